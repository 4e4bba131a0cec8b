"""A simulated NVMe controller behind the same seams as the real one.

Registers live in an :class:`~nvmevfio.mmio.ArrayMmio` (every write logged);
DMA goes through :class:`SimDma`, which plays the IOMMU: the controller can only
reach IOVAs the ledger mapped, and an access outside them is a recorded fault.
Commands run synchronously when their SQ tail doorbell is written. Faults can be
injected: a controller that never becomes ready, CSTS.CFS on enable or at any
moment, an error status for the next command of an opcode, completions that never
arrive (all, or the next N: held until an honoured Abort or a reset), Abort honoured
or not (QEMU never honours it), and surprise removal (every register reads all ones).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import numpy as np

from nvmevfio.dma import HUGE_PAGE
from nvmevfio.mmio import ArrayMmio
from nvmevfio.noiommu_pool import PhysicalPool
from nvmevfio.nvme import regs, sgl
from nvmevfio.nvme.regs import CAP_, CC_, CSTS_
from nvmevfio.nvme.spec import CQE, SQE, AdminOpcode, IoOpcode


class SimFault(Exception):
    """The simulated device touched an IOVA nobody mapped (an IOMMU fault on real hardware)."""


class SimDma:
    """The simulator's IOMMU: IOVA -> host memory, as mapped by the ledger."""

    def __init__(self) -> None:
        self.maps: dict[int, tuple[int, int, bool]] = {}
        self.faults: list[tuple[int, int]] = []
        self.map_calls = 0
        self.unmap_calls = 0

    def map_dma(self, vaddr: int, iova: int, size: int, device_writable: bool = True) -> None:
        for base, (_, sz, _) in self.maps.items():
            if iova < base + sz and base < iova + size:
                raise SimFault(f"IOVA {iova:#x}+{size:#x} overlaps a mapping at {base:#x}")
        self.maps[iova] = (vaddr, size, device_writable)
        self.map_calls += 1

    def unmap_dma(self, iova: int, size: int) -> None:
        if self.maps.get(iova, (0, -1, False))[1] != size:
            raise SimFault(f"unmap of {iova:#x}+{size:#x} does not match a mapping")
        del self.maps[iova]
        self.unmap_calls += 1

    def physical_pool(self, physical: list[int]) -> PhysicalPool:
        """A stand-in for the no-IOMMU lane's pinned pool: host memory whose 2 MiB chunks the
        simulated device sees at the made-up "physical" addresses ``physical``, and nothing else
        (the ledger maps nothing in that lane, so a caller's own pages stay invisible)."""
        array = np.zeros(len(physical) * HUGE_PAGE, dtype=np.uint8)
        pool = PhysicalPool(array, physical)
        for pa, offset, length in pool.runs:
            self.map_dma(int(array.ctypes.data) + offset, pa, length)
        return pool

    def view(self, iova: int, length: int, write: bool = False) -> np.ndarray:
        for base, (vaddr, size, writable) in self.maps.items():
            if base <= iova and iova + length <= base + size:
                if write and not writable:
                    break
                buf = (ctypes.c_uint8 * length).from_address(vaddr + iova - base)
                return np.ctypeslib.as_array(buf)
        self.faults.append((iova, length))
        raise SimFault(f"device access to unmapped IOVA {iova:#x}+{length:#x}")


@dataclass
class SimNamespace:
    blocks: int
    block_size: int = 512
    metadata: int = 0
    data: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.data = np.zeros(self.blocks * self.block_size, dtype=np.uint8)


@dataclass
class _Queue:
    base: int
    depth: int
    cqid: int = 0  # SQ: its CQ
    head: int = 0
    tail: int = 0
    phase: int = 1  # CQ only
    full_waits: list[np.ndarray] = field(default_factory=list)  # CQ only: entries held while it was full


class SimController:
    BAR_SIZE = 0x4000

    def __init__(self, namespaces: list[SimNamespace] | None = None, *, mqes: int = 1023, mdts: int = 5,
                 to: int = 2, dstrd: int = 0, max_queues: int = 8, oncs: int = 0x0C,
                 sgls: int = sgl.SGLS_BIT_BUCKET | 1, nssrs: bool = False) -> None:
        self.dma = SimDma()
        self.mmio = ArrayMmio(self.BAR_SIZE, on_write=self._on_write)
        self.namespaces = namespaces if namespaces is not None else [SimNamespace(2048)]
        self.mdts = mdts
        self.max_queues = max_queues
        self.oncs = oncs
        self.subsystem_resets = 0
        self.sgls = sgls  # Identify Controller SGLS: SGLs with any alignment and Bit Buckets, as QEMU's
        cap = regs.pack({CAP_.MQES: mqes, CAP_.CQR: 1, CAP_.TO: to, CAP_.DSTRD: dstrd, CAP_.CSS: 1, CAP_.NSSRS: nssrs,
                         CAP_.MPSMIN: 0, CAP_.MPSMAX: 4})
        self.mmio.regs[0:8].view(np.uint64)[0] = cap
        self.mmio.poke32(regs.VS, 0x00010400)
        self.sqs: dict[int, _Queue] = {}
        self.cqs: dict[int, _Queue] = {}
        self.dstrd = dstrd
        # fault injection
        self.never_ready = False
        self.fatal_on_enable = False
        self.swallow_completions = False
        self.drop_next = 0  # hold back the completions of the next N commands
        self.held: list[tuple[_Queue, int, int]] = []  # (sq, qid, cid) whose completion was held back
        self.honour_abort = False  # Abort (08h): complete the held command with Command Abort Requested
        self.removed = False
        self.corrupt_read_lba: int | None = None  # READs return this LBA with one payload bit flipped
        self.resets = 0
        self.fail_next: dict[int, tuple[int, int]] = {}  # opcode -> (sct, sc), I/O and admin alike
        self.commands: list[tuple[int, int, int]] = []  # (qid, opcode, nsid) executed
        self.last_sqe: dict[int, np.ndarray] = {}  # opcode -> the last entry executed with it
        # Asynchronous events (5.2): AERs held until an event; events queued while none is
        # outstanding; an event type stays masked until its log page is read with RAE=0.
        self.aerl = 3  # 0's based
        self.aers: list[tuple[_Queue, int]] = []  # (admin SQ, cid) outstanding
        self.pending_events: list[int] = []  # DW0s waiting for an AER
        self.masked_types: set[int] = set()
        self.aec = 0  # Asynchronous Event Configuration (Set Features 0Bh)
        self.temperature = 300  # Kelvin, as the SMART log reports it
        self.over_temp_threshold = 343
        self.changed_nsids: list[int] = []  # the Changed Namespace List log (04h)
        self.detached: set[int] = set()  # namespace ids detached from this controller
        self.cq_full_holds = 0  # completions held because their CQ was full (the host's head doorbell late)

    # ------------------------------------------------------------------ registers
    def _reg(self, off: int) -> int:
        return self.mmio.read32(off)

    def raise_cfs(self) -> None:
        """CSTS.CFS=1, as a controller that hit a fatal error (cleared by CC.EN=0)."""
        self.mmio.poke32(regs.CSTS, regs.put(self._reg(regs.CSTS), CSTS_.CFS, 1))

    def remove(self) -> None:
        """Surprise removal: every register reads all ones and writes go nowhere."""
        self.removed = True
        self.mmio.regs[:] = 0xFF

    def _on_write(self, off: int, width: int, value: int) -> None:
        if self.removed:
            return
        if off >= regs.DOORBELL_BASE:
            self._doorbell(off, value)
            return
        if width == 8:
            self.mmio.regs[off : off + 8].view(np.uint64)[0] = value
            return
        if off == regs.CC:
            self._cc(value)
        elif off == regs.NSSR and value == 0x4E564D65 and regs.get(int(self.mmio.regs[0:8].view(np.uint64)[0]),
                                                                   CAP_.NSSRS):
            # NVM Subsystem Reset (3.7.1): the controller resets as on CC.EN=0, CC cleared, CSTS.NSSRO set
            self.subsystem_resets += 1
            self._cc(0)
            self.mmio.poke32(regs.CSTS, regs.put(self._reg(regs.CSTS), CSTS_.NSSRO, 1))
        elif off in (regs.INTMS, regs.INTMC):
            pass
        elif off in (regs.AQA, regs.ASQ, regs.ASQ + 4, regs.ACQ, regs.ACQ + 4):
            self.mmio.poke32(off, value)

    def _cc(self, value: int) -> None:
        old = self._reg(regs.CC)
        self.mmio.poke32(regs.CC, value)
        csts = self._reg(regs.CSTS)
        if regs.get(value, CC_.EN) and not regs.get(old, CC_.EN):
            if self.fatal_on_enable:
                csts = regs.put(csts, CSTS_.CFS, 1)
            elif not self.never_ready:
                aqa = self._reg(regs.AQA)
                asq = self._reg(regs.ASQ) | self._reg(regs.ASQ + 4) << 32
                acq = self._reg(regs.ACQ) | self._reg(regs.ACQ + 4) << 32
                self.sqs = {0: _Queue(asq, regs.get(aqa, regs.AQA_.ASQS) + 1, 0)}
                self.cqs = {0: _Queue(acq, regs.get(aqa, regs.AQA_.ACQS) + 1)}
                csts = regs.put(csts, CSTS_.RDY, 1)
        elif not regs.get(value, CC_.EN) and regs.get(old, CC_.EN):
            self.sqs, self.cqs, self.held, self.aers, self.masked_types = {}, {}, [], [], set()
            self.resets += 1
            csts = regs.put(regs.put(regs.put(csts, CSTS_.RDY, 0), CSTS_.SHST, 0), CSTS_.CFS, 0)
        if regs.get(value, CC_.SHN) and not regs.get(old, CC_.SHN):
            csts = regs.put(csts, CSTS_.SHST, regs.SHST_COMPLETE)
        self.mmio.poke32(regs.CSTS, csts)

    def _doorbell(self, off: int, value: int) -> None:
        index = (off - regs.DOORBELL_BASE) // (4 << self.dstrd)
        qid, is_cq = divmod(index, 2)
        if is_cq:
            cq = self.cqs.get(qid)
            if cq is not None:
                cq.head = value
                while cq.full_waits and not self._cq_full(cq):  # the room given back: post what waited
                    self._post(cq, cq.full_waits.pop(0))
            return
        sq = self.sqs.get(qid)
        if sq is None:
            return
        sq.tail = value
        ring = self.dma.view(sq.base, sq.depth * 64).view(SQE)
        while sq.head != sq.tail:
            e = ring[sq.head].copy()
            sq.head = (sq.head + 1) % sq.depth
            self._execute(qid, sq, e)

    # ------------------------------------------------------------------ commands
    def _complete(self, sq: _Queue, sqid: int, cid: int, sct: int = 0, sc: int = 0, dw0: int = 0) -> None:
        if self.swallow_completions:
            return
        if self.drop_next and sqid:
            self.drop_next -= 1
            self.held.append((sq, sqid, cid))
            return
        cq = self.cqs[sq.cqid]
        entry = np.zeros(1, dtype=CQE)
        entry["dw0"] = dw0
        entry["sqhd"] = sq.head
        entry["sqid"] = sqid
        entry["cid"] = cid
        entry["status"] = (sct << 9) | (sc << 1)
        if cq.full_waits or self._cq_full(cq):
            # A controller posts no entry into a full CQ (one slot always empty, 3.3.1.5): it
            # waits for the host's CQ head doorbell. A host that waits for this completion
            # before ringing it hangs, as on a real controller.
            self.cq_full_holds += 1
            cq.full_waits.append(entry)
            return
        self._post(cq, entry)

    @staticmethod
    def _cq_full(cq: _Queue) -> bool:
        return (cq.tail + 1) % cq.depth == cq.head

    def _post(self, cq: _Queue, entry: np.ndarray) -> None:
        ring = self.dma.view(cq.base, cq.depth * 16, write=True).view(CQE)
        entry["status"] |= cq.phase
        ring[cq.tail] = entry[0]
        cq.tail = (cq.tail + 1) % cq.depth
        if cq.tail == 0:
            cq.phase ^= 1

    def _page_size(self) -> int:
        return 1 << (12 + regs.get(self._reg(regs.CC), CC_.MPS))

    def _segments(self, prp1: int, prp2: int, length: int) -> list[tuple[int, int]]:
        """Walk PRP1/PRP2/PRP lists like a controller does."""
        ps = self._page_size()
        first = min(length, ps - prp1 % ps)
        segs = [(prp1, first)]
        left = length - first
        if left == 0:
            return segs
        if left <= ps:
            return [*segs, (prp2, left)]
        per = ps // 8
        lst = prp2
        while left > 0:
            entries = self.dma.view(lst, per * 8).view(np.uint64)
            for i in range(per):
                if i == per - 1 and left > ps:
                    lst = int(entries[i])
                    break
                take = min(ps, left)
                segs.append((int(entries[i]), take))
                left -= take
                if left == 0:
                    break
        return segs

    def _sgl_segments(self, e: np.ndarray, length: int) -> list[tuple[int | None, int]]:
        """Walk SGL1 and its segments (4.1.2) like a controller does: Data Block descriptors as
        (address, length), Bit Bucket ones as (None, length), up to ``length`` bytes."""
        out: list[tuple[int | None, int]] = []
        pending = [(int(e["prp1"]), int(e["prp2"]))]
        while pending and sum(n for _, n in out) < length:
            addr, word = pending.pop(0)
            kind, n = word >> 60, word & 0xFFFFFFFF
            if kind == sgl.DescriptorType.DATA_BLOCK:
                out.append((addr, n))
            elif kind == sgl.DescriptorType.BIT_BUCKET:
                out.append((None, n))
            elif kind in (sgl.DescriptorType.SEGMENT, sgl.DescriptorType.LAST_SEGMENT):
                words = self.dma.view(addr, n).view(np.uint64).reshape(-1, 2)
                pending = [(int(a), int(w)) for a, w in words]
            else:
                raise ValueError(f"SGL descriptor type {kind:#x}")
        return out

    def _data(self, e: np.ndarray, length: int) -> list[tuple[int | None, int]]:
        """The data pointer's pieces: PRPs, or SGLs when CDW0.PSDT is 01b."""
        if int(e["flags"]) & sgl.PSDT_MASK == sgl.PSDT_SGL:
            return self._sgl_segments(e, length)
        return list(self._segments(int(e["prp1"]), int(e["prp2"]), length))

    def _copy_out(self, segs: list[tuple[int | None, int]], data: np.ndarray) -> None:
        pos = 0
        for iova, n in segs:
            if iova is not None:
                self.dma.view(iova, n, write=True)[:] = data[pos : pos + n]
            pos += n

    def _dma_out(self, prp1: int, prp2: int, data: np.ndarray) -> None:
        self._copy_out(list(self._segments(prp1, prp2, len(data))), data)

    def _copy_in(self, segs: list[tuple[int | None, int]], length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.uint8)
        pos = 0
        for iova, n in segs:
            if iova is None:
                raise ValueError("a Bit Bucket descriptor in a write")
            out[pos : pos + n] = self.dma.view(iova, n)
            pos += n
        return out

    def _dma_in(self, prp1: int, prp2: int, length: int) -> np.ndarray:
        return self._copy_in(list(self._segments(prp1, prp2, length)), length)

    def _execute(self, qid: int, sq: _Queue, e: np.ndarray) -> None:
        opc, cid, nsid = int(e["opc"]), int(e["cid"]), int(e["nsid"])
        self.commands.append((qid, opc, nsid))
        self.last_sqe[opc] = e.copy()
        if opc in self.fail_next:
            sct, sc = self.fail_next.pop(opc)
            self._complete(sq, qid, cid, sct, sc)
            return
        if qid == 0 and opc == AdminOpcode.ASYNC_EVENT_REQUEST:
            if len(self.aers) > self.aerl:
                self._complete(sq, qid, cid, 1, 0x05)  # Asynchronous Event Request Limit Exceeded
                return
            self.aers.append((sq, cid))  # completes when an event comes
            self._deliver_events()
            return
        try:
            dw0, sct, sc = (self._admin if qid == 0 else self._io)(e, opc, nsid)
        except SimFault:
            dw0, sct, sc = 0, 0, 0x04  # Data Transfer Error
        self._complete(sq, qid, cid, sct, sc, dw0)

    # ------------------------------------------------------------------ asynchronous events
    def raise_event(self, type_: int, info: int, lid: int) -> None:
        """An asynchronous event: completes an outstanding AER, or waits for one."""
        self.pending_events.append(type_ | info << 8 | lid << 16)
        self._deliver_events()

    def _deliver_events(self) -> None:
        while self.aers and self.pending_events:
            i = next((k for k, dw0 in enumerate(self.pending_events) if dw0 & 7 not in self.masked_types), None)
            if i is None:
                return
            dw0 = self.pending_events.pop(i)
            self.masked_types.add(dw0 & 7)
            sq, cid = self.aers.pop(0)
            self._complete(sq, 0, cid, 0, 0, dw0)

    def change_namespace(self, nsid: int, *, attached: bool) -> None:
        """Attach or detach namespace ``nsid`` behind the host's back, with its notice event."""
        (self.detached.discard if attached else self.detached.add)(nsid)
        self.changed_nsids.append(nsid)
        if self.aec & (1 << 8):
            self.raise_event(2, 0x00, 0x04)

    def identify_controller(self) -> np.ndarray:
        d = np.zeros(4096, dtype=np.uint8)
        d[0:2].view("<u2")[0] = 0x1B36
        d[2:4].view("<u2")[0] = 0x1AF4
        d[4:24] = np.frombuffer(b"SIM0001".ljust(20), np.uint8)
        d[24:64] = np.frombuffer(b"nvmevfio simulated controller".ljust(40), np.uint8)
        d[64:72] = np.frombuffer(b"1.0".ljust(8), np.uint8)
        d[77] = self.mdts
        d[92:96].view("<u4")[0] = 1 << 8  # OAES: Namespace Attribute Notices
        d[259] = self.aerl
        d[80:84].view("<u4")[0] = 0x10400
        d[512], d[513] = 0x66, 0x44
        d[516:520].view("<u4")[0] = len(self.namespaces)
        d[520:522].view("<u2")[0] = self.oncs
        d[525] = 1
        d[536:540].view("<u4")[0] = self.sgls
        return d

    def _admin(self, e: np.ndarray, opc: int, nsid: int) -> tuple[int, int, int]:
        cdw10, cdw11 = int(e["cdw10"]), int(e["cdw11"])
        prp1, prp2 = int(e["prp1"]), int(e["prp2"])
        if opc == AdminOpcode.IDENTIFY:
            cns = cdw10 & 0xFF
            if cns == 1:
                self._dma_out(prp1, prp2, self.identify_controller())
            elif cns == 0:
                d = np.zeros(4096, dtype=np.uint8)
                if 1 <= nsid <= len(self.namespaces) and nsid not in self.detached:
                    ns = self.namespaces[nsid - 1]
                    d[0:8].view("<u8")[0] = ns.blocks
                    d[8:16].view("<u8")[0] = ns.blocks
                    d[16:24].view("<u8")[0] = ns.blocks
                    d[25] = 0
                    d[128:132].view("<u4")[0] = (ns.block_size.bit_length() - 1) << 16 | ns.metadata
                elif nsid != 0xFFFFFFFF and nsid not in self.detached:  # an inactive one reads zeros
                    return 0, 0, 0x0B
                self._dma_out(prp1, prp2, d)
            elif cns == 2:
                d = np.zeros(1024, dtype="<u4")
                ids = [i + 1 for i in range(len(self.namespaces))
                       if i + 1 > nsid and i + 1 not in self.detached]
                d[: len(ids)] = ids
                self._dma_out(prp1, prp2, d.view(np.uint8))
            else:
                return 0, 0, 0x02
            return 0, 0, 0
        if opc == AdminOpcode.SET_FEATURES:
            if cdw10 & 0xFF == 0x07:
                n = self.max_queues - 1
                return n | n << 16, 0, 0
            if cdw10 & 0xFF == 0x0B:
                self.aec = cdw11
            if cdw10 & 0xFF == 0x04 and not (cdw11 >> 20) & 3:  # over temperature threshold
                self.over_temp_threshold = cdw11 & 0xFFFF
                if self.temperature >= self.over_temp_threshold and self.aec & (1 << 1):
                    self.raise_event(1, 0x01, 0x02)  # SMART / Health status: Temperature Threshold
            return 0, 0, 0
        if opc == AdminOpcode.GET_FEATURES:
            return {0x07: (self.max_queues - 1) * 0x10001, 0x06: 1}.get(cdw10 & 0xFF, 0), 0, 0
        if opc == AdminOpcode.GET_LOG_PAGE:
            lid = cdw10 & 0xFF
            length = ((cdw10 >> 16) + 1) * 4
            d = np.zeros(length, dtype=np.uint8)
            if lid == 0x02:
                d[0] = 0x02 if self.temperature >= self.over_temp_threshold else 0  # critical warning: temperature
                d[1:3].view("<u2")[0] = self.temperature
                d[3] = 100
            elif lid == 0x03:
                d[0] = 1
                d[8:16] = np.frombuffer(b"1.0".ljust(8), np.uint8)
            elif lid == 0x04:
                changed = np.array(self.changed_nsids[: length // 4], dtype="<u4")
                d[: 4 * len(changed)] = changed.view(np.uint8)
                self.changed_nsids = []
            elif lid != 0x01:
                return 0, 1, 0x09
            if not cdw10 & (1 << 15):  # RAE=0: the event of this log page's type is cleared
                self.masked_types.discard({0x01: 0, 0x02: 1, 0x04: 2}.get(lid, -1))
            self._dma_out(prp1, prp2, d)
            self._deliver_events()
            return 0, 0, 0
        if opc == AdminOpcode.CREATE_IO_CQ:
            qid, depth = cdw10 & 0xFFFF, (cdw10 >> 16) + 1
            if qid in self.cqs or qid == 0 or qid > self.max_queues:
                return 0, 1, 0x01
            self.cqs[qid] = _Queue(prp1, depth)
            return 0, 0, 0
        if opc == AdminOpcode.CREATE_IO_SQ:
            qid, depth, cqid = cdw10 & 0xFFFF, (cdw10 >> 16) + 1, cdw11 >> 16
            if cqid not in self.cqs:
                return 0, 1, 0x00
            if qid in self.sqs or qid == 0:
                return 0, 1, 0x01
            self.sqs[qid] = _Queue(prp1, depth, cqid)
            return 0, 0, 0
        if opc == AdminOpcode.ABORT:
            sqid, cid = cdw10 & 0xFFFF, cdw10 >> 16
            hit = [h for h in self.held if h[1] == sqid and h[2] == cid]
            if not (self.honour_abort and hit):
                return 1, 0, 0  # DW0 bit 0 set: not aborted
            self.held.remove(hit[0])
            self._complete(hit[0][0], sqid, cid, 0, 0x07)  # Command Abort Requested
            return 0, 0, 0
        if opc == AdminOpcode.DOORBELL_BUFFER_CONFIG:
            return 0, 0, 0x01  # not offered (OACS bit 8 clear): Invalid Command Opcode
        if opc == AdminOpcode.DELETE_IO_SQ:
            self.sqs.pop(cdw10 & 0xFFFF, None)
            return 0, 0, 0
        if opc == AdminOpcode.DELETE_IO_CQ:
            self.cqs.pop(cdw10 & 0xFFFF, None)
            return 0, 0, 0
        return 0, 0, 0x01

    def _io(self, e: np.ndarray, opc: int, nsid: int) -> tuple[int, int, int]:
        if not 1 <= nsid <= len(self.namespaces):
            return 0, 0, 0x0B
        ns = self.namespaces[nsid - 1]
        slba = int(e["cdw10"]) | int(e["cdw11"]) << 32
        nlb = (int(e["cdw12"]) & 0xFFFF) + 1
        if opc == IoOpcode.FLUSH:
            return 0, 0, 0
        if opc == IoOpcode.DATASET_MANAGEMENT:
            nr = (int(e["cdw10"]) & 0xFF) + 1
            rng = self._dma_in(int(e["prp1"]), int(e["prp2"]), nr * 16).view(
                [("cattr", "<u4"), ("nlb", "<u4"), ("slba", "<u8")])
            for r in rng:
                lo = int(r["slba"]) * ns.block_size
                ns.data[lo : lo + int(r["nlb"]) * ns.block_size] = 0
            return 0, 0, 0
        if slba + nlb > ns.blocks:
            return 0, 0, 0x80
        lo, hi = slba * ns.block_size, (slba + nlb) * ns.block_size
        if opc == IoOpcode.WRITE_ZEROES:
            ns.data[lo:hi] = 0
        elif opc == IoOpcode.VERIFY:
            pass  # nothing is transferred; the blocks are readable
        elif opc == IoOpcode.COMPARE:
            if not np.array_equal(self._dma_in(int(e["prp1"]), int(e["prp2"]), hi - lo), ns.data[lo:hi]):
                return 0, 2, 0x85  # Compare Failure
        elif opc == IoOpcode.READ:
            out = ns.data[lo:hi]
            bad = self.corrupt_read_lba
            if bad is not None and slba <= bad < slba + nlb:
                out = out.copy()
                out[(bad - slba) * ns.block_size + ns.block_size // 2] ^= 1
            self._copy_out(self._data(e, hi - lo), out)
        elif opc == IoOpcode.WRITE:
            ns.data[lo:hi] = self._copy_in(self._data(e, hi - lo), hi - lo)
        else:
            return 0, 0, 0x01
        return 0, 0, 0
