"""Several controllers in one process (issue 25 part 3): `nvmevfio perf ADDR ADDR` runs a workload
on each at once, a row each and the total, every block verified on each; the guest has one NUMA
node, which the output says (the choice itself is tested against a fake sysfs: tests/sim/test_perf_many.py).
And `nvmevfio serve ADDR ADDR`: one daemon, a socket per controller."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
from cli_runner import nv, nvj

import nvmevfio


def test_two_controllers_in_one_perf_verified(data_ctrl, small_ctrl):
    a, b = data_ctrl["address"], small_ctrl["address"]
    d = nvj("perf", a, b, "-w", "randrw", "-q", 8, "-s", 4096, "-n", 1500, "--verify", "--range", "100000:120000")
    assert [c["address"] for c in d["controllers"]] == [a, b]
    for c in d["controllers"]:
        assert c["ios"] == 1500 and c["errors"] == 0 and c["verify"] and c["mismatches"] == []
        assert c["verified_blocks"] > 0 and c["reads"] > 0 and c["writes"] > 0
    t = d["total"]
    assert t["ios"] == 3000 and t["mismatches"] == 0 and t["controllers"] == 2
    assert t["verified_blocks"] == sum(c["verified_blocks"] for c in d["controllers"])
    assert d["numa"].startswith("one NUMA node")


def test_two_controllers_rows_and_total(data_ctrl, small_ctrl):
    """Rows and the total, with a thread per queue (`--thread-per-queue`) and one poller for both
    (`--shared-poller`, on the first CPU when no --cpu is given), and perf's default here: the
    guest's two vCPUs would both spin under four threads (two controllers, two queues each), so one
    poller; the output says which and why."""
    a, b = data_ctrl["address"], small_ctrl["address"]
    assert len(os.sched_getaffinity(0)) == 2  # the guest's vCPUs: what the default is chosen from
    shared = "poller: one thread polls every controller's queues"
    for extra, poller, cpus in (
            (("--thread-per-queue",), "poller: a thread per queue (asked for (--thread-per-queue))", "-"),
            (("--shared-poller",), f"{shared} (asked for)", "0"),
            ((), f"{shared} (the default: 4 spinning threads would take all 2 CPUs this process may use "
                 "(--thread-per-queue for a thread each))", "0")):
        out = nv("perf", a, b, "-w", "randread", "-q", 16, "-n", 4000, "--queues", 2,
                 *extra).stdout.decode().splitlines()
        rows = {line.split()[0]: line.split() for line in out if line.split() and line.split()[0] in (a, b, "total")}
        assert set(rows) == {a, b, "total"}, out
        assert float(rows["total"][1]) > 0  # (the total row has no CPUs column)
        assert abs(float(rows["total"][1]) - float(rows[a][2]) - float(rows[b][2])) < 0.2
        assert "NUMA: one NUMA node" in "\n".join(out) and poller in out, out
        assert rows[a][1] == rows[b][1] == cpus  # threads left unpinned; the poller on the first CPU


def test_the_same_controller_twice_is_refused(data_ctrl):
    a = data_ctrl["address"]
    r = nv("perf", a, a, "-n", 10, check=False)
    assert r.returncode != 0 and b"named twice" in r.stderr


def test_one_daemon_serves_two_controllers(data_ctrl, small_ctrl, tmp_path):
    """`nvmevfio serve A B`: a socket per controller, a grant per controller; what a client writes
    through each socket is on that controller (read back directly once the daemon stopped)."""
    a, b = data_ctrl["address"], small_ctrl["address"]
    grants = tmp_path / "grants.toml"
    grants.write_text(f'[[grant]]\nuid = 0\nnsid = 1\nfirst_lba = 100000\nblocks = 1000\naccess = "rw"\n'
                      f'controller = "{a}"\n\n[[grant]]\nuid = 0\nnsid = 1\nfirst_lba = 50000\nblocks = 500\n'
                      f'access = "rw"\ncontroller = "{b}"\n')
    sock = tmp_path / "nv.sock"
    socks = [str(tmp_path / f"nv-{x}.sock") for x in (a, b)]
    log = tmp_path / "serve.log"
    with log.open("w") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "nvmevfio", "-v", "serve", a, b, "--grants", str(grants),
                                 "--socket", str(sock), "--clients", "2"], stdout=logf, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not all(os.path.exists(s) for s in socks):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        data = [np.random.default_rng(i).integers(0, 256, 16 * 512, dtype=np.uint8) for i in (1, 2)]
        for s, blocks, d in zip(socks, (1000, 500), data):
            with nvmevfio.connect(s, 1) as dev:
                assert dev.info.block_count == blocks
                dev.write_blocks(3, d)
                dev.flush()
                assert np.array_equal(dev.read_blocks(3, 16), d)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        print(log.read_text()[-3000:])
    assert proc.returncode == 0 and not any(os.path.exists(s) for s in socks)
    for addr, lba, d in zip((a, b), (100003, 50003), data):
        with nvmevfio.open(addr, 1) as dev:
            assert np.array_equal(dev.read_blocks(lba, 16), d)


def test_one_poller_thread_drives_both_controllers(data_ctrl, small_ctrl):
    """`perf A B --shared-poller`: one thread polls both controllers' queues; each controller's
    own SMART counter of read commands moves by what its row says, and interrupts are refused."""
    a, b = data_ctrl["address"], small_ctrl["address"]
    before = [int(nvj("smart-log", x)["host_read_commands"]) for x in (a, b)]
    d = nvj("perf", a, b, "-w", "randread", "-q", 16, "-n", 3000, "--shared-poller", "--cpu", 1)
    assert d["poller"] == "shared" and [c["address"] for c in d["controllers"]] == [a, b]
    for c, was, x in zip(d["controllers"], before, (a, b)):
        assert c["ios"] == 3000 and c["errors"] == 0 and c["mode"] == "poll" and c["pinned_cpus"] == [1]
        assert c["per_queue"][0]["cpu"] == 1
        assert int(nvj("smart-log", x)["host_read_commands"]) - was >= 3000
    r = nv("perf", a, b, "--mode", "irq", "-n", 10, "--shared-poller", check=False)
    assert r.returncode != 0 and b"--shared-poller" in r.stderr and b"--mode poll" in r.stderr
    # with interrupts, a thread per queue by default (a thread cannot sleep on both queues)
    d = nvj("perf", a, b, "--mode", "irq", "-w", "randread", "-q", 4, "-n", 500)
    assert d["poller"] == "per-queue" and [c["mode"] for c in d["controllers"]] == ["irq", "irq"]
    assert d["poller_why"] == "the default (interrupts: no shared poller)"
    assert [c["ios"] for c in d["controllers"]] == [500, 500]
