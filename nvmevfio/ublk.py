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
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvmevfio._ffi import ffi, lib
from nvmevfio.errors import NvmeVfioError, Refused, ShimError
from nvmevfio.ublk_devices import (
    NEW_DEV_ID,
    RUN_DIR,
    UBLK_F_CMD_IOCTL_ENCODE,
    UBLK_F_USER_RECOVERY,
    UBLK_F_USER_RECOVERY_REISSUE,
    DeviceInfo,
    UblkError,
    control_checked,
    encode_owner,
    stats_path,
)

log = logging.getLogger("nvmevfio.ublk")

UBLK_ATTR_READ_ONLY = 1 << 0
UBLK_ATTR_VOLATILE_CACHE = 1 << 2
UBLK_ATTR_FUA = 1 << 3
UBLK_IO_OPS = {0: "READ", 1: "WRITE", 2: "FLUSH", 3: "DISCARD", 5: "WRITE_ZEROES"}
UBLK_MAX_QUEUE_DEPTH = 4096
# NVMe: Identify Controller ONCS and VWC bits (Base Specification 2.0, Figure 275)
ONCS_DSM = 1 << 2
ONCS_WRITE_ZEROES = 1 << 3
VWC_PRESENT = 1 << 0
WRITE_ZEROES_MAX_NLB = 65536
DSM_MAX_NLB = 0xFFFFFFFF

DEFAULT_DEPTH = 64
MAX_IO_BYTES = 256 << 10  # a tag's buffer (and a request's most): MDTS when smaller


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


@dataclass(frozen=True)
class Shape:
    """How a server serves: its ublk queues (None: one per CPU, at most DEFAULT_QUEUES_MAX and at
    most the controller's grant), NVMe completions (``poll`` or ``irq``), each queue thread's CPU
    (None: not pinned), and why (``nvmevfio ublk`` says it in its JSON, ``shape_why``)."""

    queues: int | None
    mode: str
    cpus: list[int] | None
    why: str


def choose_shape(queues: int | None, mode: str | None, cpus: list[int] | None, *, allowed: set[int],
                 per_cpu: int, fixed_queues: int | None = None) -> Shape:
    """The server's shape: what was asked for (``queues``, ``mode``, ``cpus``: --queues, --mode,
    --cpu; any of them given, the rest take their plain defaults: a queue per CPU, interrupts,
    threads not pinned), else the default for the machine. ``allowed``: the CPUs this process may
    use; ``per_cpu``: the queues a queue per CPU gives (:func:`default_queues`); ``fixed_queues``:
    the queue count of a device being recovered.

    The default: where a server thread per CPU would take every CPU this process may use (at
    most DEFAULT_QUEUES_MAX of them, more than one), one queue, polled, its thread on the last
    allowed CPU: blk-mq hands every CPU's requests to it and the other CPUs stay with the
    applications, as SPDK's ublk target serves every queue from its one reactor core. Measured
    on the 2-CPU guest against a queue per CPU with interrupts (docs/disk.md, session 22; ratios
    to the kernel driver, median of 3 boots): randread 4 KiB QD1 0.91 against 0.78, QD32 1.02
    against 0.82, randwrite QD32 0.96 against 0.84, ext4 0.83 against 0.75, 128 KiB reads 0.62
    against 0.67; two fio jobs at QD1 0.69 against 0.47 (one boot). With one CPU there is
    nothing to leave (interrupts); with more CPUs than queues, a queue per CPU with interrupts."""
    if queues is not None or mode is not None or cpus is not None:
        return Shape(fixed_queues or queues, mode or "irq", cpus, "asked for")
    n = len(allowed)
    if n >= 2 and per_cpu >= n and (fixed_queues or 1) == 1:
        last = max(allowed)
        return Shape(1, "poll", [last], f"the default: a server thread per CPU would take all {n} CPUs this process "
                     f"may use, so one queue, polled, on CPU {last} (--mode irq: a queue per CPU, interrupts)")
    why = ("one CPU: a polled server would take it from the applications" if n < 2
           else f"{fixed_queues} queues of the device recovered" if fixed_queues
           else f"{per_cpu} queues leave CPUs free of the {n} this process may use")
    return Shape(fixed_queues, "irq", None, f"the default: a queue per CPU with interrupts ({why})")


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


# struct nv_ublk_queue's counters; the *_ns: where the loop's time went (cbits/ublk.c)
QUEUE_COUNTERS = ("requests", "reads", "writes", "flushes", "discards", "write_zeroes", "write_zeroes_unmap", "fua",
                  "bytes_read", "bytes_written", "interrupts", "nvme_batches", "sleeps", "spin_hits", "errors",
                  "taskrun_enters", "submit_ns", "spun_ns", "slept_ns")


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
        from nvmevfio.nvme.queue import DOORBELL_COUNTERS  # numpy's import kept off --list and --stop

        q = self.q
        try:  # its NVMe queue pair's MMIO doorbells (none while a reset has the queues down)
            ring = self.server.dev.provider.doorbell_counters(self.q_id + 1)
        except NvmeVfioError:
            ring = dict.fromkeys(DOORBELL_COUNTERS, 0)
        own = {k: int(getattr(q, k)) for k in QUEUE_COUNTERS}
        own["coop_taskrun"] = int(q.coop_taskrun)  # new requests come without an IPI (cbits/ublk.c)
        return {**own, **{f"nvme_{k}": int(ring[k]) for k in DOORBELL_COUNTERS}}

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
        control_checked(lib.nv_ublk_add_dev(info), "ADD_DEV")
        self.dev_id = int(info.dev_id)
        try:
            params = self.geometry.params(self.read_only, self.mark_read_only)
            control_checked(lib.nv_ublk_set_params(self.dev_id, params), "SET_PARAMS", self.dev_id)
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
        control_checked(r, "START_USER_RECOVERY", dev_id)
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
            control_checked(lib.nv_ublk_end_recovery(self.dev_id, os.getpid()), "END_USER_RECOVERY", self.dev_id)
        else:
            control_checked(lib.nv_ublk_start_dev(self.dev_id, os.getpid()), "START_DEV", self.dev_id)
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
