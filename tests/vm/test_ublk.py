"""A filesystem on nvmevfio through Linux's ublk: `nvmevfio ublk` serves the namespace as
/dev/ublkbN, every request one NVMe command issued from C. ext4 on top keeps every byte across a
server restart (SHA-256 of each file, fsck clean), fio verifies its own data, trims reach the
device as Deallocate and read back zeros, Write Zeroes goes with and without unmap, a
filesystem's flush arrives as an NVMe Flush, several queues each serve I/O, and a SIGKILLed
server either is recovered (--recoverable, --recover) with every fsync'd file intact, or fails
the disk's I/O in bounded time. Bad input fails in one line with nothing changed.

Most tests share one server (the module's `disk`: started --recoverable, ext4 on the first
192 MiB, the rest raw for the block-level checks) because each `python -m nvmevfio` costs
5-8 s under the guest's emulated CPU; a test starts its own server only where the server is
what it tests (a mode, a queue count, a controller, a crash without recovery). Device lists and
counters are read in-process (`nvmevfio.ublk.list_devices`, what `--list` prints); the tree
test checks once that the CLI's `--list` says the same.

The type1 lane boots Debian's 6.1 kernel, which has no ublk: there the one test is that
`nvmevfio ublk` says so in one line and names `nvmevfio nbd`. The custom kernel (iommufd and
no-IOMMU lanes) has ublk built in and runs everything else."""

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import controller
from disk_checks import (
    FS_BLOCK,
    FsyncWriter,
    Writer,
    aligned,
    check_tree,
    crash_and_recover,
    device_bytes,
    extents,
    fio_verify,
    fsck_clean,
    mkfs,
    mount,
    nv,
    one_line_error,
    sh,
    sizes,
    umount,
    umount_after_crash,
    write_tree,
)

from nvmevfio import ublk as ub
from nvmevfio import ublk_devices as ubd

UBLK = Path("/dev/ublk-control").exists()
MNT = Path("/tmp/ublk-mnt")  # the shared disk's filesystem
OWN_MNT = Path("/tmp/ublk-own-mnt")  # a test's own server's
SIZE = 256 << 20  # the nvmevfio-nbd controller's namespace, 512-byte blocks
FS_SIZE = 192 << 20  # the shared disk's ext4; past it, raw blocks for the block-level checks
LBA_CHECK_AT = 200 << 20  # bytes written through the disk, read back from the namespace
ZEROES_AT = 208 << 20  # blkdiscard and Write Zeroes


# What does not depend on the DMA lane runs in one custom-kernel lane (tests/vm/conftest.py, `lanes`):
# refusals made before any server starts, and what the kernel's ublk driver does once a server is
# gone or a request failed (the server's memory, whichever lane it came from, is gone with it)
ONE_LANE = pytest.mark.lanes("iommufd", why="decided before any DMA memory exists, or by the kernel's ublk driver "
                             "after the server's memory is gone: the no-IOMMU lane would repeat it")

ROLES = ("nvmevfio-nbd", "nvmevfio-small", "nvmevfio-faulty")  # the controllers this file serves
OURS: set[str] = set()  # their PCI addresses: the ublk devices this file may list and stop


@pytest.fixture(scope="module")
def ublk_ctrl(guest):
    """The NBD tests' controller (256 MiB, 512-byte blocks); the two files run one after the other
    (test_nbd.py's export, over ublk on this kernel, is stopped with its ublk device before)."""
    OURS.update(controller(guest, role)["address"] for role in ROLES)
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
        """What `nvmevfio ublk --list -o json` prints, taken in-process: this file's devices only
        (test_nbd.py serves a controller through a ublk device of its own too)."""
        return [d.to_dict() for d in ubd.list_devices() if d.address in OURS]

    def listed(info: dict) -> dict:
        return next(d for d in devices() if d["dev_id"] == info["dev_id"])

    def start(addr: str, *extra: str) -> dict:
        """`nvmevfio ublk ADDRESS --background`: returns once /dev/ublkbN is there."""
        info = json.loads(nv("ublk", addr, "--background", "-o", "json", *extra, timeout=240).stdout)
        dev = Path(info["device"])
        deadline = time.monotonic() + 30
        while not (dev.exists() and int(Path(f"/sys/block/{dev.name}/size").read_text()) * 512 == info["size"]):
            assert time.monotonic() < deadline, f"{dev} did not appear with the namespace's size"
            time.sleep(0.05)
        return info

    def stop(info: dict) -> None:
        nv("ublk", "--stop", str(info["dev_id"]), timeout=180)
        assert not Path(info["device"]).exists()
        assert all(d["dev_id"] != info["dev_id"] for d in devices())

    def rescheduling_ipis(cpu: int) -> int:
        """The rescheduling IPIs CPU ``cpu`` has taken since boot (/proc/interrupts, RES)."""
        for line in Path("/proc/interrupts").read_text().splitlines():
            if line.split(":")[0].strip() == "RES":
                return int(line.split()[1 + cpu])
        raise AssertionError("no RES line in /proc/interrupts")

    def stats(info: dict) -> dict:
        """The server's counters as `--list` shows them, written after this call began (the server
        rewrites them every half second): they count every request completed before it."""
        since = time.time()
        path = ubd.stats_path(info["dev_id"])
        deadline = time.monotonic() + 10
        while not (path.exists() and path.stat().st_mtime > since):
            assert time.monotonic() < deadline, f"{path} was not rewritten within 10 s"
            time.sleep(0.05)
        return listed(info)["stats"]

    def write_direct(dev: str, data: bytes, offset: int) -> None:
        """``data`` at ``offset`` with O_DIRECT (past the page cache), then fsync."""
        fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
        try:
            buf = aligned(len(data))
            buf[:] = data
            assert os.pwrite(fd, buf, offset) == len(data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def namespace_bytes(addr: str, offset: int, length: int) -> bytes:
        """The namespace's bytes read by `nvmevfio read` (the controller must be free)."""
        back = subprocess.run([sys.executable, "-m", "nvmevfio", "read", addr, "-s", str(offset // 512),
                               "-c", str(length // 512 - 1)], capture_output=True, timeout=240)
        assert back.returncode == 0, back.stderr
        return back.stdout

    @dataclass
    class Disk:
        """The shared server: ``info`` is what `nvmevfio ublk --background` printed for the one
        serving now (a test that restarts or recovers it updates it); ext4 mounted at MNT."""

        address: str
        info: dict

    @pytest.fixture(scope="module")
    def disk(ublk_ctrl):
        # polled with a queue per CPU (asked for); the default shape and irq have tests of their own
        info = start(ublk_ctrl["address"], "--recoverable", "--mode", "poll")
        assert info["io_queue_size"] == 256  # at least 256 (2 x --depth 64 + 1): room for the CQ head doorbell to wait
        mkfs(info["device"], "-E", "nodiscard", blocks=FS_SIZE // FS_BLOCK)
        mount(info["device"], MNT)
        shared = Disk(ublk_ctrl["address"], info)
        yield shared
        if MNT.is_mount():
            umount_after_crash(MNT)
        for d in ubd.list_devices():
            if d.address == ublk_ctrl["address"]:
                ubd.stop_device(d.dev_id)

    @pytest.fixture
    def cleanup(ublk_ctrl):
        """Whatever a test with a server of its own leaves behind: unmounted, its devices stopped
        (the shared disk's stays, and so does any device not serving this file's controllers)."""
        yield
        if OWN_MNT.is_mount():
            umount_after_crash(OWN_MNT)
        for d in ubd.list_devices():
            if d.address in OURS and d.address != ublk_ctrl["address"]:
                ubd.stop_device(d.dev_id)

    # ---------------------------------------------------------------- the shared disk
    def test_ext4_files_keep_their_sha256_across_a_server_restart_and_fio_verifies(disk):
        info = disk.info
        assert info["block_size"] == 512 and info["size"] == SIZE and info["recoverable"]
        manifest = write_tree(MNT / "tree", sizes(2000, 32), seed=31)
        sh("sync")
        umount(MNT)
        # and 3 MiB through the disk past the filesystem, O_DIRECT, in the server's poll mode
        # (unmounted first: this kernel refuses writes to a mounted disk, BLK_DEV_WRITE_MOUNTED unset)
        data = np.random.default_rng(7).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
        write_direct(info["device"], data, LBA_CHECK_AT)
        st = stats(info)
        assert st["writes"] >= len(data) // info["io_bytes"] and st["errors"] == 0
        # the CLI's list is the library's (this file reads it in-process elsewhere)
        cli = [d for d in json.loads(nv("ublk", "--list", "-o", "json").stdout) if d["address"] in OURS]
        assert [(d["dev_id"], d["address"], d["nsid"], d["server_pid"]) for d in cli] == \
            [(d["dev_id"], d["address"], d["nsid"], d["server_pid"]) for d in devices()]
        assert next(d for d in cli if d["dev_id"] == info["dev_id"])["address"] == disk.address
        stop(info)
        # read back through nvmevfio itself, from the NVMe namespace at the same LBA
        assert namespace_bytes(disk.address, LBA_CHECK_AT, len(data)) == data

        disk.info = info = start(disk.address, "--recoverable")  # a new server: only the device's bytes remain
        mount(info["device"], MNT)
        check_tree(MNT / "tree", manifest)
        assert len(manifest) == 2000
        fio_verify(f"--directory={MNT}", "--size=16M", "--rw=randrw", "--ioengine=psync")
        for f in MNT.glob("verify.*"):
            f.unlink()
        umount(MNT)
        fsck_clean(info["device"])
        mount(info["device"], MNT)
        st = stats(info)
        assert st["errors"] == 0 and st["reads"] > 0 and st["writes"] > 0

    def test_fstrim_deallocates_and_the_blocks_read_zeros(disk):
        dev = disk.info["device"]
        victim = MNT / "victim.bin"
        victim.write_bytes(np.random.default_rng(5).integers(1, 256, 8 << 20, dtype=np.uint8).tobytes())
        sh("sync")
        where = extents(victim)
        assert any(device_bytes(dev, where))
        before = stats(disk.info)["discards"]
        victim.unlink()
        sh("sync")
        assert "trimmed" in sh("fstrim", "-v", str(MNT))
        assert not any(device_bytes(dev, where)), "fstrim did not deallocate the deleted file's blocks"
        assert stats(disk.info)["discards"] > before
        umount(MNT)
        fsck_clean(dev)
        mount(dev, MNT)

    def test_blkdiscard_and_write_zeroes_with_and_without_unmap(disk):
        dev = disk.info["device"]
        pattern = np.random.default_rng(9).integers(1, 256, 4 << 20, dtype=np.uint8).tobytes()
        first = ZEROES_AT // FS_BLOCK
        where = [(first, len(pattern) // FS_BLOCK)]
        before = stats(disk.info)

        def fill() -> None:
            with open(dev, "r+b") as f:
                f.seek(ZEROES_AT)
                f.write(pattern)
                f.flush()
                os.fsync(f.fileno())
            assert device_bytes(dev, where) == pattern

        umount(MNT)  # this kernel refuses writes to a mounted disk (BLK_DEV_WRITE_MOUNTED unset)
        try:
            fill()
            sh("blkdiscard", "-o", str(ZEROES_AT), "-l", str(2 << 20), dev)  # Dataset Management, Deallocate
            got = device_bytes(dev, where)
            assert not any(got[: 2 << 20]) and got[2 << 20 :] == pattern[2 << 20 :]
            fill()
            sh("blkdiscard", "-z", "-o", str(ZEROES_AT), "-l", str(1 << 20), dev)  # Write Zeroes, blocks kept
            got = device_bytes(dev, where)
            assert not any(got[: 1 << 20]) and got[1 << 20 :] == pattern[1 << 20 :]
            sh("fallocate", "-p", "-o", str(ZEROES_AT + (1 << 20)), "-l", str(1 << 20), dev)  # Write Zeroes + DEAC
            got = device_bytes(dev, where)
            assert not any(got[: 2 << 20]) and got[2 << 20 :] == pattern[2 << 20 :]
        finally:
            mount(dev, MNT)
        st = stats(disk.info)
        assert st["discards"] > before["discards"] and st["write_zeroes"] > before["write_zeroes"]
        assert st["write_zeroes_unmap"] > before["write_zeroes_unmap"] and st["errors"] == 0

    def test_an_fsync_on_ext4_reaches_the_device_as_an_nvme_flush(disk):
        dev = disk.info["device"]
        assert Path(f"/sys/block/{Path(dev).name}/queue/write_cache").read_text().strip() == "write back"
        sh("sync")
        before = stats(disk.info)["flushes"]
        for i in range(5):
            fd = os.open(MNT / f"flush{i}", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
            os.close(fd)
        after = stats(disk.info)
        assert after["flushes"] >= before + 5, (before, after)
        assert after["fua"] > 0  # the journal's commit blocks go with FUA

    def test_the_servers_time_and_its_nvme_doorbells_are_counted(disk):
        """128 KiB direct reads: each is one NVMe command (one SQ tail doorbell a batch), and the
        server counts its time inside io_uring submissions (the kernel's copy of each READ into
        the request's pages), spinning and asleep, beside its queue pair's MMIO doorbell time."""
        dev = disk.info["device"]
        before = stats(disk.info)
        fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
        try:
            buf = aligned(128 << 10)
            for i in range(64):
                assert os.preadv(fd, [buf], i * (128 << 10)) == 128 << 10
        finally:
            os.close(fd)
        after = stats(disk.info)
        got = {k: after[k] - before[k] for k in after if isinstance(after[k], int)}
        assert got["reads"] >= 64 and got["bytes_read"] >= 64 * (128 << 10), got
        assert 1 <= got["nvme_sq_mmio"] <= got["requests"] and got["nvme_sq_mmio_ns"] > 0, got
        assert got["nvme_batches"] == got["nvme_sq_mmio"], got  # polled, no shadow doorbells: each batch an MMIO write
        assert got["submit_ns"] > 0 and got["spun_ns"] + got["slept_ns"] > 0, got
        assert listed(disk.info)["stats"]["per_queue"][0].keys() >= {"submit_ns", "nvme_sq_mmio_ns"}

    @ONE_LANE
    def test_a_namespace_already_served_is_refused_in_one_line(disk):
        info = disk.info
        for extra in ([], ["--background"]):
            line = one_line_error(nv("ublk", disk.address, *extra, check=False))
            assert f"already served by {info['device']}" in line and f"--stop {info['dev_id']}" in line, line
        assert [d["dev_id"] for d in devices()] == [info["dev_id"]]
        with open(info["device"], "rb") as f:  # the first server still serves
            assert len(f.read(4096)) == 4096

    @ONE_LANE
    def test_recover_of_a_device_not_waiting_is_refused(disk):
        line = one_line_error(nv("ublk", "--recover", "98", check=False))
        assert "no ublk device 98" in line, line
        line = one_line_error(nv("ublk", "--recover", str(disk.info["dev_id"]), check=False))
        assert "is not waiting for recovery" in line and "is running" in line, line
        d = listed(disk.info)
        assert d["server_alive"] and d["server_pid"] == disk.info["pid"]

    def test_a_killed_recoverable_server_is_recovered_and_fsynced_files_survive(disk):
        info = disk.info
        writer, again = crash_and_recover(MNT / "crash", info["pid"], info["dev_id"])
        assert listed(info)["server_pid"] == again["pid"]
        disk.info = {**info, **again}
        sh("sync")
        umount(MNT)
        fsck_clean(info["device"])
        mount(info["device"], MNT)
        writer.check(MNT / "crash")

    class SqliteWriter(Writer):
        """Commits numbered transactions to an SQLite database (WAL, synchronous=FULL):
        transaction N inserts ROWS rows (N, its row number, a random payload, the payload's SHA-256).
        N is recorded in ``committed`` only once its COMMIT returned; ``state`` says where it is."""

        ROWS = 5
        what = "transactions"

        def __init__(self, path: Path) -> None:
            self.path = path
            self.committed: list[int] = []
            self.state = "opening"
            super().__init__()

        def progress(self) -> int:
            return len(self.committed)

        def _run(self) -> None:
            rng = np.random.default_rng(41)
            try:
                db = sqlite3.connect(self.path, isolation_level=None)  # transactions as written here
                try:
                    db.execute("PRAGMA journal_mode=WAL")  # kept in the file: checked when it is read back
                    db.execute("PRAGMA synchronous=FULL")
                    db.execute("PRAGMA wal_autocheckpoint=64")  # checkpoints write the main file as it runs
                    db.execute("CREATE TABLE t (txn INTEGER, row INTEGER, payload BLOB, sha TEXT)")
                    n = 0
                    while not self.stopping.is_set():
                        self.state = f"inserting {n}"
                        db.execute("BEGIN")
                        for row in range(self.ROWS):
                            payload = rng.integers(0, 256, int(rng.integers(1, 6000)), dtype=np.uint8).tobytes()
                            db.execute("INSERT INTO t VALUES (?, ?, ?, ?)",
                                       (n, row, payload, hashlib.sha256(payload).hexdigest()))
                        self.state = f"committing {n}"
                        db.execute("COMMIT")
                        self.committed.append(n)
                        n += 1
                    self.state = "stopped"
                finally:
                    db.close()
            except (sqlite3.Error, OSError) as exc:
                self.failures.append(exc)

    def test_sqlite_commits_survive_a_server_killed_mid_transaction(disk):
        """A real database as the persistent store: every transaction whose COMMIT returned is
        there after the server was SIGKILLed and recovered, none half-applied, and SQLite's own
        integrity check passes, read back from the device (remounted)."""
        info = disk.info
        path = MNT / "db.sqlite"
        writer = SqliteWriter(path)
        try:
            writer.wait_for(30)
            os.kill(info["pid"], signal.SIGKILL)  # the writer is always inside a transaction or its COMMIT
            at_kill, state = len(writer.committed), writer.state
            deadline = time.monotonic() + 30
            while not listed(info)["waiting_for_recovery"]:
                assert time.monotonic() < deadline, listed(info)
                time.sleep(0.1)
            again = json.loads(nv("ublk", "--recover", str(info["dev_id"]), "--background", "-o", "json",
                                  timeout=240).stdout)
            assert again["device"] == info["device"]
            disk.info = {**info, **again}
            writer.wait_for(at_kill + 20)  # the held COMMIT returned and the database carries on
        finally:
            writer.stop()
        assert writer.failures == [], (writer.failures, state)
        assert state.startswith(("inserting", "committing")), state
        committed = writer.committed
        assert committed == list(range(len(committed)))
        sh("sync")
        umount(MNT)  # what the device holds, not the page cache
        mount(disk.info["device"], MNT)
        db = sqlite3.connect(MNT / "db.sqlite")
        try:
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            per_txn = dict(db.execute("SELECT txn, COUNT(*) FROM t GROUP BY txn").fetchall())
            # every committed transaction, whole; nothing of one whose COMMIT never returned
            assert per_txn == {n: SqliteWriter.ROWS for n in committed}, (
                {n: c for n, c in per_txn.items() if c != SqliteWriter.ROWS}, set(committed) ^ set(per_txn), state)
            for txn, rows in db.execute("SELECT txn, GROUP_CONCAT(row) FROM t GROUP BY txn"):
                assert sorted(map(int, rows.split(","))) == list(range(SqliteWriter.ROWS)), (txn, rows)
            for txn, row, payload, sha in db.execute("SELECT txn, row, payload, sha FROM t"):
                assert hashlib.sha256(payload).hexdigest() == sha, (txn, row)
        finally:
            db.close()
        for f in MNT.glob("db.sqlite*"):
            f.unlink()

    # ---------------------------------------------------------------- servers of their own
    def test_bytes_written_in_irq_mode_land_at_their_lba_on_the_namespace(guest, cleanup):
        """The shared disk serves in poll mode (its restart test checks the same there)."""
        small = controller(guest, "nvmevfio-small")
        info = start(small["address"], "--mode", "irq", "--depth", "16", "--io-queue-size", "17")  # no room spare
        assert info["io_queue_size"] == 17
        data = np.random.default_rng(8).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
        offset = 77 * 4096  # LBA 616
        write_direct(info["device"], data, offset)
        st = stats(info)
        assert st["writes"] >= len(data) // info["io_bytes"] and st["errors"] == 0 and st["interrupts"] > 0
        stop(info)
        assert namespace_bytes(small["address"], offset, len(data)) == data

    def test_several_queues_each_serve_io_and_too_many_are_refused(guest, cleanup):
        small = controller(guest, "nvmevfio-small")  # max_ioqpairs=4
        line = one_line_error(nv("ublk", small["address"], "--queues", "5", check=False))
        assert "allows 4 I/O queue pairs" in line, line
        cpus = ub.possible_cpus()
        assert 2 <= cpus < 4, cpus  # the guest has 2 CPUs: within the grant, past ublk's queue limit
        line = one_line_error(nv("ublk", small["address"], "--queues", str(cpus + 1), check=False))
        assert f"at most {cpus} queues" in line, line
        line = one_line_error(nv("ublk", small["address"], "--cpu", str(cpus + 3), check=False))
        assert f"--cpu {cpus + 3}: this process may run on CPUs" in line, line
        line = one_line_error(nv("ublk", small["address"], "--depth", "16", "--io-queue-size", "16", check=False))
        assert "--io-queue-size 16: a queue keeps one entry empty, so it needs more than --depth 16" in line, line
        assert not any(d["address"] == small["address"] for d in devices())  # nothing was added

        # each queue's thread pinned (--cpu): queue i on the i-th CPU of the list, here reversed
        pins = list(range(cpus))[::-1]
        info = start(small["address"], "--queues", str(cpus), "--cpu", ",".join(map(str, pins)))
        dev = info["device"]
        assert info["queues"] == cpus and len(os.listdir(f"/sys/block/{Path(dev).name}/mq")) == cpus
        assert info["cpus"] == pins
        allowed = [line.split(":")[1].strip() for task in Path(f"/proc/{info['pid']}/task").iterdir()
                   for line in (task / "status").read_text().splitlines() if line.startswith("Cpus_allowed_list")]
        singles = {str(c) for c in pins}  # the queue threads; the rest of the process is not pinned
        assert sorted(a for a in allowed if a in singles) == sorted(singles), allowed
        # one fio job pinned to each CPU: blk-mq sends a CPU's requests to its own queue
        fio_verify(f"--filename={dev}", "--rw=randrw", "--ioengine=psync", "--size=8M", "--offset_increment=8M",
                   f"--numjobs={cpus}", f"--cpus_allowed=0-{cpus - 1}", "--cpus_allowed_policy=split")
        st = stats(info)
        assert st["errors"] == 0 and len(st["per_queue"]) == cpus
        for q, per in enumerate(st["per_queue"]):
            assert per["reads"] > 0 and per["writes"] > 0, (q, st["per_queue"])
        stop(info)

    def test_the_default_shape_here_is_one_polled_queue_on_the_last_cpu(guest, cleanup):
        """On the guest's 2 CPUs a thread per CPU would take them all: by default one queue,
        polled, its thread on the last CPU, serving requests from every CPU; --mode irq gives a
        queue per CPU with interrupts, threads not pinned."""
        small = controller(guest, "nvmevfio-small")
        last = max(os.sched_getaffinity(0))
        info = start(small["address"])
        dev = info["device"]
        assert (info["queues"], info["mode"], info["cpus"]) == (1, "poll", [last]), info
        assert info["shape_why"].startswith("the default: a server thread per CPU would take all 2 CPUs"), info
        assert len(os.listdir(f"/sys/block/{Path(dev).name}/mq")) == 1
        allowed = [line.split(":")[1].strip() for task in Path(f"/proc/{info['pid']}/task").iterdir()
                   for line in (task / "status").read_text().splitlines() if line.startswith("Cpus_allowed_list")]
        assert allowed.count(str(last)) == 1, allowed  # the queue's thread alone is pinned
        fio_verify(f"--filename={dev}", "--rw=randrw", "--ioengine=psync", "--size=8M", "--offset_increment=8M",
                   "--numjobs=2", f"--cpus_allowed=0-{last}", "--cpus_allowed_policy=split")
        st = stats(info)
        assert st["errors"] == 0 and st["reads"] > 0 and st["writes"] > 0 and len(st["per_queue"]) == 1
        assert st["interrupts"] == 0 and st["nvme_sq_mmio"] > 0  # polled: no MSI-X eventfd reads
        stop(info)
        info = start(small["address"], "--mode", "irq")
        assert (info["queues"], info["mode"], info["cpus"], info["shape_why"]) == (2, "irq", [None, None], "asked for")
        stop(info)

    @ONE_LANE
    def test_new_requests_reach_the_polled_server_without_an_ipi(guest, cleanup, monkeypatch):
        """The server's io_uring is cooperative (IORING_SETUP_COOP_TASKRUN): a request submitted on
        another CPU reaches the polling thread as task work without a rescheduling IPI, and the
        thread enters the kernel for it when the ring's IORING_SQ_TASKRUN flag says so. With the
        kernel's default (NVMEVFIO_UBLK_TASKRUN=ipi) each request interrupts the server's CPU."""
        small = controller(guest, "nvmevfio-small")
        cpus = sorted(os.sched_getaffinity(0))
        reads = 400
        seen = {}
        for how in ("coop", "ipi"):
            if how == "ipi":
                monkeypatch.setenv("NVMEVFIO_UBLK_TASKRUN", "ipi")
            info = start(small["address"])
            assert info["cpus"] == [cpus[-1]], info
            before, ipis = stats(info), rescheduling_ipis(cpus[-1])
            # QD1 direct reads from the other CPU: each request a wake of the server's queue
            sh("taskset", "-c", str(cpus[0]), "dd", f"if={info['device']}", "of=/dev/null", "bs=4k",
               f"count={reads}", "iflag=direct", "status=none")
            after = stats(info)
            seen[how] = {"ipis": rescheduling_ipis(cpus[-1]) - ipis, "coop": after["per_queue"][0]["coop_taskrun"],
                         "enters": after["taskrun_enters"] - before["taskrun_enters"],
                         "reads": after["reads"] - before["reads"]}
            stop(info)
        print("rescheduling IPIs on the server's CPU, task-work entries:", seen)
        coop, ipi = seen["coop"], seen["ipi"]
        assert coop["reads"] >= reads and ipi["reads"] >= reads, seen
        assert coop["coop"] == 1 and ipi["coop"] == 0 and ipi["enters"] == 0, seen
        # The requests came through the flag (393 of 400 in one run; a request that finds the
        # server asleep, its 300 µs spin over, wakes it instead, which may take an IPI to the
        # halted vCPU: hence the margins)
        assert coop["enters"] >= reads // 4, seen
        assert ipi["ipis"] >= reads // 2 and coop["ipis"] <= reads // 4, seen

    @ONE_LANE
    def test_a_media_error_is_eio_with_the_nvme_status_in_the_log(guest, cleanup):
        faulty = controller(guest, "nvmevfio-faulty")  # reads of LBA 100 fail (QEMU blkdebug)
        info = start(faulty["address"], "--depth", "4")
        fd = os.open(info["device"], os.O_RDONLY | os.O_DIRECT)
        buf = aligned(4096)
        try:
            assert os.preadv(fd, [buf], 0) == 4096  # LBAs 0-7 read
            with pytest.raises(OSError) as e:
                os.preadv(fd, [buf], 96 * 512)  # LBAs 96-103
            assert e.value.errno == 5  # EIO
        finally:
            os.close(fd)
        assert stats(info)["errors"] >= 1
        stop(info)
        log = Path(info["log"]).read_text()
        assert "READ LBA 96 (+8): Unrecovered Read Error" in log and "EIO" in log, log[-2000:]

    @ONE_LANE
    def test_stop_of_an_unknown_device_is_one_line():
        line = one_line_error(nv("ublk", "--stop", "99", check=False))
        assert "no ublk device 99" in line, line

    @ONE_LANE
    def test_a_killed_server_fails_io_in_bounded_time_and_leaves_a_removable_stale_device(guest, cleanup):
        small = controller(guest, "nvmevfio-small")
        info = start(small["address"])
        mkfs(info["device"])
        mount(info["device"], OWN_MNT)
        writer = FsyncWriter(OWN_MNT)
        writer.wait_for(30)
        os.kill(info["pid"], signal.SIGKILL)
        killed = time.monotonic()
        writer.thread.join(60)  # not stopped: only the kernel's errors may end the writer
        assert not writer.thread.is_alive(), "the writer hung on the dead server"
        assert writer.failures and time.monotonic() - killed < 60, writer.failures
        umount_after_crash(OWN_MNT)
        stale = listed(info)
        assert stale["stale"] and not stale["server_alive"] and not stale["waiting_for_recovery"]
        assert "stale" in nv("ublk", "--stop", str(info["dev_id"])).stdout
        assert all(d["dev_id"] != info["dev_id"] for d in devices())

        info = start(small["address"])  # a new device over the same namespace: the journal replays
        mount(info["device"], OWN_MNT)
        writer.check(OWN_MNT)
        umount(OWN_MNT)
        fsck_clean(info["device"])
        stop(info)
