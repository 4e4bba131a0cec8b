"""A filesystem on nvmevfio: `nvmevfio nbd` (nbdkit + nvmevfio's Python plugin) exports the
namespace, the kernel's nbd driver attaches it (nbd-client), ext4 goes on top. Every byte is
checked by SHA-256 after a server restart, fsync'd files survive a SIGKILL of the server, fstrim
reaches the device as Deallocate, and fio verifies its own data through the filesystem."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import disk_checks as dc
import numpy as np
import pytest
from conftest import controller, record

NBD = "/dev/nbd0"
MNT = Path("/tmp/nbd-mnt")
FILES = 500  # ublk (test_ublk.py) is the main disk path and writes 2,000; here the export's own checks


@pytest.fixture(scope="module")
def nbd_ctrl(guest):
    """A controller of its own (256 MiB, 512-byte blocks) for the NBD tests."""
    return controller(guest, "nvmevfio-nbd")


def start(addr: str) -> dict:
    """`nvmevfio nbd ADDRESS --background`: returns once the device is open."""
    out = dc.sh(sys.executable, "-m", "nvmevfio", "nbd", addr, "--background", "-o", "json", timeout=240)
    info = json.loads(out)
    assert info["size"] == 256 << 20 and info["block_size"] == 512
    return info


def stop(addr: str) -> None:
    dc.sh(sys.executable, "-m", "nvmevfio", "nbd", addr, "--stop", timeout=120)


def attach(info: dict) -> None:
    dc.sh("nbd-client", "-unix", info["socket"], NBD, "-b", "512", timeout=60)
    deadline = time.monotonic() + 30
    while int(Path("/sys/block/nbd0/size").read_text()) * 512 != info["size"]:
        assert time.monotonic() < deadline, "nbd0 did not get the export's size"
        time.sleep(0.1)


def detach() -> None:
    dc.sh("nbd-client", "-d", NBD, timeout=60)


class Export:
    """The module's export, attached as NBD with ext4 mounted at MNT; ``info`` is what
    `nvmevfio nbd --background` printed for the nbdkit serving now (a test that restarts it
    updates it)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.info = start(address)
        attach(self.info)

    def restart(self) -> None:
        """A new server process: nothing survives but what is on the device."""
        self.info = start(self.address)
        attach(self.info)


@pytest.fixture(scope="module")
def export(nbd_ctrl):
    """One export for the file (each `nvmevfio nbd` costs seconds under the guest's emulated CPU)."""
    exp = Export(nbd_ctrl["address"])
    dc.mkfs(NBD, "-E", "nodiscard")
    dc.mount(NBD, MNT)
    yield exp
    if MNT.is_mount():
        dc.umount_after_crash(MNT)
    subprocess.run(["nbd-client", "-d", NBD], capture_output=True, timeout=60)
    subprocess.run([sys.executable, "-m", "nvmevfio", "nbd", nbd_ctrl["address"], "--stop"], capture_output=True,
                   timeout=120)


def test_filesystem_tree_survives_a_server_restart(export, io_dir):
    t0 = time.monotonic()
    manifest = dc.write_tree(MNT / "tree", dc.sizes(FILES, 12, large=5), seed=11)
    dc.sh("sync")
    total = sum(p.stat().st_size for p in (MNT / "tree").rglob("*.bin"))
    write_s = time.monotonic() - t0
    dc.umount(MNT)
    detach()
    stop(export.address)

    export.restart()
    dc.mount(NBD, MNT)
    dc.check_tree(MNT / "tree", manifest)
    assert len(manifest) == FILES
    dc.umount(MNT)
    dc.fsck_clean(NBD)
    dc.mount(NBD, MNT)
    record(io_dir, "nbd", {"files": FILES, "bytes": total, "write_s": write_s})


def test_fstrim_deallocates_and_fio_verifies(export, io_dir):
    victim = MNT / "victim.bin"
    victim.write_bytes(np.random.default_rng(5).integers(1, 256, 8 << 20, dtype=np.uint8).tobytes())
    dc.sh("sync")
    where = dc.extents(victim)
    assert any(dc.device_bytes(NBD, where))  # the file's data is there
    victim.unlink()
    dc.sh("sync")
    assert "trimmed" in dc.sh("fstrim", "-v", str(MNT))
    assert not any(dc.device_bytes(NBD, where)), "fstrim did not deallocate the deleted file's blocks"

    # fio through the filesystem, verifying its own data (crc32c)
    job = dc.fio_verify(f"--directory={MNT}", "--size=16M", "--rw=randrw", "--ioengine=psync", timeout=600)
    record(io_dir, "nbd", {"fio_read_iops": job["read"]["iops"], "fio_write_iops": job["write"]["iops"]})
    for f in MNT.glob("verify.*"):
        f.unlink()
    dc.umount(MNT)
    dc.fsck_clean(NBD)
    dc.mount(NBD, MNT)


def test_fsynced_files_survive_a_server_kill(export):
    (MNT / "crash").mkdir()
    writer = dc.FsyncWriter(MNT / "crash", max_size=256 << 10)
    writer.wait_for(30, timeout_s=60)
    os.kill(export.info["pid"], signal.SIGKILL)  # mid-I/O
    writer.stopping.set()
    writer.thread.join(20)
    # Disconnecting fails whatever the kernel still holds for the dead server (a write-back the
    # writer's fsync may wait on), as an operator would after a server crash.
    detach()
    writer.stop(60)
    dc.umount_after_crash(MNT)  # its journal aborted
    Path(export.info["pidfile"]).unlink(missing_ok=True)

    export.restart()  # the controller was left enabled by the killed process: reopened cleanly
    dc.mount(NBD, MNT)  # journal replay
    writer.check(MNT / "crash")
    dc.umount(MNT)
    dc.fsck_clean(NBD)
