"""One client's session of the service daemon: :class:`Session` (its socket, grant, queue pair,
shared rings, buffers and counters), the default lane's compiled data path (:class:`FastPath`,
cbits/service.c) and the validated lane's Dataset Management entry being run
(:class:`Deallocating`).
"""

from __future__ import annotations

import mmap
import socket
from dataclasses import dataclass, field

import numpy as np

from nvmevfio._ffi import ffi
from nvmevfio.dma import DmaBuffer
from nvmevfio.provider import Provider
from nvmevfio.service import ring as rings
from nvmevfio.service import validator
from nvmevfio.service.grants import ServiceGrant


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
