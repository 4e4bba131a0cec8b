"""``nvmevfio.connect()``: block access through the service, for unprivileged processes.

The same verbs as :class:`nvmevfio.blockdev.BlockDevice` (info, read/write, flush, write
zeroes, deallocate, buffers, submit/reap, file()); LBA 0 is the first block of the client's
granted window. Buffers are memfds the daemon allocated and mapped into the IOMMU; the client
maps them too and never learns an address. Requests go through the shared rings of
:mod:`nvmevfio.service.ring`: one eventfd write per batch, one wait per reap.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nvmevfio._ffi import ffi, lib
from nvmevfio.blockdev import BlockFile, DeviceInfo
from nvmevfio.errors import NvmeVfioError, Refused
from nvmevfio.nvme.perfloop import PerfCounters
from nvmevfio.nvme.queue import DOORBELL_COUNTERS
from nvmevfio.nvme.spec import SQE, command_error
from nvmevfio.service import DEFAULT_SOCKET
from nvmevfio.service import ring as rings
from nvmevfio.service.protocol import receive, send

DEFAULT_TIMEOUT_S = 30.0
RECORD = np.dtype([("tag", "<i8"), ("status", "<u2"), ("reason", "U24")])  # what reap() returns


class ServiceGone(NvmeVfioError):
    """The daemon went away (stopped, restarted or killed): reconnect with connect()."""

    reason = "service-gone"


@dataclass(eq=False)
class ServiceBuffer:
    """A DMA buffer of the service's: its bytes are :attr:`array` (shared with the daemon, which
    mapped them for the device). Holds no address."""

    id: int
    generation: int
    size: int
    array: np.ndarray = field(repr=False)
    _map: mmap.mmap | None = field(default=None, repr=False)
    iova: int | None = field(default=None, repr=False)  # the validated lane only: its device address

    @property
    def live(self) -> bool:
        return self._map is not None


class ServiceDevice:
    """A connection to ``nvmevfio serve``: see :func:`connect`."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, nsid: int = 1, *, lane: str = "default",
                 timeout_s: float = DEFAULT_TIMEOUT_S, queue_depth: int | None = None) -> None:
        self.timeout_s = timeout_s
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout_s)  # control messages; the data path waits with select()
        try:
            self._sock.connect(socket_path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self._sock.close()
            raise ServiceGone(f"no nvmevfio service on {socket_path} ({exc.strerror})", socket=socket_path) from None
        self._fds: list[int] = []
        self._ring_map: mmap.mmap | None = None
        self._buffers: dict[int, ServiceBuffer] = {}
        try:
            hello: dict[str, Any] = {"op": "hello", "nsid": nsid, "lane": lane}
            if queue_depth is not None:  # leave the rest of the grant's depth to this uid's other sessions
                hello["queue_depth"] = queue_depth
            reply, fds = self._call(hello)
            if len(fds) != 3:
                raise ServiceGone("the service's hello carried no ring", socket=socket_path)
            ring_fd, self._doorbell, self._completion = fds
            self._fds = fds
            size = os.fstat(ring_fd).st_size
            self._ring_map = mmap.mmap(ring_fd, size, flags=mmap.MAP_SHARED)
            request = SQE if lane == "validated" else rings.REQUEST
            self._ring = rings.SharedRings(np.frombuffer(self._ring_map, dtype=np.uint8), request=request)
        except BaseException:
            self.close()
            raise
        info = dict(reply["info"])
        self.writable: bool = info.pop("writable")
        self.dma_memory: int = info.pop("dma_memory")
        self.lane: str = info.pop("lane")
        self.page_size: int = info.pop("page_size")  # CC.MPS: the unit of PRP entries
        self.info = DeviceInfo(**info)
        self.nsid = self.info.nsid
        self.block_size = self.info.block_size
        self.block_count = self.info.block_count
        self._sq_tail = 0
        self._cq_head = 0
        self._next_tag = 1
        self._pending: dict[int, int] = {}  # tag -> 1, submitted and not reaped
        self._done: list[np.ndarray] = []  # reaped from the ring, not yet returned
        self._staging: ServiceBuffer | None = None

    # ------------------------------------------------------------------ control
    def _call(self, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        try:
            try:
                send(self._sock, message)
                reply, fds = receive(self._sock)
            except (BrokenPipeError, ConnectionResetError):
                reply, fds = self._last_word()
                if reply is None:
                    raise
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ServiceGone(f"the nvmevfio service went away ({exc.strerror}); reconnect") from None
        except TimeoutError:
            raise ServiceGone(f"the nvmevfio service did not answer {message.get('op')!r} within "
                              f"{self.timeout_s:g} s", reason="service-unresponsive") from None
        if reply is None:
            raise ServiceGone("the nvmevfio service went away (its socket closed); reconnect")
        if not reply.get("ok"):
            raise Refused(str(reply.get("reason", "refused")), str(reply.get("message", "refused by the service")))
        return reply, fds

    def _last_word(self) -> tuple[dict[str, Any] | None, list[int]]:
        """What the daemon said before it hung up (it refuses a peer without a grant, or with too
        many connections, and closes at once: the hello may meet a closed socket, or the reset
        may be reported before the refusal), if anything."""
        self._sock.setblocking(False)
        try:
            return receive(self._sock)
        except OSError:
            return None, []

    def status(self) -> dict[str, Any]:
        """This session's counters (buffers, DMA bytes, requests, refusals) from the daemon."""
        reply, _ = self._call({"op": "status"})
        return reply

    def alloc_buffer(self, nbytes: int) -> ServiceBuffer:
        """A DMA buffer of ``nbytes`` (the grant's dma_memory caps the total)."""
        reply, fds = self._call({"op": "alloc", "size": int(nbytes)})
        if len(fds) != 1:
            raise ServiceGone("the service's buffer carried no memory")
        try:
            size = os.fstat(fds[0]).st_size
            mm = mmap.mmap(fds[0], size, flags=mmap.MAP_SHARED)
        finally:
            os.close(fds[0])
        buf = ServiceBuffer(reply["buffer"], reply["generation"], reply["size"],
                            np.frombuffer(mm, dtype=np.uint8)[: reply["size"]], mm, reply.get("iova"))
        self._buffers[buf.id] = buf
        return buf

    def free_buffer(self, buf: ServiceBuffer) -> None:
        """The daemon scrubs and unmaps it; the handle is stale afterwards."""
        self._call({"op": "free", "buffer": buf.id, "generation": buf.generation})
        self._buffers.pop(buf.id, None)
        buf.array = np.empty(0, dtype=np.uint8)
        mm, buf._map = buf._map, None
        if mm is not None:
            with contextlib.suppress(BufferError):  # a caller's view still refers to it: it goes with that
                mm.close()

    def check_window(self, lba: int, count: int) -> None:
        """Refuse (out-of-window) blocks outside the granted window, before asking the daemon."""
        if lba < 0 or count < 0 or lba + count > self.block_count:
            raise Refused("out-of-window", f"LBA {lba}+{count} is outside the granted window of {self.block_count} "
                          "blocks", lba=lba, count=count, blocks=self.block_count)

    # ------------------------------------------------------------------ batches
    def _submit(self, opcode: int, lbas: Any, counts: Any, buf: ServiceBuffer | None, offsets: Any) -> np.ndarray:
        if self.lane != "default":
            raise Refused("lane-unsupported", "in the validated lane requests are raw entries: use submit_raw()")
        lbas = np.atleast_1d(np.asarray(lbas, dtype=np.int64))
        counts = np.broadcast_to(np.asarray(counts, dtype=np.int64), lbas.shape)
        offsets = np.broadcast_to(np.asarray(offsets, dtype=np.int64), lbas.shape)
        n = len(lbas)
        self._check_batch(n)
        if (lbas < 0).any() or (counts < 0).any() or (offsets < 0).any():
            raise Refused("out-of-window", "negative LBA, count or offset")
        entries = np.zeros(n, dtype=rings.REQUEST)
        tags = np.arange(self._next_tag, self._next_tag + n, dtype=np.int64) & 0xFFFFFFFF
        self._next_tag = (self._next_tag + n) & 0xFFFFFFFF or 1
        entries["opcode"] = opcode
        entries["tag"] = tags
        entries["lba"] = lbas
        entries["count"] = counts
        entries["offset"] = offsets
        if buf is not None:
            entries["buffer"] = buf.id
            entries["generation"] = buf.generation
        self._publish(entries, tags)
        return tags

    def submit_raw(self, entries: np.ndarray) -> np.ndarray:
        """The validated (Model B) lane: publish raw 64-byte NVMe submission entries (spec.SQE
        records, PRPs pointing at this client's buffers' ``iova``, PRP-list pages in them too)
        and ring once. Each entry's CID is its tag in :meth:`reap`. The daemon's validator checks
        every one before the device sees it; a refused one completes with its label."""
        if self.lane != "validated":
            raise Refused("lane-unsupported", "raw entries go through the validated lane: "
                          "connect(..., lane=\"validated\")")
        entries = np.asarray(entries, dtype=SQE).reshape(-1)
        self._check_batch(len(entries))
        tags = entries["cid"].astype(np.int64)
        self._publish(entries, tags)
        return tags

    def _check_batch(self, n: int) -> None:
        if n > self.info.queue_depth:
            raise Refused("count-out-of-range", f"{n} requests in one batch: at most the queue depth "
                          f"{self.info.queue_depth}", count=n)

    def _publish(self, entries: np.ndarray, tags: np.ndarray) -> None:
        """Requests into the shared ring once it has room (the daemon takes them as its depth
        allows), one doorbell for the batch; their tags are in flight from here."""
        deadline = time.monotonic() + self.timeout_s
        while self._ring.request_room(self._sq_tail) < len(entries):
            self._wait(deadline)
        self._sq_tail = self._ring.put_requests(self._sq_tail, entries)
        self._ring_doorbell()
        self._pending.update(dict.fromkeys(tags.tolist(), 1))

    def _ring_doorbell(self) -> None:
        try:
            os.eventfd_write(self._doorbell, 1)  # one doorbell per batch
        except OSError as exc:
            raise ServiceGone(f"the nvmevfio service went away ({exc})") from None

    def submit_reads(self, lbas: Any, counts: Any, buf: ServiceBuffer, offsets: Any) -> np.ndarray:
        """Post a batch of reads (one eventfd write); returns their tags. Collect with :meth:`reap`."""
        return self._submit(rings.READ, lbas, counts, buf, offsets)

    def submit_writes(self, lbas: Any, counts: Any, buf: ServiceBuffer, offsets: Any) -> np.ndarray:
        return self._submit(rings.WRITE, lbas, counts, buf, offsets)

    def in_flight(self) -> int:
        return len(self._pending)

    def capacity(self) -> int:
        return self.info.queue_depth

    def _wait(self, deadline: float) -> None:
        """Until the daemon posts completions (or frees request slots), or it goes away."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise Refused("command-timeout", f"the service did not answer within {self.timeout_s:g} s")
        sock = self._sock.fileno()
        poller = select.poll()  # not select(): a process may hold descriptors past FD_SETSIZE
        poller.register(self._completion, select.POLLIN)
        poller.register(sock, select.POLLIN)
        ready = [fd for fd, _ in poller.poll(left * 1000)]
        if sock in ready:
            try:
                data = self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except OSError:
                data = b""
            if not data:
                raise ServiceGone("the nvmevfio service went away (its socket closed); reconnect")
        if self._completion in ready:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._completion)

    def _collect(self) -> int:
        try:
            got, self._cq_head = self._ring.take_completions(self._cq_head)
        except rings.RingBroken as exc:  # the daemon ended the session (or stopped) and zeroed the ring
            raise ServiceGone(f"the nvmevfio service ended this session ({exc}); reconnect") from None
        if len(got):
            self._done.append(got)
            if self._ring.requests_waiting(self._sq_tail):
                # the daemon holds requests back while the completion ring is full: room again
                self._ring_doorbell()
        return len(got)

    def reap(self, minimum: int = 1, timeout_s: float | None = None) -> np.ndarray:
        """Completions (at least ``minimum`` while any are in flight) as records of ``tag``,
        ``status`` (0: success; the NVMe status field otherwise) and ``reason`` (the name of
        the service's refusal, or "")."""
        minimum = min(minimum, len(self._pending))
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        have = sum(len(d) for d in self._done) + self._collect()
        while have < minimum:
            self._wait(deadline)
            have += self._collect()
        got = np.concatenate(self._done) if self._done else np.empty(0, dtype=rings.COMPLETION)
        self._done = []
        out = np.zeros(len(got), dtype=RECORD)
        out["tag"] = got["tag"]
        refused = got["status"] == rings.SERVICE_REFUSED
        out["status"] = got["status"]
        out["reason"] = [rings.REASONS[r] if f else "" for r, f in zip(got["reason"].tolist(), refused.tolist())]
        for t in out["tag"].tolist():
            self._pending.pop(t, None)
        return out

    # ------------------------------------------------------------------ synchronous verbs
    def _one(self, opcode: int, lba: int, count: int, buf: ServiceBuffer | None, offset: int, name: str) -> None:
        if self._pending:
            raise Refused("queue-busy", f"{len(self._pending)} batched request(s) in flight; reap them first")
        tag = int(self._submit(opcode, [lba], [count], buf, [offset])[0])
        rec = self.reap(1)
        row = rec[rec["tag"] == tag][0]
        if row["reason"]:
            raise Refused(str(row["reason"]), f"{name} of {count} block(s) at LBA {lba} refused by the service: "
                          f"{row['reason']}", lba=lba, count=count)
        if row["status"]:
            raise command_error(int(row["status"]), name, slba=lba, count=count)

    def read_into(self, lba: int, count: int, buf: ServiceBuffer, offset: int = 0) -> None:
        self._split(rings.READ, lba, count, buf, offset, "Read")

    def write_from(self, lba: int, count: int, buf: ServiceBuffer, offset: int = 0) -> None:
        self._split(rings.WRITE, lba, count, buf, offset, "Write")

    def _split(self, opcode: int, lba: int, count: int, buf: ServiceBuffer, offset: int, name: str) -> None:
        step = max(1, self.info.max_transfer_bytes // self.block_size - 1)  # room for an in-page offset
        for start in range(0, max(count, 1), step):
            n = min(step, count - start) if count else count
            self._one(opcode, lba + start, n, buf, offset + start * self.block_size, name)

    def _staging_buf(self) -> ServiceBuffer:
        if self._staging is None:
            self._staging = self.alloc_buffer(min(self.info.max_transfer_bytes, 1 << 20, self.dma_memory))
        return self._staging

    def read_blocks(self, lba: int, count: int) -> np.ndarray:
        out = np.empty(count * self.block_size, dtype=np.uint8)
        staging = self._staging_buf()
        per = max(1, staging.size // self.block_size)
        for start in range(0, count, per):
            n = min(per, count - start)
            self.read_into(lba + start, n, staging)
            out[start * self.block_size : (start + n) * self.block_size] = staging.array[: n * self.block_size]
        return out

    def write_blocks(self, lba: int, data: Any) -> int:
        src = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
        if len(src) % self.block_size:
            raise Refused("length-mismatch", f"{len(src)} bytes is not a whole number of {self.block_size}-byte "
                          "blocks", length=len(src))
        count = len(src) // self.block_size
        staging = self._staging_buf()
        per = max(1, staging.size // self.block_size)
        for start in range(0, count, per):
            n = min(per, count - start)
            staging.array[: n * self.block_size] = src[start * self.block_size : (start + n) * self.block_size]
            self.write_from(lba + start, n, staging)
        return count

    def flush(self) -> None:
        self._one(rings.FLUSH, 0, 0, None, 0, "Flush")

    def write_zeroes(self, lba: int, count: int) -> None:
        self._one(rings.WRITE_ZEROES, lba, count, None, 0, "Write Zeroes")

    def deallocate(self, lba: int, count: int) -> None:
        self._one(rings.DEALLOCATE, lba, count, None, 0, "Dataset Management (deallocate)")

    # ------------------------------------------------------------------ perf (nvmevfio.perf.run)
    def register_buffer(self, buf: ServiceBuffer, slot_size: int) -> ServiceSlots:
        """``buf`` cut into slots of ``slot_size`` bytes for :meth:`perf_loop` (the daemon authored
        its pages' PRPs when it mapped it: nothing more to register)."""
        if not buf.live or buf.id not in self._buffers:
            raise Refused("stale-handle", f"buffer {buf.id} is not a live buffer of this session")
        if slot_size <= 0 or slot_size % 4 or slot_size > buf.size:
            raise Refused("length-mismatch", f"slot size {slot_size}: dword aligned, at most the buffer's {buf.size}")
        return ServiceSlots(buf, slot_size, buf.size // slot_size)

    def perf_loop(self, reg: ServiceSlots, *, io_size: int, lba_range: tuple[int, int], random: bool,
                  read_pct: int, depth: int, max_ios: int = 0, seed: int = 1) -> ServicePerfLoop:
        """A workload for the client's C closed loop over the shared rings (``nvmevfio.perf.run``
        drives it): LBAs in ``lba_range`` of the window, ``depth`` requests kept published."""
        return ServicePerfLoop(self, reg, io_size=io_size, lba_range=lba_range, random=random, read_pct=read_pct,
                               depth=depth, max_ios=max_ios, seed=seed)

    @staticmethod
    def doorbell_counters() -> dict[str, int]:
        """The device's doorbells are the daemon's: nothing is counted on this side."""
        return dict.fromkeys(DOORBELL_COUNTERS, 0)

    def file(self) -> BlockFile:
        """A seekable binary file over the window."""
        return BlockFile(self)  # type: ignore[arg-type]  # the same verbs BlockFile uses

    # ------------------------------------------------------------------ the end
    def close(self) -> None:
        """Hang up: the daemon waits for anything in flight, then scrubs this session's memory."""
        for buf in self._buffers.values():
            buf.array = np.empty(0, dtype=np.uint8)
        self._buffers.clear()
        if getattr(self, "_ring", None) is not None:
            self._ring.close()
        if self._ring_map is not None:
            with contextlib.suppress(BufferError):
                self._ring_map.close()
            self._ring_map = None
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self._sock.close()

    def __enter__(self) -> ServiceDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(socket_path: str = DEFAULT_SOCKET, nsid: int = 1, *, lane: str = "default",
            timeout_s: float = DEFAULT_TIMEOUT_S, queue_depth: int | None = None) -> ServiceDevice:
    """Connect to ``nvmevfio serve`` on ``socket_path`` as whoever this process is (the daemon
    asks the kernel): the namespace window your grant gives, LBA 0 at its start. Refused
    ``no-grant`` without one; :class:`ServiceGone` when no daemon is there or it went away.
    ``queue_depth``: at most this many of the grant's queue depth, which this uid's sessions
    share (without it, a session takes what the others left)."""
    return ServiceDevice(socket_path, nsid, lane=lane, timeout_s=timeout_s, queue_depth=queue_depth)


@dataclass(frozen=True, eq=False)
class ServiceSlots:
    """A service buffer cut into equal slots, one per request of a perf loop."""

    buffer: ServiceBuffer
    slot_size: int
    slots: int


class ServicePerfLoop(PerfCounters):
    """``nvmevfio perf`` through the service: the client's closed loop in C
    (``nv_svc_client_perf``) publishes requests into its shared ring, one doorbell per batch,
    and reaps completions into the same histogram and counters as the in-process loop."""

    def __init__(self, dev: ServiceDevice, reg: ServiceSlots, *, io_size: int, lba_range: tuple[int, int],
                 random: bool, read_pct: int, depth: int, max_ios: int, seed: int) -> None:
        if dev.lane != "default":
            raise Refused("lane-unsupported", "perf through the service uses the default lane")
        if dev._pending:
            raise Refused("queue-busy", f"{len(dev._pending)} request(s) in flight; reap them first")
        bs = dev.block_size
        lo, hi = lba_range
        if io_size <= 0 or io_size % bs or io_size > reg.slot_size:
            raise Refused("length-mismatch", f"I/O size {io_size}: a multiple of {bs} bytes, at most the slot's "
                          f"{reg.slot_size}")
        if not (0 <= lo < hi <= dev.block_count) or hi - lo < io_size // bs:
            raise Refused("out-of-window", f"range {lo}..{hi} does not fit the window of {dev.block_count} blocks")
        if not 1 <= depth <= min(reg.slots, dev.info.queue_depth):
            raise Refused("count-out-of-range", f"depth {depth}: 1..{min(reg.slots, dev.info.queue_depth)} "
                          "(the slots and the granted queue depth)")
        self.dev, self.reg = dev, reg
        nlb = io_size // bs
        p = self._setup(nlb=nlb, block_size=bs, lba_lo=lo, positions=(hi - lo) // nlb, random=random,
                        read_pct=read_pct, depth=depth, nslots=reg.slots, max_ios=max_ios, seed=seed,
                        timeout_s=dev.timeout_s)
        p.buf_slot, p.buf_gen = reg.buffer.id, reg.buffer.generation
        self.issued_ns = np.zeros(reg.slots, dtype=np.int64)
        self._tail = ffi.new("uint32_t *")  # the device's ring indices while C runs
        self._head = ffi.new("uint32_t *")
        self._ptrs = dev._ring.pointers()

    def _run(self, slice_s: float, drain: bool) -> bool:
        dev = self.dev
        header, requests, completions = self._ptrs
        self._tail[0], self._head[0] = dev._sq_tail, dev._cq_head
        r = int(lib.nv_svc_client_perf(header, requests, completions, dev._ring.depth, dev._doorbell,
                                       dev._completion, dev._sock.fileno(), self._p, self.reg.slot_size,
                                       ffi.cast("int64_t *", self.issued_ns.ctypes.data), self._tail, self._head,
                                       int(slice_s * 1e9), int(drain)))
        dev._sq_tail, dev._cq_head = int(self._tail[0]), int(self._head[0])
        if r == -errno.EPIPE:
            raise ServiceGone("the nvmevfio service went away (its socket closed); reconnect")
        if r == -errno.ETIMEDOUT:
            raise Refused("command-timeout", f"the service completed nothing within {dev.timeout_s:g} s "
                          f"({self._in_flight()} request(s) in flight)")
        if r < 0:
            raise ServiceGone(f"the service's completion ring broke the protocol ({os.strerror(-r)})")
        return r == 1
