"""A filesystem on nvmevfio: `nvmevfio nbd` exports the namespace, the kernel's nbd driver
attaches it (nbd-client), ext4 goes on top. Every byte is checked by SHA-256 after a server
restart, fsync'd files survive a SIGKILL of the server, fstrim reaches the device as Deallocate,
and fio verifies its own data through the filesystem.

Which nbdkit plugin serves depends on the kernel (`--plugin auto`): on the custom kernel
(iommufd and no-IOMMU lanes), which has ublk, nbdkit's C file plugin on the namespace's ublk
device, which `nvmevfio nbd` starts and `--stop` takes down (C end to end); on Debian's 6.1
(type1 lane), without ublk, nvmevfio's Python plugin. Each test checks the one its lane gets."""

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

# Which plugin serves depends on the kernel, not on the DMA lane past that: the Python plugin (type1),
# the file plugin on a ublk device (iommufd). In the no-IOMMU lane it would be the file plugin on ublk
# again, whose data path (the ublk server's) test_ublk.py runs in that lane.
pytestmark = pytest.mark.lanes("type1", "iommufd", why="the no-IOMMU lane's NBD is nbdkit's file plugin on the "
                               "ublk server test_ublk.py tests there")
UBLK = Path("/dev/ublk-control").exists()  # as test_ublk.py decides it (ublk built into the custom kernel)
PLUGIN = "file" if UBLK else "python"
NBD = "/dev/nbd0"
MNT = Path("/tmp/nbd-mnt")
FILES = 500  # ublk (test_ublk.py) is the main disk path and writes 2,000; here the export's own checks


@pytest.fixture(scope="module")
def nbd_ctrl(guest):
    """A controller of its own (256 MiB, 512-byte blocks) for the NBD tests."""
    return controller(guest, "nvmevfio-nbd")


def ublk_devices(addr: str) -> list:
    """The ublk devices serving ``addr`` (none where the kernel has no ublk)."""
    if not UBLK:
        return []
    from nvmevfio import ublk_devices

    return [d for d in ublk_devices.list_devices() if d.address == addr]


def start(addr: str) -> dict:
    """`nvmevfio nbd ADDRESS --background`: returns once the device is open; the plugin it chose
    is this lane's, said in its one stderr line and its JSON."""
    res = dc.nv("nbd", addr, "--background", "-o", "json", timeout=240)
    info = json.loads(res.stdout)
    assert info["size"] == 256 << 20 and info["block_size"] == 512
    assert info["plugin"] == PLUGIN, info
    said = [line for line in res.stderr.splitlines() if "plugin" in line]
    assert len(said) == 1, res.stderr
    if UBLK:  # C end to end: nbdkit's file plugin on the namespace's ublk device
        assert f"file plugin on {info['ublk_device']}" in said[0] and "C end to end" in said[0], said
        assert [f"/dev/ublkb{d.dev_id}" for d in ublk_devices(addr)] == [info["ublk_device"]]
    else:
        assert "Python plugin (this kernel has no ublk)" in said[0] and info["ublk_device"] is None, said
    return info


def stop(addr: str) -> None:
    """`--stop`: nbdkit, and the ublk device it started."""
    dc.sh(sys.executable, "-m", "nvmevfio", "nbd", addr, "--stop", timeout=180)
    assert ublk_devices(addr) == []


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
                   timeout=180)


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
    record(io_dir, "nbd", {"files": FILES, "bytes": total, "write_s": write_s, "plugin": PLUGIN})


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

    # The controller was left enabled by the killed process: reopened cleanly. Over ublk only
    # nbdkit died: the export takes up the ublk device it started, still serving.
    before = export.info
    export.restart()
    if UBLK:
        assert export.info["ublk_device"] == before["ublk_device"] and export.info["ublk_started"]
    dc.mount(NBD, MNT)  # journal replay
    writer.check(MNT / "crash")
    dc.umount(MNT)
    dc.fsck_clean(NBD)
