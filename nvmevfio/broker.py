"""The broker: owns the controller, the DMA ledger and every queue.

It authors every address the device sees (queue bases, PRP entries, PRP-list
pages, doorbell values, CC bits) from its own ledger, and validates every
request before anything touches the device: a refused request raises
:class:`~nvmevfio.errors.Refused` with a reason label and writes no register,
posts no entry and rings no doorbell.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from nvmevfio.dma import DmaBuffer, DmaLedger, align_up
from nvmevfio.errors import CommandError, CommandTimeout, ControllerFatal, Refused
from nvmevfio.mmio import Mmio
from nvmevfio.nvme import prp, regs, spec
from nvmevfio.nvme.controller import Controller, Registers, State
from nvmevfio.nvme.queue import COMPLETION, SCALAR_BATCH, CommandTable, CompletionQueue, SubmissionQueue
from nvmevfio.nvme.spec import CQE, SQE, AdminOpcode, Cns, IoOpcode

ADMIN_DEPTH = 32
DEFAULT_IO_DEPTH = 128
# Per-command transfer cap, also when MDTS=0 ("no limit"). Linux caps at 4 MiB too
# (NVME_MAX_KB_SZ); QEMU's model fails larger transfers whose pages are not
# physically contiguous (its scatter list is bounded by IOV_MAX = 1024 pages).
UNLIMITED_MDTS_CAP = 4 << 20
DEFAULT_STAGING = 8 << 20
COMMAND_TIMEOUT_S = 30.0
MAX_NLB = 1 << 16  # NLB is a 16-bit 0's based field
DSM_MAX_RANGES = 256
ONCS_WRITE_ZEROES = 1 << 3
ONCS_DSM = 1 << 2


def _int_array(x: Any, what: str) -> np.ndarray:
    """LBAs, counts or offsets as int64; integral floats (np.ones) are fine, fractions are refused."""
    a = np.asarray(x)
    if a.dtype.kind in "iu":
        return a.astype(np.int64, copy=False).reshape(-1)
    if a.dtype.kind != "f" or not np.isfinite(a).all() or (a != np.floor(a)).any():
        raise Refused("invalid-argument", f"{what} must be whole numbers, got {a.tolist()!r:.80}", what=what)
    return a.astype(np.int64).reshape(-1)


def _ints(x: Any, what: str) -> list[int]:
    """The same, as Python ints, without numpy for plain lists of ints."""
    if isinstance(x, (list, tuple)) and all(type(v) is int for v in x):
        return list(x)
    return _int_array(x, what).tolist()


class IrqWaiter(Protocol):
    """MSI-X: block until ``vector`` fires or ``timeout_s`` passes."""

    def vectors(self, count: int) -> None: ...
    def wait(self, vector: int, timeout_s: float) -> bool: ...
    def close(self) -> None: ...


@dataclass
class Namespace:
    nsid: int
    size_blocks: int  # NSZE
    capacity_blocks: int  # NCAP
    used_blocks: int  # NUSE
    block_size: int
    metadata_size: int
    lba_format: int
    identify: dict[str, Any] = field(repr=False)

    @property
    def size_bytes(self) -> int:
        return self.size_blocks * self.block_size


class QueuePair:
    """An I/O (or admin) SQ/CQ pair with its command ids, PRP-list pages and in-flight table."""

    def __init__(self, qid: int, sq: SubmissionQueue, cq: CompletionQueue, buffers: list[DmaBuffer],
                 prp_base: int, prp_pages_per_cmd: int, prp_array: np.ndarray | None, page_size: int) -> None:
        self.qid = qid
        self.sq = sq
        self.cq = cq
        self.buffers = buffers
        self.prp_base = prp_base
        self.prp_pages = prp_pages_per_cmd
        self.prp_array = prp_array  # uint64 view of the PRP-list memory
        self.page_size = page_size
        self.table = CommandTable(sq.depth - 1)  # one SQ slot always stays empty

    @property
    def in_flight(self) -> int:
        return self.table.in_flight

    @property
    def capacity(self) -> int:
        return min(self.table.free, self.sq.free)

    def prp_list_iovas(self, cid: int) -> list[int]:
        base = self.prp_base + cid * self.prp_pages * self.page_size
        return [base + k * self.page_size for k in range(self.prp_pages)]

    def author_prps(self, cid: int, iova: int, length: int) -> tuple[int, int]:
        """PRP1 and PRP2 for command ``cid``, writing its PRP-list pages (in this queue's list
        area) when the transfer needs them."""
        p = prp.build(iova, length, self.page_size, self.prp_list_iovas(cid))
        if p.lists:
            if self.prp_array is None:
                raise Refused("count-out-of-range", "this queue has no PRP-list pages")
            per = self.page_size // 8
            base = cid * self.prp_pages * per
            for k, page in enumerate(p.lists):
                self.prp_array[base + k * per : base + k * per + len(page)] = page
        return p.prp1, p.prp2


class Broker:
    def __init__(self, mmio: Mmio, ledger: DmaLedger, *, irq: IrqWaiter | None = None,
                 page_size: int | None = None, staging_bytes: int = DEFAULT_STAGING,
                 command_timeout_s: float = COMMAND_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.mmio = mmio
        self.ledger = ledger
        self.irq = irq
        self.host_page_size = page_size or ledger.page_size
        self.ctrl = Controller(mmio)
        self.staging_bytes = staging_bytes
        self.command_timeout_s = command_timeout_s
        self.clock = clock
        self.admin: QueuePair | None = None
        self.io: list[QueuePair] = []
        self.page_size = 4096  # controller memory page size (CC.MPS), set at enable
        self.id_ctrl: dict[str, Any] | None = None
        self.namespaces: dict[int, Namespace] = {}
        self.max_transfer = 0
        self._staging: DmaBuffer | None = None
        self._scratch: DmaBuffer | None = None
        self.irq_mode = False
        self.commands_completed = 0

    # ============================================================ controller state
    def bind(self) -> Registers:
        return self.ctrl.bind()

    @property
    def state(self) -> State:
        return self.ctrl.state

    def registers(self) -> Registers:
        return self.ctrl.registers()

    def _require_ready(self) -> None:
        if self.ctrl.state is State.FATAL:
            raise Refused("controller-fatal", "controller is in fatal state (CSTS.CFS was set); reset it")
        if self.ctrl.state is not State.READY or self.admin is None:
            raise Refused("controller-not-enabled",
                          f"controller is {self.ctrl.state.value}: enable it first", state=self.ctrl.state.value)

    def _require_io(self) -> QueuePair:
        self._require_ready()
        if not self.io:
            raise Refused("io-queues-not-created", "no I/O queues: call create_io_queues() first")
        return self.io[0]

    def reset(self) -> None:
        """CC.EN=0 and wait CSTS.RDY=0; every queue and broker buffer is released."""
        if self.ctrl.state is State.UNBOUND:
            self.ctrl.bind()
        self.ctrl.disable()
        self._drop_queues()

    def _drop_queues(self) -> None:
        for qp in [*self.io, *([self.admin] if self.admin else [])]:
            busy = qp.table.busy_cids()
            for slot, gen, n in qp.table.buffer_counts(busy):
                self.ledger.unpin(slot, gen, n)
            for buf in qp.buffers:
                if buf.live:
                    self.ledger.free(buf)
        self.io = []
        self.admin = None
        for name in ("_staging", "_scratch"):
            buf = getattr(self, name)
            if buf is not None and buf.live:
                self.ledger.free(buf)
            setattr(self, name, None)
        if self.irq is not None and self.irq_mode:
            self.irq.close()
        self.irq_mode = False

    def _new_queue_pair(self, qid: int, depth: int, prp_pages_per_cmd: int, vector: int | None) -> QueuePair:
        sq_buf = self.ledger.alloc(depth * SQE.itemsize, owner="broker:sq")
        cq_buf = self.ledger.alloc(depth * CQE.itemsize, owner="broker:cq")
        bufs = [sq_buf, cq_buf]
        prp_array = None
        prp_base = 0
        if prp_pages_per_cmd:
            prp_buf = self.ledger.alloc((depth - 1) * prp_pages_per_cmd * self.page_size, owner="broker:prp",
                                        device_writable=False)
            bufs.append(prp_buf)
            prp_base = self.ledger.iova(prp_buf)
            prp_array = prp_buf.array.view(np.uint64)
        sq = SubmissionQueue(qid, sq_buf.array.view(SQE), self.mmio, self.ctrl.doorbell(qid, False))
        cq = CompletionQueue(qid, cq_buf.array.view(CQE), self.mmio, self.ctrl.doorbell(qid, True), vector)
        return QueuePair(qid, sq, cq, bufs, prp_base, prp_pages_per_cmd, prp_array, self.page_size)

    def enable(self, *, admin_depth: int = ADMIN_DEPTH) -> Registers:
        """Disable, author the admin queues from the ledger, pick CC, enable, wait RDY (CAP.TO)."""
        if self.ctrl.state is State.UNBOUND:
            self.ctrl.bind()
        if self.ctrl.state is State.READY:
            raise Refused("controller-already-enabled", "controller is already enabled; reset() first")
        self.ctrl.disable()
        self._drop_queues()
        admin_depth = min(admin_depth, self.ctrl.mqes, 4096)
        cc = self.ctrl.choose_cc(self.host_page_size)
        self.page_size = 1 << (12 + regs.get(cc, regs.CC_.MPS))
        self.admin = self._new_queue_pair(0, admin_depth, 1, None)
        self.ctrl.arm_admin_queues(self.ledger.iova(self.admin.buffers[0]), self.ledger.iova(self.admin.buffers[1]),
                                   admin_depth, admin_depth)
        self.ctrl.enable(cc)
        return self.ctrl.registers()

    def shutdown(self) -> None:
        """Delete I/O queues, then CC.SHN normal shutdown and wait CSTS.SHST complete."""
        self._require_ready()
        for qp in reversed(self.io):
            self._admin_sync(self._sqe(AdminOpcode.DELETE_IO_SQ, cdw10=qp.qid), "Delete I/O SQ")
            self._admin_sync(self._sqe(AdminOpcode.DELETE_IO_CQ, cdw10=qp.qid), "Delete I/O CQ")
        rtd3e = (self.id_ctrl or {}).get("rtd3e", 0)
        self.ctrl.shutdown(rtd3e)
        self._drop_queues()

    # ============================================================ command authoring
    @staticmethod
    def _sqe(opc: int, **fields: int) -> np.ndarray:
        e = np.zeros(1, dtype=SQE)
        e["opc"] = opc
        for k, v in fields.items():
            e[k] = v
        return e

    def _attach_data(self, qp: QueuePair, e: np.ndarray, cid: int, buf: DmaBuffer, offset: int,
                     length: int) -> None:
        """Author PRP1/PRP2 (and PRP-list pages) for ``length`` bytes of ``buf`` from ``offset``."""
        iova = self.ledger.iova(buf) + offset
        need = prp.list_pages_needed(iova, length, self.page_size)
        if need > qp.prp_pages:
            raise Refused("count-out-of-range",
                          f"{length} bytes need {need} PRP-list pages; this queue has {qp.prp_pages} per command",
                          length=length)
        e["prp1"], e["prp2"] = qp.author_prps(cid, iova, length)

    def _post(self, qp: QueuePair, entries: np.ndarray, cids: np.ndarray, buf: DmaBuffer | None) -> np.ndarray:
        """Post entries (cids assigned, PRPs authored) and record them in flight. No doorbell."""
        qp.sq.post(entries)
        if buf is not None:
            self.ledger.pin(buf, len(cids))
        return qp.table.record(cids, int(entries["opc"][0]), buf.slot if buf is not None else -1,
                               buf.generation if buf is not None else 0, self.clock())

    @staticmethod
    def _require_room(qp: QueuePair, n: int) -> None:
        if n > qp.capacity:
            raise Refused("queue-full", f"queue {qp.qid} has room for {qp.capacity} more commands, {n} asked",
                          qid=qp.qid, free=qp.capacity, wanted=n)

    def _take_cids(self, qp: QueuePair, n: int) -> np.ndarray:
        self._require_room(qp, n)
        return qp.table.take(n)

    # ============================================================ completions
    def _wait_pending(self, qp: QueuePair, deadline: float) -> None:
        """Wait until the CQ has a new entry (MSI-X eventfd or polling), bounded by ``deadline``."""
        cq = qp.cq
        irq, vector = self.irq, cq.vector
        use_irq = self.irq_mode and vector is not None and irq is not None
        spins = 0
        while not cq.pending():
            if use_irq and irq is not None and vector is not None:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    self._timeout(qp)
                # The eventfd counts interrupts raised since the last wait, so a
                # completion that landed between pending() and here is not lost.
                irq.wait(vector, min(remaining, 0.5))
                continue
            spins += 1
            if spins & 0xFF == 0 and self.clock() > deadline:
                self._timeout(qp)

    def _timeout(self, qp: QueuePair) -> None:
        self.ctrl.check_fatal()
        busy = qp.table.busy_cids()
        oldest = int(busy[np.argmin(qp.table.submitted[busy])]) if len(busy) else None
        what = f" (oldest: opcode {int(qp.table.opcode[oldest]):#04x}, cid {oldest})" if oldest is not None else ""
        raise CommandTimeout(
            f"queue {qp.qid}: no completion within {self.command_timeout_s:.0f} s for "
            f"{len(busy)} command(s){what}; CSTS={self.ctrl.csts():#010x}", qid=qp.qid, in_flight=len(busy))

    def _reap(self, qp: QueuePair, minimum: int, timeout_s: float | None) -> np.ndarray:
        """Reap at least ``minimum`` completions (all that are ready), one CQ head doorbell per batch.

        Returns a structured array of ``nvme.queue.COMPLETION``: tag, cid, opcode, result,
        status (without the phase tag), latency_s."""
        parts = []
        got = 0
        deadline = self.clock() + (self.command_timeout_s if timeout_s is None else timeout_s)
        while True:
            cqes = qp.cq.reap()
            if len(cqes):
                qp.cq.ring_head()
                qp.sq.update_head(int(cqes["sqhd"][-1]))
                try:
                    done, counts = qp.table.retire(cqes, self.clock())
                except ValueError as exc:
                    raise ControllerFatal(f"queue {qp.qid}: {exc}", qid=qp.qid) from exc
                for slot, gen, n in counts:
                    self.ledger.unpin(slot, gen, n)
                parts.append(done)
                got += len(done)
                self.commands_completed += len(done)
            if got >= minimum or not qp.in_flight:
                if len(parts) == 1:
                    return parts[0]
                return np.concatenate(parts) if parts else np.empty(0, dtype=COMPLETION)
            self._wait_pending(qp, deadline)

    def _raise_for(self, c: np.void, name: str, **context: Any) -> None:
        _, sc, sct, _, more, dnr = spec.split_status(int(c["status"]) << 1)
        raise CommandError(name, sct, sc, bool(dnr), sct_name=spec.sct_name(sct),
                           sc_name=spec.status_name(sct, sc), more=bool(more), **context)

    def _admin_sync(self, e: np.ndarray, name: str, buf: DmaBuffer | None = None, length: int = 0) -> int:
        qp = self.admin
        if qp is None:
            raise Refused("controller-not-enabled", "controller is not enabled")
        tag = self._submit_one(qp, e, buf, length)
        for c in self._reap(qp, 1, None):
            if c["tag"] == tag:
                if c["status"]:
                    self._raise_for(c, name)
                return int(c["result"])
        raise ControllerFatal(f"admin command {name} was not completed")  # pragma: no cover

    # ============================================================ admin verbs
    def _scratch_buf(self) -> DmaBuffer:
        if self._scratch is None or not self._scratch.live:
            self._scratch = self.ledger.alloc(4096, owner="broker:scratch")
        return self._scratch

    def _admin_read(self, e: np.ndarray, name: str, length: int) -> bytes:
        buf = self._scratch_buf()
        if length > buf.size:
            self.ledger.free(buf)
            self._scratch = buf = self.ledger.alloc(align_up(length, 4096), owner="broker:scratch")
        arr = buf.array
        arr[:length] = 0
        self._admin_sync(e, name, buf, length)
        return bytes(arr[:length])

    def identify_controller(self) -> dict[str, Any]:
        self._require_ready()
        raw = self._admin_read(self._sqe(AdminOpcode.IDENTIFY, cdw10=Cns.CONTROLLER), "Identify Controller", 4096)
        self.id_ctrl = spec.parse_identify_controller(raw)
        self.id_ctrl_raw = raw
        mdts = self.id_ctrl["mdts"]
        mpsmin = 1 << (12 + regs.get(self.ctrl.cap, regs.CAP_.MPSMIN))
        self.max_transfer = UNLIMITED_MDTS_CAP if mdts == 0 else min((1 << mdts) * mpsmin, UNLIMITED_MDTS_CAP)
        return self.id_ctrl

    def active_namespaces(self) -> list[int]:
        self._require_ready()
        raw = self._admin_read(self._sqe(AdminOpcode.IDENTIFY, nsid=0, cdw10=Cns.ACTIVE_NAMESPACE_LIST),
                               "Identify Active Namespace List", 4096)
        return spec.parse_active_namespaces(raw)

    def identify_namespace(self, nsid: int) -> Namespace:
        self._require_ready()
        if not 1 <= nsid <= 0xFFFFFFFE:
            raise Refused("namespace-inactive", f"namespace id {nsid} is not valid", nsid=nsid)
        raw = self._admin_read(self._sqe(AdminOpcode.IDENTIFY, nsid=nsid, cdw10=Cns.NAMESPACE),
                               "Identify Namespace", 4096)
        ident = spec.parse_identify_namespace(raw)
        if ident["nsze"] == 0:
            self.namespaces.pop(nsid, None)
            raise Refused("namespace-inactive", f"namespace {nsid} is not active (NSZE=0)", nsid=nsid)
        idx = spec.flbas_index(ident["flbas"], ident["nlbaf"])
        lbaf = ident["lbafs"][idx]
        ns = Namespace(nsid, ident["nsze"], ident["ncap"], ident["nuse"], 1 << lbaf["ds"], lbaf["ms"], idx, ident)
        self.namespaces[nsid] = ns
        return ns

    def get_log_page(self, lid: int, length: int, *, nsid: int = 0xFFFFFFFF, offset: int = 0) -> bytes:
        self._require_ready()
        if length <= 0 or length % 4 or length > 1 << 20:
            raise Refused("length-mismatch", f"log page length {length} must be a positive multiple of 4 up to 1 MiB",
                          length=length)
        numd = length // 4 - 1  # 0's based dword count
        e = self._sqe(AdminOpcode.GET_LOG_PAGE, nsid=nsid, cdw10=lid | ((numd & 0xFFFF) << 16),
                      cdw11=numd >> 16, cdw12=offset & 0xFFFFFFFF, cdw13=offset >> 32)
        return self._admin_read(e, f"Get Log Page {lid:#04x}", length)

    def get_features(self, fid: int, *, sel: int = 0, nsid: int = 0, cdw11: int = 0) -> int:
        self._require_ready()
        if not 0 < fid <= 0xFF or sel not in (0, 1, 2, 3):
            raise Refused("invalid-feature", f"feature id {fid:#x} / select {sel} out of range", fid=fid, sel=sel)
        return self._admin_sync(self._sqe(AdminOpcode.GET_FEATURES, nsid=nsid, cdw10=fid | (sel << 8),
                                          cdw11=cdw11), f"Get Features {fid:#04x}")

    def create_io_queues(self, count: int = 1, depth: int = DEFAULT_IO_DEPTH, *, irq: bool = False) -> int:
        """Set Features Number of Queues, then CREATE I/O CQ before SQ for each pair. Returns the depth used."""
        self._require_ready()
        if self.io:
            raise Refused("io-queues-exist", f"{len(self.io)} I/O queue pair(s) already created")
        if not 2 <= depth <= self.ctrl.mqes:
            raise Refused("count-out-of-range", f"queue depth {depth} outside 2..{self.ctrl.mqes} (CAP.MQES+1)",
                          depth=depth, mqes=self.ctrl.mqes)
        if count < 1:
            raise Refused("count-out-of-range", f"queue count {count} must be at least 1", count=count)
        if irq and self.irq is None:
            raise Refused("irq-unavailable", "MSI-X completions need a VFIO device (no interrupt source)")
        if self.id_ctrl is None:
            self.identify_controller()
        got = self._admin_sync(self._sqe(AdminOpcode.SET_FEATURES, cdw10=spec.Feature.NUMBER_OF_QUEUES,
                                         cdw11=(count - 1) | ((count - 1) << 16)), "Set Features Number of Queues")
        allowed = min((got & 0xFFFF) + 1, (got >> 16) + 1)
        if allowed < count:
            raise Refused("count-out-of-range", f"controller allows {allowed} I/O queue pairs, {count} asked",
                          allowed=allowed)
        if irq:
            assert self.irq is not None
            self.irq.vectors(count + 1)
            self.irq_mode = True
        per_cmd = prp.list_pages_needed(0, self.max_transfer, self.page_size) if self.max_transfer else 1
        for i in range(count):
            qid = i + 1
            vector = qid if irq else None
            qp = self._new_queue_pair(qid, depth, per_cmd, vector)
            cq_iova = self.ledger.iova(qp.buffers[1])
            sq_iova = self.ledger.iova(qp.buffers[0])
            cdw11 = 1 | ((1 << 1) | (qid << 16) if irq else 0)  # PC=1, IEN, IV
            try:
                self._admin_sync(self._sqe(AdminOpcode.CREATE_IO_CQ, prp1=cq_iova,
                                           cdw10=qid | ((depth - 1) << 16), cdw11=cdw11), "Create I/O CQ")
                self._admin_sync(self._sqe(AdminOpcode.CREATE_IO_SQ, prp1=sq_iova,
                                           cdw10=qid | ((depth - 1) << 16), cdw11=1 | (qid << 16)), "Create I/O SQ")
            except BaseException:
                for b in qp.buffers:
                    self.ledger.free(b)
                raise
            self.io.append(qp)
        self.refresh_namespaces()
        return depth

    # ============================================================ I/O validation
    def refresh_namespaces(self) -> dict[int, Namespace]:
        """Identify every active namespace (CNS 02h, then CNS 00h for each), so that I/O
        validation afterwards is a lookup that never touches the device."""
        self.namespaces = {}
        for nsid in self.active_namespaces():
            self.identify_namespace(nsid)
        return self.namespaces

    def namespace(self, nsid: int) -> Namespace:
        """The identified namespace ``nsid``; a pure lookup (refresh_namespaces() fills the table)."""
        self._require_ready()
        ns = self.namespaces.get(nsid)
        if ns is None:
            raise Refused("namespace-inactive",
                          f"namespace {nsid} is not active on this controller (active: "
                          f"{sorted(self.namespaces) or 'none'})", nsid=nsid, active=sorted(self.namespaces))
        if ns.metadata_size:
            raise Refused("unsupported-lba-format",
                          f"namespace {nsid} uses LBA format {ns.lba_format} with {ns.metadata_size} bytes of "
                          "metadata per block; only formats without metadata are supported", nsid=nsid)
        return ns

    def check_window(self, ns: Namespace, slba: int, count: int) -> None:
        if count <= 0:
            raise Refused("count-out-of-range", f"block count {count} must be positive", count=count)
        if slba < 0 or slba + count > ns.size_blocks:
            raise Refused("window-past-namespace-end",
                          f"blocks {slba}..{slba + count - 1} are outside namespace {ns.nsid} "
                          f"(0..{ns.size_blocks - 1})", slba=slba, count=count, nsze=ns.size_blocks)

    @property
    def max_pages(self) -> int:
        """Memory pages one command may touch: MDTS counts bytes, but a transfer at an
        in-page offset touches one page more; devices bound their scatter lists by
        pages (QEMU fails at 1025), so the page count is the limit that holds."""
        return max(1, self.max_transfer // self.page_size)

    def max_blocks(self, ns: Namespace, in_page_offset: int = 0) -> int:
        """Blocks per command for data starting at ``in_page_offset`` within a page."""
        limit = self.max_transfer - (self.page_size if in_page_offset % self.page_size else 0)
        return max(1, min(limit // ns.block_size, MAX_NLB))

    # ============================================================ I/O: batched submit / reap
    def _check_rw(self, ns: Namespace, base: int, size: int, slba: int, count: int,
                  offset: int) -> tuple[int, int, int]:
        """Every rule for one READ/WRITE, on Python ints: returns (iova, length, pages)."""
        limit = self.max_blocks(ns)
        if count < 1 or count > limit:
            raise Refused("count-out-of-range", f"block count {count}: must be 1..{limit} per command (MDTS)",
                          count=count, limit=limit)
        if slba < 0 or slba + count > ns.size_blocks:
            self.check_window(ns, slba, count)
        length = count * ns.block_size
        if offset < 0 or offset & 3 or offset + length > size:
            raise Refused("length-mismatch", f"{length} bytes at offset {offset} fall outside the {size}-byte "
                          "buffer or are not dword aligned", offset=offset, length=length, size=size)
        ps = self.page_size
        iova = base + offset
        pages = (iova % ps + length + ps - 1) // ps  # from the start of PRP1's page to the last byte
        if pages > self.max_pages:
            raise Refused("count-out-of-range", f"a command would touch {pages} memory pages, more than "
                          f"{self.max_pages} (MDTS); at an in-page offset it carries at most "
                          f"{self.max_blocks(ns, 4)} blocks", max_pages=self.max_pages)
        return iova, length, pages

    def submit_rw(self, opcode: int, nsid: int, slbas: Any, counts: Any, buf: DmaBuffer, offsets: Any, *,
                  qid: int = 1, doorbell: bool = True) -> np.ndarray:
        """Post a batch of READ or WRITE commands into ``buf`` at ``offsets`` and ring the SQ tail
        doorbell once. Returns their tags.

        Every command is validated (window, MDTS, buffer bounds, handle) before any is posted; a
        refusal names the first command that breaks a rule. Small batches are authored entry by
        entry (cheaper than numpy's per-call overhead), larger ones vectorized.
        """
        qp = self._queue(qid)
        ns = self.namespace(nsid)
        if opcode not in (IoOpcode.READ, IoOpcode.WRITE):
            raise Refused("unsupported-command", f"opcode {opcode:#x} is not READ or WRITE", opcode=opcode)
        base = self.ledger.iova(buf)  # stale-handle check before anything else
        slbas, counts, offsets = (x if isinstance(x, (list, tuple)) else np.atleast_1d(x)
                                  for x in (slbas, counts, offsets))
        n = len(slbas)
        if not (len(counts) == len(offsets) == n):
            raise Refused("length-mismatch", "slbas, counts and offsets differ in length")
        if n == 0:
            return np.empty(0, dtype=np.int64)
        if n <= SCALAR_BATCH:
            return self._submit_small(qp, ns, opcode, base, buf, _ints(slbas, "LBAs"), _ints(counts, "counts"),
                                      _ints(offsets, "offsets"), doorbell)
        slbas = _int_array(slbas, "LBAs")
        counts = _int_array(counts, "counts")
        offsets = _int_array(offsets, "offsets")
        ps = self.page_size
        lengths = counts * ns.block_size
        iovas = base + offsets
        pages = (iovas % ps + lengths + ps - 1) // ps
        if (counts.min() < 1 or counts.max() > self.max_blocks(ns) or slbas.min() < 0
                or (slbas + counts).max() > ns.size_blocks or offsets.min() < 0 or (offsets & 3).any()
                or (offsets + lengths).max() > buf.size or pages.max() > self.max_pages):
            for s_, c_, o_ in zip(slbas.tolist(), counts.tolist(), offsets.tolist()):
                self._check_rw(ns, base, buf.size, s_, c_, o_)  # raises for the first bad command
        cids = self._take_cids(qp, n)
        try:
            entries = self._author_rw(qp, opcode, ns.nsid, slbas, counts, cids, iovas, lengths, pages)
        except BaseException:
            qp.table.give_back(cids)
            raise
        tags = self._post(qp, entries, cids, buf)
        if doorbell:
            qp.sq.ring_doorbell()
        return tags

    def _submit_small(self, qp: QueuePair, ns: Namespace, opcode: int, base: int, buf: DmaBuffer,
                      slbas: list[int], counts: list[int], offsets: list[int], doorbell: bool) -> np.ndarray:
        """submit_rw for a few commands: validated, packed into the ring and recorded one by one."""
        checked = [self._check_rw(ns, base, buf.size, s_, c_, o_) for s_, c_, o_ in zip(slbas, counts, offsets)]
        n = len(checked)
        self._require_room(qp, n)
        self.ledger.pin(buf, n)
        ps = self.page_size
        now = self.clock()
        tags = []
        for slba, count, (iova, length, pages) in zip(slbas, counts, checked):
            cid = qp.table.take_one()
            if pages == 1:
                prp2 = 0
            elif pages == 2:
                prp2 = iova - iova % ps + ps
            else:
                _, prp2 = qp.author_prps(cid, iova, length)
            # SQE_STRUCT order: opc, flags, cid, nsid, cdw2, cdw3, mptr, prp1, prp2, cdw10..cdw15
            qp.sq.post_one((opcode, 0, cid, ns.nsid, 0, 0, 0, iova, prp2, slba & 0xFFFFFFFF, slba >> 32,
                            count - 1, 0, 0, 0))
            tags.append(qp.table.record_one(cid, opcode, buf.slot, buf.generation, now))
        if doorbell:
            qp.sq.ring_doorbell()
        return np.array(tags, dtype=np.int64)

    def _author_rw(self, qp: QueuePair, opcode: int, nsid: int, slbas: np.ndarray, counts: np.ndarray,
                   cids: np.ndarray, iovas: np.ndarray, lengths: np.ndarray, pages: np.ndarray) -> np.ndarray:
        """The SQEs of a READ/WRITE batch: fields vectorized, PRP lists only where needed."""
        n = len(cids)
        ps = self.page_size
        entries = np.zeros(n, dtype=SQE)
        entries["opc"] = opcode
        entries["cid"] = cids
        entries["nsid"] = nsid
        entries["cdw10"] = slbas & 0xFFFFFFFF
        entries["cdw11"] = slbas >> 32
        entries["cdw12"] = counts - 1
        entries["prp1"] = iovas
        entries["prp2"] = np.where(pages == 2, iovas - iovas % ps + ps, 0)
        listed = np.flatnonzero(pages > 2)
        if len(listed):
            per = ps // 8
            one_page = listed[pages[listed] - 1 <= per]
            if len(one_page) and qp.prp_array is not None:
                # PRP lists that fit one list page, for the whole batch at once: row k of the
                # list area holds command k's data pages after the first (4.1.1), zero beyond.
                want = pages[one_page] - 1
                col = np.arange(1, int(want.max()) + 1)
                rows = (iovas[one_page] - iovas[one_page] % ps)[:, None] + ps * col
                area = qp.prp_array.reshape(qp.table.size, qp.prp_pages * per)
                area[cids[one_page], : len(col)] = np.where(col <= want[:, None], rows, 0)
                entries["prp2"][one_page] = qp.prp_base + cids[one_page] * (qp.prp_pages * ps)
            for i in listed[pages[listed] - 1 > per].tolist():  # chained lists: one by one
                _, entries["prp2"][i] = qp.author_prps(int(cids[i]), int(iovas[i]), int(lengths[i]))
        return entries

    def _queue(self, qid: int) -> QueuePair:
        self._require_io()
        if not 1 <= qid <= len(self.io):
            raise Refused("io-queues-not-created", f"I/O queue {qid} does not exist ({len(self.io)} created)",
                          qid=qid)
        return self.io[qid - 1]

    def ring(self, qid: int = 1) -> None:
        self._queue(qid).sq.ring_doorbell()

    def reap(self, qid: int = 1, minimum: int = 1, timeout_s: float | None = None) -> np.ndarray:
        qp = self._queue(qid)
        return self._reap(qp, min(minimum, qp.in_flight), timeout_s)

    def in_flight(self, qid: int = 1) -> int:
        return self._queue(qid).in_flight

    def capacity(self, qid: int = 1) -> int:
        return self._queue(qid).capacity

    def _submit_one(self, qp: QueuePair, e: np.ndarray, buf: DmaBuffer | None = None, length: int = 0) -> int:
        """Author one command (cid, PRPs), post it and ring the SQ tail doorbell; returns its tag."""
        cids = self._take_cids(qp, 1)
        cid = int(cids[0])
        e["cid"] = cid
        if buf is not None:
            try:
                self._attach_data(qp, e, cid, buf, 0, length)
            except BaseException:
                qp.table.give_back(cids)
                raise
        [tag] = self._post(qp, e, cids, buf)
        qp.sq.ring_doorbell()
        return int(tag)

    def _sync(self, qp: QueuePair, tags: list[int], name: str, **context: Any) -> None:
        """Reap until every tag completed; raise for the first error (after reaping the whole batch)."""
        want = set(tags)
        failed = None
        while want:
            for c in self._reap(qp, 1, None):
                if int(c["tag"]) in want:
                    want.discard(int(c["tag"]))
                    if c["status"] and failed is None:
                        failed = c
        if failed is not None:
            self._raise_for(failed, name, **context)

    # ============================================================ I/O: synchronous helpers
    def transfer(self, opcode: int, nsid: int, slba: int, count: int, buf: DmaBuffer, offset: int = 0,
                 qid: int = 1) -> None:
        """READ or WRITE ``count`` blocks between ``buf[offset:]`` and the namespace, split by MDTS,
        keeping as many commands in flight as the queue allows."""
        qp = self._queue(qid)
        ns = self.namespace(nsid)
        self.check_window(ns, slba, count)
        if offset < 0 or offset + count * ns.block_size > buf.size:
            raise Refused("length-mismatch", f"{count} blocks of {ns.block_size} bytes do not fit the "
                          f"{buf.size}-byte buffer at offset {offset}", count=count, size=buf.size)
        base = self.ledger.iova(buf)  # stale-handle check
        if qp.in_flight:
            raise Refused("queue-busy", f"queue {qid} has {qp.in_flight} batched commands in flight; reap them first")
        step = self.max_blocks(ns, base + offset)
        starts = np.arange(slba, slba + count, step, dtype=np.int64)
        counts = np.minimum(step, slba + count - starts)
        offs = offset + (starts - slba) * ns.block_size
        name = "Read" if opcode == IoOpcode.READ else "Write"
        pos = 0
        outstanding = 0  # the queue was idle, so every completion on it is ours
        failed = None
        while pos < len(starts) or outstanding:
            room = qp.capacity
            if pos < len(starts) and room and failed is None:
                k = min(room, len(starts) - pos)
                outstanding += len(self.submit_rw(opcode, nsid, starts[pos : pos + k], counts[pos : pos + k], buf,
                                                  offs[pos : pos + k], qid=qid))
                pos += k
            done = self._reap(qp, 1, None)
            outstanding -= len(done)
            bad = np.flatnonzero(done["status"])
            if len(bad) and failed is None:
                failed = done[bad[0]]
        if failed is not None:
            self._raise_for(failed, name, nsid=nsid, slba=slba, count=count)

    def _staging_buf(self) -> DmaBuffer:
        if self._staging is None or not self._staging.live:
            size = max(self.staging_bytes, self.max_transfer)
            self._staging = self.ledger.alloc(size, owner="broker:staging")
        return self._staging

    def read(self, nsid: int, slba: int, count: int, qid: int = 1) -> np.ndarray:
        """Read ``count`` blocks into a new uint8 array (through the broker's staging buffer)."""
        self._queue(qid)
        ns = self.namespace(nsid)
        self.check_window(ns, slba, count)
        out = np.empty(count * ns.block_size, dtype=np.uint8)
        stage = self._staging_buf()
        per = stage.size // ns.block_size
        arr = stage.array
        for start in range(0, count, per):
            k = min(per, count - start)
            self.transfer(IoOpcode.READ, nsid, slba + start, k, stage, 0, qid)
            out[start * ns.block_size : (start + k) * ns.block_size] = arr[: k * ns.block_size]
        return out

    def write(self, nsid: int, slba: int, data: Any, qid: int = 1) -> int:
        """Write whole blocks from a bytes-like or numpy object; returns the block count."""
        self._queue(qid)
        ns = self.namespace(nsid)
        src = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8) if not isinstance(data, np.ndarray) \
            else data.reshape(-1).view(np.uint8)
        if len(src) == 0 or len(src) % ns.block_size:
            raise Refused("length-mismatch", f"{len(src)} bytes is not a positive multiple of the "
                          f"{ns.block_size}-byte block size of namespace {nsid}", length=len(src),
                          block_size=ns.block_size)
        count = len(src) // ns.block_size
        self.check_window(ns, slba, count)
        stage = self._staging_buf()
        per = stage.size // ns.block_size
        arr = stage.array
        for start in range(0, count, per):
            k = min(per, count - start)
            arr[: k * ns.block_size] = src[start * ns.block_size : (start + k) * ns.block_size]
            self.transfer(IoOpcode.WRITE, nsid, slba + start, k, stage, 0, qid)
        return count

    def flush(self, nsid: int, qid: int = 1) -> None:
        qp = self._queue(qid)
        self.namespace(nsid)
        tag = self._submit_one(qp, self._sqe(IoOpcode.FLUSH, nsid=nsid))
        self._sync(qp, [tag], "Flush", nsid=nsid)

    def _range_command(self, qid: int, nsid: int, slba: int, count: int, oncs_bit: int, what: str) -> QueuePair:
        """Checks shared by the range commands: queue, namespace, window, and ONCS support."""
        qp = self._queue(qid)
        self.check_window(self.namespace(nsid), slba, count)
        if not (self.id_ctrl or {}).get("oncs", 0) & oncs_bit:
            raise Refused("unsupported-command", f"the controller does not support {what} "
                          f"(ONCS bit {oncs_bit.bit_length() - 1})")
        return qp

    def write_zeroes(self, nsid: int, slba: int, count: int, qid: int = 1) -> None:
        qp = self._range_command(qid, nsid, slba, count, ONCS_WRITE_ZEROES, "Write Zeroes")
        for start in range(slba, slba + count, MAX_NLB):
            k = min(MAX_NLB, slba + count - start)
            tag = self._submit_one(qp, self._sqe(IoOpcode.WRITE_ZEROES, nsid=nsid, cdw10=start & 0xFFFFFFFF,
                                                 cdw11=start >> 32, cdw12=k - 1))
            self._sync(qp, [tag], "Write Zeroes", nsid=nsid, slba=start, count=k)

    def deallocate(self, nsid: int, slba: int, count: int, qid: int = 1) -> None:
        """Dataset Management with the Deallocate attribute (ranges of up to 2^32-1 blocks)."""
        qp = self._range_command(qid, nsid, slba, count, ONCS_DSM, "Dataset Management")
        per = 0xFFFFFFFF
        starts = list(range(slba, slba + count, per))
        rng = np.zeros(len(starts), dtype=[("cattr", "<u4"), ("nlb", "<u4"), ("slba", "<u8")])
        rng["slba"] = starts
        rng["nlb"] = [min(per, slba + count - s) for s in starts]
        if len(rng) > DSM_MAX_RANGES:
            raise Refused("count-out-of-range", "too many blocks for one Dataset Management command")
        buf = self._scratch_buf()
        arr = buf.array
        arr[:] = 0
        arr[: rng.nbytes] = rng.view(np.uint8)
        tag = self._submit_one(qp, self._sqe(IoOpcode.DATASET_MANAGEMENT, nsid=nsid, cdw10=len(rng) - 1,
                                             cdw11=1 << 2), buf, rng.nbytes)
        self._sync(qp, [tag], "Dataset Management (Deallocate)", nsid=nsid, slba=slba, count=count)

    def close(self) -> None:
        """Shut down if enabled (best effort), then release every broker buffer."""
        try:
            if self.ctrl.state is State.READY:
                self.shutdown()
        finally:
            self._drop_queues()
