"""C closed loops driven from Python in slices: the counters and latency histogram of a
``struct nv_perf`` (cbits/perf.c), the loop on one queue pair (perf, the ublk and NBD servers), and
one poller over several queue pairs (``perf --shared-poller``). Split from queue.py, whose
:class:`QueuePair` they drive."""

from __future__ import annotations

import contextlib
import errno
from typing import Any, Callable

import numpy as np

from nvmevfio._ffi import ffi, lib
from nvmevfio.errors import CommandTimeout, ControllerFatal, DeviceGone, QueuePaused, Refused, ShimError
from nvmevfio.nvme.queue import QueuePair


class SlicedLoop:
    """A C closed loop run in slices from Python: ``step`` and ``drain`` over the subclass's
    ``_run``."""

    def step(self, slice_s: float) -> bool:
        """Run for ``slice_s`` (kept full). True when the I/O count is reached and drained."""
        return self._run(slice_s, False)

    def drain(self) -> None:
        """Stop issuing; reap what is in flight (late commands recovered on the way)."""
        while not self._run(0.0, True):
            pass

    def _run(self, slice_s: float, drain: bool) -> bool:
        """One slice of the C loop (``drain``: issue nothing more). True when finished."""
        raise NotImplementedError


class PerfCounters(SlicedLoop):
    """What a C closed loop (``struct nv_perf``) counts, and its latency histogram: shared by
    :class:`PerfLoop` (on a queue pair) and the service client's loop (over its shared rings)."""

    _p: Any
    hist: np.ndarray

    def _setup(self, *, nlb: int, block_size: int, lba_lo: int, positions: int, random: bool, read_pct: int,
               depth: int, nslots: int, max_ios: int, seed: int, timeout_s: float) -> Any:
        """The workload's ``struct nv_perf`` (slots free, counters zero), kept in ``_p``."""
        self.hist = np.zeros(int(lib.nv_hist_buckets()), dtype=np.uint64)
        self.free_slots = np.arange(nslots - 1, -1, -1, dtype=np.uint32)
        p = ffi.new("struct nv_perf *")
        p.nlb, p.block_size = nlb, block_size
        p.lba_lo, p.positions, p.random, p.read_pct = lba_lo, positions, int(random), read_pct
        p.depth, p.nslots, p.max_ios = depth, nslots, max_ios
        p.timeout_ns = int(timeout_s * 1e9)
        p.rng = seed & 0xFFFFFFFFFFFFFFFF
        p.free_slots = ffi.cast("uint32_t *", self.free_slots.ctypes.data)
        p.nfree = nslots
        p.hist = ffi.cast("uint64_t *", self.hist.ctypes.data)
        self._p = p
        self.reset_stats()
        return p

    def _in_flight(self) -> int:
        p = self._p
        return int(p.nslots - p.nfree)

    @property
    def hybrid(self) -> bool:
        """Hybrid polling (a polled queue): nap about half the expected time to the next completion
        (mean latency / depth, measured as the loop runs), then spin, instead of spinning all along."""
        return bool(self._p.hybrid)

    @hybrid.setter
    def hybrid(self, on: bool) -> None:
        self._p.hybrid = int(on)

    @property
    def iodepth_batch(self) -> int:
        """Issue only when this many commands can go with one SQ tail doorbell (fio's
        iodepth_batch_submit); 1: whatever is free, at once. The caller keeps it within the depth."""
        return max(1, int(self._p.batch_min))

    @iodepth_batch.setter
    def iodepth_batch(self, n: int) -> None:
        self._p.batch_min = n

    @property
    def iodepth_batch_complete_max(self) -> int:
        """Reap at most this many completions before the CQ head doorbell and the next refill
        (fio's iodepth_batch_complete_max); 0: every ready one."""
        return int(self._p.reap_max)

    @iodepth_batch_complete_max.setter
    def iodepth_batch_complete_max(self, n: int) -> None:
        self._p.reap_max = n

    @property
    def wave_cap(self) -> int:
        """With iodepth_batch_complete_max 0: the cap it takes for the rest of the run once the
        loop's reaps show whole-queue waves (cbits/perf.h, perf_wave_check); 0: never."""
        return int(self._p.wave_cap)

    @wave_cap.setter
    def wave_cap(self, n: int) -> None:
        self._p.wave_cap = n

    @property
    def refill(self) -> bool:
        """While no completion cap is in force: re-post each completion's command as it is reaped,
        then the CQ head and SQ tail doorbells back to back (cbits/perf.c perf_reap_refill)."""
        return bool(self._p.refill)

    @refill.setter
    def refill(self, on: bool) -> None:
        self._p.refill = int(on)

    def reset_stats(self) -> None:
        """Zero the counters and histogram (after a ramp), keeping the commands in flight: they
        count towards the I/O count from here on."""
        p = self._p
        p.issued = self._in_flight()
        p.ios = p.reads = p.writes = p.errors = p.lat_sum_ns = p.lat_max_ns = 0
        p.lat_min_ns = 0xFFFFFFFFFFFFFFFF
        p.first_error_status = p.first_error_opcode = 0
        p.wait_ns = p.fills = p.reaps = p.sleeps = 0
        self.hist[:] = 0

    def stats(self) -> dict[str, int]:
        p = self._p
        return {k: int(getattr(p, k)) for k in ("ios", "reads", "writes", "errors", "lat_sum_ns", "lat_min_ns",
                                                 "lat_max_ns", "issued", "first_error_status",
                                                 "first_error_opcode", "wait_ns", "fills", "reaps", "sleeps")}


class PerfLoop(PerfCounters):
    """A closed-loop workload in C (``nv_perf_run``) on one queue pair: LBAs generated in C
    (random or sequential, read/write/mix), the queue kept full, latencies recorded into a
    log-linear histogram. Commands use the slots of a registered buffer, whose PRPs the
    broker authored; C picks a free slot per command and copies its PRPs."""

    def __init__(self, ring: QueuePair, prps: np.ndarray, buf_slot: int, buf_gen: int, *, nsid: int, nlb: int,
                 block_size: int, page_size: int, lba_lo: int, positions: int, random: bool, read_pct: int,
                 depth: int, max_ios: int, seed: int, timeout_s: float, zoned: tuple[int, int, int] = (0, 0, 0),
                 recover: Callable[[BaseException], list[np.ndarray]] | None = None,
                 guard: Callable[[], contextlib.AbstractContextManager[None]] | None = None,
                 slot_memory: Callable[[], np.ndarray] | None = None) -> None:
        """``recover``: the broker's answer to a late command, CSTS.CFS or a gone device (abort,
        reset, requeue); it returns the records of commands it ended, whose slots come back here.
        ``guard``: held around each run (the broker's one-thread-per-queue lock).
        ``slot_memory``: returns the slots' bytes where the device reads and writes them, or
        raises StaleHandle once the registered buffer (or the whole session) is gone."""
        self._ring = ring  # the broker's queue pair and PRP table: device addresses, never shown
        self._recover = recover
        self._guard = guard or contextlib.nullcontext
        self._prps = prps  # kept alive while C holds a pointer to it
        self._slot_memory = slot_memory
        p = self._setup(nlb=nlb, block_size=block_size, lba_lo=lba_lo, positions=positions, random=random,
                        read_pct=read_pct, depth=depth, nslots=len(prps), max_ios=max_ios, seed=seed,
                        timeout_s=timeout_s)
        p.nsid, p.page_size, p.buf_slot, p.buf_gen = nsid, page_size, buf_slot, buf_gen
        p.prps = ffi.cast("struct nv_prp_slot *", prps.ctypes.data)
        p.zone_size, p.zone_ios, p.zone_append = zoned  # a zoned workload (Submit.perf_loop)

    def _in_flight(self) -> int:
        return self._ring.in_flight

    def _run(self, slice_s: float, drain: bool) -> bool:
        with self._guard():
            return self._run_held(slice_s, drain)

    def _run_held(self, slice_s: float, drain: bool) -> bool:
        r = self._ring.perf_run(self._p, slice_s, drain)
        if r >= 0:
            return r == 1
        self._answer(r, "perf", self._ended)
        return False

    def _answer(self, r: int, what: str, ended: Callable[[np.ndarray], None]) -> None:
        """A C loop's negative result ``r`` (guard held): a late command (-ETIMEDOUT), CSTS.CFS, a
        reset by another thread or a gone device go to the broker's recovery, and ``ended`` gets
        the COMPLETION records of the commands it had to end; anything else raises."""
        try:
            if r == -errno.ETIMEDOUT:
                raise CommandTimeout(f"queue {self._ring.qid}: {what}: a command took longer than "
                                     f"{self._p.timeout_ns / 1e9:g} s ({self._ring.in_flight} commands in flight)",
                                     qid=self._ring.qid, in_flight=self._ring.in_flight)
            self._ring._completions(r)
        except (CommandTimeout, ControllerFatal, DeviceGone, QueuePaused) as exc:
            if self._recover is None or (isinstance(exc, ControllerFatal) and not exc.context.get("cfs")):
                raise
            for records in self._recover(exc):
                ended(records)

    # A C server on this queue (ublk, nvmevfio/ublk.py): the queue pair and the slots' PRPs reach
    # its C function through serve_c only (never returned to Python), under the broker's guard.
    @property
    def slot_memory(self) -> np.ndarray:
        """The registered buffer's bytes as the device reads and writes them, slot ``i`` at ``i *
        slot_size``: the buffer itself with an IOMMU; in the no-IOMMU lane its pinned bounce pages
        (a C server copying requests' data in and out works there, past the ledger's syncs)."""
        if self._slot_memory is None:
            raise Refused("invalid-argument", "this workload was built without its slots' memory")
        return self._slot_memory()  # the ledger's lookup: stale-handle once freed or closed

    def serve_c(self, fn: Any, *args: Any, ended: Callable[[np.ndarray], None], what: str = "C server") -> int:
        """``fn(*args, workload, queue_pair)`` under the broker's guard, once: ``fn`` is a function
        of the C shim (``lib``) whose last two parameters are this loop's ``struct nv_perf *``
        (the slots' PRP table, the ledger handle, the namespace, page size and timeout the broker
        validated) and the queue pair's ``struct nv_qp *``. A negative result the broker can
        answer (-ETIMEDOUT, CSTS.CFS, a reset by another thread) goes to its recovery, still
        under the guard, and ``ended`` gets the records of the commands it ended (``cookie``:
        the command's slot or tag, ``status``) to answer them; then the result is returned, for
        the caller to run again. A gone device or anything else raises."""
        shim_fn: Any = getattr(lib, str(getattr(fn, "__name__", "")), None)
        if shim_fn is None or shim_fn is not fn:
            raise TypeError(f"serve_c runs functions of the C shim (nvmevfio._ffi.lib), not {fn!r}")
        with self._guard():
            r = int(shim_fn(*args, self._p, self._ring._qp))
            if r < 0 and r != -errno.ECANCELED:
                self._answer(r, what, ended)
            return r

    def _ended(self, records: np.ndarray) -> None:
        """Commands the broker ended after a reset: errors, and their slots free again."""
        p = self._p
        for cookie, status, opcode in zip(records["cookie"].tolist(), records["status"].tolist(),
                                          records["opcode"].tolist()):
            self.free_slots[p.nfree] = cookie
            p.nfree += 1
            if not p.errors:
                p.first_error_status, p.first_error_opcode = status, opcode
            p.errors += 1
            p.ios += 1
            if opcode == 0x02:
                p.reads += 1
            else:
                p.writes += 1



class PerfGroup(SlicedLoop):
    """Several :class:`PerfLoop` s driven by one thread (``nv_perf_run_many``): one poller for the
    polled queue pairs of several controllers, as an SPDK reactor, instead of a spinning thread
    per queue. Each turn fills and reaps every queue; nothing sleeps, so the queues must be
    polled (a thread cannot sleep on several queues' interrupts: refused by name). ``step`` and
    ``drain`` are a loop's; a late command, CSTS.CFS, a reset by another thread or a gone device
    goes to the recovery of the one loop it concerns, with the other loops' guards let go."""

    def __init__(self, loops: list[PerfLoop]) -> None:
        if not loops:
            raise Refused("invalid-argument", "a shared poller needs at least one queue")
        irq = [loop._ring.qid for loop in loops if loop._ring._qp.irq_fd >= 0]
        if irq:
            raise Refused("invalid-argument", "a shared poller polls: queue(s) "
                          f"{', '.join(map(str, irq))} complete by interrupt (open the controllers polled)",
                          qids=irq)
        self.loops = loops
        self._qps = ffi.new("struct nv_qp *[]", [loop._ring._qp for loop in loops])
        self._ps = ffi.new("struct nv_perf *[]", [loop._p for loop in loops])
        self._which = ffi.new("uint32_t *")

    def _run(self, slice_s: float, drain: bool) -> bool:
        with contextlib.ExitStack() as held:
            for loop in self.loops:
                held.enter_context(loop._guard())
            r = int(lib.nv_perf_run_many(self._qps, self._ps, len(self.loops), int(slice_s * 1e9), int(drain),
                                         self._which))
            for loop in self.loops:
                if loop._ring._hook is not None:
                    loop._ring._hook.check()
        if r >= 0:
            return r == 1
        if r == -errno.EINVAL:
            raise ShimError("nv_perf_run_many", f"queue {self.loops[self._which[0]]._ring.qid}", -r,
                            "a shared poller polls: the queue completes by interrupt")
        loop = self.loops[self._which[0]]
        with loop._guard():  # as the loop's own run answers it: under its guard alone
            loop._answer(r, "perf", loop._ended)
        return False
