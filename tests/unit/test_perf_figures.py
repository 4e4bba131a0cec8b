"""perf's pure logic for several queues at once: the CPU list option, the count shared out, the
queues' counters and histograms merged, the CPU cost per command, a run's figures (exact values)."""

import numpy as np
import pytest

from nvmevfio import perf_stats
from nvmevfio.cli.common import parse_cpu_list


def test_cpu_lists_as_taskset_writes_them():
    assert parse_cpu_list("0-1,3") == [0, 1, 3]
    assert parse_cpu_list("1") == [1]
    assert parse_cpu_list("2,0") == [2, 0]  # queue 1 on CPU 2, queue 2 on CPU 0
    assert parse_cpu_list("0-3") == [0, 1, 2, 3]
    assert parse_cpu_list("0,0") == [0, 0]
    for bad in ("", "a", "1-", "3-1", "0,,1", "-1", "1.5"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)


def test_count_shared_out():
    assert perf_stats.split_count(1001, 2) == [501, 500]
    assert perf_stats.split_count(10, 3) == [4, 3, 3]
    assert perf_stats.split_count(None, 2) == [0, 0]  # 0: bounded by time only


def _stats(**kw: int) -> dict[str, int]:
    base = dict.fromkeys((*perf_stats.STAT_SUMS, "first_error_status", "first_error_opcode"), 0)
    return {**base, "lat_min_ns": 2**64 - 1, "lat_max_ns": 0, **kw}


def test_merged_counters_and_histograms():
    a = _stats(ios=100, reads=60, writes=40, lat_sum_ns=5_000_000, lat_min_ns=20_000, lat_max_ns=90_000, issued=108,
               wait_ns=7, fills=10, reaps=20, sleeps=1)
    b = _stats(ios=50, reads=50, errors=2, lat_sum_ns=4_000_000, lat_min_ns=30_000, lat_max_ns=200_000, issued=58,
               wait_ns=3, fills=5, reaps=6, first_error_status=0x281, first_error_opcode=2)
    m = perf_stats.merge_stats([a, b])
    assert m == {"ios": 150, "reads": 110, "writes": 40, "errors": 2, "lat_sum_ns": 9_000_000, "issued": 166,
                 "wait_ns": 10, "fills": 15, "reaps": 26, "sleeps": 1, "lat_min_ns": 20_000, "lat_max_ns": 200_000,
                 "first_error_status": 0x281, "first_error_opcode": 2}
    # histograms in fio's layout: bucket 644 stands for 32768 + 4.5 * 512 = 35,072 ns ((644 >> 6) - 1 = 9 error
    # bits), bucket 700 for 32768 + 60.5 * 512 = 63,744, bucket 760 for 65536 + 56.5 * 1024 = 123,392
    h1 = np.zeros(29 * 64, dtype=np.uint64)
    h2 = np.zeros_like(h1)
    h1[644] = 98
    h1[700] = 2
    h2[644] = 49
    h2[760] = 1
    merged = perf_stats.merge_histograms([h1, h2])
    assert merged.dtype == np.uint64 and int(merged.sum()) == 150
    assert (int(merged[644]), int(merged[700]), int(merged[760])) == (147, 2, 1)
    assert [perf_stats.bucket_value(b) for b in (644, 700, 760)] == [35_072.0, 63_744.0, 123_392.0]
    # 150 commands: p50 is the 75th (bucket 644), p99 the 149th (bucket 700), p99.9 the 150th (bucket 760)
    assert perf_stats.percentiles(merged, [50, 99, 99.9]) == [35_072.0, 63_744.0, 123_392.0]
    lat = perf_stats.latency_figures(m, merged)
    assert lat["lat_mean_us"] == 60.0 and lat["lat_min_us"] == 20.0 and lat["lat_max_us"] == 200.0
    assert (lat["lat_p50_us"], lat["lat_p99_us"], lat["lat_p999_us"]) == (35.072, 63.744, 123.392)


def test_cpu_per_command_and_share_off_cpu():
    # 0.3 s user + 0.1 s system over 2 s of wall time, 20,000 commands: 20 us each, off CPU 80%
    assert perf_stats.cpu_figures(0.3, 0.1, 2.0, 20_000) == pytest.approx(
        {"cpu_us_per_io": 20.0, "usr_us_per_io": 15.0, "sys_us_per_io": 5.0, "wait_share": 0.8})
    assert perf_stats.cpu_figures(1.02, 0.0, 1.0, 10)["wait_share"] == 0.0  # a spinning thread, rounding: never below 0
    assert perf_stats.cpu_figures(0.0, 0.0, 0.0, 0) == {"cpu_us_per_io": 0.0, "usr_us_per_io": 0.0,
                                                        "sys_us_per_io": 0.0, "wait_share": 0.0}


def test_run_figures_throughput_profile_and_doorbell_times():
    # 40,000 commands of 4 KiB in a 2 s window; the loop ran 2.5 s and waited 0.5 s of it; 2,000 SQ tail
    # writes took 0.1 s (50 us each), 500 CQ head writes 0.025 s (50 us each): 5% of the loop's time
    st = _stats(ios=40_000, reads=30_000, writes=10_000, lat_sum_ns=40_000 * 80_000, lat_min_ns=10_000,
                lat_max_ns=900_000, wait_ns=500_000_000, fills=2_000, reaps=500)
    hist = np.zeros(29 * 64, dtype=np.uint64)
    hist[644] = 40_000
    db = {"sq_mmio": 2_000, "cq_mmio": 500, "sq_shadow_only": 7, "cq_shadow_only": 3,
          "sq_mmio_ns": 100_000_000, "cq_mmio_ns": 25_000_000}
    got = perf_stats.run_figures(st, hist, 2.0, 4096, 2.5, db)
    want = {"ios": 40_000, "reads": 30_000, "writes": 10_000, "errors": 0, "iops": 20_000.0,
            "mib_per_s": 40_000 * 4096 / 2.0 / (1 << 20), "wait_pct": 20.0, "ios_per_submit": 20.0,
            "ios_per_reap": 80.0, "sq_doorbell_mmio": 2_000, "cq_doorbell_mmio": 500, "sq_doorbell_us": 50.0,
            "cq_doorbell_us": 50.0, "doorbell_pct": 5.0, "shadow_only_updates": 10}
    assert {k: got[k] for k in want} == pytest.approx(want)
    assert got["lat_mean_us"] == 80.0 and got["lat_p50_us"] == 35.072
    # nothing measured: no division by zero anywhere
    none = perf_stats.run_figures(_stats(), np.zeros_like(hist), 0.0, 4096, 0.0, dict.fromkeys(db, 0))
    assert (none["iops"], none["wait_pct"], none["sq_doorbell_us"], none["doorbell_pct"], none["ios_per_reap"]) == (
        0.0, 0.0, 0.0, 0.0, 0.0)
