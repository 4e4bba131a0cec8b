"""A filesystem on nvmevfio: `nvmevfio nbd` (nbdkit + nvmevfio's Python plugin) exports the
namespace, the kernel's nbd driver attaches it (nbd-client), ext4 goes on top. Every byte is
checked by SHA-256 after a server restart, fsync'd files survive a SIGKILL of the server, fstrim
reaches the device as Deallocate, and fio verifies its own data through the filesystem."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import controller, record

NBD = "/dev/nbd0"
MNT = Path("/tmp/nbd-mnt")


@pytest.fixture(scope="module")
def nbd_ctrl(guest):
    """A controller of its own (256 MiB, 512-byte blocks) for the NBD tests."""
    return controller(guest, "nvmevfio-nbd")


def sh(*cmd: str, timeout: float = 300) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} -> {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


def start(addr: str) -> dict:
    """`nvmevfio nbd ADDRESS --background`: returns once the device is open."""
    out = sh(sys.executable, "-m", "nvmevfio", "nbd", addr, "--background", "-o", "json", timeout=240)
    info = json.loads(out)
    assert info["size"] == 256 << 20 and info["block_size"] == 512
    return info


def stop(addr: str) -> None:
    sh(sys.executable, "-m", "nvmevfio", "nbd", addr, "--stop", timeout=120)


def attach(info: dict) -> None:
    sh("nbd-client", "-unix", info["socket"], NBD, "-b", "512", timeout=60)
    deadline = time.monotonic() + 30
    while int(Path("/sys/block/nbd0/size").read_text()) * 512 != info["size"]:
        assert time.monotonic() < deadline, "nbd0 did not get the export's size"
        time.sleep(0.1)


def detach() -> None:
    sh("nbd-client", "-d", NBD, timeout=60)


@pytest.fixture
def cleanup(nbd_ctrl):
    """Whatever a test leaves behind: unmounted, detached, the export stopped."""
    yield
    subprocess.run(["umount", str(MNT)], capture_output=True, timeout=120)
    subprocess.run(["nbd-client", "-d", NBD], capture_output=True, timeout=60)
    subprocess.run([sys.executable, "-m", "nvmevfio", "nbd", nbd_ctrl["address"], "--stop"], capture_output=True,
                   timeout=120)


def mount() -> None:
    MNT.mkdir(exist_ok=True)
    sh("mount", "-t", "ext4", NBD, str(MNT))


def umount() -> None:
    sh("umount", str(MNT), timeout=120)


def fsck_clean() -> None:
    res = subprocess.run(["fsck.ext4", "-fn", NBD], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"fsck.ext4 -fn: {res.returncode}\n{res.stdout}\n{res.stderr}"


def sizes(n: int, seed: int) -> list[int]:
    """File sizes from 0 to 8 MiB: mostly small (as a real tree), a few large, both ends present."""
    rng = np.random.default_rng(seed)
    out = [0, 1, 8 << 20] + [int(x) for x in rng.integers(0, 16 << 10, n - 23)]
    out += [int(x) for x in np.exp(rng.uniform(np.log(64 << 10), np.log(8 << 20), 20))]
    return out


def test_filesystem_tree_survives_a_server_restart(nbd_ctrl, io_dir, cleanup):
    addr = nbd_ctrl["address"]
    info = start(addr)
    attach(info)
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", NBD)
    mount()
    rng = np.random.default_rng(11)
    manifest = {}
    t0 = time.monotonic()
    for i, size in enumerate(sizes(2000, 12)):
        path = MNT / f"d{i % 37:02d}" / f"s{i // 37:02d}" / f"f{i:04d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        path.write_bytes(data)
        manifest[str(path.relative_to(MNT))] = hashlib.sha256(data).hexdigest()
    sh("sync")
    total = sum(p.stat().st_size for p in MNT.rglob("*.bin"))
    write_s = time.monotonic() - t0
    umount()
    detach()
    stop(addr)

    info = start(addr)  # a new server process: nothing survives but what is on the device
    attach(info)
    mount()
    got = {str(p.relative_to(MNT)): hashlib.sha256(p.read_bytes()).hexdigest() for p in MNT.rglob("*.bin")}
    assert len(got) == len(manifest) == 2000
    assert got == manifest
    umount()
    fsck_clean()
    detach()
    stop(addr)
    record(io_dir, "nbd", {"files": 2000, "bytes": total, "write_s": write_s})


def test_fsynced_files_survive_a_server_kill(nbd_ctrl, cleanup):
    addr = nbd_ctrl["address"]
    info = start(addr)
    attach(info)
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", NBD)
    mount()
    durable: dict[str, str] = {}
    stop_writing = threading.Event()
    failures: list[BaseException] = []

    def writer() -> None:
        rng = np.random.default_rng(21)
        i = 0
        try:
            while not stop_writing.is_set():
                data = rng.integers(0, 256, int(rng.integers(1, 256 << 10)), dtype=np.uint8).tobytes()
                name = f"w{i:05d}.bin"
                fd = os.open(MNT / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                durable[name] = hashlib.sha256(data).hexdigest()  # only once fsync returned
                i += 1
        except OSError as exc:  # the server is gone: the kernel fails the I/O
            failures.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    deadline = time.monotonic() + 60
    while len(durable) < 30:
        assert time.monotonic() < deadline and t.is_alive(), "the writer did not get going"
        time.sleep(0.05)
    os.kill(info["pid"], signal.SIGKILL)  # mid-I/O
    stop_writing.set()
    t.join(20)
    # Disconnecting fails whatever the kernel still holds for the dead server (a write-back the
    # writer's fsync may wait on), as an operator would after a server crash.
    detach()
    t.join(60)
    assert not t.is_alive(), "the writer hung on the dead export"
    if subprocess.run(["umount", str(MNT)], capture_output=True, timeout=120).returncode:  # journal aborted
        sh("umount", "-l", str(MNT))
    Path(info["pidfile"]).unlink(missing_ok=True)

    info = start(addr)  # the controller was left enabled by the killed process: reopened cleanly
    attach(info)
    mount()  # journal replay
    for name, digest in durable.items():
        assert hashlib.sha256((MNT / name).read_bytes()).hexdigest() == digest, name
    umount()
    fsck_clean()
    detach()
    stop(addr)


def _extents(path: Path) -> list[tuple[int, int]]:
    """(first block, blocks) of a file's physical extents, in 4 KiB filesystem blocks (filefrag)."""
    out = sh("filefrag", "-v", str(path))
    ext = []
    for line in out.splitlines():
        parts = line.replace("..", " ").replace(":", " ").split()
        if len(parts) >= 6 and parts[0].isdigit():
            ext.append((int(parts[3]), int(parts[5])))
    assert ext, out
    return ext


def test_fstrim_deallocates_and_fio_verifies(nbd_ctrl, io_dir, cleanup):
    addr = nbd_ctrl["address"]
    info = start(addr)
    attach(info)
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "nodiscard", NBD)
    mount()
    victim = MNT / "victim.bin"
    victim.write_bytes(np.random.default_rng(5).integers(1, 256, 8 << 20, dtype=np.uint8).tobytes())
    sh("sync")
    extents = _extents(victim)

    def device_bytes() -> bytes:
        fd = os.open(NBD, os.O_RDONLY)
        try:
            return b"".join(os.pread(fd, n * 4096, first * 4096) for first, n in extents)
        finally:
            os.close(fd)

    assert any(device_bytes())  # the file's data is there
    victim.unlink()
    sh("sync")
    trimmed = sh("fstrim", "-v", str(MNT))
    assert "trimmed" in trimmed
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    assert not any(device_bytes()), "fstrim did not deallocate the deleted file's blocks"

    # fio through the filesystem, verifying its own data (crc32c)
    res = subprocess.run(["fio", "--name=nbd", f"--directory={MNT}", "--size=32M", "--rw=randrw", "--bs=4k",
                          "--ioengine=psync", "--direct=1", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                          "--output-format=json"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    job = json.loads(res.stdout)["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0
    record(io_dir, "nbd", {"fio_read_iops": job["read"]["iops"], "fio_write_iops": job["write"]["iops"]})
    umount()
    fsck_clean()
    detach()
    stop(addr)
