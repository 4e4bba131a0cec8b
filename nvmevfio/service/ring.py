"""The service's data path: a pair of shared-memory rings per client (issue #9 point 2).

One sealed memfd, created by the daemon and mapped by both sides, holds a request ring (the
client produces, the daemon consumes) and a completion ring (the other way round), the shape of
io_uring's SQ/CQ and of vhost-user's virtqueues. Each side tells the other with an eventfd
(the client's "doorbell", the daemon's "completion"), once per batch, not once per command.

Indices are free-running 32-bit counters: an entry's index is ``counter % depth``, a ring's
fill is ``(tail - head) mod 2**32``. Each index lives in its own cache line and has one
writer. The producer fills entries with ordinary stores and publishes the new tail with a
store-release; the consumer reads the tail with a load-acquire (cbits/barrier.h), then the
entries, then publishes its head the same way.

A request names a buffer the client got from the daemon (its id and generation) and an offset
in it; never an address. The daemon checks everything in it; a refusal completes the request
with a service status and a reason from :data:`REASONS`, and nothing reaches the device.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nvmevfio.errors import NvmeVfioError

HEADER = 4096  # the four indices, one cache line each, then the rings from the next page
_SQ_TAIL, _SQ_HEAD, _CQ_TAIL, _CQ_HEAD = 0, 64, 128, 192
_DEPTH_AT = 256  # the depth, written once by the daemon
# Notification suppression (cbits/svc_ring.h), each flag with one writer; 0 means "notify me":
# DAEMON_POLLING, 1 while the daemon spins over the ring (a client may skip its doorbell);
# CLIENT_BUSY, 1 while a client looks at its completions itself (the daemon may skip the
# completion eventfd). Each side fences between publishing its index and reading the other's
# flag, and clears its own flag, fences, and looks at the other's index once more before it
# sleeps, so no wake-up is lost. This module's Python client never sets CLIENT_BUSY and always
# rings; the C perf loop uses both.
DAEMON_POLLING, CLIENT_BUSY = 320, 384

REQUEST = np.dtype([("opcode", "u1"), ("flags", "u1"), ("rsvd", "<u2"), ("buffer", "<u4"),
                    ("generation", "<u8"), ("offset", "<u8"), ("lba", "<u8"), ("count", "<u4"),
                    ("tag", "<u4")])
COMPLETION = np.dtype([("tag", "<u4"), ("status", "<u2"), ("reason", "<u2"), ("result", "<u4"),
                       ("rsvd", "<u4")])
assert REQUEST.itemsize == 40 and COMPLETION.itemsize == 16  # the wire format; checked at import

# Request opcodes: the NVM command set's own numbers (spec.IoOpcode).
FLUSH, WRITE, READ, WRITE_ZEROES, DEALLOCATE = 0x00, 0x01, 0x02, 0x08, 0x09
OPCODES = {FLUSH: "flush", WRITE: "write", READ: "read", WRITE_ZEROES: "write-zeroes", DEALLOCATE: "deallocate"}

# ``status``: 0 success; below 0x8000 the NVMe status field the device returned (SCT << 8 | SC);
# SERVICE_REFUSED: the daemon refused the request before the device saw it, ``reason`` says why.
SERVICE_REFUSED = 0x8000
REASONS = ("", "out-of-window", "read-only", "invalid-region", "stale-generation", "region-overrun",
           "unaligned", "count-out-of-range", "disallowed-opcode", "quota-exceeded", "client-gone",
           # the validated lane's (nvmevfio/service/validator.py) besides those above
           "host-physical", "cross-owner-alias", "deep-prp-chain", "disallowed-namespace",
           # the controller lacks the command (ONCS)
           "unsupported-command")


class RingBroken(NvmeVfioError):
    """The other side's index says more entries than the ring holds: it broke the protocol, or
    (the client's view) the daemon ended the session and zeroed the ring."""

    reason = "ring-broken"


def reason_code(reason: str) -> int:
    return REASONS.index(reason)


def ring_bytes(depth: int, request: np.dtype = REQUEST, page: int = 4096) -> int:
    """The memfd's size for a ring pair of ``depth`` entries each (requests of ``request``)."""
    sq = -(-depth * request.itemsize // page) * page
    cq = -(-depth * COMPLETION.itemsize // page) * page
    return HEADER + sq + cq


def used(head: int, tail: int) -> int:
    """Entries between free-running ``head`` and ``tail``. Pure."""
    return (tail - head) & 0xFFFFFFFF


def slots(start: int, n: int, depth: int) -> np.ndarray:
    """The ring indices of ``n`` entries from free-running counter ``start``. Pure."""
    return (start + np.arange(n, dtype=np.int64)) % depth


class SharedRings:
    """Both rings over one mapping (a numpy uint8 array of :func:`ring_bytes` bytes). The side
    that produces requests is the client; the daemon is the other. ``request``: the request
    entries' type, :data:`REQUEST`, or the 64-byte NVMe SQE in the validated lane."""

    def __init__(self, memory: np.ndarray, depth: int | None = None, request: np.dtype = REQUEST) -> None:
        from nvmevfio._ffi import ffi, lib

        self._lib = lib
        self.memory = memory
        self._base = ffi.cast("char *", memory.ctypes.data)
        if depth is not None:
            memory[:HEADER] = 0
            memory[_DEPTH_AT : _DEPTH_AT + 4].view("<u4")[0] = depth
        self.depth = int(memory[_DEPTH_AT : _DEPTH_AT + 4].view("<u4")[0])
        if self.depth < 1 or ring_bytes(self.depth, request) > memory.size:
            raise ValueError(f"a ring of depth {self.depth} does not fit {memory.size} bytes")
        self.request = request
        sq_bytes = self.depth * request.itemsize
        self.requests = memory[HEADER : HEADER + sq_bytes].view(request)
        cq_at = HEADER + -(-sq_bytes // 4096) * 4096
        self.completions = memory[cq_at : cq_at + self.depth * COMPLETION.itemsize].view(COMPLETION)

    def pointers(self) -> tuple[Any, Any, Any]:
        """The header, request ring and completion ring as C pointers (cbits/service.c)."""
        from nvmevfio._ffi import ffi

        return (ffi.cast("uint8_t *", self.memory.ctypes.data),
                ffi.cast("struct nv_svc_request *", self.requests.ctypes.data),
                ffi.cast("struct nv_svc_completion *", self.completions.ctypes.data))

    def _load(self, at: int) -> int:
        return int(self._lib.nv_load_acquire32(self._base + at))

    def _store(self, at: int, value: int) -> None:
        self._lib.nv_store_release32(self._base + at, value & 0xFFFFFFFF)

    # -- the client's side ---------------------------------------------------------------
    def request_room(self, tail: int) -> int:
        """Free request entries, for the producer whose own tail is ``tail``."""
        return self.depth - used(self._load(_SQ_HEAD), tail)

    def put_requests(self, tail: int, entries: np.ndarray) -> int:
        """Write ``entries`` at ``tail`` and publish them; returns the new tail. The caller
        checked :meth:`request_room`."""
        self.requests[slots(tail, len(entries), self.depth)] = entries
        tail = (tail + len(entries)) & 0xFFFFFFFF
        self._store(_SQ_TAIL, tail)
        return tail

    def requests_waiting(self, tail: int) -> int:
        """Requests published up to ``tail`` that the daemon has not taken yet."""
        return used(self._load(_SQ_HEAD), tail)

    def take_completions(self, head: int) -> tuple[np.ndarray, int]:
        """Completions published since ``head`` (copied), and the new head, published. Raises
        RingBroken (nothing copied) when the tail is more than a ring ahead of ``head``."""
        tail = self._load(_CQ_TAIL)
        n = used(head, tail)
        if n > self.depth:  # never published by a daemon that serves the ring: zeroed, or forged
            raise RingBroken(f"completion tail {tail} is {n} entries past head {head} in a ring of {self.depth}",
                             head=head, tail=tail, depth=self.depth)
        if not n:
            return np.empty(0, dtype=COMPLETION), head
        out = self.completions[slots(head, n, self.depth)]
        head = (head + n) & 0xFFFFFFFF
        self._store(_CQ_HEAD, head)
        return out, head

    # -- the daemon's side ---------------------------------------------------------------
    def take_requests(self, head: int, limit: int) -> tuple[np.ndarray, int]:
        """Up to ``limit`` published requests from ``head``, *copied* out of the shared page
        (what the daemon checks is what it uses, whatever the client writes afterwards), and
        the new head, published."""
        n = min(used(head, self._load(_SQ_TAIL)), limit)
        if n > self.depth:  # a client wrote a tail more than a ring ahead: take one ring's worth
            n = self.depth
        if not n:
            return np.empty(0, dtype=self.request), head
        out = self.requests[slots(head, n, self.depth)]
        head = (head + n) & 0xFFFFFFFF
        self._store(_SQ_HEAD, head)
        return out, head

    def completion_room(self, tail: int) -> int:
        return self.depth - used(self._load(_CQ_HEAD), tail)

    def put_completions(self, tail: int, entries: np.ndarray) -> int:
        self.completions[slots(tail, len(entries), self.depth)] = entries
        tail = (tail + len(entries)) & 0xFFFFFFFF
        self._store(_CQ_TAIL, tail)
        return tail

    def close(self) -> None:
        empty: Any = np.empty(0, dtype=np.uint8)
        self.memory = self.requests = self.completions = empty
