"""The everyday command set against QEMU's NVMe model, through the CLI as a user types it:
set-feature/get-feature, get-log, compare, verify, id-ns --all, ns-rescan, format (LBA size
changes, the old geometry refused), and the commands QEMU lacks (a status name, exit 4)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import controller

import nvmevfio
from nvmevfio.errors import Refused


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nvmevfio", *args], capture_output=True, text=True, timeout=300)


def ok(*args: str) -> str:
    r = cli(*args)
    assert r.returncode == 0, f"{args}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_set_feature_then_get_feature(small_ctrl):
    addr = small_ctrl["address"]
    before = json.loads(ok("get-feature", addr, "-f", "4", "-o", "json"))["value"]
    out = ok("set-feature", addr, "-f", "4", "-V", "0x150")  # temperature threshold: 336 K
    assert "set-feature:0x04 (Temperature Threshold), value:0x00000150" in out
    assert json.loads(ok("get-feature", addr, "-f", "4", "-o", "json"))["value"] & 0xFFFF == 0x150
    ok("set-feature", addr, "-f", "4", "-V", str(before & 0xFFFF))
    r = cli("set-feature", addr, "-f", "7", "-V", "0x10001")  # Number of Queues: the broker's
    assert r.returncode == 3 and "broker-owned-command" in r.stderr


def test_get_log_matches_smart_log(small_ctrl):
    addr = small_ctrl["address"]
    raw = subprocess.run([sys.executable, "-m", "nvmevfio", "get-log", addr, "--log-id", "2", "--log-len", "512",
                          "-b"], capture_output=True, timeout=120)
    assert raw.returncode == 0 and len(raw.stdout) == 512
    smart = json.loads(ok("smart-log", addr, "-o", "json"))
    temp_k = int.from_bytes(raw.stdout[1:3], "little")
    assert smart["temperature"] == temp_k  # nvme-cli's field, in kelvins
    part = json.loads(ok("get-log", addr, "--log-id", "2", "--log-len", "64", "--lpo", "64", "-o", "json"))
    assert bytes.fromhex(part["data"]) == raw.stdout[64:128]


def test_compare_verify_id_ns_all_rescan(data_ctrl, tmp_path):
    addr = data_ctrl["address"]
    data = np.random.default_rng(12).integers(0, 256, 4096, dtype=np.uint8)
    with nvmevfio.open(addr, 1) as dev:
        dev.write_blocks(9000, data)
    f = tmp_path / "expected.bin"
    f.write_bytes(data.tobytes())
    ok("compare", addr, "-n", "1", "--start-block", "9000", "--block-count", "7", "--data-size", "4096",
       "--data", str(f))
    changed = data.copy()
    changed[5] ^= 0xFF
    f.write_bytes(changed.tobytes())
    r = cli("compare", addr, "-n", "1", "--start-block", "9000", "--block-count", "7", "--data", str(f))
    assert r.returncode == 4 and "Compare Failure" in r.stderr, r.stderr
    ok("verify", addr, "-n", "1", "--start-block", "0", "--block-count", "255")
    docs = json.loads(ok("id-ns", addr, "--all", "-o", "json"))
    # QEMU sizes a namespace with metadata as the image over (block + metadata) bytes
    assert [d["nsze"] for d in docs] == [ns["size"] // (ns["block_size"] + ns["metadata"])
                                         for ns in data_ctrl["namespaces"]]
    rescan = json.loads(ok("ns-rescan", addr, "-o", "json"))["namespaces"]
    assert [r["nsid"] for r in rescan] == [ns["nsid"] for ns in data_ctrl["namespaces"]]


def test_format_changes_the_block_size(guest):
    addr = controller(guest, "nvmevfio-nbd")["address"]  # throwaway contents; formatted back at the end
    ns = json.loads(ok("id-ns", addr, "-n", "1", "-o", "json"))
    four_k = next(i for i, f in enumerate(ns["lbafs"]) if f["ds"] == 12 and f["ms"] == 0)
    five12 = next(i for i, f in enumerate(ns["lbafs"]) if f["ds"] == 9 and f["ms"] == 0)
    dev = nvmevfio.open(addr, 1)
    try:
        assert dev.block_size == 512
        table = dev.provider.format_nvm(1, four_k)
        assert table[1].block_size == 4096 and table[1].size_blocks == (256 << 20) // 4096
        with pytest.raises(Refused) as ei:
            dev.read_blocks(0, 1)  # the old geometry
        assert ei.value.reason == "namespace-changed"
    finally:
        dev.close()
    with nvmevfio.open(addr, 1) as dev:
        assert dev.block_size == 4096 and not dev.read_blocks(0, 2).any()  # formatted: zeros
        dev.write_blocks(10, np.full(4096, 7, np.uint8))
        assert (dev.read_blocks(10, 1) == 7).all()
    out = ok("format", addr, "-n", "1", "--lbaf", str(five12), "--force")
    assert f"({(256 << 20) // 512} blocks of 512 bytes)" in out
    with nvmevfio.open(addr, 1) as dev:
        assert dev.block_size == 512


@pytest.mark.parametrize("args", [
    ["sanitize", "--sanact", "2"], ["device-self-test", "--self-test-code", "1"],
    ["fw-commit", "--slot", "1", "--action", "1"], ["create-ns", "--nsze", "2048", "--ncap", "2048"],
])
def test_commands_qemu_lacks_give_a_status_name(small_ctrl, args):
    addr = small_ctrl["address"]
    r = cli(args[0], addr, *args[1:])
    assert r.returncode in (0, 4), r.stderr  # 0 where this QEMU implements it
    if r.returncode == 4:
        assert "Invalid" in r.stderr and "Traceback" not in r.stderr, r.stderr
    ok("id-ctrl", addr, "-o", "json")  # nothing broke


def test_sanitize_and_self_test_logs_decoded_as_nvme_cli(small_ctrl):
    """Both pages decoded with nvme-cli's JSON names, or, where this QEMU lacks the page, its
    status name and exit 4."""
    addr = small_ctrl["address"]
    r = cli("sanitize-log", addr, "-o", "json")
    if r.returncode == 0:
        d = json.loads(r.stdout)[addr]
        assert set(d) >= {"sprog", "sstat", "cdw10_info", "time_over_write"} and "status" in d["sstat"]
    else:
        assert r.returncode == 4 and "Invalid" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = cli("self-test-log", addr, "-e", "2", "-o", "json")
    if r.returncode == 0:
        d = json.loads(r.stdout)
        assert len(d["List of Valid Reports"]) == 2 and "Current Device Self-Test Operation" in d
        text = ok("self-test-log", addr)
        assert text.startswith(f"Device Self Test Log for NVME device:{addr}") and "List of Valid Reports: 20" in text
    else:
        assert r.returncode == 4 and "Invalid" in r.stderr and "Traceback" not in r.stderr, r.stderr
