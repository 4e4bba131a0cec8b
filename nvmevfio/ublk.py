"""A namespace as a Linux ublk block device (``/dev/ublkbN``), served per request in C.

Linux's userspace block driver (ublk_drv) hands each block request to a server over io_uring.
Here Python decides everything once: it opens the controller, creates one NVMe I/O queue pair
per ublk queue, registers one DMA buffer per queue whose slots are the tags' I/O buffers (the
broker authors every slot's PRPs), derives the device's parameters from Identify, adds and
starts the device; then one thread per queue runs ``nv_ublk_queue_run`` (cbits/ublk.c), which
turns each request into one NVMe command without returning to Python. SIGTERM or SIGINT stops
the device (the kernel drains it through the running queues), deletes it and shuts the
controller down.

With ``recoverable`` (ublk's user recovery, re-issue variant) a server that dies leaves the
device waiting, its requests held; ``nvmevfio ublk --recover DEV`` starts a new server on it
and the held requests are issued again. Without it, the kernel fails the dead server's
outstanding and new requests with EIO and removes the disk.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvmevfio._ffi import ffi, lib
from nvmevfio.errors import NvmeVfioError, Refused, ShimError

log = logging.getLogger("nvmevfio.ublk")

UBLK_CONTROL = Path("/dev/ublk-control")
UBLK_CHAR_CLASS = Path("/sys/class/ublk-char")
RUN_DIR = Path("/run/nvmevfio")
# include/uapi/linux/ublk_cmd.h
UBLK_F_USER_RECOVERY = 1 << 3
UBLK_F_USER_RECOVERY_REISSUE = 1 << 4
UBLK_F_CMD_IOCTL_ENCODE = 1 << 6
UBLK_S_DEV_DEAD, UBLK_S_DEV_LIVE, UBLK_S_DEV_QUIESCED = 0, 1, 2
STATE_NAMES = {UBLK_S_DEV_DEAD: "dead", UBLK_S_DEV_LIVE: "live", UBLK_S_DEV_QUIESCED: "quiesced"}
UBLK_ATTR_READ_ONLY = 1 << 0
UBLK_ATTR_VOLATILE_CACHE = 1 << 2
UBLK_ATTR_FUA = 1 << 3
UBLK_IO_OPS = {0: "READ", 1: "WRITE", 2: "FLUSH", 3: "DISCARD", 5: "WRITE_ZEROES"}
UBLK_MAX_QUEUE_DEPTH = 4096
NEW_DEV_ID = 0xFFFFFFFF  # ADD_DEV: the kernel picks the id
# NVMe: Identify Controller ONCS and VWC bits (Base Specification 2.0, Figure 275)
ONCS_DSM = 1 << 2
ONCS_WRITE_ZEROES = 1 << 3
VWC_PRESENT = 1 << 0
WRITE_ZEROES_MAX_NLB = 65536
DSM_MAX_NLB = 0xFFFFFFFF

DEFAULT_DEPTH = 64
MAX_IO_BYTES = 256 << 10  # a tag's buffer (and a request's most): MDTS when smaller
SERVER_FLAGS_MARK = 1 << 63  # ublksrv_flags: set when nvmevfio's server added the device


class UblkError(NvmeVfioError):
    """ublk is missing, a device is not what the request needs, or a control command failed."""

    reason = "ublk"


def control_available() -> bool:
    return UBLK_CONTROL.exists()


def require_ublk() -> None:
    """One line when the kernel has no ublk (Debian 12's 6.1 kernel is built without it)."""
    if not control_available():
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["modprobe", "-q", "ublk_drv"], capture_output=True, timeout=30)
    if not control_available():
        raise UblkError(f"ublk is not available: this kernel has no ublk_drv ({UBLK_CONTROL} is missing, "
                        "CONFIG_BLK_DEV_UBLK); use nvmevfio nbd ADDRESS to use the namespace as a disk instead",
                        reason="ublk-missing")


def possible_cpus() -> int:
    """nr_cpu_ids: the kernel gives a ublk device at most this many queues."""
    try:
        return int(Path("/sys/devices/system/cpu/possible").read_text().strip().split(",")[-1].split("-")[-1]) + 1
    except (OSError, ValueError):
        return os.cpu_count() or 1


DEFAULT_QUEUES_MAX = 4


def default_queues() -> int:
    """--queues by default: one per CPU, at most DEFAULT_QUEUES_MAX. blk-mq hands each CPU's
    requests to its own queue, so a request is not handed from one CPU's queue to a server
    thread busy on another's (measured in docs/disk.md: 2 queues on the guest's 2 CPUs)."""
    return max(1, min(possible_cpus(), os.cpu_count() or 1, DEFAULT_QUEUES_MAX))


def _check(r: int, what: str, dev_id: int | None = None) -> int:
    if r < 0:
        target = f"ublk device {dev_id}" if dev_id is not None and dev_id != NEW_DEV_ID else str(UBLK_CONTROL)
        raise ShimError(what, target, -r)
    return r


# ------------------------------------------------------------------ the device's identity
def encode_owner(address: str, nsid: int) -> int:
    """The PCI function and namespace a device serves, kept by the kernel in ublksrv_flags: bit 63
    marks nvmevfio's, the function (domain up to 7FFFh) in bits 32-62, the namespace in 0-31."""
    dom, bus, devfn = address.split(":")
    dev, fn = devfn.split(".")
    if int(dom, 16) > 0x7FFF:
        raise UblkError(f"PCI domain {dom} is past what the device's record holds (7fff)", reason="bad-address")
    bdf = (int(dom, 16) << 16) | (int(bus, 16) << 8) | (int(dev, 16) << 3) | int(fn, 16)
    return SERVER_FLAGS_MARK | (bdf << 32) | (nsid & 0xFFFFFFFF)


def decode_owner(flags: int) -> tuple[str, int] | None:
    if not flags & SERVER_FLAGS_MARK:
        return None
    bdf = (flags >> 32) & 0x7FFFFFFF
    address = f"{bdf >> 16:04x}:{(bdf >> 8) & 0xFF:02x}:{(bdf >> 3) & 0x1F:02x}.{bdf & 7}"
    return address, flags & 0xFFFFFFFF


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (killed, not yet reaped) serves nothing
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def stats_path(dev_id: int) -> Path:
    return RUN_DIR / f"ublk{dev_id}.json"


@dataclass
class DeviceInfo:
    dev_id: int
    state: str
    server_pid: int
    server_alive: bool
    queues: int
    depth: int
    max_io_bytes: int
    recoverable: bool
    address: str | None
    nsid: int | None
    block_device: str | None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def stale(self) -> bool:
        """Left by a server that is gone: removable with ``--stop``."""
        return not self.server_alive

    @property
    def waiting_for_recovery(self) -> bool:
        return self.recoverable and not self.server_alive and self.state in ("quiesced", "live")

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("dev_id", "state", "server_pid", "server_alive", "queues", "depth",
                                           "max_io_bytes", "recoverable", "address", "nsid", "block_device",
                                           "stats")}
        d["stale"] = self.stale
        d["waiting_for_recovery"] = self.waiting_for_recovery
        return d


def device_info(dev_id: int) -> DeviceInfo:
    info = ffi.new("struct nv_ublk_info *")
    r = lib.nv_ublk_get_dev_info(dev_id, info)
    if r == -errno.ENODEV or r == -errno.ENOENT:
        raise UblkError(f"there is no ublk device {dev_id} (see nvmevfio ublk --list)", reason="unknown-device",
                        dev_id=dev_id)
    _check(r, "GET_DEV_INFO", dev_id)
    owner = decode_owner(int(info.ublksrv_flags))
    blk = Path(f"/dev/ublkb{dev_id}")
    stats: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        stats = json.loads(stats_path(dev_id).read_text())
    pid = int(info.ublksrv_pid)
    return DeviceInfo(dev_id=dev_id, state=STATE_NAMES.get(int(info.state), str(int(info.state))), server_pid=pid,
                      server_alive=_alive(pid), queues=int(info.nr_hw_queues), depth=int(info.queue_depth),
                      max_io_bytes=int(info.max_io_buf_bytes),
                      recoverable=bool(int(info.flags) & UBLK_F_USER_RECOVERY),
                      address=owner[0] if owner else None, nsid=owner[1] if owner else None,
                      block_device=str(blk) if blk.exists() else None, stats=stats)


def list_devices() -> list[DeviceInfo]:
    require_ublk()
    ids = sorted(int(p.name[len("ublkc"):]) for p in UBLK_CHAR_CLASS.glob("ublkc*")) \
        if UBLK_CHAR_CLASS.exists() else []
    out = []
    for dev_id in ids:
        with contextlib.suppress(UblkError):  # removed meanwhile
            out.append(device_info(dev_id))
    return out


def _wait_gone(dev_id: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not (UBLK_CHAR_CLASS / f"ublkc{dev_id}").exists():
            return True  # deleted (a mounted filesystem may still hold its number)
        try:
            device_info(dev_id)
        except UblkError:
            return True
        time.sleep(0.1)
    return False


def _wait_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def stop_device(dev_id: int, timeout_s: float = 120.0) -> DeviceInfo:
    """Stop ublk device ``dev_id``: its running server gets SIGTERM (it drains and deletes the
    device); a device whose server is gone is stopped and deleted here."""
    require_ublk()
    info = device_info(dev_id)
    if info.server_alive:
        os.kill(info.server_pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        # The device goes before the server has shut the controller down: wait for the process
        # too, so that the controller is free for its next user once --stop returns.
        if not _wait_gone(dev_id, timeout_s) or not _wait_exit(info.server_pid, deadline - time.monotonic()):
            raise UblkError(f"ublk device {dev_id}: its server (pid {info.server_pid}) did not stop within "
                            f"{timeout_s:g} s", reason="stop-timeout", dev_id=dev_id)
        return info
    _check(lib.nv_ublk_stop_dev(dev_id), "STOP_DEV", dev_id)
    _check(lib.nv_ublk_del_dev(dev_id, 0), "DEL_DEV", dev_id)
    stats_path(dev_id).unlink(missing_ok=True)
    return info


# ------------------------------------------------------------------ the server
@dataclass
class Geometry:
    """What the device tells the kernel, from Identify Controller and Namespace."""

    block_size: int
    blocks: int
    io_bytes: int  # a tag's buffer: the most one request carries
    volatile_cache: bool
    oncs: int

    def params(self, read_only: bool, mark_read_only: bool = True) -> Any:
        """read_only: no discard or write-zeroes; the disk marked read-only unless mark_read_only is off (nvmet)."""
        p = ffi.new("struct nv_ublk_params *")
        shift = self.block_size.bit_length() - 1
        spb = self.block_size // 512  # 512-byte sectors per block
        p.attrs = ((UBLK_ATTR_READ_ONLY if read_only and mark_read_only else 0)
                   | (UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA if self.volatile_cache else 0))
        p.logical_bs_shift = p.physical_bs_shift = p.io_min_shift = shift
        p.io_opt_shift = self.io_bytes.bit_length() - 1
        p.max_sectors = self.io_bytes // 512
        p.dev_sectors = self.blocks * spb
        p.discard_granularity = self.block_size
        dsm = self.oncs & ONCS_DSM and not read_only
        p.max_discard_sectors = min(DSM_MAX_NLB // spb * spb, 0xFFFFFFFF // spb * spb) if dsm else 0
        wz = self.oncs & ONCS_WRITE_ZEROES and not read_only
        p.max_write_zeroes_sectors = WRITE_ZEROES_MAX_NLB * spb if wz else 0
        return p


def geometry(dev: Any) -> Geometry:
    ctrl = dev.provider.identify_controller()
    ps = dev.provider.memory_page_size
    mdts = dev.info.max_transfer_bytes or MAX_IO_BYTES
    io_bytes = max(ps, min(MAX_IO_BYTES, mdts) // ps * ps)
    io_bytes = 1 << (io_bytes.bit_length() - 1)  # a power of two (io_opt is given as a shift)
    return Geometry(block_size=dev.block_size, blocks=dev.block_count, io_bytes=io_bytes,
                    volatile_cache=bool(int(ctrl.get("vwc", 0)) & VWC_PRESENT), oncs=int(ctrl.get("oncs", 0)))


class _Queue:
    """One ublk queue: an NVMe I/O queue pair, a registered buffer (a slot per tag), a thread."""

    def __init__(self, server: Server, q_id: int, char_fd: int) -> None:
        dev, g = server.dev, server.geometry
        self.server = server
        self.q_id = q_id
        self.buf = dev.alloc_buffer(server.depth * g.io_bytes)
        self.reg = dev.provider.register_buffer(self.buf, g.io_bytes)
        # The broker validates the pairing (namespace, slots, depth within the queue), as it does
        # for perf; the C server gets the queue pair and the slots' PRP table from it through
        # serve_c, and the slots' device-visible memory (the kernel copies where the device reads).
        self.loop = dev.provider.perf_loop(dev.nsid, self.reg, io_size=g.io_bytes, lba_range=(0, g.blocks),
                                           random=False, read_pct=100, depth=server.depth, qid=q_id + 1)
        visible = self.loop.slot_memory
        q = ffi.new("struct nv_ublk_queue *")
        q.q_id, q.depth, q.char_fd = q_id, server.depth, char_fd
        q.buffers = ffi.cast("uint8_t *", visible.ctypes.data)
        q.slot_size = g.io_bytes
        q.block_shift = g.block_size.bit_length() - 1
        q.read_only, q.nblocks, q.oncs = int(server.read_only), g.blocks, g.oncs
        self.q = q
        self._visible = visible
        self.error: BaseException | None = None
        self.opened = threading.Event()
        self.errors_logged = 0
        self.thread = threading.Thread(target=self._serve, name=f"nvmevfio-ublk-q{q_id}", daemon=True)

    def _serve(self) -> None:
        try:
            cpu = self.server.queue_cpus()[self.q_id]
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})  # 0: this thread (before its first FETCH: the kernel
                # completes the queue's requests in the task that fetched them)
            r = lib.nv_ublk_queue_open(self.q, 1)
            self.opened.set()
            if r < 0:
                raise ShimError("ublk queue open", f"queue {self.q_id}", -r)
            while True:  # a run the broker recovered from (a late command, a reset) serves on
                r = self.loop.serve_c(lib.nv_ublk_queue_run, self.q, ended=self._answer,
                                      what=f"ublk queue {self.q_id}")
                if r == 0 or r == -errno.ECANCELED:
                    return
        except BaseException as exc:
            self.error = exc
        finally:
            self.opened.set()
            lib.nv_ublk_queue_close(self.q)  # a FETCH still outstanding is cancelled: the kernel takes it back
            self.server.wake.set()

    def _answer(self, records: Any) -> None:
        """The requests of the commands the broker's recovery ended, answered from their status."""
        for tag, status in zip(records["cookie"].tolist(), records["status"].tolist()):
            lib.nv_ublk_queue_complete(self.q, tag, status)

    def counters(self) -> dict[str, int]:
        q = self.q
        return {k: int(getattr(q, k)) for k in ("requests", "reads", "writes", "flushes", "discards", "write_zeroes",
                                                "write_zeroes_unmap", "fua", "bytes_read", "bytes_written",
                                                "interrupts", "nvme_batches", "sleeps", "spin_hits",
                                                "errors")}

    def new_errors(self) -> list[str]:
        """Failed requests since the last call, as log lines with the NVMe status name."""
        from nvmevfio.nvme import spec  # numpy's import kept off --list and --stop

        q = self.q
        total = int(q.errors)
        lines = []
        first = max(self.errors_logged, total - 16)
        for i in range(first, total):
            e = q.error_log[i % 16]
            op = UBLK_IO_OPS.get(int(e.op), f"op {int(e.op)}")
            err = -int(e.err)
            status = int(e.status)
            why = (f"{spec.status_name((status >> 8) & 7, status & 0xFF)} (status {status:#06x})" if status
                   else "refused before the device")
            lines.append(f"queue {self.q_id} tag {int(e.tag)}: {op} LBA {int(e.slba)} (+{int(e.nlb)}): {why} -> "
                         f"{errno.errorcode.get(err, err)}")
        if total - first < total - self.errors_logged:
            lines.insert(0, f"queue {self.q_id}: {total - self.errors_logged - (total - first)} earlier errors not "
                            "shown")
        self.errors_logged = total
        return lines


class Server:
    """A ublk device over namespace ``dev`` (an open BlockDevice with ``queues`` I/O queue pairs
    of at least ``depth`` + 1 entries)."""

    def __init__(self, dev: Any, *, address: str, queues: int, depth: int, read_only: bool = False,
                 recoverable: bool = False, refuse_writes: bool = False, cpus: list[int] | None = None) -> None:
        """``cpus``: queue i's thread pinned to ``cpus[i % len(cpus)]`` (none: where the scheduler
        puts it). On a host with fewer cores than pollers plus the rest (an emulated guest), one CPU
        for every polling queue leaves the other cores to the submitters and the device."""
        self.dev = dev
        allowed = os.sched_getaffinity(0)
        if cpus is not None and (not cpus or not set(cpus) <= allowed):
            raise Refused("invalid-argument", f"CPUs {cpus}: this process may run on CPUs "
                          f"{', '.join(map(str, sorted(allowed)))} only", cpus=cpus)
        self.cpus = list(cpus) if cpus else None
        self.address = address
        self.queues = queues
        self.depth = depth
        self.read_only, self.mark_read_only = read_only or refuse_writes, read_only
        self.recoverable = recoverable
        most = possible_cpus()
        if queues > most:
            raise Refused("count-out-of-range", f"--queues {queues}: ublk serves at most {most} queues on this "
                          "machine (one per possible CPU)", queues=queues, cpus=most)
        self.geometry = geometry(dev)
        self.dev_id: int | None = None
        self.char_fd = -1
        self.started = False
        self.wake = threading.Event()
        self.stop_requested = threading.Event()
        self._queues: list[_Queue] = []

    @property
    def block_device(self) -> str:
        return f"/dev/ublkb{self.dev_id}"

    def queue_cpus(self) -> list[int | None]:
        """Each queue's CPU (None: not pinned)."""
        return [self.cpus[i % len(self.cpus)] if self.cpus else None for i in range(self.queues)]

    def add(self) -> int:
        """ADD_DEV and SET_PARAMS: the device exists (no disk until started)."""
        info = ffi.new("struct nv_ublk_info *")
        info.nr_hw_queues, info.queue_depth = self.queues, self.depth
        info.max_io_buf_bytes = self.geometry.io_bytes
        info.dev_id = NEW_DEV_ID
        info.ublksrv_pid = os.getpid()
        info.flags = UBLK_F_CMD_IOCTL_ENCODE | (UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE
                                                if self.recoverable else 0)
        info.ublksrv_flags = encode_owner(self.address, self.dev.nsid)
        _check(lib.nv_ublk_add_dev(info), "ADD_DEV")
        self.dev_id = int(info.dev_id)
        try:
            _check(lib.nv_ublk_set_params(self.dev_id, self.geometry.params(self.read_only, self.mark_read_only)),
                   "SET_PARAMS", self.dev_id)
        except BaseException:
            lib.nv_ublk_del_dev(self.dev_id, 1)
            self.dev_id = None
            raise
        return self.dev_id

    def adopt(self, target: DeviceInfo) -> None:
        """--recover: take over ``target`` (START_USER_RECOVERY), whose tag buffers must be the size
        this controller's gives (the kernel copies up to that much into each)."""
        dev_id = target.dev_id
        if target.max_io_bytes != self.geometry.io_bytes:
            raise UblkError(f"/dev/ublkb{dev_id} was added with {target.max_io_bytes}-byte requests, this "
                            f"controller takes {self.geometry.io_bytes}", reason="not-recovering", dev_id=dev_id)
        # EBUSY until the dead server's /dev/ublkcN is released, which the kernel does when its
        # io_uring is freed (asynchronously, after the device is already quiesced)
        deadline = time.monotonic() + 15
        while (r := lib.nv_ublk_start_recovery(dev_id)) == -errno.EBUSY and time.monotonic() < deadline:
            time.sleep(0.1)
        _check(r, "START_USER_RECOVERY", dev_id)
        self.dev_id = dev_id

    def _open_queues(self) -> None:
        assert self.dev_id is not None
        path = f"/dev/ublkc{self.dev_id}"
        deadline = time.monotonic() + 10
        while not Path(path).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        fd = lib.nv_open_rw(path.encode())
        if fd < 0:
            raise ShimError("open", path, -fd)
        self.char_fd = fd
        self._queues = [_Queue(self, i, fd) for i in range(self.queues)]
        for q in self._queues:
            q.thread.start()
        for q in self._queues:
            q.opened.wait()
            if q.error is not None:
                raise q.error
            if not q.q.ready:
                raise UblkError(f"ublk queue {q.q_id} did not fetch its requests", reason="queue-not-ready")

    def start(self, *, recovering: bool = False) -> None:
        """Queue threads fetch every tag, then START_DEV (or END_USER_RECOVERY): the disk appears."""
        assert self.dev_id is not None
        self._open_queues()
        if recovering:
            _check(lib.nv_ublk_end_recovery(self.dev_id, os.getpid()), "END_USER_RECOVERY", self.dev_id)
        else:
            _check(lib.nv_ublk_start_dev(self.dev_id, os.getpid()), "START_DEV", self.dev_id)
        self.started = True
        deadline = time.monotonic() + 10
        while not Path(self.block_device).exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def counters(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for q in self._queues:
            for k, v in q.counters().items():
                total[k] = total.get(k, 0) + v
        return total

    def write_stats(self) -> None:
        if self.dev_id is None:
            return
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        path = stats_path(self.dev_id)
        tmp = path.with_suffix(".tmp")
        # the totals, and each queue's own (which queues the kernel spreads requests over)
        tmp.write_text(json.dumps({"pid": os.getpid(), "serial": self.dev.info.serial, "read_only": self.read_only,
                                   **self.counters(), "per_queue": [q.counters() for q in self._queues]}))
        tmp.rename(path)

    def failed_queue(self) -> _Queue | None:
        return next((q for q in self._queues if not q.thread.is_alive()), None)

    def serve(self) -> None:
        """Until stop_requested or a queue thread ends: log failed requests, keep the counters."""
        while not self.stop_requested.is_set():
            self.wake.wait(0.5)
            self.wake.clear()
            for q in self._queues:
                for line in q.new_errors():
                    log.error("%s: %s", self.block_device, line)
            self.write_stats()
            dead = self.failed_queue()
            if dead is not None:
                raise UblkError(f"{self.block_device}: queue {dead.q_id} ended: {dead.error}",
                                reason="queue-failed") from dead.error

    def close(self) -> None:
        """STOP_DEV (the kernel drains the disk through the running queues, then ends every
        FETCH), join the queue threads, DEL_DEV."""
        if self.dev_id is None:
            return
        dev_id = self.dev_id
        if self.started or self._queues:
            r = lib.nv_ublk_stop_dev(dev_id)
            if r < 0:
                log.error("ublk device %d: STOP_DEV: %s", dev_id, os.strerror(-r))
        for q in self._queues:
            q.thread.join(30)
            if q.thread.is_alive():  # the kernel did not end its FETCHes: make it return
                q.q.stop = 1
                q.thread.join(30)
        for q in self._queues:
            for line in q.new_errors():
                log.error("%s: %s", self.block_device, line)
        self.write_stats()
        if self.char_fd >= 0:
            lib.nv_close(self.char_fd)
            self.char_fd = -1
        r = lib.nv_ublk_del_dev(dev_id, 0)  # a filesystem still mounted on it keeps it until unmounted
        if r < 0:
            log.error("ublk device %d: DEL_DEV: %s", dev_id, os.strerror(-r))
        stats_path(dev_id).unlink(missing_ok=True)
        self.dev_id = None
        for q in self._queues:
            with contextlib.suppress(NvmeVfioError):
                self.dev.provider.free_buffer(q.buf)


def check_not_served(address: str, nsid: int) -> None:
    """Refuse a namespace another ublk device serves (its server running, or waiting for --recover)."""
    for d in list_devices():
        if d.address != address or d.nsid != nsid:
            continue
        if d.server_alive:
            raise UblkError(f"{address} nsid {nsid} is already served by /dev/ublkb{d.dev_id} (server pid "
                            f"{d.server_pid}); stop it first: nvmevfio ublk --stop {d.dev_id}",
                            reason="namespace-served", dev_id=d.dev_id)
        if d.waiting_for_recovery:
            raise UblkError(f"{address} nsid {nsid} belongs to /dev/ublkb{d.dev_id}, which waits for its server: "
                            f"nvmevfio ublk --recover {d.dev_id}, or remove it: nvmevfio ublk --stop {d.dev_id}",
                            reason="namespace-served", dev_id=d.dev_id)


def recovery_target(dev_id: int, timeout_s: float = 15.0) -> DeviceInfo:
    """The device --recover takes over: recoverable, its server dead, quiesced by the kernel."""
    require_ublk()
    deadline = time.monotonic() + timeout_s
    while True:
        d = device_info(dev_id)
        if not d.recoverable or d.server_alive or d.state == "dead" or d.address is None or d.nsid is None:
            why = ("it was not started with --recoverable" if not d.recoverable
                   else f"its server (pid {d.server_pid}) is running" if d.server_alive
                   else "it was not added by nvmevfio" if d.address is None
                   else f"its state is {d.state}")
            raise UblkError(f"/dev/ublkb{dev_id} is not waiting for recovery: {why}", reason="not-recovering",
                            dev_id=dev_id, state=d.state)
        if d.state == "quiesced":
            return d
        if time.monotonic() > deadline:  # the kernel quiesces a device once its dead server's files are closed
            raise UblkError(f"/dev/ublkb{dev_id} is not waiting for recovery: still {d.state} {timeout_s:g} s "
                            "after its server died", reason="not-recovering", dev_id=dev_id, state=d.state)
        time.sleep(0.1)


@contextlib.contextmanager
def signals_stop(server: Server) -> Iterator[None]:
    """SIGTERM and SIGINT end serve() (the main thread then stops the device)."""
    def handler(signum: int, frame: Any) -> None:
        server.stop_requested.set()
        server.wake.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
