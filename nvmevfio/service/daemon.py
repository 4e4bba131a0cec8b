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
a named reason. The default lane's per-request work is C
(:class:`~nvmevfio.service.session.FastPath`, cbits/service.c): the steady state runs in
``nv_svc_serve`` over every such session and comes back to Python only for what needs it (a
control message, a held request, a late command). The validated lane's entries go through
:mod:`nvmevfio.service.validator`. A client that goes away (SIGKILL included) loses its
session: its commands are waited for, its buffers scrubbed and unmapped, its queue pair given
to the next client.

:class:`Service` is the event loop (the C loop's turns and Python's), the default lane's held
requests and completions, and a session's ending; its other parts are files of their own:
connections and control messages (:mod:`nvmevfio.service.connections`), the validated lane
(:mod:`nvmevfio.service.validated`), a session and its compiled data path
(:mod:`nvmevfio.service.session`), the messages' encoding (:mod:`nvmevfio.service.protocol`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import threading
from typing import Any

import numpy as np

from nvmevfio._ffi import lib
from nvmevfio.errors import NvmeVfioError
from nvmevfio.provider import Provider
from nvmevfio.service import DEFAULT_SOCKET
from nvmevfio.service import ring as rings
from nvmevfio.service.connections import Connections, raise_fd_limit
from nvmevfio.service.grants import GrantsError, ServiceGrant
from nvmevfio.service.session import Session
from nvmevfio.service.validated import ValidatedLane

log = logging.getLogger(__name__)

# Polled queues: how long the C loop keeps spinning after its last request or completion before
# it sleeps on the doorbells. Clients see it spin (ring.py's DAEMON_POLLING) and skip their
# doorbell; a closed-loop client's next batch is then taken without waking a sleeping CPU,
# which costs more under TCG than the whole batch's work.
IDLE_SPIN_S = 0.001
POLL_S = 0.0  # with commands in flight on polled queues (no MSI-X): look again at once (a busy CPU)
# control messages and hang-ups taken per turn of the loop, for the same reason as ACCEPT_BURST
# (connections.py): a peer that closes 400 connections at once made 400 hang-ups in one selector
# batch (1.8 s under TCG) while the default lane's sessions waited for the loop to come back to C.
# The selector is level-triggered: what is left over is reported again on the next turn.
CONTROL_PER_TURN = 16


class Service(Connections, ValidatedLane):
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


def controller_socket(socket_path: str, address: str) -> str:
    """The socket of one controller of a daemon serving several: ``SOCKET`` with the controller's
    address before its suffix (``/run/nvmevfio/nvmevfio.sock`` and 0000:01:00.0:
    ``/run/nvmevfio/nvmevfio-0000:01:00.0.sock``). A client names the controller it wants by its socket."""
    head, dot, suffix = socket_path.rpartition(".")
    if not dot or "/" in suffix:
        return f"{socket_path}-{address}"
    return f"{head}-{address}.{suffix}"


def run_several(services: list[Service]) -> None:
    """Several controllers, one daemon: each :class:`Service` (its controller, grants and socket)
    started, then served by a thread of its own until SIGTERM or SIGINT (or one of them fails: the
    others are stopped too), then every session ended and every controller closed."""
    started: list[Service] = []
    try:
        for s in services:
            s.start()
            started.append(s)
    except BaseException:
        for s in started:
            s.close()
        raise
    failures: list[BaseException] = []

    def serve(s: Service) -> None:
        try:
            s.serve()
        except BaseException as exc:  # raised by the calling thread below
            failures.append(exc)
        finally:
            for other in services:
                other.stop()

    def stop_all(*_: Any) -> None:
        for s in services:
            s.stop()

    threads = [threading.Thread(target=serve, args=(s,), name=f"nvmevfio-serve-{s.address}") for s in services]
    main = threading.current_thread() is threading.main_thread()  # (only it may set signal handlers)
    previous = {sig: signal.signal(sig, stop_all) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(0.2)  # the main thread stays free for the signal handlers
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for s in services:
            s.stop()
        for t in threads:
            t.join()
        for s in services:
            s.close()
    if failures:
        raise failures[0]
