"""Passthrough against QEMU's NVMe model: the CLI with nvme-cli's options, data through the
broker's own buffer, broker-owned commands refused, a status name and exit 4 for what the
controller lacks."""

import numpy as np
from cli_runner import Result, nv

import nvmevfio


def cli(*args: str, input: bytes | None = None) -> Result:
    """In this process, as `python -m nvmevfio` runs it (cli_runner: output, exit status)."""
    return nv(*args, input=input, check=False)


def test_admin_passthru_identify_raw(small_ctrl):
    r = cli("admin-passthru", small_ctrl["address"], "--opcode", "0x06", "--cdw10", "1", "--data-len", "4096",
            "--read", "-b")
    assert r.returncode == 0, r.stderr
    assert b"Admin Command Identify is Success and result: 0x00000000" in r.stderr
    ident = r.stdout
    assert len(ident) == 4096 and int.from_bytes(ident[0:2], "little") == 0x1B36  # PCI vendor: QEMU
    assert ident[4:24].decode().strip() == "nvmevfio-small"  # the serial the harness gave it


def test_io_passthru_write_then_read(small_ctrl, tmp_path):
    addr = small_ctrl["address"]
    data = np.random.default_rng(8).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    r = cli("io-passthru", addr, "-n", "1", "--opcode", "0x01", "--cdw10", "5000", "--cdw12", "7",
            "--data-len", "4096", "--write", "--input-file", str(src))
    assert r.returncode == 0 and b"IO Command Write is Success" in r.stderr, r.stderr
    with nvmevfio.open(addr, 1) as dev:
        assert dev.read_blocks(5000, 8).tobytes() == data
        _, got = dev.provider.io_passthru(0x02, nsid=1, cdw10=5000, cdw12=7, data_len=4096)
        assert got == data


def test_refused_and_unimplemented(small_ctrl):
    addr = small_ctrl["address"]
    r = cli("admin-passthru", addr, "--opcode", "0x01")  # Create I/O SQ: the broker's
    assert r.returncode == 1 and b"broker-owned-command" in r.stderr and b"Create I/O Submission Queue" in r.stderr
    r = cli("admin-passthru", addr, "--opcode", "0x09", "--cdw10", "0x07")  # Set Features Number of Queues
    assert r.returncode == 1 and b"Number of Queues" in r.stderr
    r = cli("admin-passthru", addr, "--opcode", "0xc2", "--data-len", "512", "--read")  # vendor-specific
    assert r.returncode == 1 and b"Invalid Command Opcode" in r.stderr, r.stderr  # nvme-cli's status
    r = cli("admin-passthru", addr, "--opcode", "0x06", "--cdw10", "1", "--data-len", "4096", "--output-format", "json")
    assert r.returncode == 0  # the controller still works after the refusals and the error
