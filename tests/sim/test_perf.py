"""The perf load generator against the simulator: counts, mixes and ranges are exact."""

import numpy as np
import pytest

from nvmevfio import perf
from nvmevfio.blockdev import BlockDevice
from nvmevfio.errors import Refused


@pytest.fixture
def dev(rig):
    return BlockDevice(rig.p, 1, queue_depth=64)


@pytest.mark.parametrize("qd", [1, 7, 32])
@pytest.mark.parametrize("workload", perf.WORKLOADS)
def test_counts_and_mix(dev, rig, workload, qd):
    before = len(rig.sim.commands)
    r = perf.run(dev, workload=workload, queue_depth=qd, count=500, io_size=1024, lba_range=(100, 1100))
    assert r.ios == 500 and r.errors == 0 and r.reads + r.writes == 500
    assert len(rig.sim.commands) - before == 500
    if workload in ("randread", "read"):
        assert r.writes == 0
    elif workload in ("randwrite", "write"):
        assert r.reads == 0
    else:
        assert 150 < r.reads < 350
    lbas = rig.broker.io[0].ring.sq_ring["cdw10"].tolist()
    # 1 KiB I/Os on 512-byte blocks: every start is I/O-aligned within the range (as fio's blockalign)
    assert all(lba == 0 or (100 <= lba <= 1100 - 2 and (lba - 100) % 2 == 0) for lba in lbas)
    assert len({lba for lba in lbas if lba}) > (1 if workload.startswith("rand") and qd > 1 else 0)
    assert 0 < r.lat_min_us <= r.lat_p50_us <= r.lat_p999_us <= r.lat_max_us


def test_sequential_wraps_in_range(dev, rig):
    perf.run(dev, workload="write", queue_depth=4, count=40, io_size=4096, lba_range=(0, 80))
    # 10 positions of 8 blocks: every one written at least once, nothing outside
    written = rig.sim.namespaces[0].data[: 80 * 512]
    assert written.any()
    assert not rig.sim.namespaces[0].data[80 * 512 :].any()


def test_refusals(dev):
    with pytest.raises(Refused) as ei:
        perf.run(dev, workload="trim", count=1)
    assert ei.value.reason == "unsupported-workload"
    with pytest.raises(Refused) as ei:
        perf.run(dev, io_size=1000, count=1)
    assert ei.value.reason == "length-mismatch"
    with pytest.raises(Refused) as ei:
        perf.run(dev, queue_depth=1000, count=1)
    assert ei.value.reason == "count-out-of-range"
    with pytest.raises(Refused) as ei:
        perf.run(dev, lba_range=(4000, 5000), count=1)
    assert ei.value.reason == "window-past-namespace-end"
    assert np.isfinite(perf.run(dev, count=10).iops)


def test_ramp_is_not_measured(dev, rig):
    before = len(rig.sim.commands)
    r = perf.run(dev, count=100, ramp_s=0.2)
    assert r.ios == 100 and len(rig.sim.commands) - before > 100


def test_verify_clean_then_a_corruption_is_named(dev, rig):
    r = perf.run(dev, workload="randrw", queue_depth=4, count=600, io_size=1024, lba_range=(0, 64), verify=True)
    assert r.verify and r.errors == 0 and r.mismatches == [] and r.verified_blocks > 100
    assert r.reads + r.writes == r.ios == 600
    rig.sim.corrupt_read_lba = 10  # the device returns LBA 10 with one payload bit flipped
    r = perf.run(dev, workload="randrw", queue_depth=4, count=600, io_size=1024, lba_range=(0, 64), verify=True)
    assert r.mismatches and {m[0] for m in r.mismatches} == {10}
    _, want, found = r.mismatches[0]
    assert found[:3] == (perf.VERIFY_MAGIC, 10, want[1])  # the header is intact: the CRC32C caught it


def test_hybrid_polling_counts_and_refusals(dev, rig):
    before = len(rig.sim.commands)
    r = perf.run(dev, workload="randrw", queue_depth=8, count=300, io_size=512, hybrid=True)
    assert (r.ios, r.errors, r.mode) == (300, 0, "hybrid") and len(rig.sim.commands) - before == 300
    with pytest.raises(Refused) as ei:
        perf.run(dev, workload="randrw", queue_depth=8, count=10, verify=True, hybrid=True)
    assert ei.value.reason == "invalid-argument"
