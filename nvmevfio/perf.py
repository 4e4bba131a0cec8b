"""A load generator in the manner of spdk_nvme_perf and fio: Python validates the workload and
reports; the closed loop runs in C (cbits/perf.c, ``nv_perf_run``: batches of refills and reaps,
a doorbell a batch, a log-linear latency histogram)."""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from nvmevfio.blockdev import BlockDevice
from nvmevfio.errors import NvmeVfioError, Refused
from nvmevfio.nvme.perfloop import PerfGroup
from nvmevfio.nvme.queue import DOORBELL_COUNTERS
from nvmevfio.perf_stats import (
    cpu_figures,
    merge_histograms,
    merge_stats,
    run_figures,
    split_count,
)

if TYPE_CHECKING:
    from nvmevfio.service.client import ServiceDevice

WORKLOADS = ("randread", "randwrite", "read", "write", "randrw")
# a zoned namespace's: Zone Append at depth (and "write" there follows the zones' write pointers)
ZONED_WORKLOADS = ("append",)


@dataclass
class PerfResult:
    workload: str
    io_size: int
    queue_depth: int
    mode: str
    seconds: float
    ios: int
    reads: int
    writes: int
    iops: float
    mib_per_s: float
    lat_mean_us: float
    lat_min_us: float
    lat_max_us: float
    lat_p50_us: float
    lat_p99_us: float
    lat_p999_us: float
    errors: int
    shadow_doorbells: bool = False
    data_descriptors: str = "prp"  # "prp" or "sgl" (open(sgl=True), perf --sgl)
    sq_in_cmb: bool = False  # the submission queue in the Controller Memory Buffer (perf --sq-in-cmb)
    sq_doorbell_mmio: int = 0  # SQ tail doorbell MMIO writes during the run
    cq_doorbell_mmio: int = 0
    shadow_only_updates: int = 0  # doorbell updates the EventIdx rule let go without MMIO
    wait_pct: float = 0.0  # share of the run the C loop spent waiting for the device (the profile)
    doorbell_pct: float = 0.0  # share of the loop's time inside MMIO doorbell writes (each an exit under emulation)
    sq_doorbell_us: float = 0.0  # mean time of one SQ tail doorbell MMIO write
    cq_doorbell_us: float = 0.0
    ios_per_submit: float = 0.0  # commands per SQ batch (per SQ tail doorbell)
    ios_per_reap: float = 0.0  # completions per CQ batch
    iodepth_batch: int = 1  # issued only when this many could go at once (--iodepth-batch)
    iodepth_batch_complete_max: int = 0  # completions reaped at most per CQ doorbell (0: all ready)
    refill_as_reaped: bool = False  # each command re-posted as its completion is reaped, the CQ head and
    # SQ tail doorbells back to back (past -q 64 by default; cbits/perf.c perf_reap_refill)
    io_queue_size: int = 0  # entries of each I/O queue pair (--io-queue-size); past -q + 1 the CQ head doorbell
    # waits; 0 through the service (its daemon's queues, whose sessions' depth is what info.queue_depth says)
    verify: bool = False
    verified_blocks: int = 0  # blocks read back whose header and CRC32C were checked
    mismatches: list = field(default_factory=list)  # (lba, expected (lba, seq, crc), found (magic, lba, seq, crc))
    queues: int = 1  # I/O queue pairs run at once, each by its own thread (--queues)
    cpus: list = field(default_factory=list)  # the CPUs the queues' threads were pinned to (--cpu), queue i on [i % n]
    # CPU time of the whole process per completed command (getrusage), and the share of the queue
    # threads' time off the CPU: waiting on the completion eventfd (irq), napping (hybrid), ~0 polling
    cpu_us_per_io: float = 0.0
    usr_us_per_io: float = 0.0
    sys_us_per_io: float = 0.0
    wait_share: float = 0.0
    per_queue: list = field(default_factory=list)  # each queue's figures (dicts: queue, cpu, iops, ..., wait_share)
    # the workload engine's (nvmevfio/workload_engine.py; perf --mix/--bs/...): the mix and sizes asked, each op's
    # figures (count, share, IOPS, MiB/s, latency, its histogram's non-zero buckets), a point a second
    mix: dict = field(default_factory=dict)
    sizes: list = field(default_factory=list)  # [bytes, percent]
    ops: dict = field(default_factory=dict)
    series: list = field(default_factory=list)
    rate_cap: int = 0  # --rate (IOPS, all jobs), 0: none
    mismatch_count: int = 0  # every mismatch (``mismatches`` keeps the first ones)
    verify_map: str = ""  # where the verify map was saved
    resets: int = 0  # controller resets during the run, whichever thread made them; the jobs carried on
    loop_recoveries: int = 0  # recoveries the jobs' own loops entered (a late command, a reset seen mid-wait)
    busy_redraws: int = 0  # positions drawn again because a command was in flight there

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Queue:
    """One queue pair's share of a run: its device (and qid), workload, CPU, what its thread measured."""

    dev: Any
    qid: int | None
    cpu: int | None
    buf: Any
    loop: Any
    wall_s: float = 0.0
    usr_s: float = 0.0
    sys_s: float = 0.0
    doorbells: dict = field(default_factory=dict)
    error: BaseException | None = None

    def counters(self) -> dict[str, int]:
        return self.dev.doorbell_counters(self.qid) if self.qid is not None else self.dev.doorbell_counters()


def slot_buffer(qs: list[_Queue], d: Any, qid: int | None, cpu: int | None, depth: int, slot_size: int,
                seed: int) -> Any:
    """A queue's registered buffer of ``depth`` slots (random bytes: what writes carry), its
    :class:`_Queue` appended to ``qs`` (the loop set by the caller)."""
    buf = d.alloc_buffer(depth * slot_size)
    qs.append(_Queue(d, qid, cpu, buf, None))
    buf.array[:] = np.random.default_rng(seed).integers(0, 256, buf.size, dtype=np.uint8)
    return d.register_buffer(buf, slot_size)


@contextlib.contextmanager
def freed_on_failure(qs: list[_Queue]) -> Iterator[None]:
    """The queues' buffers freed when building the run fails (a refusal of its workload)."""
    try:
        yield
    except BaseException:
        for q in qs:
            with contextlib.suppress(NvmeVfioError):
                q.dev.free_buffer(q.buf)
        raise


def _sessions(dev: Any, queues: int) -> list[tuple[Any, int | None]]:
    """(device, qid) of each queue pair the run uses: I/O queues 1..queues of a device opened here,
    or one service session each (a session is one queue pair); too many refused, by name."""
    if isinstance(dev, (list, tuple)):
        if queues not in (1, len(dev)):
            raise Refused("count-out-of-range", f"{queues} queue pairs asked, {len(dev)} service sessions given "
                          "(one queue pair each)", queues=queues)
        return [(d, None) for d in dev]
    if queues < 1:
        raise Refused("count-out-of-range", f"queue count {queues} must be at least 1", queues=queues)
    have = dev.info.io_queues if isinstance(dev, BlockDevice) else 1
    if queues > have:
        raise Refused("count-out-of-range", f"{queues} queue pairs asked, the device has {have} I/O queue pair(s) "
                      "(open it with more queues, or connect one service session per queue)",
                      queues=queues, io_queues=have)
    return [(dev, q + 1 if isinstance(dev, BlockDevice) else None) for q in range(queues)]


def _drive(group: list[_Queue], *, seconds: float | None, ramp_s: float, start: threading.Barrier,
           stop: threading.Event) -> None:
    """One thread's queues (one queue, or all of a shared poller's: ``PerfGroup``): pinned to the
    first one's CPU, ramp, wait for the others, then the measured run and its drain, with this
    thread's CPU time (getrusage RUSAGE_THREAD) and doorbells around it. A shared poller's CPU
    time goes to its queues in proportion to the commands each completed."""
    try:
        cpu = group[0].cpu
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})  # 0: the calling thread (Linux affinity is per thread)
        loop: Any = group[0].loop if len(group) == 1 else PerfGroup([q.loop for q in group])
        if ramp_s > 0:
            t_ramp = time.perf_counter() + ramp_s
            while time.perf_counter() < t_ramp and not stop.is_set() and not loop.step(min(0.25, ramp_s)):
                pass
            for q in group:
                q.loop.reset_stats()
        start.wait()
        before = [q.counters() for q in group]
        ru0 = resource.getrusage(resource.RUSAGE_THREAD)
        t0 = time.perf_counter()
        end = t0 + seconds if seconds is not None else float("inf")
        finished = False
        while not finished and not stop.is_set():
            now = time.perf_counter()
            if now >= end:
                break
            finished = loop.step(min(1.0, end - now))
        loop.drain()
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_THREAD)
        usr, sys_ = ru1.ru_utime - ru0.ru_utime, ru1.ru_stime - ru0.ru_stime
        ios = [q.loop.stats()["ios"] for q in group] if len(group) > 1 else [1]
        for q, b, n in zip(group, before, ios):
            share = n / sum(ios) if sum(ios) else 1 / len(group)
            q.wall_s, q.usr_s, q.sys_s = wall, usr * share, sys_ * share
            after = q.counters()
            q.doorbells = {k: after[k] - b[k] for k in DOORBELL_COUNTERS}
    except BaseException as exc:  # handed to the calling thread, which raises it
        group[0].error = exc
        stop.set()
        start.abort()


def _run_threads(qs: list[_Queue], *, seconds: float | None, ramp_s: float,
                 status: Callable[[float, int], None] | None,
                 tick: Callable[[float], None] | None = None, shared_poller: bool = False) -> tuple[float, float]:
    """Each queue's closed loop on a thread of its own (the C loop releases the GIL: cffi's API
    mode), or all of them on one thread (``shared_poller``: ``PerfGroup``, polled queues only),
    measured from one common start; returns the process's user and system CPU seconds
    over the measured part. ``status`` and ``tick`` (a time series' point) are called each
    whole second from the start (1.0, 2.0, ...: no drift)."""
    groups = [qs] if shared_poller else [[q] for q in qs]
    clock: dict[str, Any] = {}

    def started() -> None:
        clock["t0"] = time.perf_counter()
        clock["ru"] = resource.getrusage(resource.RUSAGE_SELF)

    start = threading.Barrier(len(groups) + 1, action=started)
    stop = threading.Event()
    threads = [threading.Thread(target=_drive, args=(g,), kwargs={"seconds": seconds, "ramp_s": ramp_s,
                                                                "start": start, "stop": stop},
                                name=f"nvmevfio-perf-{i + 1}", daemon=True) for i, g in enumerate(groups)]
    for t in threads:
        t.start()
    try:
        start.wait()
        next_status = clock["t0"] + 1.0
        for t in threads:
            while t.is_alive():
                t.join(max(0.01, next_status - time.perf_counter()))
                now = time.perf_counter()
                if now >= next_status:
                    if tick is not None:
                        tick(now - clock["t0"])
                    if status is not None:
                        status(now - clock["t0"], sum(q.loop.stats()["ios"] for q in qs))
                    next_status += 1.0
    except threading.BrokenBarrierError:
        pass  # a queue's thread failed before the start: its error is raised below
    except BaseException:
        stop.set()
        start.abort()
        for t in threads:
            t.join()
        raise
    for t in threads:
        t.join()
    for q in qs:
        if q.error is not None:
            raise q.error
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime - clock["ru"].ru_utime, ru.ru_stime - clock["ru"].ru_stime


@dataclass
class Prepared:
    """A run built and checked, not yet started (:func:`prepare`): its queues, each with its
    registered buffer and C loop, and what its result will say; ``verify`` instead when the run
    is perf's verifying loop (in Python, one queue)."""

    qs: list[_Queue]
    meta: dict[str, Any]
    zone_starts: range = range(0)
    first: Any = None
    verify: Callable[..., PerfResult] | None = None
    seconds: float | None = None  # how long it runs (5 s when neither a time nor a count was given)

    def start(self) -> None:
        """What must happen once the workload is checked and before its first command: a zoned
        workload's zones emptied, to be filled once."""
        for z in self.zone_starts:
            self.first.zone_action("reset", z)

    def result(self, usr_s: float, sys_s: float) -> PerfResult:
        """The buffers freed (after a failure commands may still hold them: the session's end
        scrubs them) and the run's figures."""
        for q in self.qs:
            q.dev.free_buffer(q.buf)
        return _result(self.qs, usr_s=usr_s, sys_s=sys_s, **self.meta)

    def free(self) -> None:
        """A run that will not start: its buffers freed."""
        for q in self.qs:
            with contextlib.suppress(NvmeVfioError):
                q.dev.free_buffer(q.buf)


def default_reap_max(queue_depth: int) -> int:
    """perf's completion batch cap past QD128: a quarter of the depth (0 up to QD128). In this
    process's loops, the cap whole-queue waves engage (cbits/perf.h; QD256 1.2-1.6x the C driver
    capped). At QD128 the cap's SQ tail doorbell waited 0.1-0.37 ms for QEMU's lock (0.5-0.95x)
    where the loop re-posting as it reaps ran 1.01-1.36x (docs/benchmarks.md, "Session 25");
    the service's client loops take the cap from the start."""
    return 0 if queue_depth <= 128 else queue_depth // 4


def refills_as_reaped(queue_depth: int) -> bool:
    """Does perf's loop (in this process, no completion cap in force, ``--iodepth-batch`` 1)
    re-post each command as its completion is reaped, then write the CQ head and SQ tail
    doorbells back to back (cbits/perf.c perf_reap_refill)? Past QD64, where refilling after the
    reap fell into slow whole-queue waves (QD128: 0.64-0.91 of the C driver); up to it the CQ
    head doorbell waits while the CQ has room (docs/benchmarks.md, "Session 20", "Session 25")."""
    return queue_depth > 64


def run(dev: BlockDevice | ServiceDevice | list[ServiceDevice], *, workload: str = "randread", io_size: int = 4096,
        queue_depth: int = 1, seconds: float | None = 5.0, count: int | None = None,
        lba_range: tuple[int, int] | None = None, rwmixread: int = 50, seed: int = 1,
        status: Callable[[float, int], None] | None = None, ramp_s: float = 0.0, verify: bool = False,
        hybrid: bool = False, queues: int = 1, cpus: list[int] | None = None,
        shared_poller: bool = False, iodepth_batch: int = 1,
        iodepth_batch_complete_max: int | None = None) -> PerfResult:
    """Run a workload; ``seconds`` or ``count`` bounds it. Returns throughput and latency figures.

    Python validates the workload once; the closed loop runs in C (``nv_perf_run``): it generates
    LBAs, keeps ``queue_depth`` commands in flight in the slots of a registered buffer and records
    latencies into a histogram. ``status(elapsed, ios)`` is called about once a second.
    ``ramp_s``: run this long first, unmeasured (like fio's ramp_time). ``hybrid``: on a polled
    device, nap between completions instead of spinning (Linux's hybrid polling).
    ``queues``: run on this many I/O queue pairs at once (1..the device's), each with its own
    closed loop and thread, ``queue_depth`` deep, ``count`` shared out; with a list of service
    sessions, one queue per session. ``cpus``: pin queue i's thread to ``cpus[i % len(cpus)]``.
    ``shared_poller``: one thread polls every queue (``nv_perf_run_many``) instead of a thread
    each; polled queues only, pinned to ``cpus[0]`` when given. ``iodepth_batch``: issue only
    when that many commands can go with one SQ tail doorbell (fio's iodepth_batch_submit; 1 to
    ``queue_depth``), fewer doorbells for a shallower queue between batches.
    ``iodepth_batch_complete_max``: reap at most that many completions before the CQ head
    doorbell and the next refill (fio's; 0: every ready one; None: every ready one, re-posted as reaped
    past QD64, :func:`default_reap_max` once whole-queue waves show or through the service).
    The result has every queue's own figures (``per_queue``) and the whole run's, and the CPU
    time per completed command."""
    prep = prepare(dev, workload=workload, io_size=io_size, queue_depth=queue_depth, seconds=seconds, count=count,
                   lba_range=lba_range, rwmixread=rwmixread, seed=seed, verify=verify, hybrid=hybrid, queues=queues,
                   cpus=cpus, shared_poller=shared_poller, iodepth_batch=iodepth_batch,
                   iodepth_batch_complete_max=iodepth_batch_complete_max)
    if prep.verify is not None:
        return prep.verify(status=status)
    prep.start()
    usr_s, sys_s = _run_threads(prep.qs, seconds=prep.seconds, ramp_s=ramp_s, status=status,
                                shared_poller=shared_poller)
    return prep.result(usr_s, sys_s)


def prepare(dev: BlockDevice | ServiceDevice | list[ServiceDevice], *, workload: str = "randread",
            io_size: int = 4096, queue_depth: int = 1, seconds: float | None = 5.0, count: int | None = None,
            lba_range: tuple[int, int] | None = None, rwmixread: int = 50, seed: int = 1, verify: bool = False,
            hybrid: bool = False, queues: int = 1, cpus: list[int] | None = None,
            shared_poller: bool = False, iodepth_batch: int = 1,
            iodepth_batch_complete_max: int | None = None) -> Prepared:
    """:func:`run`'s workload checked and built, nothing sent to the device yet: every refusal
    happens here, before any I/O (several controllers' runs are all prepared before any
    starts: ``perf_many``)."""
    if workload not in WORKLOADS + ZONED_WORKLOADS:
        raise Refused("unsupported-workload", f"workload {workload!r}: one of {', '.join(WORKLOADS + ZONED_WORKLOADS)}")
    pairs = _sessions(dev, queues)
    first: Any = pairs[0][0]
    bs = first.block_size
    if io_size <= 0 or io_size % bs:
        raise Refused("length-mismatch", f"I/O size {io_size} is not a positive multiple of the {bs}-byte block")
    lo, hi = lba_range or (0, first.block_count)
    if not (0 <= lo < hi <= first.block_count) or hi - lo < io_size // bs:
        raise Refused("window-past-namespace-end", f"range {lo}..{hi} does not fit the namespace "
                      f"(0..{first.block_count}) or one {io_size}-byte I/O")
    if not 1 <= queue_depth <= first.capacity():
        raise Refused("count-out-of-range", f"queue depth {queue_depth} outside 1..{first.capacity()}")
    if not 1 <= iodepth_batch <= queue_depth:
        raise Refused("count-out-of-range", f"I/O depth batch {iodepth_batch} outside 1..{queue_depth} (the queue "
                      "depth)", iodepth_batch=iodepth_batch, queue_depth=queue_depth)
    # by default a loop of this process reaps every ready completion and caps itself when whole-queue
    # waves show (cbits/perf.h); a service session's client loop takes the cap at once
    waves = iodepth_batch_complete_max is None and isinstance(first, BlockDevice)
    wave_cap = default_reap_max(queue_depth) if waves else 0
    if iodepth_batch_complete_max is not None:
        reap_max = iodepth_batch_complete_max
    else:
        reap_max = 0 if waves else default_reap_max(queue_depth)
    if not 0 <= reap_max <= queue_depth:
        raise Refused("count-out-of-range", f"completion batch {reap_max} outside 0..{queue_depth} "
                      "(0: every ready one)", iodepth_batch_complete_max=reap_max)
    if verify and (iodepth_batch > 1 or iodepth_batch_complete_max):
        raise Refused("invalid-argument", "verify runs its loop in Python: --iodepth-batch and "
                      "--iodepth-batch-complete-max are the C loop's")
    if count is not None and count < len(pairs):
        raise Refused("count-out-of-range", f"I/O count {count} must be at least one per queue ({len(pairs)})")
    allowed = os.sched_getaffinity(0)
    if cpus is not None and (not cpus or not set(cpus) <= allowed):
        raise Refused("invalid-argument", f"CPUs {cpus}: this process may run on CPUs "
                      f"{', '.join(map(str, sorted(allowed)))} only")
    if seconds is None and count is None:
        seconds = 5.0
    read_pct = {"randread": 100, "read": 100, "randwrite": 0, "write": 0}.get(workload, rwmixread)
    if verify and workload in ZONED_WORKLOADS:
        raise Refused("invalid-argument", "verify writes at chosen LBAs: not a Zone Append workload")
    if verify and hybrid:
        raise Refused("invalid-argument", "verify runs its loop in Python: hybrid polling is the C loop's")
    if hybrid and first.info.completion_mode != "poll":
        raise Refused("invalid-argument", "hybrid polling needs a polled device (open it with irq=False)")
    if shared_poller and (verify or hybrid):
        raise Refused("invalid-argument", "a shared poller spins over every queue in C: not with verify (a Python "
                      "loop) or hybrid polling (naps)")
    if shared_poller and not isinstance(first, BlockDevice):
        raise Refused("invalid-argument", "a shared poller drives queue pairs of devices opened here, not service "
                      "sessions (each is its own client loop)")
    if shared_poller and first.info.completion_mode != "poll":
        raise Refused("invalid-argument", "a shared poller polls: open the device polled (irq=False); a thread "
                      "cannot sleep on several queues' interrupts")
    if verify:
        if not isinstance(first, BlockDevice) or len(pairs) > 1:
            raise Refused("invalid-argument", "verify runs in Python on one queue of a device opened here")
        return Prepared([], {}, verify=functools.partial(
            _run_verify, first, workload=workload, io_size=io_size, queue_depth=queue_depth, seconds=seconds,
            count=count, lo=lo, hi=hi, read_pct=read_pct, seed=seed))
    page = 4096
    slot_size = (io_size + page - 1) // page * page
    zoned, zone_starts = _zoned(first, workload, lo, hi)
    if zoned and len(pairs) > 1:
        raise Refused("invalid-argument", f"workload {workload} on a zoned namespace fills its zones once, in order, "
                      "on one queue: no --queues", queues=len(pairs))
    qs: list[_Queue] = []
    with freed_on_failure(qs):  # every queue's buffer and workload validated before any I/O
        for i, ((d, qid), n) in enumerate(zip(pairs, split_count(count, len(pairs)))):
            reg = slot_buffer(qs, d, qid, cpus[i % len(cpus)] if cpus else None, queue_depth, slot_size, seed + i)
            kw = {"qid": qid} if qid is not None else {}
            loop = d.perf_loop(reg, io_size=io_size, lba_range=(lo, hi), random=workload.startswith("rand"),
                               read_pct=read_pct, depth=queue_depth, max_ios=n, seed=seed + i, **kw, **zoned)
            loop.hybrid = hybrid
            loop.iodepth_batch = iodepth_batch
            loop.iodepth_batch_complete_max = reap_max
            loop.wave_cap = wave_cap
            loop.refill = waves and iodepth_batch == 1 and refills_as_reaped(queue_depth)
            qs[-1].loop = loop
    meta = {"workload": workload, "io_size": io_size, "queue_depth": queue_depth, "cpus": cpus,
            "mode": "hybrid" if hybrid else first.info.completion_mode, "shadow": first.info.shadow_doorbells,
            "info": first.info, "iodepth_batch": iodepth_batch}
    return Prepared(qs, meta, zone_starts, first, seconds=seconds)


def _result(qs: list[_Queue], *, workload: str, io_size: int, queue_depth: int, cpus: list[int] | None,
            usr_s: float, sys_s: float, mode: str, shadow: bool, info: Any = None,
            iodepth_batch: int = 1) -> PerfResult:
    stats = [q.loop.stats() for q in qs]
    elapsed = max(q.wall_s for q in qs)
    # the cap in force at the end, as the loops have it: whole-queue waves may have engaged one (cbits/perf.h)
    iodepth_batch_complete_max = max(int(q.loop.iodepth_batch_complete_max) for q in qs)
    rows = []
    for i, (q, st) in enumerate(zip(qs, stats)):
        rows.append({"queue": q.qid if q.qid is not None else i + 1, "cpu": q.cpu, "seconds": q.wall_s,
                     **run_figures(st, q.loop.hist, elapsed, io_size, q.wall_s, q.doorbells),
                     **cpu_figures(q.usr_s, q.sys_s, q.wall_s, st["ios"])})
    total = merge_stats(stats)
    db = {k: sum(q.doorbells[k] for q in qs) for k in DOORBELL_COUNTERS}
    whole = run_figures(total, merge_histograms([q.loop.hist for q in qs]), elapsed, io_size,
                     sum(q.wall_s for q in qs), db)
    cpu: dict[str, Any] = dict(cpu_figures(usr_s, sys_s, elapsed, total["ios"]))
    # off CPU: the queue threads' share, not the process's (whose other threads sleep)
    cpu["wait_share"] = cpu_figures(sum(q.usr_s for q in qs), sum(q.sys_s for q in qs),
                                    sum(q.wall_s for q in qs), total["ios"])["wait_share"]
    return PerfResult(workload=workload, io_size=io_size, queue_depth=queue_depth, mode=mode, seconds=elapsed,
                      shadow_doorbells=shadow, queues=len(qs), cpus=list(cpus or []), per_queue=rows,
                      data_descriptors=getattr(info, "data_descriptors", "prp"),
                      sq_in_cmb=bool(getattr(info, "sq_in_cmb", False)), iodepth_batch=iodepth_batch,
                      iodepth_batch_complete_max=iodepth_batch_complete_max,
                      refill_as_reaped=any(q.loop.refill for q in qs),
                      io_queue_size=qs[0].dev.info.queue_depth if isinstance(qs[0].dev, BlockDevice) else 0,
                      **whole, **cpu)


def _zoned(dev: BlockDevice | ServiceDevice, workload: str, lo: int, hi: int) -> tuple[dict[str, Any], range]:
    """A zoned namespace's workload (``append``, or ``write`` on a zoned namespace): the zones of
    the range (returned, to be reset once the broker checked the workload) are filled once, in
    order, each to its capacity; the run ends when they are full (or its time is up)."""
    zoned = dev.provider.namespace(dev.nsid).zoned if isinstance(dev, BlockDevice) else None
    if workload not in ZONED_WORKLOADS and (workload != "write" or zoned is None):
        return {}, range(0)
    if zoned is None or not isinstance(dev, BlockDevice):
        raise Refused("not-zoned", f"workload {workload} needs a zoned namespace opened here (not the service)")
    size = zoned.zone_size
    starts = range(lo - lo % size, hi - size + 1, size)
    _, zones = dev.zone_report(lo - lo % size, count=max(1, len(starts)))
    return {"zoned": workload, "zone_capacity": min((z.capacity for z in zones), default=0)}, starts


# ---------------------------------------------------------------------- verify (like fio's verify)
VERIFY_MAGIC = 0x4656564E  # "NVVF"
# Every block written in verify mode starts with this header; the CRC32C covers the rest of the block.
VERIFY_HEADER = np.dtype([("magic", "<u4"), ("crc", "<u4"), ("lba", "<u8"), ("seq", "<u8"), ("pad", "<u8")])


def _run_verify(dev: BlockDevice, *, workload: str, io_size: int, queue_depth: int, seconds: float | None,
                count: int | None, lo: int, hi: int, read_pct: int, seed: int,
                status: Callable[[float, int], None] | None) -> PerfResult:
    """The verify workload, driven from Python over the batched path: every written block carries
    its LBA, a sequence number and a CRC32C (the ``crc32c`` package) of its payload; every block
    read back that this run wrote is checked against what was last written there. I/Os go to
    I/O-sized positions in the range, never two at once to the same one."""
    import crc32c

    bs = dev.block_size
    nlb = io_size // bs
    positions = (hi - lo) // nlb
    if queue_depth > positions:
        raise Refused("count-out-of-range", f"queue depth {queue_depth} exceeds the {positions} I/O positions "
                      "of the range (verify never overlaps two I/Os)")
    rng = np.random.default_rng(seed)
    buf = dev.alloc_buffer(queue_depth * io_size)
    arr = buf.array
    expected: dict[int, tuple[int, int]] = {}  # lba -> (seq, crc) of the last completed write
    busy: set[int] = set()
    pending: dict[int, tuple[int, int, bool, list[tuple[int, int]]]] = {}  # tag -> (slot, pos, is read, headers)
    free = list(range(queue_depth))
    seq = verified = issued = done_n = reads = errors = 0
    mismatches: list[tuple[int, tuple[int, int, int], tuple[int, int, int, int]]] = []
    lat: list[np.ndarray] = []
    sequential = not workload.startswith("rand")
    cursor = 0
    t0 = time.perf_counter()
    end = t0 + seconds if seconds is not None else float("inf")
    next_status = t0 + 1.0
    while True:
        now = time.perf_counter()
        stop = now >= end or (count is not None and issued >= count)
        while not stop and free and len(busy) < positions:
            if sequential:
                pos = cursor % positions
                cursor += 1
                if pos in busy:
                    break
            else:
                pos = int(rng.integers(0, positions))
                if pos in busy:
                    continue
            slot = free.pop()
            lba = lo + pos * nlb
            is_read = bool(read_pct >= 100 or (read_pct > 0 and rng.integers(0, 100) < read_pct))
            view = arr[slot * io_size : (slot + 1) * io_size]
            headers: list[tuple[int, int]] = []
            if not is_read:
                view[:] = rng.integers(0, 256, io_size, dtype=np.uint8)
                for b in range(nlb):
                    seq += 1
                    block = view[b * bs : (b + 1) * bs]
                    crc = crc32c.crc32c(block[VERIFY_HEADER.itemsize :].tobytes())
                    block[: VERIFY_HEADER.itemsize] = np.array([(VERIFY_MAGIC, crc, lba + b, seq, 0)],
                                                               dtype=VERIFY_HEADER).view(np.uint8)
                    headers.append((seq, crc))
            submit = dev.submit_reads if is_read else dev.submit_writes
            [tag] = submit([lba], [nlb], buf, [slot * io_size]).tolist()
            pending[tag] = (slot, pos, is_read, headers)
            busy.add(pos)
            issued += 1
            stop = count is not None and issued >= count
        if not pending:
            break
        completed = dev.reap(1)
        lat.append(completed["latency_s"])
        for tag, st in zip(completed["tag"].tolist(), completed["status"].tolist()):
            slot, pos, is_read, headers = pending.pop(tag)
            lba = lo + pos * nlb
            done_n += 1
            if st:
                errors += 1
            elif is_read:
                reads += 1
                view = arr[slot * io_size : (slot + 1) * io_size]
                for b in range(nlb):
                    want = expected.get(lba + b)
                    if want is None:
                        continue  # not written by this run: nothing to compare
                    block = view[b * bs : (b + 1) * bs]
                    h = block[: VERIFY_HEADER.itemsize].view(VERIFY_HEADER)[0]
                    crc = crc32c.crc32c(block[VERIFY_HEADER.itemsize :].tobytes())
                    found = (int(h["magic"]), int(h["lba"]), int(h["seq"]), int(h["crc"]))
                    if found != (VERIFY_MAGIC, lba + b, want[0], want[1]) or crc != want[1]:
                        mismatches.append((lba + b, (lba + b, want[0], want[1]), found))
                    verified += 1
            else:
                for b, (sq, crc) in enumerate(headers):
                    expected[lba + b] = (sq, crc)
            busy.discard(pos)
            free.append(slot)
        if status is not None and now >= next_status:
            status(now - t0, done_n)
            next_status = now + 1.0
    elapsed = time.perf_counter() - t0
    dev.free_buffer(buf)
    us = np.concatenate(lat) * 1e6 if lat else np.zeros(0)
    p50, p99, p999 = (float(v) for v in np.percentile(us, [50, 99, 99.9])) if len(us) else (0.0, 0.0, 0.0)
    return PerfResult(
        workload=workload, io_size=io_size, queue_depth=queue_depth, mode=dev.info.completion_mode,
        seconds=elapsed, ios=done_n, reads=reads, writes=done_n - reads - errors,
        iops=done_n / elapsed if elapsed else 0.0, mib_per_s=done_n * io_size / elapsed / (1 << 20) if elapsed else 0.0,
        lat_mean_us=float(us.mean()) if len(us) else 0.0, lat_min_us=float(us.min()) if len(us) else 0.0,
        lat_max_us=float(us.max()) if len(us) else 0.0, lat_p50_us=p50, lat_p99_us=p99, lat_p999_us=p999,
        errors=errors, shadow_doorbells=dev.info.shadow_doorbells, verify=True, verified_blocks=verified,
        mismatches=mismatches)
