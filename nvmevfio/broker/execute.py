"""Execution: one thread at a time per queue pair, a command start to end (author its SQE and
PRPs, post, doorbell, wait, reap) with retries of a transient status, reaping batches, and the
no-IOMMU lane's bounce copies and address translation. What only recovery can do (abort, reset,
the device gone) goes through the :class:`RecoveryHook` it is given; a command that leaves
asynchronous events pending says so in its result (:class:`Ran`) and services nothing."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any, NamedTuple, NoReturn, Protocol

import numpy as np

from nvmevfio.broker.common import CANCELLED_STATUS, MAX_RETRIES, TRANSIENT, BrokerQueue, data_blocks
from nvmevfio.broker.core import Core
from nvmevfio.dma import DmaBuffer
from nvmevfio.errors import CommandTimeout, ControllerFatal, DeviceGone, QueuePaused, Refused
from nvmevfio.nvme import builders, prp, spec
from nvmevfio.nvme.queue import CID_TAKE, COMPLETION
from nvmevfio.nvme.sgl import PSDT_SGL
from nvmevfio.nvme.spec import SQE, IoOpcode


class RecoveryHook(Protocol):
    """What execution asks of recovery (:class:`nvmevfio.broker.recovery.Recovery`)."""

    def recover_timeout(self, qp: BrokerQueue) -> None: ...
    def reset_controller(self, why: str) -> None: ...
    def gone_raise(self, exc: DeviceGone) -> NoReturn: ...


class _NoRecovery:
    """Until the broker wires recovery in: the error as it came."""

    def recover_timeout(self, qp: BrokerQueue) -> None:
        raise CommandTimeout(f"queue {qp.qid}: a command is late and no recovery is wired", qid=qp.qid)

    def reset_controller(self, why: str) -> None:
        raise ControllerFatal(f"a controller reset is needed ({why}) and no recovery is wired")

    def gone_raise(self, exc: DeviceGone) -> NoReturn:
        raise exc


class Ran(NamedTuple):
    """A command's DW0, whether asynchronous event completions wait on the admin queue (the
    caller services them: :mod:`.events`), and its DW1 (Zone Append's LBA, high half)."""

    dw0: int
    events_pending: bool
    dw1: int = 0


def completion_result(rec: np.void) -> int:
    """A reaped COMPLETION record's DW1:DW0 as one 64-bit value."""
    return int(rec["result"]) | int(rec["result_hi"]) << 32


def sqe(opc: int, **fields: int) -> np.ndarray:
    e = np.zeros(1, dtype=SQE)
    e["opc"] = opc
    for k, v in fields.items():
        e[k] = v
    return e


def command_sqe(cmd: builders.Command, **pointers: int) -> np.ndarray:
    """The SQE of a built command (:mod:`nvmevfio.nvme.builders`), with the data or
    queue pointers (``prp1``, ``prp2``) the broker authored."""
    return sqe(cmd.opc, nsid=cmd.nsid, **cmd.cdws, **pointers)


def refuse_busy(qp: BrokerQueue) -> NoReturn:
    raise Refused("queue-busy", f"queue {qp.qid} has {qp.in_flight} batched commands in flight; reap them "
                  "first", qid=qp.qid, in_flight=qp.in_flight)


def require_room(qp: BrokerQueue, n: int) -> None:
    if n > qp.capacity:
        raise Refused("queue-full", f"queue {qp.qid} has room for {qp.capacity} more commands, {n} asked",
                      qid=qp.qid, free=qp.capacity, wanted=n)


def take_cancelled(qp: BrokerQueue) -> list[np.ndarray]:
    out, qp.cancelled = qp.cancelled, []
    return out


def raise_for(status: int, name: str, **context: Any) -> NoReturn:
    """CommandError for a completion status (without the phase tag)."""
    raise spec.command_error(status, name, **context)


class Executor:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.recovery: RecoveryHook = _NoRecovery()

    def attach_recovery(self, hook: RecoveryHook) -> None:
        self.recovery = hook

    # ============================================================ command authoring
    def for_device(self, qp: BrokerQueue, sqes: np.ndarray) -> None:
        """The no-IOMMU lane's last step before SQEs go to the ring: the ledger's pool addresses
        in their PRP1 and PRP2, and in the entries and chain pointers of the PRP-list pages of
        this queue that they use, become physical addresses, page by page (the pool is
        contiguous only within a huge page). Translating twice changes nothing. With an IOMMU
        the ledger's addresses are the device's, and this does nothing."""
        ledger = self.core.ledger
        if ledger.pool is None:
            return
        if qp.prp_array is not None:
            per = qp.prp_pages * self.core.page_size // 8  # one command's list entries
            listed = (sqes["prp2"] - np.uint64(qp.prp_base)) < np.uint64(qp.prp_array.size * 8)
            if listed.any():
                area = qp.prp_array.reshape(-1, per)
                for cid in np.unique(sqes["cid"][listed]).tolist():
                    ledger.translate(area[cid])
        ledger.translate(sqes["prp1"])
        ledger.translate(sqes["prp2"])

    def author_one(self, qp: BrokerQueue, e: np.ndarray, buf: DmaBuffer, length: int,
                   sgl: bool = False) -> np.ndarray | None:
        """Author PRP1/PRP2 (or, with ``sgl``, SGL1) for ``length`` bytes of ``buf``. When list
        pages are needed, a command id is taken first (its list pages hold them) and returned."""
        iova = self.core.ledger.iova(buf)
        if sgl:
            return self.author_sgl(qp, e, data_blocks(self.core.ledger, iova, length))
        need = prp.list_pages_needed(iova, length, self.core.page_size)
        if need > qp.prp_pages:
            raise Refused("count-out-of-range",
                          f"{length} bytes need {need} PRP-list pages; this queue has {qp.prp_pages} per command",
                          length=length)
        cids = None
        if need:
            if qp.in_flight:
                refuse_busy(qp)
            cids = qp.ring.take(1)
            e["cid"] = cids[0]
        e["prp1"], e["prp2"] = qp.author_prps(int(e["cid"][0]) if need else 0, iova, length)
        return cids

    def author_sgl(self, qp: BrokerQueue, e: np.ndarray, extents: list[tuple[int, int, int]]) -> np.ndarray | None:
        """SGL1 of one command (PSDT 01b) for ``extents`` (device addresses). One descriptor sits in
        the SQE; more need SGL segments in the command's list pages: its id is taken first, and returned."""
        cids = None
        if len(extents) > 1:
            if qp.in_flight:
                refuse_busy(qp)
            cids = qp.ring.take(1)
            e["cid"] = cids[0]
        try:
            e["prp1"], e["prp2"] = qp.author_sgl(int(e["cid"][0]), extents, self.core.ledger.device_address)
        except BaseException:
            if cids is not None:
                qp.ring.untake(cids)
            raise
        e["flags"] |= PSDT_SGL
        return cids

    # ============================================================ queue ownership
    @contextlib.contextmanager
    def using(self, qp: BrokerQueue) -> Iterator[None]:
        """One thread at a time on a queue pair: a second thread is refused (``queue-busy``), never
        interleaved. Waits instead while a controller reset holds the queue, and for the admin
        queue (the broker's own: another thread's admin command ends soon)."""
        me = threading.get_ident()
        if not qp.lock.acquire(blocking=False):
            self.core.refuse_gone()  # held by the thread releasing the device: say so
            if self.core.recovery.resetter == me and qp.owner in self.core.recovery.parked:
                yield  # the reset works on a parked thread's queue: that thread touches nothing now
                return
            if not self._wait_for_queue(qp):
                raise Refused("queue-busy", f"queue {qp.qid} is in use by another thread: give each thread its "
                              "own queue (open(queues=N), qid=...)", qid=qp.qid)
        outer, qp.owner = qp.owner, me
        try:
            yield
        finally:
            qp.owner = outer
            qp.lock.release()

    def _wait_for_queue(self, qp: BrokerQueue) -> bool:
        """Wait for a queue held by a controller reset or (admin) another thread's command; parked
        while a reset runs. False: an I/O queue another thread is using (refuse)."""
        core = self.core
        if qp.qid and core.recovery.resetter is None:
            return False
        deadline = time.monotonic() + core.park_limit_s()
        while time.monotonic() < deadline:
            if core.recovery.resetter is not None:
                core.park()
            if qp.lock.acquire(timeout=0.002):
                return True
            core.refuse_gone()
        return False

    # ============================================================ one command, start to end
    def exec(self, qp: BrokerQueue, e: np.ndarray, name: str, buf: DmaBuffer | None = None, length: int = 0,
             timeout_s: float | None = None, retry: bool = True, sgl: bool = False,
             extents: list[tuple[int, int, int]] | None = None, **context: Any) -> Ran:
        """One command start to end on an idle queue, in one C call (post, SQ doorbell, wait, reap,
        CQ doorbell); returns its DW0 (and DW1). A transient status (DNR=0) is retried with a backoff; a
        timeout goes through abort / reset (see :meth:`settle`). Raises CommandError otherwise.
        ``sgl``: SGL descriptors for ``buf`` instead of PRPs; ``extents``: the SGL's descriptors as
        the caller authored them (device addresses inside ``buf``; Bit Buckets)."""
        core = self.core
        with self.using(qp):
            for attempt in range(MAX_RETRIES + 1):
                e["cid"] = CID_TAKE
                cids = self.author_sgl(qp, e, extents) if extents is not None else \
                    self.author_one(qp, e, buf, length, sgl) if buf is not None else None
                slot, gen = (buf.slot, buf.generation) if buf is not None else (-1, 0)
                self.for_device(qp, e)
                try:
                    c = qp.ring.exec(e, timeout_s or core.command_timeout_s, slot, gen)
                except (ControllerFatal, DeviceGone, QueuePaused) as exc:
                    c = self.wait_failed(qp, exc, buf)
                except BaseException:
                    if cids is not None and qp.ring.busy[int(cids[0])] == 1:  # taken, never posted
                        qp.ring.untake(cids)
                    raise
                status, result = self.settle(qp, c, buf)
                if not retry or not self.retry(status, attempt):
                    break
            result = self.outcome(status, result, name, **context)
        return Ran(result & 0xFFFFFFFF, qp is core.admin and bool(qp.ring.nevents), result >> 32)

    def admin_sync(self, e: np.ndarray, name: str, buf: DmaBuffer | None = None, length: int = 0,
                   timeout_s: float | None = None) -> Ran:
        qp = self.core.admin
        if qp is None:
            raise Refused("controller-not-enabled", "controller is not enabled")
        return self.exec(qp, e, name, buf, length, timeout_s=timeout_s)

    def retry(self, status: int, attempt: int) -> bool:
        """Retry a transient status (DNR=0) after a short backoff, up to MAX_RETRIES times."""
        if not status or status & (1 << 14) or (status >> 8) & 7 or status & 0xFF not in TRANSIENT \
                or attempt >= MAX_RETRIES:
            return False
        self.core.recovery.retries += 1
        self.core.sleep(0.001 * (1 << attempt))
        return True

    def outcome(self, status: int, result: int, name: str, **context: Any) -> int:
        self.core.commands_completed += 1
        if status == CANCELLED_STATUS:
            raise CommandTimeout(f"{name}: no completion within {self.core.command_timeout_s:g} s; the controller "
                                 "was reset and the command not retried", status=status, **context)
        if status:
            raise_for(status, name, **context)
        return int(result)

    def settle(self, qp: BrokerQueue, c: tuple[int, int] | None, buf: DmaBuffer | None) -> tuple[int, int]:
        """The (status, DW1:DW0) of the one command an idle queue executed. None means it timed out:
        the buffer stays pinned (the device may still DMA into it), the broker aborts or resets,
        and the command ends exactly once: requeued and completed, or cancelled."""
        if c is not None:
            return c
        if buf is not None:
            self.core.ledger.pin(buf, 1)  # still in flight: quarantined until it ends
        self.recovery.recover_timeout(qp)
        done = self.reap(qp, 1, None)
        return int(done["status"][0]), completion_result(done[0])

    def wait_failed(self, qp: BrokerQueue, exc: BaseException, buf: DmaBuffer | None) -> tuple[int, int] | None:
        """A C wait ended on CSTS: all ones (the device is gone) or CFS (reset; the command was
        requeued); or another thread is resetting (park; the command was requeued)."""
        if isinstance(exc, DeviceGone):
            self.recovery.gone_raise(exc)
        if buf is not None:
            self.core.ledger.pin(buf, 1)  # requeued by the reset: quarantined until it ends
        if isinstance(exc, QueuePaused):
            self.core.park()
        else:
            self.recovery.reset_controller("CSTS.CFS set")
        done = self.reap(qp, 1, None)
        return int(done["status"][0]), completion_result(done[0])

    # ============================================================ completions
    def reap(self, qp: BrokerQueue, minimum: int, timeout_s: float | None) -> np.ndarray:
        """Reap at least ``minimum`` completions (all that are ready), one CQ head doorbell per batch,
        waiting in C (spinning, or on the MSI-X eventfd).

        Returns a structured array of ``nvme.queue.COMPLETION``: tag, latency_s, result, cookie, cid,
        status (without the phase tag), opcode; commands the broker ended after a reset come first.
        A command older than the command timeout triggers recovery (abort, then reset); a
        caller's shorter ``timeout_s`` only bounds this call's wait."""
        core = self.core
        parts = take_cancelled(qp)
        got = sum(len(p) for p in parts)
        wait_s = core.command_timeout_s if timeout_s is None else timeout_s
        while qp.in_flight:
            try:
                done, runs = qp.ring.reap_wait(max(0, minimum - got), wait_s)
            except DeviceGone as exc:
                self.recovery.gone_raise(exc)
            except (ControllerFatal, QueuePaused) as exc:
                if isinstance(exc, QueuePaused):
                    core.park()  # another thread's reset requeued (or cancelled) ours
                elif not exc.context.get("cfs"):
                    raise
                else:
                    self.recovery.reset_controller("CSTS.CFS set")
                more = take_cancelled(qp)
                parts += more
                got += sum(len(p) for p in more)
                continue
            for slot, gen, n in runs:
                core.ledger.unpin(slot, gen, n)
            core.commands_completed += len(done)
            parts.append(done)
            got += len(done)
            if got >= minimum or not qp.in_flight:
                break
            # the wait ran out short of the minimum
            if qp.ring.oldest_age_s() >= core.command_timeout_s:
                self.recovery.recover_timeout(qp)
                more = take_cancelled(qp)
                parts += more
                got += sum(len(p) for p in more)
            elif timeout_s is not None:
                break  # the caller's own wait ran out; nothing is late yet
        out = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.empty(0, dtype=COMPLETION)
        if core.bounce_reads and len(out):
            self.bounce_back(qp, out)
        return out

    # ============================================================ the no-IOMMU lane's bounce copies
    def bounce_posted(self, qp: BrokerQueue, opcode: int, buf: DmaBuffer, first_tag: int, offsets: Any,
                      lengths: Any) -> None:
        """No-IOMMU lane, a batch just posted (its doorbell not yet rung): a WRITE's (a ZONE APPEND's)
        bytes go to the buffer's device-visible shadow now; a READ's range is remembered, to be copied back to
        the caller's memory when its completion is reaped."""
        pairs = zip(np.atleast_1d(offsets).tolist(), np.atleast_1d(lengths).tolist())
        if opcode in (IoOpcode.WRITE, IoOpcode.ZONE_APPEND):
            for off, length in pairs:
                self.core.ledger.sync_for_device(buf, off, length)
        else:
            pending = self.core.bounce_reads.setdefault(qp.qid, {})
            for i, (off, length) in enumerate(pairs):
                pending[first_tag + i] = (buf, off, length)

    def bounce_back(self, qp: BrokerQueue, done: np.ndarray) -> None:
        """Reaped completions: each successful READ's bytes go from the shadow to the caller."""
        pending = self.core.bounce_reads.get(qp.qid)
        if not pending:
            return
        for tag, status in zip(done["tag"].tolist(), done["status"].tolist()):
            entry = pending.pop(tag, None)
            if entry is not None and status == 0:
                self.core.ledger.sync_for_cpu(*entry)
