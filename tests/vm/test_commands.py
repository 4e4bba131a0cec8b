"""The everyday command set against QEMU's NVMe model, through the CLI as a user types it (in
process: cli_runner.nv): set-feature/get-feature, get-log, id-ns --all, ns-rescan, format (LBA size
changes, the old geometry refused), create-ns where QEMU lacks it. Compare, verify, the commands
QEMU lacks (a status name, exit 1 as nvme-cli) and the sanitize and self-test logs: in
test_nvme_cli_compat.py, against nvme-cli itself."""

import json

import numpy as np
import pytest
from cli_runner import nv
from conftest import controller

import nvmevfio
from nvmevfio.errors import Refused


def cli(*args: str):
    r = nv(*args, check=False)
    r.stdout, r.stderr = r.stdout.decode(), r.stderr.decode()
    return r


def ok(*args: str) -> str:
    r = cli(*args)
    assert r.returncode == 0, f"{args}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_set_feature_then_get_feature(small_ctrl):
    addr = small_ctrl["address"]
    before = json.loads(ok("get-feature", addr, "-f", "4", "-o", "json"))["value"]
    out = ok("set-feature", addr, "-f", "4", "-v", "0x150")  # temperature threshold: 336 K
    assert out == "set-feature:0x04 (Temperature Threshold), value:0x00000150, cdw12:00000000, save:0\n"
    assert json.loads(ok("get-feature", addr, "-f", "4", "-o", "json"))["value"] & 0xFFFF == 0x150
    ok("set-feature", addr, "-f", "4", "-v", str(before & 0xFFFF))
    r = cli("set-feature", addr, "-f", "7", "-v", "0x10001")  # Number of Queues: the broker's
    assert r.returncode == 1 and "broker-owned-command" in r.stderr  # nvme-cli's set-feature: 1


def test_get_log_matches_smart_log(small_ctrl):
    addr = small_ctrl["address"]
    raw = nv("get-log", addr, "--log-id", "2", "--log-len", "512", "-b")
    assert raw.returncode == 0 and len(raw.stdout) == 512
    smart = json.loads(ok("smart-log", addr, "-o", "json"))
    temp_k = int.from_bytes(raw.stdout[1:3], "little")
    assert smart["temperature"] == temp_k  # nvme-cli's field, in kelvins
    part = json.loads(ok("get-log", addr, "-i", "2", "-l", "64", "-o", "0x40", "--output-format", "json"))  # -o: lpo
    assert bytes.fromhex(part["data"]) == raw.stdout[64:128]


def test_id_ns_all_and_rescan(data_ctrl):
    addr = data_ctrl["address"]
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
    r = cli("format", addr, "-n", "1", "--lbaf", str(five12), "--force")
    assert r.returncode == 0 and r.stdout == "Success formatting namespace:1\n"  # nvme-cli's line
    assert f"namespace 1: {(256 << 20) // 512} blocks of 512 bytes" in r.stderr
    with nvmevfio.open(addr, 1) as dev:
        assert dev.block_size == 512


def test_create_ns_where_qemu_lacks_it_gives_a_status_name(small_ctrl):
    """(sanitize, device-self-test, fw-commit: test_nvme_cli_compat, against nvme-cli's exit codes)"""
    addr = small_ctrl["address"]
    r = cli("create-ns", addr, "--nsze", "2048", "--ncap", "2048", "--flbas", "0")
    assert r.returncode in (0, 1), r.stderr  # 0 where this QEMU implements it; 1: its status, as nvme-cli
    if r.returncode == 1:
        assert "Invalid" in r.stderr and "Traceback" not in r.stderr, r.stderr
    ok("id-ctrl", addr, "-o", "json")  # nothing broke
