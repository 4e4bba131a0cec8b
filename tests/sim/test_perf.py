"""The perf load generator against the simulator: counts, mixes and ranges are exact."""

import collections
import os

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


def test_two_queues_each_its_thread_its_cpu_and_the_total(rig):
    """--queues 2: a closed loop per I/O queue pair, each on its own thread pinned to its CPU; the
    I/O count shared out, each queue's commands on its own SQ, the rows adding up to the total."""
    dev = BlockDevice(rig.p, 1, queue_depth=64, queues=2)
    cpu = sorted(os.sched_getaffinity(0))[0]
    before = len(rig.sim.commands)
    r = perf.run(dev, workload="randrw", queue_depth=8, count=1001, io_size=1024, queues=2, cpus=[cpu])
    assert (r.queues, r.ios, r.errors, r.reads + r.writes) == (2, 1001, 0, 1001)
    per_qid = collections.Counter(qid for qid, _, _ in rig.sim.commands[before:])
    assert per_qid == {1: 501, 2: 500}  # each queue's commands on its own SQ
    assert [(q["queue"], q["cpu"], q["ios"]) for q in r.per_queue] == [(1, cpu, 501), (2, cpu, 500)]
    assert sum(q["iops"] for q in r.per_queue) == pytest.approx(r.iops, rel=1e-9)
    assert sum(q["reads"] for q in r.per_queue) == r.reads
    assert r.lat_min_us == min(q["lat_min_us"] for q in r.per_queue)
    assert r.lat_max_us == max(q["lat_max_us"] for q in r.per_queue)
    assert 0 < r.cpu_us_per_io < 1e5 and 0 <= r.wait_share <= 1 and r.cpus == [cpu]
    assert r.cpu_us_per_io == pytest.approx(r.usr_us_per_io + r.sys_us_per_io)
    assert all(0 < q["cpu_us_per_io"] < 1e5 and 0 <= q["wait_share"] <= 1 for q in r.per_queue)


def test_too_many_queues_and_foreign_cpus_refused_before_any_io(rig):
    dev = BlockDevice(rig.p, 1, queue_depth=64, queues=2)
    mark = rig.mark()
    with pytest.raises(Refused) as ei:
        perf.run(dev, count=10, queues=3)
    assert ei.value.reason == "count-out-of-range" and "the device has 2 I/O queue pair(s)" in str(ei.value)
    with pytest.raises(Refused) as ei:
        perf.run(dev, count=1, queues=2)  # not one I/O per queue
    assert ei.value.reason == "count-out-of-range"
    with pytest.raises(Refused) as ei:
        perf.run(dev, count=10, queues=2, cpus=[max(os.sched_getaffinity(0)) + 1])
    assert ei.value.reason == "invalid-argument"
    with pytest.raises(Refused) as ei:
        perf.run(dev, count=10, queues=2, verify=True)
    assert ei.value.reason == "invalid-argument"
    assert rig.unchanged_since(mark)
    assert perf.run(dev, count=10, queues=2).ios == 10  # and nothing was left held


def test_prepare_checks_and_builds_without_io_and_defaults_to_five_seconds(dev, rig):
    mark = rig.mark()
    prep = perf.prepare(dev, workload="randread", queue_depth=4, seconds=None, count=None)
    assert prep.seconds == 5.0 and len(prep.qs) == 1 and prep.verify is None
    counted = perf.prepare(dev, queue_depth=4, seconds=None, count=100)
    assert counted.seconds is None  # the count bounds it
    assert rig.unchanged_since(mark)  # built and checked: nothing reached the device
    prep.free()
    counted.free()
    r = perf.run(dev, workload="randread", queue_depth=4, count=50)
    assert r.ios == 50 and r.errors == 0


def test_iodepth_batch_counts_exact_and_refusals(dev, rig):
    """--iodepth-batch (fio's iodepth_batch_submit): a count ends exactly, its last few issued as
    they are; a batch outside 1..depth or with verify is refused before any command."""
    before = len(rig.sim.commands)
    r = perf.run(dev, workload="randread", queue_depth=32, count=100, iodepth_batch=16)
    assert r.ios == 100 and r.errors == 0 and r.iodepth_batch == 16
    assert len(rig.sim.commands) - before == 100
    # the simulator completes a batch at its doorbell: 32, 32, 32, then the last 4 (fewer than 16: the count's end)
    assert r.ios_per_submit == 25.0
    r = perf.run(dev, workload="randwrite", queue_depth=8, count=1000, iodepth_batch=8)
    assert r.ios == 1000 and r.ios_per_submit == 8.0 and r.to_dict()["iodepth_batch"] == 8
    before = len(rig.sim.commands)
    for kw, reason in (({"iodepth_batch": 0}, "count-out-of-range"), ({"iodepth_batch": 33}, "count-out-of-range"),
                       ({"iodepth_batch": 2, "verify": True}, "invalid-argument")):
        with pytest.raises(Refused) as ei:
            perf.run(dev, queue_depth=32, count=10, **kw)
        assert ei.value.reason == reason
    assert len(rig.sim.commands) == before


def test_completion_batch_cap_and_its_default(rig):
    """--iodepth-batch-complete-max (fio's iodepth_batch_complete_max): at most N completions per CQ
    head doorbell; by default every ready one, past QD64 each command re-posted as it is reaped
    with the CQ head and SQ tail doorbells back to back (cbits/perf.c perf_reap_refill), and past
    QD128 a quarter of the depth once the reaps show whole-queue waves (cbits/perf.h: a window of 64
    reaps after the first 16 averaging 7/8 of the depth). The simulator answers every command at
    once, a whole-queue wave each time, so the counts are exact."""
    dev = BlockDevice(rig.p, 1, queue_depth=513)
    r = perf.run(dev, workload="randread", queue_depth=32, count=1000, iodepth_batch_complete_max=8)
    assert (r.ios, r.errors, r.iodepth_batch_complete_max, r.refill_as_reaped) == (1000, 0, 8, False)
    assert r.ios_per_reap == 8.0  # the simulator has all 32 ready at once: 8 taken each time
    r = perf.run(dev, workload="randread", queue_depth=32, count=640)
    assert (r.iodepth_batch_complete_max, r.ios_per_reap, r.refill_as_reaped) == (0, 32.0, False)
    r = perf.run(dev, workload="randread", queue_depth=128, count=128 * 120)
    # 120 reaps of 128, no cap at QD128; each reap's CQ head doorbell, then its SQ tail doorbell for
    # the 128 re-posted (the first fill has its own, the last reap re-posts nothing)
    assert (r.iodepth_batch_complete_max, r.refill_as_reaped, r.ios, r.errors) == (0, True, 128 * 120, 0)
    assert (r.ios_per_reap, r.cq_doorbell_mmio, r.sq_doorbell_mmio) == (128.0, 120, 120)
    r = perf.run(dev, workload="randread", queue_depth=256, count=2560)  # 10 reaps: too few to judge
    assert r.iodepth_batch_complete_max == 0 and r.ios_per_reap == 256.0 and r.ios == 2560
    r = perf.run(dev, workload="randread", queue_depth=256, count=256 * 120)
    # 80 reaps of 256 (20,480), then the cap: 10,240 in 160 reaps of 64; 30,720 in 240 reaps
    assert r.iodepth_batch_complete_max == 64 and r.ios_per_reap == 128.0 and r.ios == 256 * 120
    # with a submit batch rule the loop refills after its reap, as before: the CQ head doorbell only
    # once the 513-entry CQ could fill (every third reap of 128), the SQ tail's every batch
    r = perf.run(dev, workload="randread", queue_depth=128, count=1280, iodepth_batch=2)
    assert (r.refill_as_reaped, r.ios, r.cq_doorbell_mmio, r.sq_doorbell_mmio) == (False, 1280, 3, 10)
    r = perf.run(dev, workload="randread", queue_depth=64, count=64 * 120)  # no cap up to QD64, waves or not
    assert (r.iodepth_batch_complete_max, r.ios_per_reap, r.refill_as_reaped) == (0, 64.0, False)
    assert [perf.default_reap_max(q) for q in (1, 32, 64, 65, 128, 129, 256, 1024)] == [0, 0, 0, 0, 0, 32, 64, 256]
    assert [perf.refills_as_reaped(q) for q in (1, 64, 65, 128, 1024)] == [False, False, True, True, True]
    with pytest.raises(Refused) as ei:
        perf.run(dev, queue_depth=16, count=10, iodepth_batch_complete_max=17)
    assert ei.value.reason == "count-out-of-range"


@pytest.mark.parametrize(("entries", "qd", "cap", "cq_rings"), [
    (33, 32, None, 100),  # no room to spare (-q + 1 entries): a CQ head doorbell every batch of 32
    (65, 32, None, 50),  # room for a second depth: every second batch
    (257, 128, 32, 20),  # batches of 32, 160 consumed between doorbells
    (257, 128, None, 25),  # 25 reaps of 128, re-posted as reaped: the CQ head doorbell every reap
    (2, 1, None, 3200),
    (3, 1, None, 1600),
    (40, 32, 5, 320),  # batches of 5: a doorbell once 8 are unrung (8 + 32 would fill 40), every 2nd batch
])
def test_cq_head_doorbell_waits_while_the_cq_has_room(rig, entries, qd, cap, cq_rings):
    """cbits/qpair.h qp_cq_must_ring (perf's loop): the CQ head doorbell is written only when the entries
    consumed since the last one and a depth more could fill the CQ; the simulator holds back a
    completion its CQ has no room for, as a controller does, so a rule that let the CQ fill would
    count holds (or hang). The loop gives the whole CQ back when it ends."""
    dev = BlockDevice(rig.p, 1, queue_depth=entries)
    before = len(rig.sim.commands)
    r = perf.run(dev, workload="randread", queue_depth=qd, count=3200, iodepth_batch_complete_max=cap)
    assert (r.ios, r.errors, r.io_queue_size) == (3200, 0, entries)
    assert len(rig.sim.commands) - before == 3200
    assert r.cq_doorbell_mmio == cq_rings
    assert rig.sim.cq_full_holds == 0
    cq = rig.sim.cqs[1]
    assert cq.head == cq.tail  # every entry consumed and its room given back when the loop returned


def test_simulator_holds_a_completion_its_cq_has_no_room_for():
    """The simulator's side of the rule above: a CQ of 3 entries takes 2 (one slot stays empty,
    3.3.1.5); a third completion waits for the CQ head doorbell, then is posted with the phase
    tag of its slot."""
    from nvmevfio.nvme import regs
    from nvmevfio.nvme.spec import CQE
    from nvmevfio.sim.controller import SimController, _Queue

    sim = SimController()
    ring = np.zeros(3, dtype=CQE)
    sim.dma.map_dma(int(ring.ctypes.data), 0x10000, ring.nbytes)
    sim.cqs[1] = _Queue(0x10000, 3)
    sq = _Queue(0x20000, 8, cqid=1)
    for cid in (7, 8, 9):
        sim._complete(sq, 1, cid)
    assert ring["cid"].tolist() == [7, 8, 0] and sim.cq_full_holds == 1
    sim._doorbell(regs.doorbell_offset(1, True, 0), 1)  # the host consumed entry 0
    assert ring["cid"].tolist() == [7, 8, 9] and [s & 1 for s in ring["status"].tolist()] == [1, 1, 1]
    sim._complete(sq, 1, 10)  # slot 0 is free, but the CQ is full again (tail 0, head 1)
    assert sim.cq_full_holds == 2 and ring["cid"][0] == 7
    sim._doorbell(regs.doorbell_offset(1, True, 0), 0)  # consumed 1 and 2: the wrapped slot gets phase 0
    assert ring["cid"][0] == 10 and ring["status"][0] & 1 == 0


def test_queue_depth_up_to_takes_what_the_controller_has(rig):
    """open(queue_depth_up_to=True) (perf's and ublk's default queue of twice the depth and one):
    a wish capped at CAP.MQES+1, where a depth asked as such is refused."""
    dev = BlockDevice(rig.p, 1, queue_depth=5000, queue_depth_up_to=True)
    mqes = rig.p.mqes  # read at enable: the simulator's CAP.MQES is 1023 (0's based)
    assert mqes == 1024 and dev.info.queue_depth == mqes and rig.broker.io[0].ring.depth == mqes
    r = perf.run(dev, workload="randread", queue_depth=600, count=2400)
    assert (r.ios, r.errors, r.io_queue_size) == (2400, 0, mqes) and rig.sim.cq_full_holds == 0


def test_doorbell_writes_are_timed(rig):
    """Each MMIO doorbell write's own time (here the simulator's, run on the write): counted per
    doorbell, its mean and its share of the loop's time in the figures, per queue and in total."""
    dev = BlockDevice(rig.p, 1, queue_depth=64)
    before = dev.doorbell_counters()
    r = perf.run(dev, workload="randread", queue_depth=8, count=400, io_size=1024)
    after = dev.doorbell_counters()
    sq_ns = after["sq_mmio_ns"] - before["sq_mmio_ns"]
    assert r.sq_doorbell_mmio > 0 and sq_ns > 0
    assert r.sq_doorbell_us == pytest.approx(sq_ns / r.sq_doorbell_mmio / 1e3)
    assert 0 < r.doorbell_pct <= 100 and r.per_queue[0]["doorbell_pct"] == pytest.approx(r.doorbell_pct)
    assert r.cq_doorbell_us > 0 if r.cq_doorbell_mmio else r.cq_doorbell_us == 0
