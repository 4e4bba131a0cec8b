"""A filesystem on nvmevfio through Linux's ublk: `nvmevfio ublk` serves the namespace as
/dev/ublkbN, every request one NVMe command issued from C. ext4 on top keeps every byte across a
server restart (SHA-256 of each file, fsck clean), fio verifies its own data, trims reach the
device as Deallocate and read back zeros, Write Zeroes goes with and without unmap, a
filesystem's flush arrives as an NVMe Flush, and a SIGKILLed server either is recovered
(--recoverable, --recover) with every fsync'd file intact, or fails the disk's I/O in bounded
time. Bad input fails in one line with nothing changed.

The type1 lane boots Debian's 6.1 kernel, which has no ublk: there the one test is that
`nvmevfio ublk` says so in one line and names `nvmevfio nbd`. The custom kernel (iommufd and
no-IOMMU lanes) has ublk built in and runs everything else."""

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
from conftest import controller

UBLK = Path("/dev/ublk-control").exists()
MNT = Path("/tmp/ublk-mnt")
SIZE = 256 << 20  # the nvmevfio-nbd controller's namespace, 512-byte blocks


def nv(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "nvmevfio", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert res.returncode == 0, f"nvmevfio {' '.join(args)} -> {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


def sh(*cmd: str, timeout: float = 300) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} -> {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


def one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode != 0, res.stdout
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.fixture(scope="module")
def ublk_ctrl(guest):
    """The NBD tests' controller (256 MiB, 512-byte blocks); the two files run one after the other."""
    return controller(guest, "nvmevfio-nbd")


def test_ublk_is_present_exactly_on_the_custom_kernel(lane):
    """What this file tests depends on it: a kernel without ublk in a custom-kernel lane would
    leave everything below untested."""
    assert (lane != "type1") == UBLK, (lane, os.uname().release)


if not UBLK:

    def test_missing_ublk_is_one_line_naming_nbd(ublk_ctrl):
        res = nv("ublk", ublk_ctrl["address"], check=False)
        line = one_line_error(res)
        assert "ublk is not available" in line and "nvmevfio nbd" in line, line
        # nothing was touched: the controller is still free for another user
        assert json.loads(nv("id-ctrl", ublk_ctrl["address"], "-o", "json").stdout)["sn"].strip() == "nvmevfio-nbd"

else:

    def devices() -> list[dict]:
        return json.loads(nv("ublk", "--list", "-o", "json").stdout)

    def start(addr: str, *extra: str) -> dict:
        """`nvmevfio ublk ADDRESS --background`: returns once /dev/ublkbN is there."""
        info = json.loads(nv("ublk", addr, "--background", "-o", "json", *extra, timeout=240).stdout)
        dev = Path(info["device"])
        deadline = time.monotonic() + 30
        while not (dev.exists() and int(Path(f"/sys/block/{dev.name}/size").read_text()) * 512 == info["size"]):
            assert time.monotonic() < deadline, f"{dev} did not appear with the namespace's size"
            time.sleep(0.1)
        return info

    def stop(info: dict) -> None:
        nv("ublk", "--stop", str(info["dev_id"]), timeout=180)
        assert not Path(info["device"]).exists()
        assert all(d["dev_id"] != info["dev_id"] for d in devices())

    def stats(info: dict) -> dict:
        """The server's counters (it writes them every half second)."""
        time.sleep(1.2)
        d = next(d for d in devices() if d["dev_id"] == info["dev_id"])
        return d["stats"]

    @pytest.fixture
    def cleanup(ublk_ctrl):
        """Whatever a test leaves behind: unmounted, every ublk device stopped."""
        yield
        subprocess.run(["umount", str(MNT)], capture_output=True, timeout=120)
        for d in devices():
            subprocess.run([sys.executable, "-m", "nvmevfio", "ublk", "--stop", str(d["dev_id"])],
                           capture_output=True, timeout=180)

    def mount(dev: str) -> None:
        MNT.mkdir(exist_ok=True)
        sh("mount", "-t", "ext4", dev, str(MNT))

    def umount() -> None:
        sh("umount", str(MNT), timeout=120)

    def fsck_clean(dev: str) -> None:
        res = subprocess.run(["fsck.ext4", "-fn", dev], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"fsck.ext4 -fn: {res.returncode}\n{res.stdout}\n{res.stderr}"

    def sizes(n: int, seed: int) -> list[int]:
        rng = np.random.default_rng(seed)
        out = [0, 1, 8 << 20] + [int(x) for x in rng.integers(0, 16 << 10, n - 23)]
        out += [int(x) for x in np.exp(rng.uniform(np.log(64 << 10), np.log(8 << 20), 20))]
        return out

    def test_ext4_files_keep_their_sha256_across_a_server_restart_and_fio_verifies(ublk_ctrl, cleanup):
        addr = ublk_ctrl["address"]
        info = start(addr)
        assert info["block_size"] == 512 and info["size"] == SIZE
        dev = info["device"]
        sh("mkfs.ext4", "-q", "-F", "-b", "4096", dev)
        mount(dev)
        rng = np.random.default_rng(31)
        manifest = {}
        for i, size in enumerate(sizes(2000, 32)):
            path = MNT / f"d{i % 37:02d}" / f"s{i // 37:02d}" / f"f{i:04d}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            path.write_bytes(data)
            manifest[str(path.relative_to(MNT))] = hashlib.sha256(data).hexdigest()
        sh("sync")
        umount()
        stop(info)

        info = start(addr)  # a new server process: nothing survives but what is on the device
        dev = info["device"]
        mount(dev)
        got = {str(p.relative_to(MNT)): hashlib.sha256(p.read_bytes()).hexdigest() for p in MNT.rglob("*.bin")}
        assert len(got) == len(manifest) == 2000
        assert got == manifest
        res = subprocess.run(["fio", "--name=ublk", f"--directory={MNT}", "--size=32M", "--rw=randrw", "--bs=4k",
                              "--ioengine=psync", "--direct=1", "--verify=crc32c", "--do_verify=1",
                              "--verify_fatal=1", "--output-format=json"], capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr
        job = json.loads(res.stdout)["jobs"][0]
        assert job["error"] == 0 and job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0
        umount()
        fsck_clean(dev)
        st = stats(info)
        assert st["errors"] == 0 and st["reads"] > 0 and st["writes"] > 0
        stop(info)

    @pytest.mark.parametrize("mode", ["poll", "irq"])
    def test_bytes_written_to_the_disk_land_at_their_lba_on_the_namespace(ublk_ctrl, cleanup, mode):
        addr = ublk_ctrl["address"]
        info = start(addr, "--mode", mode, "--depth", "16")
        data = np.random.default_rng(7).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
        offset = 77 * 4096  # LBA 616
        fd = os.open(info["device"], os.O_WRONLY | os.O_DIRECT)
        try:
            buf = memoryview(bytearray(len(data) + 4096))
            start_at = -(np.frombuffer(buf, np.uint8).ctypes.data) % 4096  # O_DIRECT: an aligned buffer
            aligned = buf[start_at : start_at + len(data)]
            aligned[:] = data
            assert os.pwrite(fd, aligned, offset) == len(data)
            os.fsync(fd)
        finally:
            os.close(fd)
        st = stats(info)
        assert st["writes"] >= len(data) // info["io_bytes"] and st["errors"] == 0
        stop(info)
        # read back through nvmevfio itself, from the NVMe namespace
        back = subprocess.run([sys.executable, "-m", "nvmevfio", "read", addr, "-s", str(offset // 512),
                               "-c", str(len(data) // 512)], capture_output=True, timeout=240)
        assert back.returncode == 0, back.stderr
        assert back.stdout == data

    def _extents(path: Path) -> list[tuple[int, int]]:
        out = sh("filefrag", "-v", str(path))
        ext = []
        for line in out.splitlines():
            parts = line.replace("..", " ").replace(":", " ").split()
            if len(parts) >= 6 and parts[0].isdigit():
                ext.append((int(parts[3]), int(parts[5])))
        assert ext, out
        return ext

    def _device_bytes(dev: str, extents: list[tuple[int, int]]) -> bytes:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        fd = os.open(dev, os.O_RDONLY)
        try:
            return b"".join(os.pread(fd, n * 4096, first * 4096) for first, n in extents)
        finally:
            os.close(fd)

    def test_fstrim_deallocates_and_the_blocks_read_zeros(ublk_ctrl, cleanup):
        info = start(ublk_ctrl["address"])
        dev = info["device"]
        sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "nodiscard", dev)
        mount(dev)
        victim = MNT / "victim.bin"
        victim.write_bytes(np.random.default_rng(5).integers(1, 256, 8 << 20, dtype=np.uint8).tobytes())
        sh("sync")
        extents = _extents(victim)
        assert any(_device_bytes(dev, extents))
        before = stats(info)["discards"]
        victim.unlink()
        sh("sync")
        assert "trimmed" in sh("fstrim", "-v", str(MNT))
        assert not any(_device_bytes(dev, extents)), "fstrim did not deallocate the deleted file's blocks"
        assert stats(info)["discards"] > before
        umount()
        fsck_clean(dev)
        stop(info)

    def test_blkdiscard_and_write_zeroes_with_and_without_unmap(ublk_ctrl, cleanup):
        info = start(ublk_ctrl["address"])
        dev = info["device"]
        pattern = np.random.default_rng(9).integers(1, 256, 4 << 20, dtype=np.uint8).tobytes()

        def fill() -> None:
            with open(dev, "r+b") as f:
                f.write(pattern)
                f.flush()
                os.fsync(f.fileno())
            assert _device_bytes(dev, [(0, 1024)]) == pattern

        fill()
        sh("blkdiscard", "-o", "0", "-l", str(2 << 20), dev)  # Dataset Management, Deallocate
        got = _device_bytes(dev, [(0, 1024)])
        assert not any(got[: 2 << 20]) and got[2 << 20 :] == pattern[2 << 20 :]
        fill()
        sh("blkdiscard", "-z", "-o", "0", "-l", str(1 << 20), dev)  # BLKZEROOUT: Write Zeroes, blocks kept
        got = _device_bytes(dev, [(0, 1024)])
        assert not any(got[: 1 << 20]) and got[1 << 20 :] == pattern[1 << 20 :]
        sh("fallocate", "-p", "-o", str(1 << 20), "-l", str(1 << 20), dev)  # punch: Write Zeroes with DEAC
        got = _device_bytes(dev, [(0, 1024)])
        assert not any(got[: 2 << 20]) and got[2 << 20 :] == pattern[2 << 20 :]
        st = stats(info)
        assert st["discards"] >= 1 and st["write_zeroes"] >= 1 and st["write_zeroes_unmap"] >= 1
        assert st["errors"] == 0
        stop(info)

    def test_an_fsync_on_ext4_reaches_the_device_as_an_nvme_flush(ublk_ctrl, cleanup):
        info = start(ublk_ctrl["address"])
        dev = info["device"]
        assert Path(f"/sys/block/{Path(dev).name}/queue/write_cache").read_text().strip() == "write back"
        sh("mkfs.ext4", "-q", "-F", "-b", "4096", dev)
        mount(dev)
        sh("sync")
        before = stats(info)["flushes"]
        for i in range(5):
            fd = os.open(MNT / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
            os.close(fd)
        after = stats(info)
        assert after["flushes"] >= before + 5, (before, after)
        assert after["fua"] > 0  # the journal's commit blocks go with FUA
        umount()
        stop(info)

    def test_a_media_error_is_eio_with_the_nvme_status_in_the_log(guest, cleanup):
        faulty = controller(guest, "nvmevfio-faulty")  # reads of LBA 100 fail (QEMU blkdebug)
        info = start(faulty["address"], "--depth", "4")
        fd = os.open(info["device"], os.O_RDONLY | os.O_DIRECT)
        buf = memoryview(bytearray(8192))
        aligned = buf[-(np.frombuffer(buf, np.uint8).ctypes.data) % 4096 :][:4096]
        try:
            assert os.preadv(fd, [aligned], 0) == 4096  # LBAs 0-7 read
            with pytest.raises(OSError) as e:
                os.preadv(fd, [aligned], 96 * 512)  # LBAs 96-103
            assert e.value.errno == 5  # EIO
        finally:
            os.close(fd)
        st = stats(info)
        assert st["errors"] >= 1
        log = Path(info["log"]).read_text()
        stop(info)
        assert "READ LBA 96 (+8): Unrecovered Read Error" in log and "EIO" in log, log[-2000:]

    # ---------------------------------------------------------------- bad input
    def test_a_namespace_already_served_is_refused_in_one_line(ublk_ctrl, cleanup):
        info = start(ublk_ctrl["address"])
        for extra in ([], ["--background"]):
            line = one_line_error(nv("ublk", ublk_ctrl["address"], *extra, check=False))
            assert f"already served by {info['device']}" in line and f"--stop {info['dev_id']}" in line, line
        assert [d["dev_id"] for d in devices()] == [info["dev_id"]]
        with open(info["device"], "rb") as f:  # the first server still serves
            assert len(f.read(4096)) == 4096
        stop(info)

    def test_stop_of_an_unknown_device_is_one_line(cleanup):
        line = one_line_error(nv("ublk", "--stop", "99", check=False))
        assert "no ublk device 99" in line, line

    def test_recover_of_a_device_not_waiting_is_refused(ublk_ctrl, cleanup):
        line = one_line_error(nv("ublk", "--recover", "98", check=False))
        assert "no ublk device 98" in line, line
        info = start(ublk_ctrl["address"], "--recoverable")
        line = one_line_error(nv("ublk", "--recover", str(info["dev_id"]), check=False))
        assert "is not waiting for recovery" in line and "is running" in line, line
        assert next(d for d in devices() if d["dev_id"] == info["dev_id"])["server_alive"]
        stop(info)

    def test_queues_above_what_the_controller_grants_are_refused(guest, cleanup):
        small = controller(guest, "nvmevfio-small")  # max_ioqpairs=4
        res = nv("ublk", small["address"], "--queues", "5", check=False)
        line = one_line_error(res)
        assert "allows 4 I/O queue pairs" in line, line
        assert devices() == []

    # ---------------------------------------------------------------- a server killed
    def _writer(durable: dict, stop_writing: threading.Event, failures: list) -> None:
        rng = np.random.default_rng(21)
        i = 0
        try:
            while not stop_writing.is_set():
                data = rng.integers(0, 256, int(rng.integers(1, 128 << 10)), dtype=np.uint8).tobytes()
                name = f"w{i:05d}.bin"
                fd = os.open(MNT / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                durable[name] = hashlib.sha256(data).hexdigest()  # only once fsync returned
                i += 1
        except OSError as exc:
            failures.append(exc)

    def _write_until(durable: dict, n: int, t: threading.Thread, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while len(durable) < n:
            assert time.monotonic() < deadline and t.is_alive(), f"the writer stalled at {len(durable)} files"
            time.sleep(0.05)

    def test_a_killed_server_fails_io_in_bounded_time_and_leaves_a_removable_stale_device(ublk_ctrl, cleanup):
        addr = ublk_ctrl["address"]
        info = start(addr)
        dev = info["device"]
        sh("mkfs.ext4", "-q", "-F", "-b", "4096", dev)
        mount(dev)
        durable: dict[str, str] = {}
        stop_writing = threading.Event()
        failures: list[BaseException] = []
        t = threading.Thread(target=_writer, args=(durable, stop_writing, failures))
        t.start()
        _write_until(durable, 30, t)
        os.kill(info["pid"], signal.SIGKILL)
        killed = time.monotonic()
        t.join(60)  # no stop_writing: only the kernel's errors may end the writer
        assert not t.is_alive(), "the writer hung on the dead server"
        assert failures and isinstance(failures[0], OSError), failures
        assert time.monotonic() - killed < 60
        stop_writing.set()
        if subprocess.run(["umount", str(MNT)], capture_output=True, timeout=120).returncode:
            sh("umount", "-l", str(MNT))
        stale = next(d for d in devices() if d["dev_id"] == info["dev_id"])
        assert stale["stale"] and not stale["server_alive"] and not stale["waiting_for_recovery"]
        res = nv("ublk", "--stop", str(info["dev_id"]))
        assert "stale" in res.stdout
        assert devices() == []

        info = start(addr)  # a new device over the same namespace: the journal replays
        mount(info["device"])
        for name, digest in durable.items():
            assert hashlib.sha256((MNT / name).read_bytes()).hexdigest() == digest, name
        umount()
        fsck_clean(info["device"])
        stop(info)
