"""Synchronous I/O: transfer() (its hot path: one C call for a ready namespace, a plain buffer and
at most two memory pages; otherwise the checked path, split by MDTS), read/write through the
broker's staging buffer, Flush, Write Zeroes and Deallocate."""

from __future__ import annotations

import threading
from typing import Any, cast

import numpy as np

from nvmevfio.broker.common import (
    DSM_MAX_RANGES,
    MAX_NLB,
    MAX_RETRIES,
    ONCS_DSM,
    ONCS_WRITE_ZEROES,
    BrokerQueue,
    Namespace,
    RegisteredBuffer,
    byte_view,
    data_blocks,
    int_array,
    whole,
)
from nvmevfio.broker.core import Core
from nvmevfio.broker.execute import Executor, command_sqe, raise_for, refuse_busy
from nvmevfio.broker.metadata import Fields, MetadataIO
from nvmevfio.broker.namespaces import Namespaces
from nvmevfio.broker.submit import Submit
from nvmevfio.dma import DmaBuffer
from nvmevfio.errors import ControllerFatal, DeviceGone, QueuePaused, Refused
from nvmevfio.nvme import builders, sgl
from nvmevfio.nvme.sgl import PSDT_SGL
from nvmevfio.nvme.spec import IoOpcode


class SyncIO:
    def __init__(self, core: Core, ex: Executor, ns: Namespaces, submit: Submit, meta: MetadataIO) -> None:
        self.core = core
        self.meta = meta
        self.ex = ex
        self.ns = ns
        self.submit = submit

    def transfer(self, opcode: int, nsid: int, slba: int, count: int, buf: DmaBuffer | RegisteredBuffer,
                 offset: int = 0, qid: int = 1) -> None:
        """READ or WRITE ``count`` blocks between ``buf[offset:]`` and the namespace. One command is
        one C call (post, doorbell, wait, reap); a longer transfer is split by MDTS, keeping as many
        commands in flight as the queue allows."""
        # The hot path: an I/O-ready namespace, a plain DMA buffer, a window and a buffer range that
        # fit, one or two memory pages (no PRP list): one C call. Whatever fails these tests takes
        # the checked path below, which refuses with the named reason.
        core = self.core
        ns = core.hot.get(nsid) if type(nsid) is int else None
        if (ns is not None and type(slba) is int and type(count) is int and type(offset) is int
                and type(buf) is DmaBuffer and 0 < count <= MAX_NLB and slba >= 0
                and slba + count <= ns.size_blocks and offset >= 0 and not offset & 3 and 0 < qid <= len(core.io)):
            length = count * ns.block_size
            iova = core.ledger.live_iova(buf)
            ps = core.page_size
            if iova is not None and offset + length <= buf.size and length <= 2 * ps - (iova + offset) % ps:
                qp = core.io[qid - 1]
                if qp.lock.acquire(False):
                    qp.owner = threading.get_ident()
                    try:
                        iova += offset
                        if core.sgl:  # one SGL Data Block descriptor: PSDT 01b, the address, the length
                            flags, prp2 = PSDT_SGL, length
                        else:
                            flags, prp2 = 0, iova - iova % ps + ps if length > ps - iova % ps else 0
                        ring = qp.ring
                        one = ring.one
                        r = ring.exec_rw_c(opcode, flags, nsid, slba, count, iova, prp2, buf.slot, buf.generation,
                                           int(core.command_timeout_s * 1e9), one)
                        if r == 0 and not one.status and not ring.hooked:
                            core.commands_completed += 1
                            return
                        self._exec_rw(qp, opcode, nsid, slba, count, iova, prp2, buf, first=r, flags=flags)
                        return
                    finally:
                        qp.owner = None
                        qp.lock.release()
        qp = core.queue(qid)
        with self.ex.using(qp):
            self._transfer(qp, opcode, nsid, slba, count, buf, offset)

    def _exec_rw(self, qp: BrokerQueue, opcode: int, nsid: int, slba: int, count: int, prp1: int, prp2: int,
                 buf: DmaBuffer, first: int | None = None, flags: int = 0) -> None:
        """One READ/WRITE without a list (PRP1 and PRP2, or with ``flags`` PSDT 01b one SGL Data
        Block descriptor, authored by the caller), start to end in one C call; transient statuses
        retried, a timeout recovered (abort, reset, requeue). ``first``: what the hot path's own
        first attempt returned (its completion in ring.one)."""
        core, ex = self.core, self.ex
        if core.ledger.pool is not None:  # the no-IOMMU lane: PRP1 and PRP2 (not a length) to physical addresses
            prp1 = core.ledger.device_address(prp1)
            prp2 = prp2 if flags & PSDT_SGL else core.ledger.device_address(prp2)
        for attempt in range(MAX_RETRIES + 1):
            try:
                if first is not None:
                    r, first = first, None
                    c = qp.ring.exec_result(r)
                else:
                    c = qp.ring.exec_rw(opcode, nsid, slba, count, prp1, prp2, int(core.command_timeout_s * 1e9),
                                        buf.slot, buf.generation, flags)
            except (ControllerFatal, DeviceGone, QueuePaused) as exc:
                c = ex.wait_failed(qp, exc, buf)
            if c is not None and not c[0]:
                core.commands_completed += 1
                return
            status, result = ex.settle(qp, c, buf)
            if not ex.retry(status, attempt):
                break
        ex.outcome(status, result, "Read" if opcode == IoOpcode.READ else "Write", nsid=nsid, slba=slba,
                   count=count)

    def _transfer(self, qp: BrokerQueue, opcode: int, nsid: int, slba: int, count: int,
                  buf: DmaBuffer | RegisteredBuffer, offset: int) -> None:
        core = self.core
        ledger = core.ledger
        ns = self.ns.namespace(nsid)
        slba, count = self.ns.check_window(ns, slba, count)
        reg = buf if isinstance(buf, RegisteredBuffer) else None
        handle = self.submit.registration(reg).buffer if reg is not None else cast(DmaBuffer, buf)
        ledger.iova(handle)  # a live handle (refused otherwise) before its size is trusted
        offset = whole(offset, "the buffer offset")
        length = count * ns.block_size
        if offset < 0 or offset + length > handle.size:
            raise Refused("length-mismatch", f"{count} blocks of {ns.block_size} bytes do not fit the "
                          f"{handle.size}-byte buffer at offset {offset}", count=count, size=handle.size)
        base = ledger.iova(handle)  # stale-handle check
        if qp.in_flight:
            refuse_busy(qp)
        name = "Read" if opcode == IoOpcode.READ else "Write"
        ps = core.page_size
        iova = base + offset
        pages = (iova % ps + length + ps - 1) // ps
        one_range = core.sgl and len(ledger.device_ranges(iova, length)) == 1
        if (pages <= 2 or one_range) and count <= MAX_NLB and offset & 3 == 0 and length <= core.max_transfer:
            # The common case: one command without a PRP list or SGL segment, one C call.
            flags, prp2 = (PSDT_SGL, length) if core.sgl else (0, iova - iova % ps + ps if pages == 2 else 0)
            if opcode == IoOpcode.WRITE:
                ledger.sync_for_device(handle, offset, length)  # no-IOMMU lane's bounce; else nothing
            self._exec_rw(qp, opcode, nsid, slba, count, iova, prp2, handle, flags=flags)
            if opcode == IoOpcode.READ:
                ledger.sync_for_cpu(handle, offset, length)
            return
        self._transfer_split(qp, ns, opcode, slba, count, handle, reg, offset, iova, name)

    def _transfer_split(self, qp: BrokerQueue, ns: Namespace, opcode: int, slba: int, count: int,
                        handle: DmaBuffer, reg: RegisteredBuffer | None, offset: int, iova: int, name: str) -> None:
        """transfer() for a command with a PRP list, or several commands split by MDTS."""
        nsid, qid, length = ns.nsid, qp.qid, count * ns.block_size
        submit_rw = self.submit.submit_rw
        if reg is not None and offset % reg.slot_size == 0 and length <= reg.slot_size:
            self._sync_batch(qp, submit_rw(opcode, nsid, [slba], [count], reg, [offset], qid=qid), name,
                             nsid=nsid, slba=slba, count=count)
            return
        step = self.ns.max_blocks(ns, iova)
        starts = np.arange(slba, slba + count, step, dtype=np.int64)
        counts = np.minimum(step, slba + count - starts)
        offs = offset + (starts - slba) * ns.block_size
        pos = 0
        outstanding = 0  # the queue was idle, so every completion on it is ours
        failed = None
        while pos < len(starts) or outstanding:
            room = qp.capacity
            if pos < len(starts) and room and failed is None:
                k = min(room, len(starts) - pos)
                outstanding += len(submit_rw(opcode, nsid, starts[pos : pos + k], counts[pos : pos + k],
                                             handle, offs[pos : pos + k], qid=qid))
                pos += k
            done = self.ex.reap(qp, 1, None)
            outstanding -= len(done)
            bad = np.flatnonzero(done["status"])
            if len(bad) and failed is None:
                failed = done[bad[0]]
        if failed is not None:
            raise_for(failed["status"], name, nsid=nsid, slba=slba, count=count)

    def _sync_batch(self, qp: BrokerQueue, tags: np.ndarray, name: str, **context: Any) -> None:
        """Reap a batch posted on an idle queue; raise for its first error."""
        left = len(tags)
        failed = None
        while left:
            done = self.ex.reap(qp, left, None)
            left -= len(done)
            bad = np.flatnonzero(done["status"])
            if len(bad) and failed is None:
                failed = done[bad[0]]
        if failed is not None:
            raise_for(failed["status"], name, **context)

    def _staging_buf(self) -> DmaBuffer:
        core = self.core
        if core.staging is None or not core.staging.live:
            core.staging = core.ledger.alloc(max(core.staging_bytes, core.max_transfer), owner="broker:staging")
        return core.staging

    def read(self, nsid: int, slba: int, count: int, qid: int = 1, *, metadata: bool = False, pract: bool = False,
             prchk: int = 0, reftag: int | None = None, apptag: int = 0, appmask: int = 0) -> Any:
        """Read ``count`` blocks into a new uint8 array (through the broker's staging buffer).

        A namespace whose format carries metadata: ``metadata`` returns (data, metadata), the
        metadata ``count`` x its size; ``pract`` has the controller strip (and check) the
        protection information, ``prchk`` (4 guard, 2 application tag, 1 reference tag) names the
        checks, ``reftag`` (default: the LBA's low 32 bits), ``apptag`` and ``appmask`` what they
        compare with. A failed check is the status End-to-end Guard, Application Tag or Reference
        Tag Check Error."""
        self.core.queue(qid)
        ns = self.ns.namespace(nsid, metadata=True)
        slba, count = self.ns.check_window(ns, slba, count)
        if ns.metadata_size or metadata or pract or prchk:
            if not ns.metadata_size:
                raise Refused("invalid-argument", f"namespace {nsid} carries no metadata", nsid=nsid)
            return self.meta.read(ns, slba, count, qid, metadata, Fields(pract, prchk, reftag, apptag, appmask))
        out = np.empty(count * ns.block_size, dtype=np.uint8)
        stage = self._staging_buf()
        per = stage.size // ns.block_size
        arr = stage.array
        for start in range(0, count, per):
            k = min(per, count - start)
            self.transfer(IoOpcode.READ, nsid, slba + start, k, stage, 0, qid)
            out[start * ns.block_size : (start + k) * ns.block_size] = arr[: k * ns.block_size]
        return out

    def read_sparse(self, nsid: int, slba: int, count: int, keep: Any, qid: int = 1) -> np.ndarray:
        """One READ of the window ``slba``..``slba + count`` whose host side is only the blocks in
        ``keep``: ``(first, blocks)`` pairs relative to ``slba``, in order and apart. The controller
        discards the others (SGL Bit Bucket descriptors, NVMe 2.0 4.1.2); returns the kept blocks'
        bytes, concatenated. Refused where SGLS offers no Bit Bucket (``bit-bucket-unsupported``),
        for a window larger than one command (MDTS) or a ``keep`` that is out of order, overlapping,
        empty or outside the window (``invalid-argument``)."""
        core = self.core
        qp = core.queue(qid)
        ns = self.ns.namespace(nsid)
        slba, count = self.ns.check_window(ns, slba, count)
        if not sgl.bit_bucket_supported(core.sgls):
            raise Refused("bit-bucket-unsupported", "the controller does not offer SGL Bit Bucket descriptors "
                          f"(Identify Controller SGLS {core.sgls:#x}, bit 16)")
        if count > min(MAX_NLB, self.ns.max_blocks(ns)):
            raise Refused("count-out-of-range", f"a sparse read is one command: {count} blocks is more than "
                          f"{min(MAX_NLB, self.ns.max_blocks(ns))} (MDTS)", count=count)
        pairs = int_array(keep, "keep").reshape(-1, 2) if len(keep) else np.empty((0, 2), np.int64)
        ends = pairs[:, 0] + pairs[:, 1]
        if not len(pairs) or (pairs[:, 1] < 1).any() or pairs[0, 0] < 0 or ends[-1] > count \
                or (pairs[1:, 0] < ends[:-1]).any():
            raise Refused("invalid-argument", f"keep must be (first, blocks) pairs in order, apart, inside the "
                          f"{count}-block window: {pairs.tolist()!r:.80}", count=count)
        bs = ns.block_size
        stage = self._staging_buf()
        base = core.ledger.iova(stage)
        extents: list[tuple[int, int, int]] = []
        pos = at = 0
        for first, blocks in pairs.tolist():
            if first > at:
                extents.append((sgl.DescriptorType.BIT_BUCKET, 0, (first - at) * bs))
            extents += data_blocks(core.ledger, base + pos, blocks * bs)
            pos += blocks * bs
            at = first + blocks
        if at < count:
            extents.append((sgl.DescriptorType.BIT_BUCKET, 0, (count - at) * bs))
        self.ex.exec(qp, command_sqe(builders.read(nsid, slba, count)), "Read", stage, pos, extents=extents,
                     nsid=nsid, slba=slba, count=count)
        core.ledger.sync_for_cpu(stage, 0, pos)  # the no-IOMMU lane's bounce; else nothing
        return stage.array[:pos].copy()

    def write(self, nsid: int, slba: int, data: Any, qid: int = 1, *, metadata: Any = None, pract: bool = False,
              prchk: int = 0, reftag: int | None = None, apptag: int = 0, appmask: int = 0) -> int:
        """Write whole blocks from a bytes-like or numpy object; returns the block count.

        A namespace whose format carries metadata needs ``metadata`` (block count x its size),
        unless ``pract`` has the controller insert the protection information of a format whose
        metadata is the tuple alone (otherwise ``metadata-required``); ``prchk``, ``reftag``,
        ``apptag`` and ``appmask`` as :meth:`read` (without PRACT the controller checks the tuples
        given)."""
        self.core.queue(qid)
        ns = self.ns.namespace(nsid, metadata=True)
        src = byte_view(data, "data")
        if len(src) == 0 or len(src) % ns.block_size:
            raise Refused("length-mismatch", f"{len(src)} bytes is not a positive multiple of the "
                          f"{ns.block_size}-byte block size of namespace {nsid}", length=len(src),
                          block_size=ns.block_size)
        slba, count = self.ns.check_window(ns, slba, len(src) // ns.block_size)
        if ns.metadata_size or metadata is not None or pract or prchk:
            if not ns.metadata_size:
                raise Refused("invalid-argument", f"namespace {nsid} carries no metadata", nsid=nsid)
            return self.meta.write(ns, slba, src, qid, metadata, Fields(pract, prchk, reftag, apptag, appmask))
        stage = self._staging_buf()
        per = stage.size // ns.block_size
        arr = stage.array
        for start in range(0, count, per):
            k = min(per, count - start)
            arr[: k * ns.block_size] = src[start * ns.block_size : (start + k) * ns.block_size]
            self.transfer(IoOpcode.WRITE, nsid, slba + start, k, stage, 0, qid)
        return count

    def flush(self, nsid: int, qid: int = 1) -> None:
        """Flush (NVM opcode 00h): the volatile write cache of ``nsid`` to media; returns once it completed."""
        qp = self.core.queue(qid)
        self.ns.namespace(nsid, metadata=True)
        self.ex.exec(qp, command_sqe(builders.flush(nsid)), "Flush", nsid=nsid)

    def _range_command(self, qid: int, nsid: int, slba: int, count: int, oncs_bit: int,
                       what: str) -> tuple[BrokerQueue, int, int]:
        """Checks shared by the range commands: queue, namespace, window, and ONCS support.
        Returns the queue and the window as Python ints."""
        qp = self.core.queue(qid)
        slba, count = self.ns.check_window(self.ns.namespace(nsid), slba, count)
        if not (self.core.id_ctrl or {}).get("oncs", 0) & oncs_bit:
            raise Refused("unsupported-command", f"the controller does not support {what} "
                          f"(ONCS bit {oncs_bit.bit_length() - 1})")
        return qp, slba, count

    def write_zeroes(self, nsid: int, slba: int, count: int, qid: int = 1, *, deallocate: bool = False) -> None:
        """Write Zeroes; ``deallocate`` sets CDW12.DEAC (bit 25, NVM Command Set 3.2.8): the
        controller may deallocate the blocks, and they still read as zeros."""
        qp, slba, count = self._range_command(qid, nsid, slba, count, ONCS_WRITE_ZEROES, "Write Zeroes")
        for start in range(slba, slba + count, MAX_NLB):
            k = min(MAX_NLB, slba + count - start)
            self.ex.exec(qp, command_sqe(builders.write_zeroes(nsid, start, k, deac=deallocate)), "Write Zeroes",
                         nsid=nsid, slba=start, count=k)

    def deallocate(self, nsid: int, slba: int, count: int, qid: int = 1) -> None:
        """Dataset Management with the Deallocate attribute (ranges of up to 2^32-1 blocks)."""
        qp, slba, count = self._range_command(qid, nsid, slba, count, ONCS_DSM, "Dataset Management")
        per = 0xFFFFFFFF
        starts = list(range(slba, slba + count, per))
        rng = np.zeros(len(starts), dtype=[("cattr", "<u4"), ("nlb", "<u4"), ("slba", "<u8")])
        rng["slba"] = starts
        rng["nlb"] = [min(per, slba + count - s) for s in starts]
        if len(rng) > DSM_MAX_RANGES:
            raise Refused("count-out-of-range", "too many blocks for one Dataset Management command")
        buf = self.core.scratch_buf()
        arr = buf.array
        arr[:] = 0
        arr[: rng.nbytes] = rng.view(np.uint8)
        self.ex.exec(qp, command_sqe(builders.dataset_management(nsid, len(rng), deallocate=True)),
                     "Dataset Management (Deallocate)", buf, rng.nbytes, nsid=nsid, slba=slba, count=count)
