"""A load generator in the manner of spdk_nvme_perf and fio, over the batched
submit/reap path: every free queue slot is refilled in one batch (one SQ
doorbell), every reap takes all ready completions (one CQ doorbell).
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

    def to_dict(self) -> dict:
        return asdict(self)


def run(dev: BlockDevice, *, workload: str = "randread", io_size: int = 4096, queue_depth: int = 1,
        seconds: float | None = 5.0, count: int | None = None, lba_range: tuple[int, int] | None = None,
        rwmixread: int = 50, seed: int = 1, status: Callable[[float, int], None] | None = None) -> PerfResult:
    """Run a workload; ``seconds`` or ``count`` bounds it. Returns throughput and latency figures."""
    if workload not in WORKLOADS:
        raise Refused("unsupported-workload", f"workload {workload!r}: one of {', '.join(WORKLOADS)}")
    bs = dev.block_size
    if io_size <= 0 or io_size % bs:
        raise Refused("length-mismatch", f"I/O size {io_size} is not a positive multiple of the {bs}-byte block")
    nlb = io_size // bs
    lo, hi = lba_range or (0, dev.block_count)
    if not (0 <= lo < hi <= dev.block_count) or hi - lo < nlb:
        raise Refused("window-past-namespace-end", f"range {lo}..{hi} does not fit the namespace "
                      f"(0..{dev.block_count}) or one {io_size}-byte I/O")
    if not 1 <= queue_depth <= dev.capacity():
        raise Refused("count-out-of-range", f"queue depth {queue_depth} outside 1..{dev.capacity()}")
    if seconds is None and count is None:
        seconds = 5.0
    slots_n = hi - lo - nlb + 1  # valid start LBAs
    aligned = (hi - lo) // nlb  # sequential positions
    rng = np.random.default_rng(seed)
    buf = dev.alloc_buffer(queue_depth * io_size)
    buf.array[:] = rng.integers(0, 256, buf.size, dtype=np.uint8)
    # Per-command state lives in arrays indexed by tag (tags grow by one per command; at
    # most queue_depth are in flight, so a ring of tags cannot collide).
    ring = 1 << max(10, (4 * queue_depth).bit_length())
    slot_of = np.zeros(ring, dtype=np.int64)
    read_of = np.zeros(ring, dtype=bool)
    free = np.arange(queue_depth, dtype=np.int64)  # a stack of free buffer slots
    nfree = queue_depth
    lat = np.empty(1 << 16, dtype=np.float64)
    nlat = reads = errors = 0
    seq = issued = in_flight = 0
    t0 = time.perf_counter()
    end = t0 + seconds if seconds is not None else float("inf")
    next_status = t0 + 1.0
    try:
        while True:
            now = time.perf_counter()
            stop = now >= end or (count is not None and issued >= count)
            if not stop and nfree:
                k = nfree if count is None else min(nfree, count - issued)
                slots = free[nfree - k : nfree].copy()
                nfree -= k
                if workload.startswith("rand"):
                    lbas = lo + rng.integers(0, slots_n, k)
                else:
                    lbas = lo + ((seq + np.arange(k)) % aligned) * nlb
                    seq += k
                if workload == "randrw":
                    is_read = rng.integers(0, 100, k) < rwmixread
                    groups = [(True, is_read), (False, ~is_read)]
                else:
                    groups = [(workload in ("randread", "read"), slice(None))]
                for want_read, sel in groups:
                    sl = slots[sel]
                    if not len(sl):
                        continue
                    submit = dev.submit_reads if want_read else dev.submit_writes
                    tags = submit(lbas[sel], np.full(len(sl), nlb), buf, sl * io_size)
                    slot_of[tags % ring] = sl
                    read_of[tags % ring] = want_read
                issued += k
                in_flight += k
            if not in_flight:
                break
            done = dev.reap(1)
            m = len(done)
            idx = done["tag"] % ring
            free[nfree : nfree + m] = slot_of[idx]
            nfree += m
            in_flight -= m
            reads += int(read_of[idx].sum())
            errors += int(np.count_nonzero(done["status"]))
            if nlat + m > len(lat):
                lat = np.resize(lat, 2 * (nlat + m))
            lat[nlat : nlat + m] = done["latency_s"]
            nlat += m
            if status is not None and now >= next_status:
                status(now - t0, nlat)
                next_status = now + 1.0
    finally:
        elapsed = time.perf_counter() - t0
        if not in_flight:
            dev.free_buffer(buf)
    writes = nlat - reads
    us = lat[:nlat] * 1e6
    pct = np.percentile(us, [50, 99, 99.9]) if nlat else np.zeros(3)
    return PerfResult(
        workload=workload, io_size=io_size, queue_depth=queue_depth, mode=dev.info.completion_mode,
        seconds=elapsed, ios=nlat, reads=reads, writes=writes, iops=nlat / elapsed if elapsed else 0.0,
        mib_per_s=nlat * io_size / elapsed / (1 << 20) if elapsed else 0.0,
        lat_mean_us=float(us.mean()) if nlat else 0.0, lat_min_us=float(us.min()) if nlat else 0.0,
        lat_max_us=float(us.max()) if nlat else 0.0, lat_p50_us=float(pct[0]), lat_p99_us=float(pct[1]),
        lat_p999_us=float(pct[2]), errors=errors)
