"""perf's figures, pure: fio's log-linear latency histogram read back (buckets, percentiles),
several queues' C loop counters merged, latency and CPU-per-command figures, a count shared out
over queues. Nothing here touches a device; split from perf.py."""

from __future__ import annotations

from typing import Any

import numpy as np

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


# The C loops' counters that several queues' runs add up (merge_stats); the rest are a minimum,
# a maximum and the first error.
STAT_SUMS = ("ios", "reads", "writes", "errors", "lat_sum_ns", "issued", "wait_ns", "fills", "reaps", "sleeps")


def merge_stats(stats: list[dict[str, int]]) -> dict[str, int]:
    """Several queues' C loop counters as one run's: sums, the smallest minimum latency and the
    largest maximum, the first queue's first error."""
    out = {k: sum(s[k] for s in stats) for k in STAT_SUMS}
    out["lat_min_ns"] = min(s["lat_min_ns"] for s in stats)
    out["lat_max_ns"] = max(s["lat_max_ns"] for s in stats)
    first = next((s for s in stats if s["errors"]), stats[0])
    out["first_error_status"], out["first_error_opcode"] = first["first_error_status"], first["first_error_opcode"]
    return out


def merge_histograms(hists: list[np.ndarray]) -> np.ndarray:
    """Latency histograms of several queues as one: the same buckets (fio's layout), counts added."""
    return np.asarray(np.sum(np.stack(hists), axis=0, dtype=np.uint64))


def latency_figures(st: dict[str, int], hist: np.ndarray) -> dict[str, float]:
    """Mean, minimum, maximum and the 50th, 99th and 99.9th percentiles (µs) of a run's counters and
    histogram; a bucket stands for its midpoint, so percentiles are kept inside what was measured."""
    n = st["ios"]
    if not n:
        return dict.fromkeys(("lat_mean_us", "lat_min_us", "lat_max_us", "lat_p50_us", "lat_p99_us", "lat_p999_us"),
                             0.0)
    p50, p99, p999 = (min(max(v, st["lat_min_ns"]), st["lat_max_ns"]) / 1000
                      for v in percentiles(hist, [50, 99, 99.9]))
    return {"lat_mean_us": st["lat_sum_ns"] / n / 1000, "lat_min_us": st["lat_min_ns"] / 1000,
            "lat_max_us": st["lat_max_ns"] / 1000, "lat_p50_us": p50, "lat_p99_us": p99, "lat_p999_us": p999}


def cpu_figures(usr_s: float, sys_s: float, wall_s: float, ios: int) -> dict[str, float]:
    """CPU time per completed command (µs: user, system, both) and the share of ``wall_s`` the
    thread(s) spent off the CPU (blocked on the completion eventfd, napping, preempted)."""
    per = 1e6 / ios if ios else 0.0
    busy = usr_s + sys_s
    return {"cpu_us_per_io": busy * per, "usr_us_per_io": usr_s * per, "sys_us_per_io": sys_s * per,
            "wait_share": min(1.0, max(0.0, 1.0 - busy / wall_s)) if wall_s > 0 else 0.0}


def split_count(count: int | None, queues: int) -> list[int]:
    """``count`` I/Os shared out over the queues (the first ones take the remainder); 0: unbounded."""
    if count is None:
        return [0] * queues
    return [count // queues + (1 if i < count % queues else 0) for i in range(queues)]


def run_figures(st: dict[str, int], hist: np.ndarray, elapsed: float, io_size: int, wall_s: float,
                doorbells: dict[str, int]) -> dict[str, Any]:
    """The figures a queue of perf's run and the whole run share: throughput over ``elapsed`` (the
    run's window, so the queues' IOPS add up to the run's), latency, the loop's profile over
    ``wall_s``, doorbells (struct nv_qp's DOORBELL_COUNTERS, taken over the run)."""
    n = st["ios"]
    return {"ios": n, "reads": st["reads"], "writes": st["writes"], "errors": st["errors"],
            "iops": n / elapsed if elapsed else 0.0,
            "mib_per_s": n * io_size / elapsed / (1 << 20) if elapsed else 0.0, **latency_figures(st, hist),
            "wait_pct": 100.0 * st["wait_ns"] / 1e9 / wall_s if wall_s else 0.0,
            "ios_per_submit": n / st["fills"] if st["fills"] else 0.0,
            "ios_per_reap": n / st["reaps"] if st["reaps"] else 0.0,
            "sq_doorbell_mmio": doorbells["sq_mmio"], "cq_doorbell_mmio": doorbells["cq_mmio"],
            # the MMIO doorbell writes' own time: each write's mean (us) and their share of the loop's time
            "sq_doorbell_us": doorbells["sq_mmio_ns"] / doorbells["sq_mmio"] / 1e3 if doorbells["sq_mmio"] else 0.0,
            "cq_doorbell_us": doorbells["cq_mmio_ns"] / doorbells["cq_mmio"] / 1e3 if doorbells["cq_mmio"] else 0.0,
            "doorbell_pct": (100.0 * (doorbells["sq_mmio_ns"] + doorbells["cq_mmio_ns"]) / 1e9 / wall_s
                             if wall_s else 0.0),
            "shadow_only_updates": doorbells["sq_shadow_only"] + doorbells["cq_shadow_only"]}
