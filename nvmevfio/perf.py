"""A load generator in the manner of spdk_nvme_perf and fio: Python validates the
workload and reports; the closed loop runs in C (cbits/qpair.c, ``nv_perf_run``),
refilling every free slot in one batch (one SQ doorbell) and reaping every ready
completion at once (one CQ doorbell), into a log-linear latency histogram.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from nvmevfio.blockdev import BlockDevice
from nvmevfio.errors import Refused

WORKLOADS = ("randread", "randwrite", "read", "write", "randrw")


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
    sq_doorbell_mmio: int = 0  # SQ tail doorbell MMIO writes during the run
    cq_doorbell_mmio: int = 0
    shadow_only_updates: int = 0  # doorbell updates the EventIdx rule let go without MMIO
    wait_pct: float = 0.0  # share of the run the C loop spent waiting for the device (the profile)
    ios_per_submit: float = 0.0  # commands per SQ batch (per SQ tail doorbell)
    ios_per_reap: float = 0.0  # completions per CQ batch

    def to_dict(self) -> dict:
        return asdict(self)


# fio's log-linear latency histogram (stat.h FIO_IO_U_PLAT_*): values below 128 ns exact, then
# 64 buckets per power of two. The C loop fills it (nv_hist_bucket); these read it back.
HIST_BITS = 6
HIST_VAL = 1 << HIST_BITS


def bucket_value(idx: int) -> float:
    """The latency (ns) a histogram bucket stands for: its midpoint (fio's plat_idx_to_val)."""
    if idx < 2 * HIST_VAL:
        return float(idx)
    error_bits = (idx >> HIST_BITS) - 1
    base = 1 << (error_bits + HIST_BITS)
    return base + (idx % HIST_VAL + 0.5) * (1 << error_bits)


def percentiles(hist: np.ndarray, pcts: list[float]) -> list[float]:
    """Latency percentiles (ns) from a histogram: the first bucket whose cumulative count reaches
    pct% of the total (fio's method)."""
    total = int(hist.sum())
    if total == 0:
        return [0.0 for _ in pcts]
    cum = np.cumsum(hist)
    out = []
    for pct in pcts:
        want = max(1, int(np.ceil(total * pct / 100.0)))
        out.append(bucket_value(int(np.searchsorted(cum, want))))
    return out


def run(dev: BlockDevice, *, workload: str = "randread", io_size: int = 4096, queue_depth: int = 1,
        seconds: float | None = 5.0, count: int | None = None, lba_range: tuple[int, int] | None = None,
        rwmixread: int = 50, seed: int = 1, status: Callable[[float, int], None] | None = None,
        ramp_s: float = 0.0) -> PerfResult:
    """Run a workload; ``seconds`` or ``count`` bounds it. Returns throughput and latency figures.

    Python validates the workload once; the closed loop runs in C (``nv_perf_run``): it generates
    LBAs, keeps ``queue_depth`` commands in flight in the slots of a registered buffer and records
    latencies into a histogram. ``status(elapsed, ios)`` is called about once a second.
    ``ramp_s``: run this long first, unmeasured (like fio's ramp_time)."""
    if workload not in WORKLOADS:
        raise Refused("unsupported-workload", f"workload {workload!r}: one of {', '.join(WORKLOADS)}")
    bs = dev.block_size
    if io_size <= 0 or io_size % bs:
        raise Refused("length-mismatch", f"I/O size {io_size} is not a positive multiple of the {bs}-byte block")
    lo, hi = lba_range or (0, dev.block_count)
    if not (0 <= lo < hi <= dev.block_count) or hi - lo < io_size // bs:
        raise Refused("window-past-namespace-end", f"range {lo}..{hi} does not fit the namespace "
                      f"(0..{dev.block_count}) or one {io_size}-byte I/O")
    if not 1 <= queue_depth <= dev.capacity():
        raise Refused("count-out-of-range", f"queue depth {queue_depth} outside 1..{dev.capacity()}")
    if count is not None and count < 1:
        raise Refused("count-out-of-range", f"I/O count {count} must be positive")
    if seconds is None and count is None:
        seconds = 5.0
    read_pct = {"randread": 100, "read": 100, "randwrite": 0, "write": 0}.get(workload, rwmixread)
    page = 4096
    slot_size = (io_size + page - 1) // page * page
    buf = dev.alloc_buffer(queue_depth * slot_size)
    buf.array[:] = np.random.default_rng(seed).integers(0, 256, buf.size, dtype=np.uint8)
    reg = dev.register_buffer(buf, slot_size)
    loop = dev.perf_loop(reg, io_size=io_size, lba_range=(lo, hi), random=workload.startswith("rand"),
                         read_pct=read_pct, depth=queue_depth, max_ios=count or 0, seed=seed)
    counters = ("sq_mmio", "cq_mmio", "sq_shadow_only", "cq_shadow_only")
    clean = False
    try:
        if ramp_s > 0:
            t_ramp = time.perf_counter() + ramp_s
            while time.perf_counter() < t_ramp and not loop.step(min(0.25, ramp_s)):
                pass
            loop.reset_stats()
        before = dev.doorbell_counters()
        t0 = time.perf_counter()
        end = t0 + seconds if seconds is not None else float("inf")
        finished = False
        while not finished:
            now = time.perf_counter()
            if now >= end:
                break
            finished = loop.step(min(1.0, end - now))
            if status is not None:
                status(time.perf_counter() - t0, loop.stats()["ios"])
        loop.drain()
        elapsed = time.perf_counter() - t0
        after = dev.doorbell_counters()
        db = {k: after[k] - before[k] for k in counters}
        clean = True
    finally:
        if clean:
            dev.free_buffer(buf)
    st = loop.stats()
    n = st["ios"]
    # a bucket stands for its midpoint: keep the figures inside what was measured
    p50, p99, p999 = (min(max(v, st["lat_min_ns"]), st["lat_max_ns"]) / 1000 if n else 0.0
                      for v in percentiles(loop.hist, [50, 99, 99.9]))
    return PerfResult(
        workload=workload, io_size=io_size, queue_depth=queue_depth, mode=dev.info.completion_mode,
        seconds=elapsed, ios=n, reads=st["reads"], writes=st["writes"], iops=n / elapsed if elapsed else 0.0,
        mib_per_s=n * io_size / elapsed / (1 << 20) if elapsed else 0.0,
        lat_mean_us=st["lat_sum_ns"] / n / 1000 if n else 0.0, lat_min_us=st["lat_min_ns"] / 1000 if n else 0.0,
        lat_max_us=st["lat_max_ns"] / 1000 if n else 0.0, lat_p50_us=p50, lat_p99_us=p99, lat_p999_us=p999,
        errors=st["errors"], shadow_doorbells=dev.info.shadow_doorbells, sq_doorbell_mmio=db["sq_mmio"],
        cq_doorbell_mmio=db["cq_mmio"], shadow_only_updates=db["sq_shadow_only"] + db["cq_shadow_only"],
        wait_pct=100.0 * st["wait_ns"] / 1e9 / elapsed if elapsed else 0.0,
        ios_per_submit=n / st["fills"] if st["fills"] else 0.0, ios_per_reap=n / st["reaps"] if st["reaps"] else 0.0)
