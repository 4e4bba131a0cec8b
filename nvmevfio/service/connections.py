"""The service daemon's connections: admission (who the kernel says the peer is, its grant, its
uid's connection cap, running out of descriptors) and the control messages of a session
(``hello``, ``alloc``, ``free``, ``info``, ``status``) with their refusals: grants, lanes,
sessions, quotas, client slots. :class:`Connections` is a part of
:class:`nvmevfio.service.daemon.Service`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import resource
import selectors
import socket
import struct
import time
from typing import Any, Callable

import numpy as np

from nvmevfio.dma import align_up
from nvmevfio.errors import NvmeVfioError, Refused
from nvmevfio.nvme.spec import SQE
from nvmevfio.provider import Provider
from nvmevfio.service import ring as rings
from nvmevfio.service import validator
from nvmevfio.service.grants import ServiceGrant, connection_cap, grant_for
from nvmevfio.service.protocol import MAX_FDS, MAX_MESSAGE, receive, send
from nvmevfio.service.session import FastPath, Session

log = logging.getLogger("nvmevfio.service.daemon")  # the daemon's one logger, whichever part logs

# connections taken per turn of the loop: a flood of them does not starve the clients (a client's
# command waits a turn or two; under the TCG guest 64 a turn made a prober's write-and-read 0.86 s)
ACCEPT_BURST = 16


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


class Connections:
    """Connections and control messages, a part of the daemon's :class:`Service` (which holds
    the state below and the session endings this part calls)."""

    provider: Provider
    grants: list[ServiceGrant]
    socket_path: str
    clients: int
    sessions: dict[int, Session]
    connections: dict[int, int]
    id_ctrl: dict[str, Any]
    _free_qids: list[int]
    _selector: selectors.EpollSelector
    _reserve: int
    _shed_logged: float
    _listener: socket.socket | None
    _serial: int
    _hang_up: Callable[[Session], None]
    _irq_fd: Callable[[int], int | None]

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
                "completion_mode": "service", "shadow_doorbells": False, "data_descriptors": "prp", "sq_in_cmb": False,
                "dma_lane": self.provider.dma_lane,
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
