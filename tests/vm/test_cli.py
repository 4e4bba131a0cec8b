"""Every nvmevfio command in the guest: exit codes, human output, JSON (nvme-cli parity, the same
data and exit codes as nvme-cli on one controller: test_nvme_cli_compat.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import nv, nvj

from nvmevfio import pci
from nvmevfio.cli.common import NVMEVFIO_OWN


@pytest.fixture(scope="module")
def addr(small_ctrl):
    a = small_ctrl["address"]
    pci.bind(a, force=True)
    return a


def test_version_and_help():
    out = nv("--version", real=True).stdout.decode()  # a real process: python -m nvmevfio
    assert out.startswith("nvmevfio, version ")
    for cmd in ("list", "bind", "unbind", "show-regs", "id-ctrl", "identify", "id-ns", "list-ns", "read", "write",
                "flush", "write-zeroes", "deallocate", "smart-log", "error-log", "fw-log", "get-feature", "reset",
                "shutdown", "perf"):
        r = nv(cmd, "--help", check=False)  # nvme-cli's commands: its status after the help, 1; nvmevfio's own: 0
        h = r.stdout.decode()
        assert "Example" in h and "Usage: " in h and r.returncode == int(cmd not in NVMEVFIO_OWN), cmd


def test_list(addr, data_ctrl):
    out = nv("list").stdout.decode()
    assert addr in out and "vfio-pci" in out and "QEMU NVM Express Controller" in out
    fns = {f["address"]: f for f in nvj("list")["Functions"]}
    assert fns[addr]["vendor_id"] == 0x1B36 and fns[addr]["driver"] == "vfio-pci"
    group = Path(f"/sys/bus/pci/devices/{data_ctrl['address']}/iommu_group").resolve().name
    assert str(fns[data_ctrl["address"]]["iommu_group"]) == group  # the group the kernel put it in


def test_human_identify(addr):
    r = nv("identify", addr)
    out = r.stdout.decode()
    assert out.startswith("NVME Identify Controller:") and "vid       : 0x1b36" in out
    assert "sn        : nvmevfio-small" in out
    assert "shadow doorbells: supported (OACS bit 8" in r.stderr.decode()  # QEMU's has Doorbell Buffer Config
    ns = nv("id-ns", addr, "-n", 1).stdout.decode()
    assert "NVME Identify Namespace 1:" in ns and "(in use)" in ns and "nsze    : 0x20000" in ns
    assert nv("list-ns", addr).stdout.decode().strip() == "[   0]:0x1"
    assert nvj("list-ns", addr) == {"nsid_list": [{"nsid": 1}]}


def test_show_regs(addr, lane):
    r = nv("show-regs", addr, "-o", "json", check=False)  # nvme-cli 2.3's show-regs -o json exits 1 after it
    d = json.loads(r.stdout)
    assert r.returncode == 1 and d["cap"] == d["decoded"]["cap"]["MQES"] | d["cap"] & ~0xFFFF
    assert d["decoded"]["cap"]["MQES"] == 2047 and d["version"] == "1.4.0" and d["iommu_backend"] == lane
    out = nv("show-regs", addr).stdout.decode()
    assert "cap  : 0x" in out
    if lane == "noiommu":  # no IOVA space, and no physical address shown
        assert d["iova_ranges"] == [] and "iommu: none (noiommu)" in out and "usable IOVA" not in out
    else:
        assert d["iova_ranges"] and "usable IOVA" in out


def test_write_file_read_back_cmp(addr, io_dir):
    src = io_dir / "cli-src.bin"
    dst = io_dir / "cli-dst.bin"
    src.write_bytes(os.urandom(6 << 20))  # > 4 MiB: chunked, progress bar on a TTY
    r = nv("write", addr, "-n", 1, "--start-block", 1000, "-d", src)  # no --block-count: the whole file
    assert r.stderr.decode() == "write: Success\n"
    nv("read", addr, "--start-block", 1000, "--block-count", 12287, "-d", dst)
    assert subprocess.run(["cmp", src, dst]).returncode == 0
    out = nv("read", addr, "-s", "0x3e8", "-c", 1).stdout  # to stdout; numbers in hex too
    assert out == src.read_bytes()[:1024]
    hd = nv("read", addr, "-s", 1000, "-c", 0, "--hexdump").stdout.decode()
    first = src.read_bytes()[:16]
    assert hd.splitlines()[0].startswith("00000000  " + " ".join(f"{b:02x}" for b in first[:8]))


def test_write_stdin_partial_block(addr):
    r = nv("write", addr, "-s", 5, input=b"x" * 700, check=False, real=True)  # real stdin, exit code
    assert r.returncode == 1 and b"length-mismatch" in r.stderr and b"--pad" in r.stderr  # nvme-cli's command: 1
    assert b"Traceback" not in r.stderr
    nv("write", addr, "-s", 5, "--pad", input=b"x" * 700)
    out = nv("read", addr, "-s", 5, "-c", 1).stdout
    assert out == b"x" * 700 + b"\0" * 324


def test_write_zeroes_deac_and_deallocate(addr):
    """nvmevfio's deallocate and write-zeroes --deac (flush, Write Zeroes, dsm --ad: test_nvme_cli_compat)."""
    nv("write", addr, "-s", 64, input=b"\xab" * 8192)
    assert nv("write-zeroes", addr, "-s", 64, "-c", 7, "--deac").stdout == b"NVME Write Zeroes Success\n"
    assert nv("read", addr, "-s", 64, "-c", 15).stdout == b"\0" * 4096 + b"\xab" * 4096
    nv("deallocate", addr, "-s", 72, "-c", 7)
    assert nv("read", addr, "-s", 64, "-c", 15).stdout == b"\0" * 8192


def test_logs_and_features(addr):
    s = nv("smart-log", addr).stdout.decode()
    assert "Smart Log for NVME device" in s and "Kelvin" in s
    e = nvj("error-log", addr, "-e", 2)
    assert "errors" in e and len(e["errors"]) >= 1 and "status_field" in e["errors"][0]
    fw = nvj("fw-log", addr)[addr]  # nvme-cli's keys (its values: test_nvme_cli_compat)
    assert fw["Active Firmware Slot (afi)"] == 1 and fw["Firmware Rev Slot 1"].endswith(" (1.0.....)")
    assert "frs1 : 0x2020202020302e31 (1.0.....)" in nv("fw-log", addr).stdout.decode()
    g = nvj("get-feature", addr, "-f", "0x7")
    assert g["name"] == "Number of Queues" and (g["value"] & 0xFFFF) + 1 >= 4
    assert "get-feature:0x07 (Number of Queues), Current value:0x" in nv("get-feature", addr, "-f", 7).stdout.decode()


def test_reset_and_shutdown(addr):
    assert "controller disabled" in nv("reset", addr).stdout.decode()
    assert "shutdown complete" in nv("shutdown", addr).stdout.decode()
    assert nvj("list-ns", addr)["nsid_list"]  # usable again afterwards


def test_errors_are_one_line_with_exit_codes(addr, data_ctrl):
    r = nv("read", addr, "--start-block", 1 << 40, check=False, real=True)
    assert r.returncode == 1 and b"window-past-namespace-end" in r.stderr and b"Traceback" not in r.stderr
    # one line (and, in the no-IOMMU lane, the warning naming its risk that every open logs)
    assert len([line for line in r.stderr.decode().strip().splitlines() if "no IOMMU:" not in line]) == 1
    r = nv("read", addr, "-n", 9, check=False)
    assert r.returncode == 1 and b"namespace-inactive" in r.stderr
    r = nv("id-ctrl", "not-an-address", check=False)
    assert r.returncode == 1 and b"not a PCI address" in r.stderr  # nvme-cli's main: err ? 1 : 0
    pci.unbind(addr)
    try:
        r = nv("id-ctrl", addr, check=False)
        assert r.returncode == 1 and b"nvmevfio bind" in r.stderr
        r = nv("-v", "id-ctrl", addr, check=False)
        assert r.returncode == 1
        r = nv("shutdown", addr, check=False)  # nvmevfio's own command: its setup class
        assert r.returncode == 5 and b"nvmevfio bind" in r.stderr
    finally:
        pci.bind(addr, force=True)


@pytest.mark.parametrize("mode", ["poll", "irq"])
@pytest.mark.parametrize("workload", ["randread", "randwrite", "read", "write", "randrw"])
def test_perf(addr, workload, mode):
    d = nvj("perf", addr, "-w", workload, "-q", 8, "-s", 4096, "-n", 1500, "--mode", mode, "--range", "0:65536")
    assert d["ios"] == 1500 and d["errors"] == 0 and d["mode"] == mode and d["queue_depth"] == 8
    assert d["reads"] + d["writes"] == 1500
    if workload == "randrw":
        assert 400 < d["reads"] < 1100
    assert 50 < d["iops"] < 1_000_000 and d["mib_per_s"] == pytest.approx(d["iops"] * 4096 / 2**20, rel=1e-6)
    assert 0 < d["lat_min_us"] <= d["lat_p50_us"] <= d["lat_p99_us"] <= d["lat_p999_us"] <= d["lat_max_us"]
    # at most one SQ tail doorbell per batch: never more MMIO writes than commands; shadow
    # doorbells are off by default on QEMU's model (nvme.structures.shadow_doorbells_pay)
    assert not d["shadow_doorbells"] and d["shadow_only_updates"] == 0
    assert 0 < d["sq_doorbell_mmio"] <= 1500
    # each MMIO doorbell write timed: an exit into QEMU's model takes microseconds, and the writes
    # and the waits are parts of one loop's time
    assert d["sq_doorbell_us"] > 0.1 and d["sq_doorbell_us"] * d["sq_doorbell_mmio"] < d["seconds"] * 1e6
    assert d["doorbell_pct"] > 0 and d["doorbell_pct"] + d["wait_pct"] <= 100.5


@pytest.mark.parametrize("mode", ["poll", "irq"])
def test_perf_verify_soak(addr, mode):
    """The integrity soak: random reads and writes, every block read back checked (CRC32C), for
    NVMEVFIO_VM_SOAK_S seconds (the one setting; 20 in CI, which runs the default; the host's value
    reaches the guest through tests/test_guest_tier.py, e.g. NVMEVFIO_VM_SOAK_S=600 for a long one)."""
    soak_s = int(os.environ.get("NVMEVFIO_VM_SOAK_S", "20"))
    d = nvj("perf", addr, "-w", "randrw", "-q", 16, "-s", 4096, "--verify", "-t", soak_s, "--range", "90000:120000",
            "--mode", mode)
    assert d["verify"] and d["mismatches"] == [] and d["errors"] == 0
    assert d["verified_blocks"] > 1000 and d["reads"] > 100 and d["writes"] > 100 and d["seconds"] >= soak_s


def test_perf_with_and_without_shadow_doorbells(addr):
    d = nvj("perf", addr, "-w", "randread", "-q", 16, "-n", 2000, "--no-shadow-doorbells")
    assert d["ios"] == 2000 and d["errors"] == 0 and not d["shadow_doorbells"] and d["shadow_only_updates"] == 0
    assert 0 < d["sq_doorbell_mmio"] <= 2000 and 0 < d["cq_doorbell_mmio"] <= 2000
    d = nvj("perf", addr, "-w", "randread", "-q", 16, "-n", 2000, "--shadow-doorbells")  # chosen, not the default
    assert d["ios"] == 2000 and d["errors"] == 0 and d["shadow_doorbells"]
    assert d["sq_doorbell_mmio"] + d["shadow_only_updates"] > 0 and d["sq_doorbell_mmio"] <= 2000


@pytest.mark.parametrize("mode", ["poll", "irq"])
def test_perf_two_queues(addr, mode):
    """--queues 2 on a controller with 4 I/O queue pairs (max_ioqpairs=4): a row per queue, each
    queue's thread on its CPU, every I/O completed, the rows adding up to the total, and the CPU
    cost per command (polling stays on CPU; with interrupts the threads sleep on their eventfds)."""
    cpus = sorted(os.sched_getaffinity(0))
    d = nvj("perf", addr, "-w", "randread", "-q", 8, "-n", 3001, "--queues", 2, "--mode", mode, "--range", "0:65536",
            "--cpu", ",".join(map(str, cpus)))
    assert (d["queues"], d["ios"], d["errors"], d["reads"]) == (2, 3001, 0, 3001)
    rows = d["per_queue"]
    assert [(q["queue"], q["cpu"], q["ios"], q["errors"]) for q in rows] == [
        (1, cpus[0], 1501, 0), (2, cpus[1 % len(cpus)], 1500, 0)]
    assert sum(q["iops"] for q in rows) == pytest.approx(d["iops"], rel=1e-9)
    assert d["lat_min_us"] == min(q["lat_min_us"] for q in rows)
    assert d["lat_max_us"] == max(q["lat_max_us"] for q in rows)
    for r in (d, *rows):
        assert 0 < r["cpu_us_per_io"] < 1e5 and 0 <= r["wait_share"] <= 1
        assert r["cpu_us_per_io"] == pytest.approx(r["usr_us_per_io"] + r["sys_us_per_io"])
    if mode == "poll":
        assert d["wait_share"] < 0.5  # spinning: on CPU while it waits
    out = nv("perf", addr, "-w", "randread", "-q", 4, "-n", 400, "--queues", 2).stdout.decode()
    assert "cpu: " in out and " us per I/O (" in out and "queue  cpu" in out
    assert [line.split()[0] for line in out.splitlines()[-3:]] == ["1", "2", "total"]


@pytest.mark.parametrize("mode", ["poll", "irq"])
def test_perf_iodepth_batch_issues_whole_batches(addr, mode):
    """--iodepth-batch 32 at -q 32: every SQ tail doorbell carries 32 commands (the loop waits for
    the whole queue to drain before it refills); a batch above -q is refused before any I/O."""
    d = nvj("perf", addr, "-w", "randread", "-q", 32, "-n", 3200, "--iodepth-batch", 32, "--mode", mode,
            "--range", "0:65536")
    assert (d["ios"], d["errors"], d["iodepth_batch"]) == (3200, 0, 32)
    assert d["ios_per_submit"] == 32.0 and d["sq_doorbell_mmio"] == 100
    r = nv("perf", addr, "-q", 8, "-n", 100, "--iodepth-batch", 9, check=False)
    assert r.returncode == 3 and b"count-out-of-range" in r.stderr and b"I/O depth batch 9 outside 1..8" in r.stderr


def test_perf_completion_batch_cap_and_its_default_at_depth(addr):
    """--iodepth-batch-complete-max 8 at -q 32: never more than 8 completions per reap (and refill);
    the CQ head doorbell waits while the default 256-entry queue has room, so it is written once
    every 224 to 231 completions; -q 128 with a cap of 32 takes at most 32; by default at -q 128
    each command is re-posted as it is reaped and every reap writes the CQ head doorbell (then the
    SQ tail's), with no cap; by default at -q 256,
    where QEMU's model answers the whole queue in one round, the reaps show whole-queue waves and
    the loop caps itself at a quarter of the depth (cbits/perf.h) and says so."""
    d = nvj("perf", addr, "-w", "randread", "-q", 32, "-n", 4000, "--iodepth-batch-complete-max", 8, "--range",
            "0:65536")
    assert (d["ios"], d["errors"], d["iodepth_batch_complete_max"], d["io_queue_size"]) == (4000, 0, 8, 256)
    assert 1.0 <= d["ios_per_reap"] <= 8.0 and 4000 // 231 <= d["cq_doorbell_mmio"] <= 4000 // 224 + 8
    d = nvj("perf", addr, "-w", "randread", "-q", 128, "-n", 6400, "--range", "0:65536",
            "--iodepth-batch-complete-max", 32)
    assert (d["ios"], d["errors"], d["iodepth_batch_complete_max"], d["io_queue_size"]) == (6400, 0, 32, 257)
    assert d["ios_per_reap"] <= 32.0 and not d["refill_as_reaped"]
    d = nvj("perf", addr, "-w", "randread", "-q", 128, "-n", 12800, "--range", "0:65536")
    assert (d["ios"], d["errors"], d["iodepth_batch_complete_max"], d["refill_as_reaped"], d["io_queue_size"]) == (
        12800, 0, 0, True, 257)
    reaps = round(12800 / d["ios_per_reap"])
    assert d["cq_doorbell_mmio"] == reaps and 1 <= d["sq_doorbell_mmio"] <= reaps + 1
    d = nvj("perf", addr, "-w", "randread", "-q", 256, "-n", 256 * 160, "--range", "0:65536")
    assert (d["ios"], d["errors"], d["iodepth_batch_complete_max"], d["io_queue_size"]) == (256 * 160, 0, 64, 513)
    assert 64.0 < d["ios_per_reap"] < 256.0  # whole waves first, then reaps of at most 64


def test_perf_cq_head_doorbell_waits_while_the_cq_has_room(addr):
    """perf's queue (by default twice -q and one, at least 256 entries) lets the CQ head doorbell
    wait until the entries consumed and a depth more could fill the CQ (cbits/qpair.h,
    qp_cq_must_ring): at -q 1, once every 255 commands where the SQ tail's is every command; with
    --io-queue-size 3, every second command; with 2 (no room), every command, as before; a size
    not above -q, or above CAP.MQES+1 (QEMU's 2048), is refused before any I/O. Every command
    completes either way."""
    d = nvj("perf", addr, "-w", "randread", "-q", 1, "-n", 2000, "--range", "0:65536")
    assert (d["ios"], d["errors"], d["io_queue_size"], d["sq_doorbell_mmio"]) == (2000, 0, 256, 2000)
    assert 7 <= d["cq_doorbell_mmio"] <= 12  # one each time 255 are unrung, and one as each slice ends
    d = nvj("perf", addr, "-w", "randread", "-q", 1, "-n", 2000, "--range", "0:65536", "--io-queue-size", 3)
    assert (d["ios"], d["errors"], d["io_queue_size"], d["sq_doorbell_mmio"]) == (2000, 0, 3, 2000)
    assert 1000 <= d["cq_doorbell_mmio"] <= 1005
    d = nvj("perf", addr, "-w", "randread", "-q", 1, "-n", 2000, "--range", "0:65536", "--io-queue-size", 2)
    assert (d["ios"], d["errors"], d["io_queue_size"], d["sq_doorbell_mmio"], d["cq_doorbell_mmio"]) == (
        2000, 0, 2, 2000, 2000)
    d = nvj("perf", addr, "-w", "randwrite", "-q", 16, "-n", 3000, "--range", "0:65536", "--io-queue-size", 1000,
            "--mode", "irq")
    # once each 984 are unrung (984 + 16 would fill 1000): 3, and one as each 1-s slice and the drain end
    assert (d["ios"], d["errors"], d["io_queue_size"]) == (3000, 0, 1000) and 3 <= d["cq_doorbell_mmio"] <= 8
    r = nv("perf", addr, "-q", 8, "-n", 100, "--io-queue-size", 8, check=False)
    assert r.returncode == 1 and b"--io-queue-size 8: a queue keeps one entry empty" in r.stderr
    r = nv("perf", addr, "-q", 8, "-n", 100, "--io-queue-size", 4096, check=False)
    assert r.returncode == 3 and b"count-out-of-range" in r.stderr and b"queue depth 4096 outside 2..2048" in r.stderr


def test_perf_more_queues_than_the_controller_allows(addr):
    r = nv("perf", addr, "-n", 100, "--queues", 5, check=False)  # max_ioqpairs=4
    assert r.returncode == 3 and b"count-out-of-range" in r.stderr
    assert b"controller allows 4 I/O queue pairs, 5 asked" in r.stderr


def test_perf_human(addr):
    out = nv("perf", addr, "-w", "read", "-q", 4, "-s", 131072, "-t", 1, real=True).stdout.decode()
    assert "IOPS" in out and "p99.9(us)" in out and "read, 131072 B, QD 4, poll" in out
    assert "doorbells: shadow off, MMIO writes" in out  # off by default on QEMU's model


def test_read_into_a_closed_pipe_ends_quietly(addr):
    p = subprocess.Popen([sys.executable, "-m", "nvmevfio", "read", addr, "-s", "0", "-c", "65535"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(p.stdout.read(100)) == 100
    p.stdout.close()  # like `| head -c 100`
    err = p.stderr.read()
    assert p.wait(timeout=120) == 0 and b"Broken pipe" not in err and b"Traceback" not in err


def test_file_write_refused_before_anything_is_written(addr, io_dir):
    nv("write-zeroes", addr, "-s", 130000, "-c", 1071)
    partial = io_dir / "partial.bin"
    partial.write_bytes(b"\x5a" * (3 * 512 + 100))
    r = nv("write", addr, "-s", 130000, "-d", partial, check=False)
    assert r.returncode == 1 and b"partial" in r.stderr
    too_big = io_dir / "too-big.bin"
    too_big.write_bytes(b"\x5a" * (2000 * 512))  # 130000 + 2000 > 131072 blocks
    r = nv("write", addr, "-s", 130000, "-d", too_big, check=False)
    assert r.returncode == 1 and b"window-past-namespace-end" in r.stderr
    assert nv("read", addr, "-s", 130000, "-c", 1071).stdout == b"\0" * (1072 * 512)
    nv("write", addr, "-s", 130000, "--pad", "-d", partial)
    assert nv("read", addr, "-s", 130000, "-c", 3).stdout == b"\x5a" * (3 * 512 + 100) + b"\0" * 412
