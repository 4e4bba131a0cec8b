"""The workload engine (issue 25 part 1) through real VFIO: a mixed, verified workload on two jobs
(two queue pairs, two threads) under a rate cap; its verify map checked again by a second process;
and a block written behind the map's back found. Cheap: about 15 s."""

import json

import numpy as np
from cli_runner import nv

import nvmevfio
from nvmevfio.workload_map import GEN_FIRST, MapFile

RANGE = "65536:90000"  # the small controller's LBAs nothing else here writes (the soak's are 90000:120000)
MIX = {"read": 50, "write": 30, "trim": 5, "flush": 5, "write-zeroes": 10}
RATE = 1000  # well under what the guest reaches on a loaded host (a run at 3000 got 2835: the device, not the cap)
SECONDS = 4


def test_mixed_verified_workload_then_verify_only(small_ctrl, tmp_path):
    addr = small_ctrl["address"]
    vmap = tmp_path / "run.map"
    r = nv("perf", addr, "--mix", ",".join(f"{k}:{v}" for k, v in MIX.items()), "--bs", "4k:50,16k:30,64k:20",
           "-q", 8, "--jobs", 2, "--cpu", "0,1", "--verify", "--verify-map", vmap, "-t", SECONDS, "--rate", RATE,
           "--range", RANGE, "-o", "json")
    d = json.loads(r.stdout)
    assert d["errors"] == 0 and d["mismatch_count"] == 0 and d["verified_blocks"] > 1000, d["verified_blocks"]
    assert d["queues"] == 2 and len(d["per_queue"]) == 2
    for op, pct in MIX.items():  # each op's share of the commands within 2 percentage points of the mix
        assert abs(d["ops"][op]["share_pct"] - pct) < 2, (op, d["ops"][op])
        assert d["ops"][op]["ios"] > 0 and d["ops"][op]["errors"] == 0
    assert abs(d["iops"] - RATE) < 0.05 * RATE, d["iops"]  # the rate cap holds within 5 %
    ts = [p["t"] for p in d["series"]]  # a point a second, at each whole second of the run
    assert len(ts) in (SECONDS - 1, SECONDS) and all(abs(t - i - 1) < 0.25 for i, t in enumerate(ts)), ts
    assert all(abs(p["iops"] - RATE) < 0.15 * RATE for p in d["series"]), d["series"]
    m = MapFile.load(str(vmap))
    assert m.meta["serial"] == "nvmevfio-small" and m.meta["range"] == [65536, 90000]
    assert m.counts()["written"] > 0 and m.counts()["flushed"] > 0 and m.counts()["in_flight"] == 0

    # another process reads every mapped block back: all as the map says
    out = nv("perf", addr, "--verify-only", "--verify-map", vmap, "-o", "json", real=True)
    rep = json.loads(out.stdout)
    assert rep["mismatch_count"] == 0 and rep["verified_blocks"] == m.counts()["written"] + m.counts()["zeroes"]

    # one acknowledged block overwritten behind the map's back: found, named, exit 4
    lba = 65536 + int(np.nonzero(m.vmap["gen"] >= GEN_FIRST)[0][-1])
    with nvmevfio.open(addr, 1) as dev:
        dev.write_blocks(lba, bytes(range(256)) * 2)
    bad = nv("perf", addr, "--verify-only", "--verify-map", vmap, check=False)
    text = bad.stdout.decode()
    assert bad.returncode == 4, text
    assert f"LBA {lba}: expected generation {int(m.vmap['gen'][lba - 65536])}" in text
    assert "1 mismatches" in text and ("1 lost acknowledged and flushed" in text) == bool(m.flushed[lba - 65536])
