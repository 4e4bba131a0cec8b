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
        rwmixread: int = 50, seed: int = 1, status: Callable[[float, int], None] | None = None,
        ramp_s: float = 0.0) -> PerfResult:
    """Run a workload; ``seconds`` or ``count`` bounds it. Returns throughput and latency figures.

    ``ramp_s``: run the workload this long first, unmeasured (like fio's ramp_time), so that
    caches, the interpreter and, in an emulated guest, the translated code are warm."""
    if ramp_s > 0:
        run(dev, workload=workload, io_size=io_size, queue_depth=queue_depth, seconds=ramp_s,
            lba_range=lba_range, rwmixread=rwmixread, seed=seed + 1)
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
    rand = workload.startswith("rand")
    chunk = 1 << 16  # random start LBAs (and read/write choices) are drawn from numpy this many at a time
    lba_pool: list[int] = []
    mix_pool: list[int] = []
    free = list(range(queue_depth))  # buffer slots; slot k is bytes [k * io_size, (k + 1) * io_size)
    slot_of: dict[int, tuple[int, bool]] = {}  # tag -> (slot, is a read)
    lat: list[np.ndarray] = []
    nlat = reads = errors = 0
    seq = issued = 0
    default_read = workload in ("randread", "read")
    t0 = time.perf_counter()
    end = t0 + seconds if seconds is not None else float("inf")
    next_status = t0 + 1.0
    try:
        while True:
            now = time.perf_counter()
            stop = now >= end or (count is not None and issued >= count)
            if not stop and free:
                k = len(free) if count is None else min(len(free), count - issued)
                slots = free[-k:]
                del free[-k:]
                if rand:
                    if len(lba_pool) < k:
                        lba_pool += (lo + rng.integers(0, slots_n, chunk)).tolist()
                    lbas = lba_pool[-k:]
                    del lba_pool[-k:]
                else:
                    lbas = [lo + ((seq + i) % aligned) * nlb for i in range(k)]
                    seq += k
                if workload == "randrw":
                    if len(mix_pool) < k:
                        mix_pool += rng.integers(0, 100, chunk).tolist()
                    kinds = [m < rwmixread for m in mix_pool[-k:]]
                    del mix_pool[-k:]
                    picks = [(want, [i for i in range(k) if kinds[i] == want]) for want in (True, False)]
                    groups = [(want, [slots[i] for i in pick], [lbas[i] for i in pick]) for want, pick in picks
                              if pick]
                else:
                    groups = [(default_read, slots, lbas)]
                for want_read, sl, lb in groups:
                    submit = dev.submit_reads if want_read else dev.submit_writes
                    tags = submit(lb, [nlb] * len(sl), buf, [x * io_size for x in sl])
                    slot_of.update(zip(tags.tolist(), ((x, want_read) for x in sl)))
                issued += k
            if not slot_of:
                break
            done = dev.reap(1)
            for tag in done["tag"].tolist():
                slot, was_read = slot_of.pop(tag)
                free.append(slot)
                reads += was_read
            errors += int(np.count_nonzero(done["status"]))
            lat.append(done["latency_s"])
            nlat += len(done)
            if status is not None and now >= next_status:
                status(now - t0, nlat)
                next_status = now + 1.0
    finally:
        elapsed = time.perf_counter() - t0
        if not slot_of:
            dev.free_buffer(buf)
    writes = nlat - reads
    latencies = np.concatenate(lat) if lat else np.empty(0)
    us = latencies * 1e6
    pct = np.percentile(us, [50, 99, 99.9]) if nlat else np.zeros(3)
    return PerfResult(
        workload=workload, io_size=io_size, queue_depth=queue_depth, mode=dev.info.completion_mode,
        seconds=elapsed, ios=nlat, reads=reads, writes=writes, iops=nlat / elapsed if elapsed else 0.0,
        mib_per_s=nlat * io_size / elapsed / (1 << 20) if elapsed else 0.0,
        lat_mean_us=float(us.mean()) if nlat else 0.0, lat_min_us=float(us.min()) if nlat else 0.0,
        lat_max_us=float(us.max()) if nlat else 0.0, lat_p50_us=float(pct[0]), lat_p99_us=float(pct[1]),
        lat_p999_us=float(pct[2]), errors=errors)
