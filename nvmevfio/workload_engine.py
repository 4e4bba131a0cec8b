"""The workload engine (issue 25): per command in C (cbits/workload.c, ``nv_wl_run``), an op
from a mix (Read, Write, Dataset Management with Deallocate, Flush, Write Zeroes), a size from
a distribution, a random (optionally skewed) or sequential position in the job's own slice of
the range, under a rate cap, with every written block stamped and every block read checked
against a verify map; per second in Python: the counters read once, a point of the time series.

Python validates everything here (the parsers below, then the broker's ``perf_loop`` for the
namespace, the range, the largest size against MDTS, the depth) before any I/O; C never sees a
device address it did not get from the broker (each slot's PRPs, which also point a Dataset
Management command at its range, written at the start of the slot's buffer).
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from nvmevfio import perf as perfmod
from nvmevfio import perf_stats
from nvmevfio._ffi import ffi, lib
from nvmevfio.blockdev import BlockDevice
from nvmevfio.errors import Refused
from nvmevfio.nvme.perfloop import PerfCounters
from nvmevfio.workload_map import MISMATCH, VMAP, MapFile, mismatch_rows

if TYPE_CHECKING:
    from nvmevfio.perf import PerfResult

# cbits/workload.c's operation order; the names --mix takes (write-zeroes also as wz)
OPS = ("read", "write", "trim", "flush", "write-zeroes")
OP_ALIASES = {"wz": "write-zeroes", "write_zeroes": "write-zeroes", "deallocate": "trim", "dsm": "trim"}
SHARE = 1_000_000  # the C draw's scale (cbits/workload.c SHARE)
MAX_SIZES = 8  # struct nv_wl size_nlb[]
MISMATCH_CAP = 64  # kept per job (all are counted)
MAX_MAP_BLOCKS = 1 << 26  # the verify map holds 24 bytes per LBA of the range: at most 1.5 GiB
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20}


def _shares(text: str, what: str, key: Callable[[str], Any]) -> list[tuple[Any, int]]:
    """``NAME:PCT,NAME:PCT,...`` (a lone NAME: 100 %) as (key(NAME), PCT) pairs adding up to 100."""
    out: list[tuple[Any, int]] = []
    for part in (p.strip() for p in text.split(",")):
        name, _, pct = part.partition(":")
        try:
            share = int(pct) if pct else 100
        except ValueError:
            raise Refused("invalid-argument", f"{what} {text!r}: {part!r} is not NAME:PERCENT") from None
        if share < 0:
            raise Refused("invalid-argument", f"{what} {text!r}: a negative share")
        out.append((key(name.strip()), share))
    if sum(s for _, s in out) != 100:
        raise Refused("invalid-argument", f"{what} {text!r}: the shares add up to {sum(s for _, s in out)}, not 100")
    keys = [k for k, _ in out]
    if len(set(keys)) != len(keys):
        raise Refused("invalid-argument", f"{what} {text!r}: an entry named twice")
    return out


def _op_name(name: str) -> str:
    op = OP_ALIASES.get(name.lower(), name.lower())
    if op not in OPS:
        raise Refused("invalid-argument", f"--mix: unknown operation {name!r} (one of {', '.join(OPS)}, wz)")
    return op


def parse_size(text: str) -> int:
    """``4k``, ``128K``, ``1m``, ``512`` as bytes (k and m are binary: KiB, MiB)."""
    t = text.strip().lower()
    digits = len(t) - len(t.lstrip("0123456789"))
    if not digits or t[digits:] not in _UNITS:
        raise Refused("invalid-argument", f"--bs: size {text!r} is not a number with k or m")
    return int(t[:digits]) * _UNITS[t[digits:]]


def parse_mix(text: str) -> dict[str, int]:
    """``read:70,write:20,trim:5,flush:5`` as {op: percent}, every op of :data:`OPS` present."""
    got = dict(_shares(text, "--mix", _op_name))
    return {op: got.get(op, 0) for op in OPS}


def parse_bs(text: str) -> list[tuple[int, int]]:
    """``4k:50,16k:30,128k:20`` as [(bytes, percent)], largest last."""
    sizes = sorted(_shares(text, "--bs", parse_size))
    if len(sizes) > MAX_SIZES:
        raise Refused("invalid-argument", f"--bs {text!r}: at most {MAX_SIZES} sizes")
    return sizes


def parse_skew(text: str) -> tuple[int, int]:
    """``80:20``: 80 % of the I/Os to the first 20 % of each job's slice (the hot part), the rest
    to the other 80 %, as (io percent, LBA percent)."""
    try:
        io_pct, lba_pct = (int(x) for x in text.split(":"))
    except ValueError:
        raise Refused("invalid-argument", f"--skew {text!r}: expected IO_PERCENT:LBA_PERCENT (e.g. 80:20)") from None
    if not (0 < io_pct < 100 and 0 < lba_pct < 100):
        raise Refused("invalid-argument", f"--skew {text!r}: both percentages between 1 and 99")
    return io_pct, lba_pct


def cumulative(shares: list[int]) -> list[int]:
    """Percentages as the C draw's cumulative thresholds out of :data:`SHARE`."""
    out, total = [], 0
    for s in shares:
        total += s
        out.append(total * SHARE // 100)
    return out


def rate_interval(rate: int, jobs: int) -> int:
    """The token bucket's interval (ns between I/Os) of each of ``jobs`` sharing ``rate`` IOPS."""
    if rate <= 0:
        raise Refused("invalid-argument", f"--rate {rate}: a positive number of I/Os per second")
    return max(1, round(1e9 * jobs / rate))


def slices(lo: int, hi: int, jobs: int, align: int) -> list[tuple[int, int]]:
    """The range [lo, hi) cut into ``jobs`` disjoint slices (start, blocks), each a multiple of
    ``align`` blocks (the largest I/O), so that no two jobs touch the same LBA."""
    per = (hi - lo) // jobs // align * align
    if per < align:
        raise Refused("window-past-namespace-end", f"range {lo}..{hi}: {jobs} jobs need {jobs} slices of at "
                      f"least {align} blocks (the largest I/O)", jobs=jobs)
    return [(lo + i * per, per) for i in range(jobs)]


@dataclasses.dataclass
class Spec:
    """A validated workload (what the CLI and :func:`run` hand to the loops)."""

    mix: dict[str, int]
    sizes: list[tuple[int, int]]
    random: bool = True
    step: int = 0  # sequential: blocks between I/O starts (0: the I/O's size)
    skew: tuple[int, int] | None = None
    rate: int | None = None
    deac: bool = False
    verify: bool = False


class WorkloadLoop(PerfCounters):
    """One job: the broker's validated :class:`~nvmevfio.nvme.queue.PerfLoop` (queue pair, slots,
    PRPs, counters) driven by ``nv_wl_run`` through its ``serve_c``, with this job's ``struct
    nv_wl`` (the mix, sizes, slice, rate, its part of the verify map). What perf's thread runner
    drives (``step``, ``drain``, ``stats``) is :class:`PerfCounters`', over the loop's counters."""

    def __init__(self, loop: Any, spec: Spec, *, block_size: int, slot_size: int, lba_lo: int, nblocks: int,
                 vmap: np.ndarray | None, nonce: int, seed: int, jobs: int, read_zeroes: bool, depth: int) -> None:
        self.loop = loop
        self._p = self._perf = loop._p  # the broker's struct nv_perf: nv_wl_run's counters, slots, queue facts
        self.hist = loop.hist
        self.free_slots = loop.free_slots
        n = int(lib.nv_hist_buckets())
        self.op_hist = np.zeros((len(OPS), n), dtype=np.uint64)
        nslots = int(self._perf.nslots)
        self._slot_op = np.zeros(nslots, dtype=np.uint8)
        self._slot_nlb = np.zeros(nslots, dtype=np.uint32)
        self._slot_lba = np.zeros(nslots, dtype=np.uint64)
        self._slot_gen = np.zeros(nslots, dtype=np.uint64)
        self._mism = np.zeros(MISMATCH_CAP, dtype=MISMATCH)
        self._mem = loop.slot_memory  # the slots' bytes as the device sees them (bounce pages, no IOMMU)
        self.vmap = vmap
        w = ffi.new("struct nv_wl *")
        w.op_cum = cumulative([spec.mix[op] for op in OPS])
        w.nsizes = len(spec.sizes)
        w.size_nlb = [b // block_size for b, _ in spec.sizes] + [0] * (MAX_SIZES - len(spec.sizes))
        w.size_cum = cumulative([s for _, s in spec.sizes]) + [SHARE] * (MAX_SIZES - len(spec.sizes))
        w.lba_lo, w.nblocks, w.random, w.step = lba_lo, nblocks, int(spec.random), spec.step
        if spec.skew:
            w.hot_pct, w.hot_blocks = spec.skew[0], nblocks * spec.skew[1] // 100
        if spec.rate:
            w.interval_ns = rate_interval(spec.rate, jobs)
            w.burst_ns = w.interval_ns * depth
        w.deac, w.read_zeroes, w.verify = int(spec.deac), int(read_zeroes), int(vmap is not None)
        w.mem = ffi.cast("uint8_t *", self._mem.ctypes.data)
        w.slot_size = slot_size
        if vmap is not None:
            w.map = ffi.cast("struct nv_wl_vmap *", vmap.ctypes.data)
        w.nonce, w.rng = nonce, (seed * 0x9E3779B97F4A7C15 + 1) & 0xFFFFFFFFFFFFFFFF
        w.mism, w.mism_cap = ffi.cast("struct nv_wl_mismatch *", self._mism.ctypes.data), MISMATCH_CAP
        w.op_hist = ffi.cast("uint64_t *", self.op_hist.ctypes.data)
        w.slot_op = ffi.cast("uint8_t *", self._slot_op.ctypes.data)
        w.slot_nlb = ffi.cast("uint32_t *", self._slot_nlb.ctypes.data)
        w.slot_lba = ffi.cast("uint64_t *", self._slot_lba.ctypes.data)
        w.slot_gen = ffi.cast("uint64_t *", self._slot_gen.ctypes.data)
        w.gen = 15  # stamped generations start at 16 (below: the map's states)
        self._w = w
        self.resets = 0  # times the broker recovered the queue (a reset) under this job

    def _in_flight(self) -> int:
        return int(self.loop._in_flight())

    def _run(self, slice_s: float, drain: bool) -> bool:
        r = self.loop.serve_c(lib.nv_wl_run, self._w, int(slice_s * 1e9), int(drain), ended=self._ended,
                              what="workload")
        if r < 0:
            self.resets += 1
            return False
        return r == 1

    def _ended(self, records: np.ndarray) -> None:
        """Commands the broker ended (a reset): errors, their slots free, their blocks undefined."""
        for cookie, status in zip(records["cookie"].tolist(), records["status"].tolist()):
            lib.nv_wl_ended(self._w, self._perf, cookie, status)

    def reset_stats(self) -> None:
        super().reset_stats()
        w = self._w
        for name in ("op_ios", "op_bytes", "op_errors", "op_lat_sum_ns"):
            setattr(w, name, [0] * len(OPS))
        w.verified_blocks = w.zero_blocks = w.mismatches = w.busy_redraws = w.rate_naps = 0
        self.op_hist[:] = 0

    def counters(self) -> dict[str, Any]:
        """This job's per-op counts and bytes, verification figures (read while C runs: each a
        word, so each is right, if not all from one instant)."""
        w = self._w
        return {"op_ios": list(w.op_ios), "op_bytes": list(w.op_bytes), "op_errors": list(w.op_errors),
                "op_lat_sum_ns": list(w.op_lat_sum_ns), "verified_blocks": int(w.verified_blocks),
                "zero_blocks": int(w.zero_blocks), "mismatches": int(w.mismatches),
                "busy_redraws": int(w.busy_redraws), "rate_naps": int(w.rate_naps), "acks": int(w.acks),
                "durable": int(w.durable)}

    def mismatch_records(self) -> np.ndarray:
        return self._mism[: min(int(self._w.mismatches), MISMATCH_CAP)].copy()


class Series:
    """The time series: once a second, every job's counters and per-op histograms read and the
    second's difference kept as a point (per op: IOPS, MiB/s, latency p50 and p99)."""

    def __init__(self, loops: list[WorkloadLoop], line: Callable[[str], None] | None,
                 resets: Callable[[], int]) -> None:
        self.loops, self.line, self._resets = loops, line, resets
        self.points: list[dict[str, Any]] = []
        self._last = self._snap()
        self._at_start = self._last_resets = resets()

    def resets_since_start(self) -> int:
        """The controller's resets since the series began, whichever thread made them."""
        return self._resets() - self._at_start

    def _snap(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ios = np.array([lp.counters()["op_ios"] for lp in self.loops], dtype=np.int64).sum(axis=0)
        nbytes = np.array([lp.counters()["op_bytes"] for lp in self.loops], dtype=np.int64).sum(axis=0)
        hist = np.sum([lp.op_hist.astype(np.int64) for lp in self.loops], axis=0)
        return ios, nbytes, hist

    def tick(self, elapsed: float) -> None:
        ios, nbytes, hist = snap = self._snap()
        dt = elapsed - (self.points[-1]["t"] if self.points else 0.0)
        d_ios, d_bytes, d_hist = ios - self._last[0], nbytes - self._last[1], hist - self._last[2]
        self._last = snap
        resets = self._resets()
        point: dict[str, Any] = {"t": round(elapsed, 3), "iops": float(d_ios.sum() / dt) if dt > 0 else 0.0,
                                 "resets": resets - self._last_resets}  # controller resets in this second
        self._last_resets = resets
        for i, op in enumerate(OPS):
            if not d_ios[i]:
                continue
            p50, p99 = perf_stats.percentiles(np.clip(d_hist[i], 0, None), [50, 99])
            point[op] = {"iops": float(d_ios[i] / dt), "mib_per_s": float(d_bytes[i] / dt / (1 << 20)),
                         "lat_p50_us": p50 / 1000, "lat_p99_us": p99 / 1000}
        self.points.append(point)
        if self.line is not None:
            parts = [f"{op} {v['iops']:.0f} IOPS p99 {v['lat_p99_us']:.0f} us" for op, v in point.items()
                     if isinstance(v, dict)]
            n = point["resets"]
            self.line(f"{elapsed:6.1f} s {point['iops']:9.0f} IOPS: " + ", ".join(parts)
                      + (f" [{n} controller reset{'s' if n > 1 else ''}, carried on]" if n else ""))


def _read_zeroes(dev: BlockDevice) -> bool:
    """Identify Namespace DLFEAT bits 2:0 = 001b: a deallocated block reads as zeroes."""
    return int(dev.provider.namespace(dev.nsid).identify.get("dlfeat", 0)) & 7 == 1


def check(dev: BlockDevice, spec: Spec, queues: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """The refusals that need the device (before any I/O): sizes in blocks, the
    verify map's size, the jobs' slices. Returns the slices."""
    bs = dev.block_size
    for size, _ in spec.sizes:
        if size <= 0 or size % bs:
            raise Refused("length-mismatch", f"--bs: {size} bytes is not a positive multiple of the {bs}-byte block")
    mdts = dev.info.max_transfer_bytes
    if spec.sizes[-1][0] > mdts:
        raise Refused("count-out-of-range", f"--bs: {spec.sizes[-1][0]} bytes is more than one command carries "
                      f"({mdts} bytes, MDTS)", io_size=spec.sizes[-1][0])
    if spec.verify and hi - lo > MAX_MAP_BLOCKS:
        raise Refused("count-out-of-range", f"verify keeps a map of 24 bytes per LBA: range {lo}..{hi} is over "
                      f"{MAX_MAP_BLOCKS} blocks (give a smaller --range)", blocks=hi - lo)
    if spec.skew and not spec.random:
        raise Refused("invalid-argument", "--skew picks random positions: not a sequential workload")
    if spec.step and spec.random:
        raise Refused("invalid-argument", "--step is the sequential workload's: not a random one")
    if spec.verify and dev.metadata_size and dev.protection is not None:
        raise Refused("invalid-argument", "verify stamps whole blocks: not on a namespace with protection information")
    return slices(lo, hi, queues, spec.sizes[-1][0] // bs)


def run(dev: BlockDevice, spec: Spec, *, queue_depth: int = 1, seconds: float | None = 5.0, count: int | None = None,
        lba_range: tuple[int, int] | None = None, seed: int = 1, queues: int = 1, cpus: list[int] | None = None,
        line: Callable[[str], None] | None = None,
        status: Callable[[float, int], None] | None = None, verify_map: str | None = None) -> PerfResult:
    """Run ``spec`` on ``queues`` jobs (a queue pair and a thread each, on its own slice of
    ``lba_range``); ``seconds`` or ``count`` bounds it. ``line`` gets the per-second text line;
    ``verify_map``: save the verify map there (:mod:`nvmevfio.workload_map`)."""
    if not isinstance(dev, BlockDevice):
        raise Refused("unsupported-workload", "the workload engine (--mix, --bs, --verify-map, ...) runs on a "
                      "device opened in this process: the service path (--socket) offers perf's plain "
                      "workloads only", path="service")
    pairs = perfmod._sessions(dev, queues)
    lo, hi = lba_range or (0, dev.block_count)
    if not (0 <= lo < hi <= dev.block_count):
        raise Refused("window-past-namespace-end",
                      f"range {lo}..{hi} does not fit the namespace (0..{dev.block_count})")
    cuts = check(dev, spec, len(pairs), lo, hi)
    if verify_map and not spec.verify:
        raise Refused("invalid-argument", "--verify-map saves the verify map: with --verify")
    if count is not None and count < len(pairs):
        raise Refused("count-out-of-range", f"I/O count {count} must be at least one per job ({len(pairs)})")
    if seconds is None and count is None:
        seconds = 5.0
    page = 4096
    largest = spec.sizes[-1][0]
    slot_size = (max(largest, 16) + page - 1) // page * page
    nonce = int.from_bytes(os.urandom(8), "little") | 1
    vmap = np.zeros(hi - lo, dtype=VMAP) if spec.verify else None
    read_zeroes = _read_zeroes(dev)
    qs: list[perfmod._Queue] = []
    loops: list[WorkloadLoop] = []
    with perfmod.freed_on_failure(qs):  # every job's buffer and workload validated before any I/O
        for i, ((d, qid), n, (start, blocks)) in enumerate(zip(pairs, perf_stats.split_count(count, len(pairs)), cuts)):
            reg = perfmod.slot_buffer(qs, d, qid, cpus[i % len(cpus)] if cpus else None, queue_depth, slot_size,
                                      seed + i)
            base = d.perf_loop(reg, io_size=largest, lba_range=(start, start + blocks), random=spec.random,
                               read_pct=100, depth=queue_depth, max_ios=n, seed=seed + i, qid=qid)
            part = vmap[start - lo : start - lo + blocks] if vmap is not None else None
            lp = WorkloadLoop(base, spec, block_size=d.block_size, slot_size=slot_size, lba_lo=start, nblocks=blocks,
                              vmap=part, nonce=nonce, seed=seed + i, jobs=len(pairs), read_zeroes=read_zeroes,
                              depth=queue_depth)
            loops.append(lp)
            qs[-1].loop = lp
    counters = dev.provider.recovery_counters
    series = Series(loops, line, lambda: counters()["resets"])
    usr_s, sys_s = perfmod._run_threads(qs, seconds=seconds, ramp_s=0.0, status=status, tick=series.tick)
    for q in qs:
        q.dev.free_buffer(q.buf)
    res = perfmod._result(qs, workload="mix", io_size=largest, queue_depth=queue_depth, cpus=cpus, usr_s=usr_s,
                          sys_s=sys_s, mode=dev.info.completion_mode, shadow=dev.info.shadow_doorbells, info=dev.info)
    res = _figures(res, loops, spec, series)
    if verify_map and vmap is not None:
        MapFile.from_run(dev, lo, vmap, nonce, cuts, [lp.counters()["durable"] for lp in loops],
                         read_zeroes).save(verify_map)
        res.verify_map = verify_map
    return res


def _figures(res: PerfResult, loops: list[WorkloadLoop], spec: Spec, series: Series) -> PerfResult:
    """The engine's own figures onto perf's result: per op (count, share, IOPS, MiB/s, latency,
    the histogram's non-zero buckets), bandwidth from the bytes moved, verification, the series."""
    cs = [lp.counters() for lp in loops]
    ios = np.sum([c["op_ios"] for c in cs], axis=0)
    nbytes = np.sum([c["op_bytes"] for c in cs], axis=0)
    errs = np.sum([c["op_errors"] for c in cs], axis=0)
    lat = np.sum([c["op_lat_sum_ns"] for c in cs], axis=0)
    hist: np.ndarray = np.asarray(np.sum([lp.op_hist for lp in loops], axis=0, dtype=np.uint64))
    total = int(ios.sum())
    secs = res.seconds or 1.0
    ops: dict[str, Any] = {}
    for i, op in enumerate(OPS):
        n = int(ios[i])
        p50, p99, p999 = perf_stats.percentiles(hist[i], [50, 99, 99.9]) if n else (0.0, 0.0, 0.0)
        nz = np.nonzero(hist[i])[0]
        ops[op] = {"ios": n, "share_pct": 100.0 * n / total if total else 0.0, "mix_pct": spec.mix[op],
                   "iops": n / secs, "mib_per_s": int(nbytes[i]) / secs / (1 << 20), "errors": int(errs[i]),
                   "lat_mean_us": int(lat[i]) / n / 1000 if n else 0.0, "lat_p50_us": p50 / 1000,
                   "lat_p99_us": p99 / 1000, "lat_p999_us": p999 / 1000,
                   "histogram_ns": [[perf_stats.bucket_value(int(b)), int(hist[i][b])] for b in nz]}
    moved = int(nbytes[0] + nbytes[1])
    mism: list[Any] = []
    for lp in loops:
        mism.extend(mismatch_rows(lp.mismatch_records()))
    res.mib_per_s = moved / secs / (1 << 20)
    for row, c in zip(res.per_queue, cs):
        row["mib_per_s"] = (c["op_bytes"][0] + c["op_bytes"][1]) / secs / (1 << 20)
    res.workload = "mix" if spec.random else "seqmix"
    res.mix, res.sizes, res.ops, res.series = dict(spec.mix), [list(s) for s in spec.sizes], ops, series.points
    res.rate_cap = spec.rate or 0
    res.verify = spec.verify
    res.verified_blocks = sum(c["verified_blocks"] for c in cs)
    res.mismatch_count = sum(c["mismatches"] for c in cs)
    res.mismatches = mism
    # the controller's resets while it ran, whichever thread made them (a reset asked for by
    # another thread or process is not seen by the loops: their queues are only paused)
    res.resets = series.resets_since_start()
    res.loop_recoveries = sum(lp.resets for lp in loops)
    res.busy_redraws = sum(c["busy_redraws"] for c in cs)
    return res


def workload(dev: BlockDevice, *, mix: str | dict[str, int] = "read:100", bs: str | int = 4096, random: bool = True,
             step: int = 0, skew: str | tuple[int, int] | None = None, rate: int | None = None, deac: bool = False,
             verify: bool = False, verify_map: str | None = None, queue_depth: int = 8, jobs: int = 1,
             seconds: float | None = 5.0, count: int | None = None, lba_range: tuple[int, int] | None = None,
             cpus: list[int] | None = None, seed: int = 1, line: Callable[[str], None] | None = None) -> PerfResult:
    """The workload engine from Python (``nvmevfio.workload``): ``mix`` ``"read:70,write:20,trim:5,flush:5"``
    (or {op: percent}), ``bs`` ``"4k:50,16k:30,128k:20"`` (or bytes), random or sequential (``step``
    blocks apart), ``skew`` ``"80:20"`` (80 % of the I/Os to the first 20 % of each job's slice),
    ``rate`` (IOPS, all jobs together), ``jobs`` queue pairs and threads (``dev`` opened with at
    least that many queues), ``verify`` (``verify_map``: save the map for :func:`nvmevfio.workload_map.verify_only`).
    Returns perf's :class:`~nvmevfio.perf.PerfResult` with ``ops`` (per op), ``series`` (a point
    a second) and the verification figures; ``mismatch_count`` 0 when every block held what was
    written."""
    spec = make_spec(mix=mix, bs=bs, random=random, step=step, skew=skew, rate=rate, deac=deac, verify=verify)
    return run(dev, spec, queue_depth=queue_depth, seconds=seconds, count=count, lba_range=lba_range, seed=seed,
               queues=jobs, cpus=cpus, line=line, verify_map=verify_map)


def make_spec(*, mix: str | dict[str, int], bs: str | int, random: bool = True, step: int = 0,
              skew: str | tuple[int, int] | None = None, rate: int | None = None, deac: bool = False,
              verify: bool = False) -> Spec:
    """A :class:`Spec` from the options as text (the CLI's) or values, each checked."""
    m = parse_mix(mix) if isinstance(mix, str) else parse_mix(",".join(f"{k}:{v}" for k, v in mix.items()))
    sizes = parse_bs(bs) if isinstance(bs, str) else [(int(bs), 100)]
    sk = parse_skew(skew) if isinstance(skew, str) else skew
    if rate is not None:
        rate_interval(rate, 1)
    if step < 0:
        raise Refused("invalid-argument", f"--step {step}: a number of blocks, 0 or more")
    return Spec(mix=m, sizes=sizes, random=random, step=step, skew=sk, rate=rate, deac=deac, verify=verify)
