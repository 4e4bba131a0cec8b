"""A load generator in the manner of spdk_nvme_perf and fio: Python validates the
workload and reports; the closed loop runs in C (cbits/perf.c, ``nv_perf_run``),
refilling every free slot in one batch (one SQ doorbell) and reaping every ready
completion at once (one CQ doorbell), into a log-linear latency histogram.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from nvmevfio.blockdev import BlockDevice
from nvmevfio.errors import Refused

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
    ios_per_submit: float = 0.0  # commands per SQ batch (per SQ tail doorbell)
    ios_per_reap: float = 0.0  # completions per CQ batch
    verify: bool = False
    verified_blocks: int = 0  # blocks read back whose header and CRC32C were checked
    mismatches: list = field(default_factory=list)  # (lba, expected (lba, seq, crc), found (magic, lba, seq, crc))

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


def run(dev: BlockDevice | ServiceDevice, *, workload: str = "randread", io_size: int = 4096, queue_depth: int = 1,
        seconds: float | None = 5.0, count: int | None = None, lba_range: tuple[int, int] | None = None,
        rwmixread: int = 50, seed: int = 1, status: Callable[[float, int], None] | None = None,
        ramp_s: float = 0.0, verify: bool = False, hybrid: bool = False) -> PerfResult:
    """Run a workload; ``seconds`` or ``count`` bounds it. Returns throughput and latency figures.

    Python validates the workload once; the closed loop runs in C (``nv_perf_run``): it generates
    LBAs, keeps ``queue_depth`` commands in flight in the slots of a registered buffer and records
    latencies into a histogram. ``status(elapsed, ios)`` is called about once a second.
    ``ramp_s``: run this long first, unmeasured (like fio's ramp_time). ``hybrid``: on a polled
    device, nap between completions instead of spinning (Linux's hybrid polling)."""
    if workload not in WORKLOADS + ZONED_WORKLOADS:
        raise Refused("unsupported-workload", f"workload {workload!r}: one of {', '.join(WORKLOADS + ZONED_WORKLOADS)}")
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
    if verify and workload in ZONED_WORKLOADS:
        raise Refused("invalid-argument", "verify writes at chosen LBAs: not a Zone Append workload")
    if verify and hybrid:
        raise Refused("invalid-argument", "verify runs its loop in Python: hybrid polling is the C loop's")
    if verify:
        if not isinstance(dev, BlockDevice):
            raise Refused("invalid-argument", "verify runs in Python over a device opened here, not the service")
        return _run_verify(dev, workload=workload, io_size=io_size, queue_depth=queue_depth, seconds=seconds,
                           count=count, lo=lo, hi=hi, read_pct=read_pct, seed=seed, status=status)
    page = 4096
    slot_size = (io_size + page - 1) // page * page
    dev_: Any = dev  # a BlockDevice or a ServiceDevice: the same verbs, each with its own buffer type
    buf = dev_.alloc_buffer(queue_depth * slot_size)
    buf.array[:] = np.random.default_rng(seed).integers(0, 256, buf.size, dtype=np.uint8)
    reg = dev_.register_buffer(buf, slot_size)
    zoned, zone_starts = _zoned(dev, workload, lo, hi)
    loop = dev_.perf_loop(reg, io_size=io_size, lba_range=(lo, hi), random=workload.startswith("rand"),
                         read_pct=read_pct, depth=queue_depth, max_ios=count or 0, seed=seed, **zoned)
    for z in zone_starts:  # the workload checked: its zones emptied, to be filled once
        dev_.zone_action("reset", z)
    if hybrid and dev.info.completion_mode != "poll":
        raise Refused("invalid-argument", "hybrid polling needs a polled device (open it with irq=False)")
    loop.hybrid = hybrid
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
            dev_.free_buffer(buf)
    st = loop.stats()
    n = st["ios"]
    # a bucket stands for its midpoint: keep the figures inside what was measured
    p50, p99, p999 = (min(max(v, st["lat_min_ns"]), st["lat_max_ns"]) / 1000 if n else 0.0
                      for v in percentiles(loop.hist, [50, 99, 99.9]))
    return PerfResult(
        workload=workload, io_size=io_size, queue_depth=queue_depth,
        mode="hybrid" if hybrid else dev.info.completion_mode, seconds=elapsed, ios=n, reads=st["reads"],
        writes=st["writes"], iops=n / elapsed if elapsed else 0.0,
        mib_per_s=n * io_size / elapsed / (1 << 20) if elapsed else 0.0,
        lat_mean_us=st["lat_sum_ns"] / n / 1000 if n else 0.0, lat_min_us=st["lat_min_ns"] / 1000 if n else 0.0,
        lat_max_us=st["lat_max_ns"] / 1000 if n else 0.0, lat_p50_us=p50, lat_p99_us=p99, lat_p999_us=p999,
        errors=st["errors"], shadow_doorbells=dev.info.shadow_doorbells, sq_doorbell_mmio=db["sq_mmio"],
        data_descriptors=dev.info.data_descriptors, sq_in_cmb=dev.info.sq_in_cmb,
        cq_doorbell_mmio=db["cq_mmio"], shadow_only_updates=db["sq_shadow_only"] + db["cq_shadow_only"],
        wait_pct=100.0 * st["wait_ns"] / 1e9 / elapsed if elapsed else 0.0,
        ios_per_submit=n / st["fills"] if st["fills"] else 0.0, ios_per_reap=n / st["reaps"] if st["reaps"] else 0.0)


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
