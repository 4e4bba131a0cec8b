"""Batched I/O: READ/WRITE batches validated whole, their SQEs and PRP lists authored (packed one
by one when small, vectorized when large) and posted with one SQ doorbell; reaping; registered
buffers (slots whose PRPs are authored once); and the C perf loop over a registered buffer."""

from __future__ import annotations

from typing import Any, cast

import numpy as np

from nvmevfio.broker.common import (
    SCALAR_BATCH,
    BrokerQueue,
    Namespace,
    RegisteredBuffer,
    data_blocks,
    int_array,
    ints,
    whole,
)
from nvmevfio.broker.core import Core
from nvmevfio.broker.execute import Executor, refuse_busy, require_room, take_cancelled
from nvmevfio.broker.namespaces import Namespaces
from nvmevfio.dma import DmaBuffer
from nvmevfio.errors import CommandTimeout, DeviceGone, QueuePaused, Refused
from nvmevfio.nvme import builders, sgl
from nvmevfio.nvme.perfloop import PerfLoop
from nvmevfio.nvme.queue import PRP_SLOT
from nvmevfio.nvme.sgl import PSDT_SGL
from nvmevfio.nvme.spec import SQE, SQE_STRUCT, IoOpcode


class Submit:
    def __init__(self, core: Core, ex: Executor, ns: Namespaces) -> None:
        self.core = core
        self.ex = ex
        self.ns = ns

    # ============================================================ batched submission
    def submit_rw(self, opcode: int, nsid: int, slbas: Any, counts: Any, buf: DmaBuffer | RegisteredBuffer,
                  offsets: Any, *, qid: int = 1, doorbell: bool = True, sgl: bool | None = None) -> np.ndarray:
        """Post a batch of READ, WRITE or ZONE APPEND commands (see :meth:`_submit_rw`); one thread
        per queue. A Zone Append's completion carries the LBA it wrote (``result`` | ``result_hi`` << 32)."""
        with self.ex.using(self.core.queue(qid)):
            return self._submit_rw(opcode, nsid, slbas, counts, buf, offsets, qid=qid, doorbell=doorbell, sgl=sgl)

    def _submit_rw(self, opcode: int, nsid: int, slbas: Any, counts: Any, buf: DmaBuffer | RegisteredBuffer,
                   offsets: Any, *, qid: int = 1, doorbell: bool = True, sgl: bool | None = None) -> np.ndarray:
        """Post a batch of READ or WRITE commands into ``buf`` at ``offsets`` and ring the SQ tail
        doorbell once. Returns their tags.

        Every command is validated (window, MDTS, buffer bounds, handle) before any is posted; a
        refusal names the first command that breaks a rule. Small batches are packed entry by
        entry (cheaper than numpy's per-call overhead), larger ones authored vectorized; either
        way one C call copies them into the ring. With a registered buffer the offsets name its
        slots and the C path copies the slots' pre-authored PRPs (or SGL, as registered).
        ``sgl``: SGL descriptors instead of PRPs (4.1.2); None follows the queues' choice.
        """
        core, nst = self.core, self.ns
        qp = core.queue(qid)
        ns = nst.namespace(nsid)
        if opcode not in (IoOpcode.READ, IoOpcode.WRITE, IoOpcode.ZONE_APPEND):
            raise Refused("unsupported-command", f"opcode {opcode:#x} is not READ, WRITE or ZONE APPEND",
                          opcode=opcode)
        use_sgl = core.use_sgl(sgl)
        reg = buf if isinstance(buf, RegisteredBuffer) else None
        handle = self.registration(reg).buffer if reg is not None else cast(DmaBuffer, buf)
        base = core.ledger.iova(handle)  # a live handle (stale or foreign: refused) before anything else
        slbas, counts, offsets = (x if isinstance(x, (list, tuple)) else np.atleast_1d(x)
                                  for x in (slbas, counts, offsets))
        n = len(slbas)
        if not (len(counts) == len(offsets) == n):
            raise Refused("length-mismatch", "slbas, counts and offsets differ in length")
        if n == 0:
            return np.empty(0, dtype=np.int64)
        if opcode == IoOpcode.ZONE_APPEND:  # its ZSLBA is a zone start, its size within ZASL
            nst.check_append(ns, ints(slbas, "LBAs"), ints(counts, "counts"))
        if reg is not None:
            return self._submit_registered(qp, ns, opcode, reg, int_array(slbas, "LBAs"),
                                           int_array(counts, "counts"), int_array(offsets, "offsets"), doorbell)
        if n <= SCALAR_BATCH:
            return self._submit_small(qp, ns, opcode, base, handle, ints(slbas, "LBAs"), ints(counts, "counts"),
                                      ints(offsets, "offsets"), doorbell, use_sgl)
        slbas = int_array(slbas, "LBAs")
        counts = int_array(counts, "counts")
        offsets = int_array(offsets, "offsets")
        ps = core.page_size
        lengths = counts * ns.block_size
        iovas = base + offsets
        pages = (iovas % ps + lengths + ps - 1) // ps
        if (counts.min() < 1 or counts.max() > nst.max_blocks(ns) or slbas.min() < 0
                or (slbas + counts).max() > ns.size_blocks or offsets.min() < 0 or (offsets & 3).any()
                or (offsets + lengths).max() > handle.size or pages.max() > nst.max_pages):
            for s_, c_, o_ in zip(slbas.tolist(), counts.tolist(), offsets.tolist()):
                nst.check_rw(ns, base, handle.size, s_, c_, o_)  # raises for the first bad command
        cids = qp.ring.take(n)
        try:
            entries = self._author_rw(qp, opcode, ns.nsid, slbas, counts, cids.astype(np.int64), iovas, lengths,
                                      pages, use_sgl)
            self.ex.for_device(qp, entries)
            first = qp.ring.post(entries, n, handle.slot, handle.generation)
        except BaseException:
            qp.ring.untake(cids)
            raise
        return self._posted(qp, handle, first, n, doorbell, opcode, offsets, lengths)

    def _posted(self, qp: BrokerQueue, buf: DmaBuffer, first_tag: int, n: int, doorbell: bool, opcode: int,
                offsets: Any, lengths: Any) -> np.ndarray:
        """Book-keeping after a batch was posted: the no-IOMMU lane's bounce copies (before the
        doorbell), pin its buffer, ring the SQ tail doorbell once."""
        if self.core.ledger.bounce:
            self.ex.bounce_posted(qp, opcode, buf, first_tag, offsets, lengths)
        self.core.ledger.pin(buf, n)
        if doorbell:
            qp.ring.ring_sq()
        return np.arange(first_tag, first_tag + n, dtype=np.int64)

    def _submit_small(self, qp: BrokerQueue, ns: Namespace, opcode: int, base: int, buf: DmaBuffer,
                      slbas: list[int], counts: list[int], offsets: list[int], doorbell: bool,
                      use_sgl: bool = False) -> np.ndarray:
        """submit_rw for a few commands: validated and packed one by one, posted in one C call."""
        checked = [self.ns.check_rw(ns, base, buf.size, s_, c_, o_) for s_, c_, o_ in zip(slbas, counts, offsets)]
        n = len(checked)
        cids = qp.ring.take(n)
        try:
            ps = self.core.page_size
            packed = qp.packed
            for i, (slba, count, (iova, length, pages)) in enumerate(zip(slbas, counts, checked)):
                cid = int(cids[i])
                flags, prp1 = 0, iova
                if use_sgl:
                    flags, (prp1, prp2) = PSDT_SGL, self._sgl1(qp, cid, iova, length)
                elif pages == 1:
                    prp2 = 0
                elif pages == 2:
                    prp2 = iova - iova % ps + ps
                else:
                    _, prp2 = qp.author_prps(cid, iova, length)
                # SQE_STRUCT order: opc, flags, cid, nsid, cdw2, cdw3, mptr, prp1, prp2, cdw10..cdw15
                SQE_STRUCT.pack_into(packed, i * 64, opcode, flags, cid, ns.nsid, 0, 0, 0, prp1, prp2,
                                     *builders.rw_dwords(slba, count), 0, 0, 0)
            self.ex.for_device(qp, np.frombuffer(packed, dtype=SQE, count=n))
            first = qp.ring.post(packed, n, buf.slot, buf.generation)
        except BaseException:
            qp.ring.untake(cids)
            raise
        return self._posted(qp, buf, first, n, doorbell, opcode, offsets, [length for _, length, _ in checked])

    def _submit_registered(self, qp: BrokerQueue, ns: Namespace, opcode: int, reg: RegisteredBuffer,
                           slbas: np.ndarray, counts: np.ndarray, offsets: np.ndarray, doorbell: bool) -> np.ndarray:
        """READ/WRITE into slots of a registered buffer: validated here, posted by C with the
        slots' pre-authored PRPs."""
        nst = self.ns
        slots = offsets // reg.slot_size
        if (counts.min() < 1 or counts.max() > nst.max_blocks(ns) or slbas.min() < 0
                or (slbas + counts).max() > ns.size_blocks):
            for s_, c_ in zip(slbas.tolist(), counts.tolist()):
                nst.check_rw(ns, 0, counts.max() * ns.block_size, s_, c_, 0)  # raises for the first bad command
        if offsets.min() < 0 or (offsets % reg.slot_size).any() or slots.max() >= reg.slots:
            raise Refused("length-mismatch", f"offsets into a registered buffer name its slots: multiples of "
                          f"{reg.slot_size} below {reg.slots * reg.slot_size}", slot_size=reg.slot_size)
        if (counts * ns.block_size).max() > reg.slot_size:
            raise Refused("length-mismatch", f"a transfer of {int(counts.max()) * ns.block_size} bytes does not fit "
                          f"a {reg.slot_size}-byte slot", slot_size=reg.slot_size)
        require_room(qp, len(slbas))
        buf = reg.buffer
        first = qp.ring.post_slots(opcode, ns.nsid, slbas.astype(np.uint64), counts.astype(np.uint32),
                                   slots.astype(np.uint32), reg._prps, ns.block_size, self.core.page_size, buf.slot,
                                   buf.generation)
        return self._posted(qp, buf, first, len(slbas), doorbell, opcode, offsets, counts * ns.block_size)

    def _sgl1(self, qp: BrokerQueue, cid: int, iova: int, length: int) -> tuple[int, int]:
        """SGL1 of one READ/WRITE of ``length`` bytes at ``iova``: a Data Block descriptor, or
        (the no-IOMMU lane, across physical runs) a Last Segment pointing to command ``cid``'s list page."""
        ledger = self.core.ledger
        return qp.author_sgl(cid, data_blocks(ledger, iova, length), ledger.device_address)

    def _author_rw(self, qp: BrokerQueue, opcode: int, nsid: int, slbas: np.ndarray, counts: np.ndarray,
                   cids: np.ndarray, iovas: np.ndarray, lengths: np.ndarray, pages: np.ndarray,
                   use_sgl: bool = False) -> np.ndarray:
        """The SQEs of a READ/WRITE batch: fields vectorized, PRP lists only where needed; with
        ``use_sgl`` one SGL Data Block descriptor each (per command where the no-IOMMU lane splits one)."""
        n = len(cids)
        ps = self.core.page_size
        entries = np.zeros(n, dtype=SQE)
        entries["opc"] = opcode
        entries["cid"] = cids
        entries["nsid"] = nsid
        entries["cdw10"], entries["cdw11"], entries["cdw12"] = builders.rw_dword_arrays(slbas, counts)
        if use_sgl:
            entries["flags"] = PSDT_SGL
            if self.core.ledger.pool is None:
                entries["prp1"], entries["prp2"] = sgl.data_block_words(iovas, lengths)
            else:
                for i in range(n):
                    entries["prp1"][i], entries["prp2"][i] = self._sgl1(qp, int(cids[i]), int(iovas[i]),
                                                                        int(lengths[i]))
            return entries
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
                area = qp.prp_array.reshape(qp.ring.ncids, qp.prp_pages * per)
                area[cids[one_page], : len(col)] = np.where(col <= want[:, None], rows, 0)
                entries["prp2"][one_page] = qp.prp_base + cids[one_page] * (qp.prp_pages * ps)
            for i in listed[pages[listed] - 1 > per].tolist():  # chained lists: one by one
                _, entries["prp2"][i] = qp.author_prps(int(cids[i]), int(iovas[i]), int(lengths[i]))
        return entries

    # ============================================================ the queue, as a batch caller sees it
    def ring(self, qid: int = 1) -> None:
        self.core.queue(qid).ring.ring_sq()

    def ring_doorbell(self, qid: int) -> None:
        """The SQ tail doorbell of I/O queue ``qid`` (entries posted with ``doorbell=False``)."""
        qp = self.core.queue(qid)
        with self.ex.using(qp):
            qp.ring.ring_sq()

    def reap(self, minimum: int = 1, *, qid: int = 1, timeout_s: float | None = None) -> np.ndarray:
        """Completions of batched commands (at least ``minimum`` while any are in flight), as a
        structured array with fields ``tag``, ``cid``, ``opcode``, ``result`` (DW0), ``result_hi`` (DW1), ``status``
        (without the phase tag; 0 is success), ``latency_s``."""
        qp = self.core.queue(qid)
        with self.ex.using(qp):
            return self.ex.reap(qp, min(minimum, qp.in_flight + sum(len(c) for c in qp.cancelled)), timeout_s)

    def completion_fd(self, qid: int) -> int | None:
        """The eventfd the I/O queue's MSI-X vector signals (queues created with ``irq``), for a
        caller's own event loop; None when the queue is polled.
        """
        qp = self.core.queue(qid)
        vector = qp.ring.vector
        irq = self.core.irq
        return irq.fd(vector) if vector is not None and irq is not None else None

    def in_flight(self, qid: int = 1) -> int:
        """Commands of I/O queue ``qid`` submitted and not yet reaped."""
        return self.core.queue(qid).in_flight

    def capacity(self, qid: int = 1) -> int:
        """How many more commands I/O queue ``qid`` takes now (its depth less those in flight)."""
        return self.core.queue(qid).capacity

    # ============================================================ registered buffers
    def register_buffer(self, buf: DmaBuffer, slot_size: int, *, sgl: bool | None = None) -> RegisteredBuffer:
        """Cut ``buf`` into slots of ``slot_size`` bytes (a multiple of the memory page size, at most
        one PRP-list page of entries) and author every slot's PRP1, PRP2 and PRP-list page once.
        ``sgl`` (None: the queues' choice): its commands carry an SGL Data Block descriptor instead,
        for every slot the device sees as one contiguous range (all of them, but in the no-IOMMU
        lane a slot across two huge pages that are not physically adjacent, which keeps its PRPs)."""
        core = self.core
        core.require_ready()
        use_sgl = core.use_sgl(sgl)
        ledger = core.ledger
        base = ledger.iova(buf)
        ps = core.page_size
        per = ps // 8
        limit = min(self.ns.max_pages, per + 1) * ps
        if slot_size <= 0 or slot_size % ps or slot_size > limit or slot_size > buf.size:
            raise Refused("length-mismatch", f"slot size {slot_size}: a multiple of the {ps}-byte memory page, "
                          f"at most {limit} bytes (MDTS, one PRP-list page) and the buffer's {buf.size}",
                          slot_size=slot_size)
        if (buf.slot, buf.generation) in core.registered:
            raise Refused("buffer-registered", f"buffer slot {buf.slot} is already registered", slot=buf.slot)
        nslots = buf.size // slot_size
        pages = slot_size // ps
        starts = base + slot_size * np.arange(nslots, dtype=np.uint64)
        prps = np.zeros(nslots, dtype=PRP_SLOT)
        prps["prp1"] = starts
        prps["prp2_page"] = starts + ps if pages >= 2 else 0
        lists = None
        if pages > 2:
            # One PRP-list page per slot: the slot's pages after the first (4.1.1), zero beyond.
            lists = ledger.alloc(nslots * ps, owner="broker:prp-registered", device_writable=False)
            table = lists.array.view(np.uint64).reshape(nslots, per)
            table[:, : pages - 1] = starts[:, None] + ps * np.arange(1, pages, dtype=np.uint64)
            prps["prp2_list"] = ledger.iova(lists) + ps * np.arange(nslots, dtype=np.uint64)
            ledger.translate(table.reshape(-1))  # the no-IOMMU lane's physical addresses; else nothing
        for name in ("prp1", "prp2_page", "prp2_list"):
            ledger.translate(prps[name])
        if use_sgl:
            prps["sgl"] = [len(ledger.device_ranges(int(a), slot_size)) == 1 for a in starts.tolist()] \
                if ledger.pool is not None else 1
        prps.flags.writeable = False
        reg = RegisteredBuffer(buf, slot_size, nslots, prps, lists)
        core.registered[(buf.slot, buf.generation)] = reg
        return reg

    def registration(self, reg: RegisteredBuffer) -> RegisteredBuffer:
        buf = reg.buffer
        if self.core.registered.get((buf.slot, buf.generation)) is not reg:
            self.core.ledger.iova(buf)  # stale-handle when the buffer itself was freed
            raise Refused("stale-handle", f"buffer slot {buf.slot} is no longer registered", slot=buf.slot)
        return reg

    def unregister_buffer(self, reg: RegisteredBuffer) -> None:
        """Drop a registration (its PRP-list pages are scrubbed and freed); refused while in flight."""
        self.registration(reg)
        buf = reg.buffer
        ledger = self.core.ledger
        if ledger.in_flight(buf):
            raise Refused("buffer-in-flight", f"buffer slot {buf.slot} has commands in flight", slot=buf.slot)
        del self.core.registered[(buf.slot, buf.generation)]
        if reg._lists is not None and reg._lists.live:
            ledger.free(reg._lists)

    def free_buffer(self, buf: DmaBuffer) -> None:
        """Scrub, unmap and free a caller's buffer (and drop its registration, if any)."""
        core = self.core
        ledger = core.ledger
        if ledger.is_live(buf):
            # The C in-flight tables are the truth: a command interrupted between its C call and
            # the ledger's pin still holds the buffer.
            for qp in core.all_queues:
                busy = qp.ring.busy_cids()
                if ((qp.ring.buf_slot[busy] == buf.slot) & (qp.ring.buf_gen[busy] == buf.generation)).any():
                    raise Refused("buffer-in-flight", f"buffer slot {buf.slot} has commands in flight on queue "
                                  f"{qp.qid}", slot=buf.slot, qid=qp.qid)
        reg = core.registered.get((buf.slot, buf.generation))
        if reg is not None and ledger.is_live(buf):
            self.unregister_buffer(reg)
        ledger.free(buf)
        core.service_pages.pop((buf.slot, buf.generation), None)

    # ============================================================ the C perf loop
    def perf_loop(self, nsid: int, reg: RegisteredBuffer, *, io_size: int, lba_range: tuple[int, int],
                  random: bool, read_pct: int, depth: int, max_ios: int = 0, seed: int = 1,
                  qid: int = 1, zoned: str = "", zone_capacity: int = 0) -> PerfLoop:
        """Validate a workload once, then hand it to the C closed loop: LBAs ``lba_range`` (half
        open), ``io_size`` bytes per I/O, ``depth`` in flight, each in a slot of ``reg``. ``zoned``
        (a zoned namespace, sequential): ``append`` (Zone Append to each zone's start) or ``write``
        (at each zone's write pointer), the zones of the range filled in order to ``zone_capacity``
        blocks each, once (the zones empty when it starts: the caller resets them)."""
        core, nst = self.core, self.ns
        qp = core.queue(qid)
        ns = nst.namespace(nsid)
        self.registration(reg)
        core.ledger.iova(reg.buffer)
        bs = ns.block_size
        if io_size <= 0 or io_size % bs or io_size > reg.slot_size:
            raise Refused("length-mismatch", f"I/O size {io_size}: a positive multiple of the {bs}-byte block, "
                          f"at most the {reg.slot_size}-byte slot", io_size=io_size)
        nlb = io_size // bs
        if nlb > nst.max_blocks(ns):
            raise Refused("count-out-of-range", f"I/O size {io_size} is more than one command carries "
                          f"({nst.max_blocks(ns) * bs} bytes, MDTS)", io_size=io_size)
        lo, span = nst.check_window(ns, lba_range[0], lba_range[1] - lba_range[0])
        hi = lo + span
        if hi - lo < nlb:
            raise Refused("window-past-namespace-end", f"range {lo}..{hi} holds no {io_size}-byte I/O")
        if not 1 <= depth <= min(qp.ring.ncids, reg.slots):
            raise Refused("count-out-of-range", f"queue depth {depth} outside 1..{min(qp.ring.ncids, reg.slots)} "
                          "(queue entries - 1, buffer slots)", depth=depth)
        if not 0 <= read_pct <= 100 or max_ios < 0:
            raise Refused("invalid-argument", f"read percentage {read_pct} / I/O count {max_ios} out of range")
        if qp.in_flight:
            refuse_busy(qp)
        # I/O-sized positions, random or sequential: offsets aligned to the I/O size, as fio's
        # blockalign default and spdk_nvme_perf do (an unaligned 4 KiB write costs the backing
        # store a read-modify-write of two pages, which measured the store, not the driver).
        positions = (hi - lo) // nlb
        zone = (0, 0, 0)
        if zoned:
            zone, positions = self._zoned(ns, zoned, zone_capacity, nlb, lo, hi, random)
            max_ios = min(max_ios or positions, positions)
        # no-IOMMU lane: the loop writes the slots' bytes as the caller left them (its reads stay
        # in the bounce memory, like any benchmark's)
        core.ledger.sync_for_device(reg.buffer, 0, reg.buffer.size)
        return PerfLoop(qp.ring, reg._prps, reg.buffer.slot, reg.buffer.generation, nsid=nsid, nlb=nlb,
                        block_size=bs, page_size=core.page_size, lba_lo=lo, positions=positions, random=random,
                        read_pct=read_pct, depth=depth, max_ios=max_ios, seed=seed, zoned=zone,
                        timeout_s=core.command_timeout_s, recover=lambda exc: self._loop_recover(qp, exc),
                        guard=lambda: self.ex.using(qp), slot_memory=lambda: self._device_visible(reg.buffer))

    def _zoned(self, ns: Namespace, kind: str, capacity: int, nlb: int, lo: int, hi: int,
               random: bool) -> tuple[tuple[int, int, int], int]:
        """A zoned workload's (zone size, I/Os per zone, append) and its I/O count: whole zones
        from a zone start (``not-zone-start``), sequential, an append within ZASL."""
        nst = self.ns
        _, z = nst.zoned_namespace(ns.nsid)
        nst.check_zone_start(ns, z, lo)
        if kind not in ("append", "write") or random:
            raise Refused("unsupported-workload", f"a zoned workload is a sequential append or write, not "
                          f"{'random ' if random else ''}{kind}", workload=kind)
        if kind == "append":
            nst.check_append(ns, [lo], [nlb])
        zones, per = (hi - lo) // z.zone_size, whole(capacity, "the zone capacity") // nlb
        if not 0 < capacity <= z.zone_size or not zones or not per:
            raise Refused("window-past-namespace-end", f"range {lo}..{hi}: no whole zone of {z.zone_size} blocks "
                          f"with room ({capacity} blocks) for a {nlb}-block I/O", capacity=capacity)
        return (z.zone_size, per, int(kind == "append")), zones * per

    def _device_visible(self, buf: DmaBuffer) -> np.ndarray:
        """``buf``'s bytes where the device reads and writes them: its bounce shadow in the
        no-IOMMU lane, else the buffer itself."""
        memory, shadow = self.core.ledger.bounce_arrays(buf)
        return shadow if shadow is not None else memory

    def _loop_recover(self, qp: BrokerQueue, exc: BaseException) -> list[np.ndarray]:
        """Recovery for the C perf loop: abort/reset for a late command, reset for CSTS.CFS; the
        records of commands it had to end go back to the loop."""
        recovery = self.ex.recovery
        if isinstance(exc, DeviceGone):
            recovery.gone_raise(exc)
        if isinstance(exc, QueuePaused):
            self.core.park()
        elif isinstance(exc, CommandTimeout):
            recovery.recover_timeout(qp)
        else:
            recovery.reset_controller("CSTS.CFS set")
        return take_cancelled(qp)
