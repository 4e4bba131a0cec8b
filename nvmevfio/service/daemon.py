"""``nvmevfio serve``: the broker as a service for unprivileged clients (issue #9).

The daemon (root) owns the controller: it enables it, creates one NVMe I/O queue pair per
client slot, and listens on a Unix socket. A connecting peer is who the kernel says it is
(SO_PEERCRED); its grant (:mod:`nvmevfio.service.grants`) decides whether it may connect at
all, which namespace window it sees (its LBA 0 is the window's first block), read-only or
read-write, and its queue-depth and DMA-memory quotas.

Control messages (JSON, one per SOCK_SEQPACKET datagram; file descriptors ride along with
SCM_RIGHTS): ``hello`` (answered with the window's info, the ring memfd and two eventfds),
``alloc`` (a DMA buffer: a sealed memfd the daemon mapped into the IOMMU; the client never
learns its IOVA), ``free``, ``info``. The data path is the shared rings of
:mod:`nvmevfio.service.ring`, one eventfd write per batch each way. Every request is checked
against the grant before it reaches the client's own queue pair; a refusal completes it with
a named reason. The default lane's per-request work is C (:class:`FastPath`, cbits/service.c):
the steady state runs in ``nv_svc_serve`` over every such session and comes back to Python
only for what needs it (a control message, a held request, a late command). The validated
lane's entries go through :mod:`nvmevfio.service.validator`. A client that goes away (SIGKILL
included) loses its session: its commands are waited for, its buffers scrubbed and unmapped,
its queue pair given to the next client.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import mmap
import os
import resource
import selectors
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nvmevfio._ffi import ffi, lib
from nvmevfio.dma import DmaBuffer, align_up
from nvmevfio.errors import CommandError, NvmeVfioError, Refused
from nvmevfio.nvme.spec import SQE, IoOpcode
from nvmevfio.provider import Provider
from nvmevfio.service import DEFAULT_SOCKET, validator
from nvmevfio.service import ring as rings
from nvmevfio.service.grants import GrantsError, ServiceGrant, connection_cap, grant_for

log = logging.getLogger(__name__)

MAX_MESSAGE = 65536
MAX_FDS = 4
# Polled queues: how long the C loop keeps spinning after its last request or completion before
# it sleeps on the doorbells. Clients see it spin (ring.py's DAEMON_POLLING) and skip their
# doorbell; a closed-loop client's next batch is then taken without waking a sleeping CPU,
# which costs more under TCG than the whole batch's work.
IDLE_SPIN_S = 0.001
POLL_S = 0.0  # with commands in flight on polled queues (no MSI-X): look again at once (a busy CPU)
# connections taken per turn of the loop: a flood of them does not starve the clients (a client's
# command waits a turn or two; under the TCG guest 64 a turn made a prober's write-and-read 0.86 s)
ACCEPT_BURST = 16
# control messages and hang-ups taken per turn of the loop, for the same reason: a peer that
# closes 400 connections at once made 400 hang-ups in one selector batch (1.8 s under TCG) while
# the default lane's sessions waited for the loop to come back to C. The selector is level-
# triggered: what is left over is reported again on the next turn.
CONTROL_PER_TURN = 16
# The validated lane's Dataset Management runs one deallocate command per range (the broker's
# verb); a turn of the loop runs at most this many, so that other clients' commands go in between.
DSM_RANGES_PER_TURN = 8


class ProtocolError(NvmeVfioError, ValueError):
    """A control message that is not one: truncated, not JSON, nested past what a parser may
    recurse into, or not a JSON object. The daemon hangs up on its sender (only)."""

    reason = "bad-message"


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None, flags: int = 0) -> None:
    """One control message (JSON), with file descriptors (SCM_RIGHTS) when given. The daemon
    passes MSG_DONTWAIT: a reply that does not fit the peer's queue raises BlockingIOError."""
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(sock, [data], fds, flags)
    else:
        sock.send(data, flags)


def receive(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One control message and its file descriptors; (None, []) when the peer has gone."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    if flags & socket.MSG_CTRUNC or flags & socket.MSG_TRUNC:
        for fd in fds:
            os.close(fd)
        raise ProtocolError("control message truncated", length=len(data))
    try:
        message = json.loads(data)
    except RecursionError:  # b"[" * 60000: the parser recurses once per level
        raise ProtocolError("control message nested too deeply", length=len(data)) from None
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ProtocolError(f"control message is not JSON: {exc}", length=len(data)) from None
    if not isinstance(message, dict):
        raise ProtocolError("a control message is a JSON object", length=len(data))
    return message, fds


def _discard(sock: socket.socket, most: int = 4) -> None:
    """Read and drop what a peer about to be refused sent already (its hello): a socket closed
    with unread data makes the peer's next receive fail ECONNRESET instead of giving it the
    refusal. Non-blocking; descriptors that came along are closed."""
    for _ in range(most):
        try:
            _, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS, socket.MSG_DONTWAIT)
        except OSError:
            return
        for fd in fds:
            os.close(fd)


def raise_fd_limit() -> tuple[int, int]:
    """RLIMIT_NOFILE's soft limit up to its hard limit (every connection costs a descriptor, a
    session four more, a buffer one): (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard
    if hard == resource.RLIM_INFINITY:  # the kernel's own ceiling (fs.nr_open) then
        try:
            with open("/proc/sys/fs/nr_open") as f:
                want = int(f.read())
        except (OSError, ValueError):
            want = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the file descriptor limit from %d to %d: %s", soft, want, exc)
            return soft, soft
        return soft, want
    return soft, soft


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer, from the kernel (SO_PEERCRED), never from the peer."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def _supplementary_groups(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return [int(g) for g in line.split()[1:]]
    except OSError:
        pass
    return []


def _status_field(exc: CommandError) -> int:
    """The NVMe status field (without the phase tag) a client's completion carries for it."""
    return (exc.dnr << 14) | (exc.sct << 8) | exc.sc


def _ring_memory(size: int) -> tuple[int, mmap.mmap]:
    """A sealed memfd (its size cannot change under the daemon) and the daemon's mapping."""
    import fcntl

    fd = os.memfd_create("nvmevfio-ring", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        return fd, mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
    except BaseException:
        os.close(fd)
        raise


class FastPath:
    """A default-lane session's compiled data path (``struct nv_svc``, cbits/service.c): its
    shared rings, grant and buffer table as C sees them. C takes each request, checks it and
    posts it on the session's queue pair with PRPs copied from page tables the broker authored
    (:meth:`Provider.service_buffer`); the daemon's Python runs per batch, not per request."""

    def __init__(self, provider: Provider, ring: rings.SharedRings, qid: int, grant: ServiceGrant, doorbell: int,
                 completion: int) -> None:
        self.ring = ring  # kept alive: C points into its memory
        svc = ffi.new("struct nv_svc *")
        svc.header, svc.requests, svc.completions = ring.pointers()
        svc.depth, svc.doorbell_fd, svc.completion_fd = ring.depth, doorbell, completion
        ns = provider.namespace(grant.nsid)
        svc.nsid, svc.writable = grant.nsid, int(grant.writable)
        svc.first_lba, svc.blocks = grant.first_lba, grant.blocks
        svc.block_size = ns.block_size
        svc.next_buffer = 1
        provider.service_attach(qid, svc)
        n = int(svc.ncids)
        self._cids = [ffi.new(f"{t}[]", n) for t in ("int64_t", "uint32_t", "uint64_t", "uint32_t")]
        svc.cid_tag, svc.cid_buffer, svc.cid_offset, svc.cid_length = self._cids
        self.svc = svc
        self._table = ffi.new("struct nv_svc_buffer[]", 8)
        self._sync_table()

    def _sync_table(self) -> None:
        self.svc.buffers, self.svc.nbuffers = self._table, len(self._table)

    def add(self, provider: Provider, ident: int, buf: DmaBuffer) -> None:
        """Buffer ``ident`` into the table (grown as ids grow), described by the broker."""
        if ident >= len(self._table):
            bigger = ffi.new("struct nv_svc_buffer[]", max(2 * len(self._table), ident + 1))
            ffi.memmove(bigger, self._table, ffi.sizeof(self._table))
            self._table = bigger
            self._sync_table()
        provider.service_buffer(self._table + ident, buf)
        self.svc.next_buffer = max(int(self.svc.next_buffer), ident + 1)

    def remove(self, ident: int) -> None:
        """Buffer ``ident`` freed: a request naming it is refused stale-generation from now on."""
        size = ffi.sizeof("struct nv_svc_buffer")
        ffi.memmove(self._table + ident, bytes(size), size)

    def take_held(self) -> tuple[int, int, int, int] | None:
        """The request C held back (see ``Service._run_sync``): (opcode, lba, count, tag)."""
        svc = self.svc
        if not svc.has_held:
            return None
        svc.has_held = 0
        h = svc.held
        return int(h.opcode), int(h.lba), int(h.count), int(h.tag)


@dataclass(eq=False)
class Deallocating:
    """A validated-lane Dataset Management entry being run, a few ranges a turn: its tag, the
    (SLBA, NLB) ranges left from the validator's checked copy, and its status so far."""

    tag: int
    ranges: list[tuple[int, int]]
    status: int = 0
    reason: str = ""


@dataclass(eq=False)
class Session:
    """One connected client."""

    sock: socket.socket
    pid: int
    uid: int
    gid: int
    grant: ServiceGrant | None = None
    qid: int = 0
    depth: int = 0
    ring: rings.SharedRings | None = None
    ring_fd: int = -1
    ring_map: mmap.mmap | None = None
    doorbell: int = -1  # eventfd: the client rang (requests waiting)
    completion: int = -1  # eventfd: the daemon posted completions
    buffers: dict[int, DmaBuffer] = field(default_factory=dict)
    next_buffer: int = 1
    dma_bytes: int = 0
    sq_head: int = 0
    cq_tail: int = 0
    # the validated lane's book-keeping (the default lane's is in FastPath's struct nv_svc)
    tags: dict[int, int] = field(default_factory=dict)  # broker tag -> client tag, in flight
    backlog: list[np.ndarray] = field(default_factory=list)  # completions the ring had no room for
    closing: bool = False
    requests: int = 0
    refused: int = 0
    lane: str = "default"
    serial: int = 0  # tells two sessions of one process apart
    freed: list[validator.Region] = field(default_factory=list)  # validated lane: quarantined IOVAs
    regions: tuple[int, validator.RegionMap] | None = None  # (ledger version, map) last built
    fast: FastPath | None = None  # the default lane's compiled data path
    dsm: Deallocating | None = None  # validated lane: a Dataset Management entry being run
    deferred: np.ndarray | None = None  # validated lane: entries taken after it, checked once it is done

    @property
    def name(self) -> str:
        return f"client pid {self.pid} uid {self.uid}"

    @property
    def connected(self) -> bool:
        """Whether it ever opened a session (a grant, a queue); buffers come only after that."""
        return self.grant is not None

    @property
    def owner(self) -> str:
        """This session's name in the DMA ledger (and the validator's region map)."""
        return f"client:{self.uid}:{self.pid}:{self.serial}"

    @property
    def in_flight(self) -> int:
        """Requests taken and not yet completed to the client."""
        return int(self.fast.svc.in_flight) if self.fast is not None else len(self.tags)

    @property
    def counters(self) -> tuple[int, int]:
        """(requests taken, requests refused)."""
        if self.fast is not None:
            return int(self.fast.svc.taken), int(self.fast.svc.refused)
        return self.requests, self.refused


class Service:
    """The daemon: :meth:`start`, then :meth:`serve` until :meth:`stop` (or SIGTERM)."""

    def __init__(self, provider: Provider, grants: list[ServiceGrant], socket_path: str = DEFAULT_SOCKET, *,
                 clients: int = 4, queue_depth: int = 64, irq: bool = True,
                 idle_spin_s: float = IDLE_SPIN_S, address: str = "") -> None:
        self.provider = provider
        self.grants = grants
        self.socket_path = socket_path
        self.clients = clients
        self.queue_depth = queue_depth
        self.irq = irq
        self.idle_spin_s = idle_spin_s
        self.address = address
        self.sessions: dict[int, Session] = {}  # by control socket fd
        self.connections: dict[int, int] = {}  # open connections by uid (the grants cap them)
        self._free_qids: list[int] = []
        # What Python waits for: the listener, the wake pipe, every control socket, the validated
        # lane's doorbells and interrupts. The C loop waits on this epoll's one descriptor beside
        # its sessions' eventfds, so that no number of idle sockets crowds those out.
        self._selector = selectors.EpollSelector()
        self._reserve = -1  # a descriptor given up to take (and close) a connection at EMFILE
        self._shed_logged = 0.0
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.id_ctrl: dict[str, Any] = {}
        self._serial = 0
        self._turn = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Enable the controller, one I/O queue pair per client slot, check every grant against
        its namespace, then listen (mode 0666: the grants, not file modes, decide who gets in)."""
        p = self.provider
        if p.state != "ready":
            p.enable()
        self.id_ctrl = p.identify_controller()
        depth = p.create_io_queues(self.clients, self.queue_depth, irq=self.irq)
        self.queue_depth = depth
        self._free_qids = list(range(self.clients, 0, -1))
        for i, g in enumerate(self.grants, 1):
            try:
                ns = p.namespace(g.nsid)
            except NvmeVfioError as exc:
                raise GrantsError(f"grant {i}: namespace {g.nsid}: {exc}") from None
            if g.first_lba + g.blocks > ns.size_blocks:
                raise GrantsError(f"grant {i}: window {g.first_lba}+{g.blocks} passes the end of namespace "
                                  f"{g.nsid} ({ns.size_blocks} blocks)")
        os.makedirs(os.path.dirname(self.socket_path) or ".", mode=0o755, exist_ok=True)
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)  # a stale socket of an earlier daemon
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        listener.bind(self.socket_path)
        os.chmod(self.socket_path, 0o666)
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        self._selector.register(listener, selectors.EVENT_READ, ("accept", None))
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        before, limit = raise_fd_limit()
        self._reserve = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        room = limit - len(os.listdir("/proc/self/fd"))
        log.info("serving %s on %s: %d client slot(s), queue depth %d, %s", self.address or "controller",
                 self.socket_path, self.clients, depth, "MSI-X" if self._irq_fd(1) is not None else "polled")
        log.info("file descriptor limit %d (was %d): room for about %d connections, less 4 a session and 1 a "
                 "buffer; a uid's connections capped by its grants", limit, before, room)

    def stop(self) -> None:
        """Ask :meth:`serve` to return (thread- and signal-safe)."""
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def serve(self) -> None:
        """The event loop: new connections, control messages, client doorbells, completions."""
        while not self._stop.is_set():
            controls = 0
            for key, _ in self._selector.select(self._serve_fast()):
                kind, session = key.data
                if kind == "accept":
                    self._accept()
                elif kind == "wake":
                    os.read(self._wake_r, 64)
                elif kind == "control":
                    if session.closing or controls >= CONTROL_PER_TURN:
                        continue
                    controls += 1
                    try:
                        self._control(session)
                    except Exception:  # a bug met by one client's message costs that client only
                        log.exception("%s: its control message failed; closing its session", session.name)
                        self._hang_up(session)
                elif kind == "doorbell":
                    if session.closing:  # hung up earlier in this same batch of events: its fds are gone
                        continue
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(session.doorbell)
                    try:
                        self._pump(session)
                    except Exception:  # one client's trouble is not every client's: it loses its session
                        log.exception("%s: its requests failed; closing its session", session.name)
                        self._hang_up(session)
                elif kind == "irq":
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(key.fd)
            self._reap_all()

    def _serve_fast(self) -> float | None:
        """The default lane's steady state, in C (``nv_svc_serve``: every such session's requests
        taken and posted, completions reaped, round robin) until Python is needed: a control
        message, a new client, a validated-lane doorbell, a held request, a signal. Returns the
        selector's timeout for what follows."""
        polled = self._irq_fd(1) is None
        fast = [(s, s.fast) for s in self.sessions.values() if s.fast is not None and not s.closing]
        slow = [s for s in self.sessions.values() if s.fast is None and not s.closing]
        slow_busy = (polled and any(s.in_flight for s in slow)) or any(s.dsm is not None for s in slow)
        if not fast:
            return POLL_S if slow_busy else None
        # the default lane's doorbells and interrupts are C's alone (never in the selector): C
        # watches the selector's epoll descriptor for everything else
        event, i = self.provider.service_serve([(s.qid, f.svc) for s, f in fast], [self._selector.fileno()],
                                               0.0 if slow_busy else 1.0, self.idle_spin_s)
        if event == lib.NV_SVC_HELD:
            self._run_held(fast[i][0])
        return 0.0

    def close(self) -> None:
        """Every session ended (commands waited for, memory scrubbed), socket removed. Once."""
        if self._wake_r < 0:
            return
        for fd, s in list(self.sessions.items()):
            self._hang_up(s)  # no more requests; finished at once when nothing is in flight
            if self.sessions.get(fd) is s:
                self._finish(s)  # waits for its commands
        if self._listener is not None:
            self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)
        self._selector.close()
        for fd in (self._wake_r, self._wake_w, self._reserve):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = self._reserve = -1

    @property
    def wake_fd(self) -> int:
        """Written to wake :meth:`serve` (a signal's wakeup fd)."""
        return self._wake_w

    def _irq_fd(self, qid: int) -> int | None:
        return self.provider.completion_fd(qid) if self.irq else None

    # ------------------------------------------------------------------ connections
    def _accept(self) -> None:
        """Up to ACCEPT_BURST waiting connections. Out of descriptors (EMFILE/ENFILE), the oldest
        waiting one is taken with the reserve descriptor and closed at once: the daemon goes on,
        and the listener does not stay readable for nothing."""
        listener = self._listener
        if listener is None:
            return
        for _ in range(ACCEPT_BURST):
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self._shed(listener, exc)
                else:  # ECONNABORTED and the like: that connection only
                    log.info("accept: %s", exc)
                continue
            self._admit(conn)

    def _shed(self, listener: socket.socket, exc: OSError) -> None:
        """Out of descriptors: the reserve one given up to take the waiting connection and close
        it (its peer sees its socket closed), then taken back."""
        if self._reserve >= 0:
            os.close(self._reserve)
            self._reserve = -1
        with contextlib.suppress(OSError):
            listener.accept()[0].close()
        with contextlib.suppress(OSError):
            self._reserve = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        now = time.monotonic()
        if now - self._shed_logged >= 1.0:  # once a second at most: a flood does not flood the log
            self._shed_logged = now
            log.warning("out of file descriptors (%s) with %d connection(s) open: closing new ones", exc.strerror,
                        len(self.sessions))

    def _admit(self, conn: socket.socket) -> None:
        """A new connection: closed at once when its peer (as the kernel says) has no grant, or
        already holds as many connections as its grants allow; otherwise listened to. Its
        socket never blocks the daemon: a reply that does not fit hangs up on the peer."""
        try:
            pid, uid, gid = peer_credentials(conn)
        except OSError:
            conn.close()
            return
        cap = connection_cap(self.grants, uid, gid, _supplementary_groups(pid))
        held = self.connections.get(uid, 0)
        if cap == 0 or held >= cap:
            reason, text = (("no-grant", f"uid {uid} (gid {gid}) has no grant on this service") if cap == 0 else
                            ("too-many-connections", f"uid {uid} already has {held} connection(s), the most its "
                             "grant allows"))
            log.debug("client pid %d uid %d: %s: closed", pid, uid, reason)
            conn.setblocking(False)
            _discard(conn)
            with contextlib.suppress(OSError):
                send(conn, {"ok": False, "reason": reason, "message": text}, flags=socket.MSG_DONTWAIT)
            conn.close()
            return
        self._serial += 1
        session = Session(conn, pid, uid, gid, serial=self._serial)
        conn.setblocking(False)
        self.connections[uid] = held + 1
        self.sessions[conn.fileno()] = session
        self._selector.register(conn, selectors.EVENT_READ, ("control", session))

    def _control(self, s: Session) -> None:
        try:
            message, fds = receive(s.sock)
        except BlockingIOError:  # nothing after all
            return
        except (OSError, ValueError) as exc:
            log.info("%s: bad control message (%s): closing", s.name, exc)
            message, fds = None, []
        for fd in fds:  # clients have nothing to pass us
            os.close(fd)
        if message is None:
            self._hang_up(s)
            return
        op = message.get("op")
        try:
            handler = {"hello": self._hello, "alloc": self._alloc, "free": self._free, "info": self._info,
                       "status": self._status}.get(str(op))
            if handler is None:
                raise Refused("invalid-argument", f"unknown request {op!r}")
            if op != "hello" and s.ring is None:
                raise Refused("not-connected", "say hello first")
            reply, out_fds = handler(s, message)
        except NvmeVfioError as exc:
            self._reply(s, {"ok": False, "reason": exc.reason, "message": str(exc.args[0])})
            if op == "hello":
                self._hang_up(s)
        except OSError as exc:
            log.info("%s: %s: closing", s.name, exc)
            self._hang_up(s)
        except Exception as exc:  # a malformed message (a field of the wrong type...): this client only
            log.exception("%s: request %r failed; closing its session", s.name, op)
            self._reply(s, {"ok": False, "reason": "service-error", "message": f"request {op!r} failed: {exc}"})
            self._hang_up(s)
        else:
            self._reply(s, {"ok": True, **reply}, out_fds)

    def _reply(self, s: Session, message: dict[str, Any], fds: list[int] | None = None) -> None:
        """Never blocks: a peer whose socket has no room for its reply (it does not read them)
        is hung up on, as is one whose socket broke."""
        if s.closing:
            return
        try:
            send(s.sock, message, fds, flags=socket.MSG_DONTWAIT)
        except BlockingIOError:
            log.info("%s: does not read its replies: closing", s.name)
            self._hang_up(s)
        except OSError as exc:
            log.info("%s: reply failed (%s): closing", s.name, exc)
            self._hang_up(s)

    def _hello(self, s: Session, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        if s.ring is not None:
            raise Refused("invalid-argument", "already connected")
        nsid = message.get("nsid", 1)
        lane = message.get("lane", "default")
        mine = [g for g in self.grants if g.nsid == nsid]
        grant = grant_for(mine, s.uid, s.gid, _supplementary_groups(s.pid))
        if grant is None:
            log.info("%s: no grant for namespace %s: refused", s.name, nsid)
            raise Refused("no-grant", f"uid {s.uid} (gid {s.gid}) has no grant for namespace {nsid} on this service",
                          uid=s.uid, nsid=nsid)
        if lane not in grant.lanes:
            raise Refused("lane-not-granted", f"the grant does not include the {lane!r} lane", lane=lane)
        if lane not in ("default", "validated"):
            raise Refused("lane-unsupported", f"no {lane!r} lane: default or validated", lane=lane)
        if lane == "validated" and self.provider.dma_lane == "noiommu":
            raise Refused("lane-unsupported", "the validated lane needs an IOMMU: without one a client's buffers "
                          "are bounced and have no device address of their own", lane=lane)
        sharing = self._sharing(s.uid, grant)
        if len(sharing) >= grant.sessions:
            raise Refused("too-many-sessions", f"uid {s.uid} already has {len(sharing)} session(s), the most its "
                          "grant allows", uid=s.uid, sessions=grant.sessions)
        left = grant.queue_depth - sum(x.depth for x in sharing)  # the grant's depth, shared by its sessions
        if left < 1:
            raise Refused("quota-exceeded", f"uid {s.uid}'s other sessions use the grant's whole queue depth "
                          f"{grant.queue_depth}; connect them with a smaller queue_depth", quota=grant.queue_depth)
        asked = message.get("queue_depth", left)
        if not isinstance(asked, int) or isinstance(asked, bool) or asked < 1:
            raise Refused("invalid-argument", f"queue depth {asked!r}: a positive number")
        if not self._free_qids:
            raise Refused("no-client-slot", f"all {self.clients} client slots are taken; try again later")
        depth = max(1, min(asked, left, self.provider.capacity(1)))
        request = SQE if lane == "validated" else rings.REQUEST
        ring_fd, ring_map = _ring_memory(rings.ring_bytes(depth, request))
        s.ring_fd, s.ring_map = ring_fd, ring_map
        s.ring = rings.SharedRings(np.frombuffer(ring_map, dtype=np.uint8), depth, request)
        s.lane = lane
        s.doorbell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        s.completion = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        s.grant, s.depth, s.qid = grant, depth, self._free_qids.pop()
        if lane == "default":  # its doorbell and interrupts are the C loop's (see _serve_fast)
            s.fast = FastPath(self.provider, s.ring, s.qid, grant, s.doorbell, s.completion)
        else:
            self._selector.register(s.doorbell, selectors.EVENT_READ, ("doorbell", s))
            irq = self._irq_fd(s.qid)
            if irq is not None and not any(k.fd == irq for k in self._selector.get_map().values()):
                self._selector.register(irq, selectors.EVENT_READ, ("irq", None))
        log.info("%s: connected to namespace %d, window %d+%d (%s), queue %d, depth %d", s.name, grant.nsid,
                 grant.first_lba, grant.blocks, "rw" if grant.writable else "ro", s.qid, depth)
        return {"info": self._window_info(s)}, [ring_fd, s.doorbell, s.completion]

    def _sharing(self, uid: int, grant: ServiceGrant) -> list[Session]:
        """``uid``'s connected sessions under ``grant``: they share its quotas."""
        return [x for x in self.sessions.values() if x.uid == uid and x.grant is grant and x.ring is not None]

    def _window_info(self, s: Session) -> dict[str, Any]:
        g = s.grant
        assert g is not None
        ns = self.provider.namespace(g.nsid)
        return {"address": self.socket_path, "nsid": g.nsid, "block_size": ns.block_size, "block_count": g.blocks,
                "capacity_bytes": g.blocks * ns.block_size, "max_transfer_bytes": self.provider.max_transfer,
                "model": self.id_ctrl.get("mn", "").strip(), "serial": self.id_ctrl.get("sn", "").strip(),
                "firmware": self.id_ctrl.get("fr", "").strip(), "queue_depth": s.depth,
                "completion_mode": "service", "shadow_doorbells": False, "dma_lane": self.provider.dma_lane,
                "writable": g.writable, "dma_memory": g.dma_memory, "lane": s.lane,
                "page_size": self.provider.memory_page_size}

    def _info(self, s: Session, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        return {"info": self._window_info(s)}, []

    def _status(self, s: Session, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        """This session's counters (and, for root, every session's)."""
        def one(x: Session) -> dict[str, Any]:
            return {"pid": x.pid, "uid": x.uid, "qid": x.qid, "buffers": len(x.buffers), "dma_bytes": x.dma_bytes,
                    "in_flight": x.in_flight, "requests": x.counters[0], "refused": x.counters[1]}
        out: dict[str, Any] = {"session": one(s)}
        if s.uid == 0:
            out["sessions"] = [one(x) for x in self.sessions.values() if x.ring is not None]
            out["device_commands"] = self.provider.commands_completed
        return out, []

    def _alloc(self, s: Session, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        size = message.get("size")
        assert s.grant is not None
        if not isinstance(size, int) or size <= 0:
            raise Refused("invalid-argument", f"buffer size {size!r}: a positive number of bytes")
        rounded = align_up(size, mmap.PAGESIZE)
        in_use = sum(x.dma_bytes for x in self._sharing(s.uid, s.grant))  # every session of the uid's
        if in_use + rounded > s.grant.dma_memory:
            raise Refused("quota-exceeded", f"{rounded} more bytes of DMA memory would pass the grant's "
                          f"{s.grant.dma_memory} (uid {s.uid}'s sessions use {in_use})", quota=s.grant.dma_memory)
        buf = self.provider.alloc_buffer(size, shared=True, owner=s.owner)
        ident = s.next_buffer
        s.next_buffer += 1
        s.buffers[ident] = buf
        s.dma_bytes += rounded
        if s.fast is not None:
            s.fast.add(self.provider, ident, buf)
        reply: dict[str, Any] = {"buffer": ident, "generation": buf.generation, "size": size}
        if s.lane == "validated":  # Model B: the client writes device addresses itself
            reply["iova"] = self.provider.device_address(buf)
        return reply, [self.provider.buffer_memfd(buf)]

    def _free(self, s: Session, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        raw = message.get("buffer")
        ident = raw if isinstance(raw, int) else -1
        buf = s.buffers.get(ident)
        if buf is None or buf.generation != message.get("generation"):
            raise Refused("stale-handle", f"no buffer {raw!r} of that generation in this session")
        if s.lane == "validated" and s.in_flight:  # its entries may name any of its buffers
            raise Refused("buffer-in-flight", f"{s.in_flight} command(s) in flight; reap them before freeing")
        iova = self.provider.device_address(buf) if s.lane == "validated" else 0
        self.provider.free_buffer(buf)  # scrubbed, unmapped; refused (buffer-in-flight) while commands use it
        if s.fast is not None:
            s.fast.remove(ident)
        if s.lane == "validated":  # an entry naming it now is refused stale-generation, until reused
            s.freed.append(validator.Region(iova, buf.size, s.owner, buf.generation, live=False))
        del s.buffers[ident]
        s.dma_bytes -= align_up(buf.size, mmap.PAGESIZE)
        return {}, []

    # ------------------------------------------------------------------ the data path
    def _pump(self, s: Session) -> None:
        """Take what the client published (as many as its depth allows), check each request and
        post the accepted ones: the default lane's in C (cbits/service.c), which holds back what
        it cannot post itself for :meth:`_run_held`; the validated lane's here."""
        if s.ring is None or s.closing:
            return
        if s.fast is None:
            self._pump_validated(s)
            return
        self.provider.service_pump(s.qid, s.fast.svc)
        if s.fast.svc.has_held and s.in_flight == 1:
            self._run_held(s)

    def _run_held(self, s: Session) -> None:
        """The request C held back (see :meth:`_run_sync`), on the session's idle queue; then
        what the client published after it."""
        assert s.fast is not None
        held = s.fast.take_held()
        if held is None:
            return
        opcode, lba, count, tag = held
        g = s.grant
        assert g is not None
        status, reason = self._run_sync(s, opcode, g.first_lba + lba, count)
        lib.nv_svc_put(s.fast.svc, tag, rings.SERVICE_REFUSED if reason else status, rings.reason_code(reason), 0)
        self._pump(s)

    def _take(self, s: Session) -> np.ndarray:
        """The client's published requests (copies), as many as fit its depth: what is in flight,
        and completions not yet handed back, count against it."""
        assert s.ring is not None
        undelivered = s.depth - s.ring.completion_room(s.cq_tail) + sum(len(b) for b in s.backlog)
        limit = s.depth - s.in_flight - undelivered
        if limit <= 0:
            return np.empty(0, dtype=s.ring.request)
        reqs, s.sq_head = s.ring.take_requests(s.sq_head, limit)
        s.requests += len(reqs)
        return reqs

    # ------------------------------------------------------------------ Model B
    def _regions(self, s: Session) -> validator.RegionMap:
        """Who owns which device address now: every live ledger buffer, plus this session's freed
        ones where nothing was allocated since (stale-generation rather than invalid-region).
        Built again only when the ledger allocated or freed something (a free of this session's
        is one of those)."""
        version = self.provider.regions_version
        if s.regions is None or s.regions[0] != version:
            live = [validator.Region(a, n, owner, gen) for a, n, owner, gen in self.provider.device_regions()]
            s.freed = [f for f in s.freed if not any(r.start < f.end and f.start < r.end for r in live)]
            s.regions = (version, validator.RegionMap(live + s.freed))
        return s.regions[1]

    def _reader(self, s: Session) -> Any:
        """The validator's reader: a copy of the session's own memory (the addresses were
        already found to be the client's)."""
        spans = [(self.provider.device_address(b), b) for b in s.buffers.values()]

        def read(iova: int, nbytes: int) -> np.ndarray:
            for start, buf in spans:
                if start <= iova and iova + nbytes <= start + buf.array.size:
                    return buf.array[iova - start : iova - start + nbytes].copy()
            raise ValueError(f"{nbytes} bytes at {iova:#x} are not the client's")  # the validator checked first

        return read

    def _pump_validated(self, s: Session) -> None:
        """Model B: raw 64-byte entries from the client's ring. Each is copied out of the shared
        page, then checked by the validator (window, opcode, namespace, every PRP and list
        entry, ownership, bounds, alignment, chain depth); what it accepts is posted as the
        validator's copy with PRP2 authored by the broker; a refusal completes the entry with
        its label, and nothing of it reaches the device."""
        assert s.grant is not None
        if s.dsm is not None:  # the rest waits for it (see _deallocate_some)
            return
        entries, s.deferred = (s.deferred, None) if s.deferred is not None else (self._take(s), None)
        if not len(entries):
            return
        ns = self.provider.namespace(s.grant.nsid)
        device = validator.Device(ns.block_size, self.provider.memory_page_size, self.provider.max_transfer,
                                  tuple(self.provider.device_address_ranges()))
        window = s.grant.window(s.owner)
        regions, read = self._regions(s), self._reader(s)
        done: list[tuple[int, int, str]] = []
        posted = 0
        for i, raw in enumerate(entries):
            tag = int(raw["cid"])
            verdict = validator.validate(raw.tobytes(), window, regions, device, read)
            if isinstance(verdict, validator.Rejected):
                log.info("%s: entry %d refused: %s (%s)", s.name, tag, verdict.label, verdict.reason)
                done.append((tag, 0, verdict.label))
                continue
            sqe = verdict.sqe
            opcode = int(sqe["opc"][0])
            if opcode == IoOpcode.DATASET_MANAGEMENT:  # run a few ranges a turn; what follows waits for it
                ranges = verdict.ranges if int(sqe["cdw11"][0]) & 0x4 and verdict.ranges is not None else ()
                s.dsm = Deallocating(tag, [(int(r["slba"]), int(r["nlb"])) for r in ranges if int(r["nlb"])])
                s.deferred = entries[i + 1 :]
                break
            if opcode in (IoOpcode.FLUSH, IoOpcode.WRITE_ZEROES):
                sqe["prp1"] = sqe["prp2"] = 0  # no data pointer: nothing of the client's reaches the device
            try:
                broker_tag = self.provider.submit_validated(s.qid, sqe, verdict.pages, doorbell=False)
            except Refused as exc:
                label = "deep-prp-chain" if exc.reason == "count-out-of-range" else exc.reason  # list pages
                done.append((tag, 0, label if label in rings.REASONS else "count-out-of-range"))
                continue
            s.tags[broker_tag] = tag
            posted += 1
        if posted:
            self.provider.ring_doorbell(s.qid)  # one SQ tail doorbell for the batch
        if done:
            self._complete(s, done)

    def _deallocate_some(self, s: Session) -> None:
        """A turn's share of the session's Dataset Management entry (from the validator's checked
        copy of the range list): its deallocate ranges (AD, CDW11 bit 2) as the broker's own
        commands, DSM_RANGES_PER_TURN at most, on the session's queue once its earlier commands
        are done (reaped by the loop, not waited for here); IDR/IDW are hints. Done, its
        completion goes to the client and the entries after it are checked."""
        work, g = s.dsm, s.grant
        if work is None or g is None or s.closing or s.in_flight:
            return
        batch, work.ranges = work.ranges[:DSM_RANGES_PER_TURN], work.ranges[DSM_RANGES_PER_TURN:]
        for slba, nlb in batch:
            status, reason = self._by_broker(self.provider.deallocate, g.nsid, slba, nlb, qid=s.qid)
            if status or reason:
                work.status, work.reason, work.ranges = status, reason, []
                break
        if work.ranges:
            return
        s.dsm = None
        self._complete(s, [(work.tag, work.status, work.reason)])
        self._pump_validated(s)

    @staticmethod
    def _by_broker(verb: Callable[..., object], *args: Any, **kwargs: Any) -> tuple[int, str]:
        """(status field, refusal label) of a broker verb run for a client: (0, "") when done."""
        try:
            verb(*args, **kwargs)
        except CommandError as exc:
            return _status_field(exc), ""
        except Refused as exc:
            return 0, exc.reason if exc.reason in rings.REASONS else "count-out-of-range"
        return 0, ""

    def _run_sync(self, s: Session, opcode: int, lba: int, count: int) -> tuple[int, str]:
        """A request C held back (a Write Zeroes longer than one command, or a command the
        controller lacks: refused ``unsupported-command``), by the broker's own verb after the
        queue's batch has drained (it runs them on an idle queue)."""
        g = s.grant
        assert g is not None
        self._drain(s)
        if opcode == rings.FLUSH:
            return self._by_broker(self.provider.flush, g.nsid, qid=s.qid)
        if opcode == rings.WRITE_ZEROES:
            return self._by_broker(self.provider.write_zeroes, g.nsid, lba, count, qid=s.qid)
        return self._by_broker(self.provider.deallocate, g.nsid, lba, count, qid=s.qid)

    def _drain(self, s: Session) -> None:
        """Until none of the session's commands is on the device (the broker's timeout recovery
        bounds the wait); a held request is not on it."""
        if s.fast is not None:
            self.provider.service_drain(s.qid, s.fast.svc)
            return
        while s.in_flight:
            self._reap(s, minimum=1)

    def _reap_all(self) -> None:
        """Every session's completions, then (room again) its held-back requests: round robin,
        the first session served moving on by one each turn, so that no busy client is always
        ahead of the others."""
        sessions = list(self.sessions.values())
        self._turn += 1
        first = self._turn % len(sessions) if sessions else 0
        for s in sessions[first:] + sessions[:first]:
            if s.in_flight and s.fast is None:  # the default lane's are reaped in C (serve)
                self._reap(s)
            if s.dsm is not None and not s.closing:
                try:
                    self._deallocate_some(s)
                except Exception:  # as a doorbell's trouble in serve(): this client's session only
                    log.exception("%s: its deallocate failed; closing its session", s.name)
                    self._hang_up(s)
            if s.closing and not s.in_flight:
                self._finish(s)

    def _reap(self, s: Session, minimum: int = 0) -> None:
        done = self.provider.reap(minimum, qid=s.qid)
        if len(done):
            out = []
            for tag, status in zip(done["tag"].tolist(), done["status"].tolist()):
                client_tag = s.tags.pop(tag, None)
                if client_tag is not None:
                    out.append((client_tag, status, ""))
            if out and not s.closing:
                self._complete(s, out)
            if not s.closing:
                self._pump(s)  # room again: requests the depth held back

    def _complete(self, s: Session, done: list[tuple[int, int, str]]) -> None:
        entries = np.zeros(len(done), dtype=rings.COMPLETION)
        entries["tag"] = [d[0] for d in done]
        entries["status"] = [rings.SERVICE_REFUSED if d[2] else d[1] for d in done]
        entries["reason"] = [rings.reason_code(d[2]) for d in done]
        s.refused += sum(1 for d in done if d[2])
        s.backlog.append(entries)
        self._deliver(s)

    def _deliver(self, s: Session) -> None:
        assert s.ring is not None
        posted = 0
        while s.backlog:
            room = s.ring.completion_room(s.cq_tail)
            if room <= 0:
                break
            head = s.backlog[0]
            s.cq_tail = s.ring.put_completions(s.cq_tail, head[:room])
            posted += min(room, len(head))
            if room >= len(head):
                s.backlog.pop(0)
            else:
                s.backlog[0] = head[room:]
        if posted:
            with contextlib.suppress(OSError):
                os.eventfd_write(s.completion, 1)

    # ------------------------------------------------------------------ endings
    def _hang_up(self, s: Session) -> None:
        """The client went away (or broke the protocol): no more requests from it; once its
        commands complete, :meth:`_finish` scrubs and frees everything it had."""
        if s.closing:
            return
        s.closing = True
        self._selector.unregister(s.sock)
        if s.doorbell >= 0 and s.fast is None:  # the default lane's is not the selector's
            self._selector.unregister(s.doorbell)
        if not s.in_flight or s.fast is not None:  # C's commands complete in microseconds: drained now
            self._finish(s)
        else:
            log.info("%s: gone with %d command(s) in flight; waiting for them", s.name, s.in_flight)

    def _finish(self, s: Session) -> None:
        self._drain(s)  # the daemon is stopping: wait for what the session has in flight
        if s.fast is not None and s.fast.take_held() is not None:
            s.fast.svc.in_flight -= 1  # a held request never reached the device: nothing to wait for
        for buf in s.buffers.values():
            if buf.live:
                self.provider.free_buffer(buf)  # scrubbed and unmapped before the memory is let go
        s.buffers.clear()
        if s.ring is not None:
            s.ring.memory[:] = 0
            s.ring.close()
            s.ring = None
        if s.ring_map is not None:
            s.ring_map.close()
            s.ring_map = None
        irq = self._irq_fd(s.qid) if s.qid and s.fast is None and s.ring_fd >= 0 else None
        if irq is not None and not any(x.fast is None and x.qid and x is not s and self._irq_fd(x.qid) == irq
                                       for x in self.sessions.values()):
            with contextlib.suppress(KeyError, ValueError):  # a default-lane session may get the queue next
                self._selector.unregister(irq)
        for fd in (s.ring_fd, s.doorbell, s.completion):
            if fd >= 0:
                os.close(fd)
        s.ring_fd = s.doorbell = s.completion = -1
        if s.qid:
            self._free_qids.append(s.qid)
            s.qid = 0
        if self.sessions.pop(s.sock.fileno(), None) is s:
            held = self.connections.get(s.uid, 0) - 1
            if held > 0:
                self.connections[s.uid] = held
            else:
                self.connections.pop(s.uid, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(s.sock)
        s.sock.close()
        if s.connected:
            log.info("%s: session ended; its memory scrubbed and unmapped", s.name)
        else:  # a connection that never opened a session (a flood of them does not flood the log)
            log.debug("%s: connection closed", s.name)


def run(provider: Provider, grants: list[ServiceGrant], socket_path: str, **options: Any) -> None:
    """Start, serve until SIGTERM or SIGINT, then end every session and close the controller."""
    service = Service(provider, grants, socket_path, **options)
    service.start()
    previous = {sig: signal.signal(sig, lambda *_: service.stop()) for sig in (signal.SIGTERM, signal.SIGINT)}
    wakeup = signal.set_wakeup_fd(service.wake_fd)  # a signal ends the C loop's wait (or spin) too
    try:
        service.serve()
    finally:
        signal.set_wakeup_fd(wakeup)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        service.close()
