"""What the disk tests (test_ublk.py, test_nbd.py) check on a block device nvmevfio serves: a
filesystem tree's SHA-256s, fsck, fsync'd files across a server crash, a file's blocks on the
device, fio's own verification. Plain functions; each test file brings its device."""

from __future__ import annotations

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
from cli_runner import nv as cli_nv

from nvmevfio.vfio import NOIOMMU_RISK

FS_BLOCK = 4096  # every disk test makes ext4 with 4 KiB blocks: filefrag's and _extents' unit


def sh(*cmd: str, timeout: float = 300) -> str:
    """Run ``cmd``; its stdout, or an assertion naming the command, its exit code and output."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} -> {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


def nv(*args: str, timeout: float = 300, check: bool = True, real: bool = False) -> subprocess.CompletedProcess[str]:
    """An nvmevfio command (the installed package), in this process through ``main.main`` as
    ``python -m nvmevfio`` runs it (cli_runner.nv: its output, its exit status, its one-line errors),
    or with ``real`` as a process of its own within ``timeout``. A server a command starts
    (`--background`: ublk, nbdkit) is a process of its own either way; in-process saves the 5-8 s
    an interpreter costs under the guest's emulated CPU for every start, stop and refusal. Asserts
    success unless ``check`` is off."""
    if real:
        res = subprocess.run([sys.executable, "-m", "nvmevfio", *args], capture_output=True, text=True,
                             timeout=timeout)
    else:
        r = cli_nv(*args, check=False)
        res = subprocess.CompletedProcess(["nvmevfio", *args], r.returncode, r.stdout.decode(errors="replace"),
                                          r.stderr.decode(errors="replace"))
    if check:
        assert res.returncode == 0, f"nvmevfio {' '.join(args)} -> {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    """A failed command's stderr, which must be exactly one (non-empty) line besides the no-IOMMU
    lane's risk warning (printed whenever a controller is opened in that lane, not an error)."""
    assert res.returncode != 0, res.stdout
    lines = [line for line in res.stderr.splitlines() if line.strip() and NOIOMMU_RISK not in line]
    assert len(lines) == 1, res.stderr
    return lines[0]


def mkfs(dev: str, *extra: str, blocks: int | None = None) -> None:
    """ext4 with FS_BLOCK blocks on ``dev``; on its first ``blocks`` blocks when given."""
    sh("mkfs.ext4", "-q", "-F", "-b", str(FS_BLOCK), *extra, dev, *([str(blocks)] if blocks else []))


def mount(dev: str, mnt: Path) -> None:
    mnt.mkdir(exist_ok=True)
    sh("mount", "-t", "ext4", dev, str(mnt))


def umount(mnt: Path) -> None:
    sh("umount", str(mnt), timeout=120)


def umount_after_crash(mnt: Path) -> None:
    """Unmount a filesystem whose device died under it (a journal aborted may refuse: lazily then)."""
    if subprocess.run(["umount", str(mnt)], capture_output=True, timeout=120).returncode:
        sh("umount", "-l", str(mnt))


def fsck_clean(dev: str) -> None:
    res = subprocess.run(["fsck.ext4", "-fn", dev], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"fsck.ext4 -fn: {res.returncode}\n{res.stdout}\n{res.stderr}"


def sizes(n: int, seed: int, large: int = 20) -> list[int]:
    """``n`` file sizes from 0 to 8 MiB: mostly small (as a real tree), ``large`` from 64 KiB to
    8 MiB (log-uniform), both ends present (0, 1 byte, 8 MiB)."""
    rng = np.random.default_rng(seed)
    out = [0, 1, 8 << 20] + [int(x) for x in rng.integers(0, 16 << 10, n - 3 - large)]
    out += [int(x) for x in np.exp(rng.uniform(np.log(64 << 10), np.log(8 << 20), large))]
    return out


def write_tree(root: Path, file_sizes: list[int], seed: int) -> dict[str, str]:
    """Files of ``file_sizes`` random bytes in 37 folders of subfolders under ``root``; returns
    each one's path (relative to ``root``) and SHA-256."""
    rng = np.random.default_rng(seed)
    manifest = {}
    for i, size in enumerate(file_sizes):
        path = root / f"d{i % 37:02d}" / f"s{i // 37:02d}" / f"f{i:04d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        path.write_bytes(data)
        manifest[str(path.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return manifest


def check_tree(root: Path, manifest: dict[str, str]) -> None:
    """Exactly the files of ``manifest`` under ``root`` (no more, no fewer), each with its SHA-256."""
    got = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.bin")}
    assert len(got) == len(manifest)
    assert got == manifest


class Writer:
    """A thread writing until ``stopping`` is set; ``progress()`` counts what it made durable. An
    OSError it meets (the device died) ends it and is kept in ``failures``. Subclasses set their
    fields before calling ``__init__`` (it starts the thread)."""

    what = "writes"

    def __init__(self) -> None:
        self.failures: list[Exception] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        raise NotImplementedError

    def progress(self) -> int:
        raise NotImplementedError

    def wait_for(self, n: int, timeout_s: float = 120) -> None:
        """Until ``n`` are durable; fails if the writer stalls or ends first."""
        deadline = time.monotonic() + timeout_s
        while self.progress() < n:
            assert time.monotonic() < deadline and self.thread.is_alive(), \
                f"the writer stalled at {self.progress()} {self.what} ({self.failures})"
            time.sleep(0.05)

    def stop(self, timeout_s: float = 120) -> None:
        self.stopping.set()
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"the writer hung ({self.progress()} {self.what} durable)"


class FsyncWriter(Writer):
    """Creates files under ``root`` and fsyncs each; a file is recorded in ``durable`` (name to
    SHA-256) only once its fsync returned."""

    what = "files"

    def __init__(self, root: Path, max_size: int = 128 << 10, seed: int = 21) -> None:
        self.root = root
        self.max_size = max_size
        self.seed = seed
        self.durable: dict[str, str] = {}
        super().__init__()

    def progress(self) -> int:
        return len(self.durable)

    def _run(self) -> None:
        rng = np.random.default_rng(self.seed)
        i = 0
        try:
            while not self.stopping.is_set():
                data = rng.integers(0, 256, int(rng.integers(1, self.max_size)), dtype=np.uint8).tobytes()
                name = f"w{i:05d}.bin"
                fd = os.open(self.root / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                self.durable[name] = hashlib.sha256(data).hexdigest()
                i += 1
        except OSError as exc:
            self.failures.append(exc)

    def check(self, root: Path) -> None:
        """Every durable file reads back under ``root`` with its SHA-256."""
        assert self.durable
        for name, digest in self.durable.items():
            assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest, name


def crash_and_recover(root: Path, pid: int, dev_id: int) -> tuple[FsyncWriter, dict]:
    """A writer creating and fsyncing files under ``root`` on ublk device ``dev_id``, whose
    --recoverable server ``pid`` is SIGKILLed mid-write; once the kernel holds the device for
    recovery (still there, its I/O held), `nvmevfio ublk --recover` serves it again and the writer
    must carry on (20 more files durable) without an error. Returns the stopped writer and what
    --recover printed."""
    from nvmevfio import ublk_devices as ubd

    root.mkdir()
    writer = FsyncWriter(root)
    try:
        writer.wait_for(30)
        os.kill(pid, signal.SIGKILL)  # mid-write: the writer fsyncs all the time
        at_kill = len(writer.durable)
        deadline = time.monotonic() + 30
        while not ubd.device_info(dev_id).waiting_for_recovery:
            assert time.monotonic() < deadline, ubd.device_info(dev_id)
            time.sleep(0.1)
        assert Path(f"/dev/ublkb{dev_id}").exists()  # the disk stays, its I/O held
        again: dict = json.loads(nv("ublk", "--recover", str(dev_id), "--background", "-o", "json",
                                    timeout=240).stdout)
        assert again["device"] == f"/dev/ublkb{dev_id}" and again["dev_id"] == dev_id and again["pid"] != pid
        writer.wait_for(at_kill + 20)  # the filesystem carries on
    finally:
        writer.stop()
    assert writer.failures == []
    return writer, again


def extents(path: Path) -> list[tuple[int, int]]:
    """(first block, blocks) of a file's physical extents, in filesystem blocks (filefrag)."""
    out = sh("filefrag", "-v", str(path))
    ext = []
    for line in out.splitlines():
        parts = line.replace("..", " ").replace(":", " ").split()
        if len(parts) >= 6 and parts[0].isdigit():
            ext.append((int(parts[3]), int(parts[5])))
    assert ext, out
    return ext


def device_bytes(dev: str, where: list[tuple[int, int]]) -> bytes:
    """The device's bytes at ``where`` ((first block, blocks) in FS_BLOCK units), past the page
    cache (dropped first: what the server returns now, not what was cached)."""
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    fd = os.open(dev, os.O_RDONLY)
    try:
        return b"".join(os.pread(fd, n * FS_BLOCK, first * FS_BLOCK) for first, n in where)
    finally:
        os.close(fd)


def aligned(size: int) -> memoryview:
    """A ``size``-byte buffer aligned to 4 KiB (O_DIRECT's requirement)."""
    buf = memoryview(bytearray(size + 4096))
    start = -(np.frombuffer(buf, np.uint8).ctypes.data) % 4096
    return buf[start : start + size]


def fio_verify(*args: str, timeout: float = 900) -> dict:
    """fio writing and reading back its own data (crc32c, fatal on a mismatch); its job's JSON
    (summed over jobs), asserted error-free with both reads and writes done."""
    res = subprocess.run(["fio", "--name=verify", "--bs=4k", "--direct=1", "--verify=crc32c", "--do_verify=1",
                          "--verify_fatal=1", "--group_reporting", "--output-format=json", *args],
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr
    # fio may print a warning line before its JSON (several jobs on one file, even in regions
    # of their own: --offset_increment)
    job: dict = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0, job
    return job
