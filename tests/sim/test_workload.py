"""The workload engine (cbits/workload.c) against the simulator: counts by opcode, mix shares,
the jobs' disjoint slices, the Dataset Management range the slot carries, the rate cap, the
time series, and verification catching a corrupted block, in the loop and from a saved map."""

from __future__ import annotations

import collections

import numpy as np
import pytest

import nvmevfio
from nvmevfio import workload_engine as wl
from nvmevfio.blockdev import BlockDevice
from nvmevfio.errors import Refused
from nvmevfio.nvme.spec import IoOpcode
from nvmevfio.workload_map import MapFile, verify_only

OPCODES = {"read": IoOpcode.READ, "write": IoOpcode.WRITE, "trim": IoOpcode.DATASET_MANAGEMENT,
           "flush": IoOpcode.FLUSH, "write-zeroes": IoOpcode.WRITE_ZEROES}


@pytest.fixture
def dev(rig):
    return BlockDevice(rig.p, 1, queue_depth=64)


def _ops_seen(rig, since: int) -> collections.Counter:
    return collections.Counter(opc for qid, opc, _ in rig.sim.commands[since:] if qid)


def test_mix_counts_shares_and_verify(dev, rig):
    before = len(rig.sim.commands)
    r = nvmevfio.workload(dev, mix="read:40,write:30,trim:10,flush:10,wz:10", bs="512:50,4k:30,16k:20",
                          queue_depth=8, count=3000, lba_range=(0, 4096), verify=True, seed=5)
    assert r.ios == 3000 and r.errors == 0 and r.mismatch_count == 0 and r.mismatches == []
    seen = _ops_seen(rig, before)
    for op, opc in OPCODES.items():
        assert r.ops[op]["ios"] == seen[opc], op  # what C counted is what the device ran
        assert abs(r.ops[op]["share_pct"] - r.ops[op]["mix_pct"]) < 3.5, (op, r.ops[op]["share_pct"])
    assert r.reads == r.ops["read"]["ios"] and r.writes == r.ops["write"]["ios"]
    assert r.verified_blocks > 1000  # reads of blocks this run wrote (or zeroed) were checked
    hist = r.ops["read"]["histogram_ns"]
    assert sum(c for _, c in hist) == r.ops["read"]["ios"] and all(v > 0 for v, _ in hist)
    assert r.ops["flush"]["mib_per_s"] == 0.0 and r.mib_per_s > 0


def test_positions_aligned_disjoint_per_job(rig):
    dev = BlockDevice(rig.p, 1, queue_depth=64, queues=2)
    wl.workload(dev, mix="write:60,read:40", bs="4k:50,16k:50", queue_depth=8, count=800, lba_range=(64, 4096),
                jobs=2, verify=True)
    # two slices of the range, each 2016 blocks (a whole number of the 32-block largest I/O)
    for q, (lo, hi) in zip(rig.broker.io[:2], [(64, 2080), (2080, 4096)]):
        sq = q.ring.sq_ring
        used = sq[(sq["opc"] == IoOpcode.WRITE) | (sq["opc"] == IoOpcode.READ)]
        slba, nlb = used["cdw10"].astype(np.int64), used["cdw12"].astype(np.int64) + 1
        assert len(used) and (slba >= lo).all() and (slba + nlb <= hi).all()
        assert ((slba - lo) % nlb == 0).all()  # aligned to the I/O's size


def test_trim_carries_its_range_in_the_slot(dev, rig):
    data = rig.sim.namespaces[0].data
    data[:] = 0xFF
    r = wl.workload(dev, mix="trim", bs="4k", count=1, lba_range=(16, 24))
    assert r.ops["trim"]["ios"] == 1 and r.errors == 0
    # the simulator zeroes the Dataset Management range it read from the command's PRP1: LBAs 16..23
    assert not data[16 * 512 : 24 * 512].any() and data[: 16 * 512].all() and data[24 * 512 :].all()


def test_write_zeroes_deac_and_sequential_step(dev, rig):
    wl.workload(dev, mix="write", bs="4k", count=16, random=False, lba_range=(0, 128), verify=True)
    r = wl.workload(dev, mix="wz", bs="4k", count=4, random=False, step=32, deac=True, lba_range=(0, 128))
    sq = rig.broker.io[0].ring.sq_ring
    wz = sq[sq["opc"] == IoOpcode.WRITE_ZEROES]
    assert sorted(wz["cdw10"].tolist()) == [0, 32, 64, 96] and (wz["cdw12"] == (7 | 1 << 25)).all()
    assert r.ops["write-zeroes"]["ios"] == 4


def test_verify_catches_a_corrupted_block(dev, rig):
    rig.sim.corrupt_read_lba = 37  # reads of LBA 37 come back with one payload bit flipped
    r = wl.workload(dev, mix="write:20,read:80", bs="4k", queue_depth=4, count=400, lba_range=(0, 64), verify=True)
    assert r.mismatch_count > 0 and {m[0] for m in r.mismatches} == {37}
    _, want, found = r.mismatches[0]
    assert found[1] == 37 and found[2] == want[1] and want[2] != found[3]  # its header right, its CRC32C not


def test_map_saved_and_verify_only(dev, rig, tmp_path):
    path = str(tmp_path / "run.map")
    r = wl.workload(dev, mix="write:80,flush:10,wz:10", bs="4k", queue_depth=4, count=300, lba_range=(0, 256),
                    verify=True, verify_map=path)
    assert r.verify_map == path
    m = MapFile.load(path)
    assert m.meta["serial"] == dev.info.serial and m.meta["range"] == [0, 256] and m.meta["block_size"] == 512
    assert m.counts()["written"] > 0 and m.counts()["flushed"] > 0 and m.counts()["in_flight"] == 0
    rep = verify_only(dev, path)
    assert rep["mismatch_count"] == 0 and rep["verified_blocks"] == 256 - m.counts()["never"]
    # written behind the map's back: one acknowledged block (flushed or not: named apart)
    lba = int(np.nonzero(m.vmap["gen"] >= 16)[0][0])
    dev.write_blocks(lba, bytes(512 * [0xA5]))
    rep = verify_only(dev, path)
    assert rep["mismatch_count"] == 1 and rep["mismatches"][0][0] == lba
    assert (rep["lost_flushed"], rep["lost_unflushed"]) == ((1, 0) if m.flushed[lba] else (0, 1))


def test_rate_cap_and_series(dev):
    r = wl.workload(dev, mix="read:50,write:50", bs="4k", queue_depth=8, seconds=2.5, rate=400,
                    lba_range=(0, 4096), verify=True)
    assert abs(r.iops - 400) < 20, r.iops
    assert len(r.series) == 2 and [round(p["t"]) for p in r.series] == [1, 2]
    assert all(abs(p["iops"] - 400) < 40 for p in r.series), r.series
    assert set(r.series[0]) >= {"t", "iops", "read", "write"} and r.series[0]["read"]["lat_p99_us"] > 0


def test_refusals(dev, rig):
    mark = rig.mark()
    for kw, reason in [({"mix": "read:50"}, "invalid-argument"), ({"bs": "1000"}, "length-mismatch"),
                       ({"bs": "1m"}, "count-out-of-range"),  # beyond MDTS (the simulator's 128 KiB)
                       ({"skew": "80:20", "random": False}, "invalid-argument"),
                       ({"lba_range": (0, 5000)}, "window-past-namespace-end"),
                       ({"verify_map": "x.map"}, "invalid-argument"),
                       ({"jobs": 2}, "count-out-of-range")]:  # the device has one I/O queue pair
        with pytest.raises(Refused) as ei:
            wl.workload(dev, count=10, **kw)
        assert ei.value.reason == reason, kw
    with pytest.raises(Refused) as ei:
        wl.run(object(), wl.make_spec(mix="read", bs="4k"), count=1)  # type: ignore[arg-type]
    assert ei.value.reason == "unsupported-workload"
    assert rig.unchanged_since(mark)


def test_resets_by_another_thread_are_reported_and_the_run_carries_on(dev, rig):
    """Controller resets asked for by another thread while the engine runs: the result counts
    them, each second's point says how many fell in it, the line says so, and the run ends
    with every block verified and no error (its commands were requeued)."""
    import threading
    import time

    lines: list[str] = []
    out: dict = {}

    def work() -> None:
        out["r"] = wl.workload(dev, mix="read:50,write:50", bs="4k", queue_depth=8, seconds=3.2,
                               lba_range=(0, 2048), verify=True, rate=2000, line=lines.append)

    before = rig.sim.resets
    t = threading.Thread(target=work)
    t.start()
    for _ in range(2):
        time.sleep(0.8)
        dev.reset_controller("controller")
    t.join(30)
    r = out["r"]
    assert rig.sim.resets - before == 2  # the device saw two CC.EN resets
    assert r.resets == 2 and sum(p["resets"] for p in r.series) == 2, (r.resets, r.series)
    assert r.errors == 0 and r.mismatch_count == 0 and r.verified_blocks > 0
    assert sum("controller reset" in line for line in lines) >= 1, lines
    assert dev.provider.recovery_counters()["resets"] >= 2
