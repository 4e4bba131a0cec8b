"""Submission and completion queues over numpy rings (NVMe base spec 2.0, 3.3.1).

One hardware action per method: ``post`` writes entries into host memory,
``ring`` writes the SQ tail doorbell, ``reap`` consumes completions from host
memory, ``ring_head`` writes the CQ head doorbell. Batches pay Python's fixed
costs once: ``post`` copies N entries with one fancy-indexed assignment, ``reap``
finds every new completion with a few vectorized operations.
"""

from __future__ import annotations

import numpy as np

from nvmevfio.errors import Refused
from nvmevfio.mmio import Mmio
from nvmevfio.nvme.spec import CQE, SQE


def ring_used(head: int, tail: int, depth: int) -> int:
    return (tail - head) % depth


def ring_free(head: int, tail: int, depth: int) -> int:
    """Free SQ slots: one slot always stays empty so that full and empty differ (3.3.1.5)."""
    return depth - 1 - ring_used(head, tail, depth)


def ring_slots(start: int, count: int, depth: int) -> np.ndarray:
    return (start + np.arange(count)) % depth


class SubmissionQueue:
    def __init__(self, qid: int, ring: np.ndarray, mmio: Mmio, doorbell: int) -> None:
        if ring.dtype != SQE:
            raise TypeError("an SQ ring is an array of SQE")
        self.qid = qid
        self.ring = ring
        self.depth = len(ring)
        self.mmio = mmio
        self.doorbell = doorbell
        self.tail = 0  # next slot the host writes
        self.head = 0  # last SQ head the controller reported (CQE.SQHD)
        self.rung = 0  # tail value last written to the doorbell

    @property
    def free(self) -> int:
        return ring_free(self.head, self.tail, self.depth)

    def post(self, entries: np.ndarray) -> np.ndarray:
        """Copy entries into the ring at the tail (no doorbell). Returns the slots used."""
        n = len(entries)
        if n > self.free:
            raise Refused("queue-full", f"SQ {self.qid} has {self.free} free slots, {n} entries to post",
                          qid=self.qid, free=self.free, wanted=n)
        slots = ring_slots(self.tail, n, self.depth)
        self.ring[slots] = entries
        self.tail = (self.tail + n) % self.depth
        return slots

    def ring_doorbell(self) -> None:
        """Publish every posted entry: the SQ tail doorbell (store barrier inside Mmio.doorbell)."""
        if self.tail != self.rung:
            self.mmio.doorbell(self.doorbell, self.tail)
            self.rung = self.tail

    def update_head(self, sqhd: int) -> None:
        self.head = int(sqhd) % self.depth


class CompletionQueue:
    def __init__(self, qid: int, ring: np.ndarray, mmio: Mmio, doorbell: int, vector: int | None = None) -> None:
        if ring.dtype != CQE:
            raise TypeError("a CQ ring is an array of CQE")
        self.qid = qid
        self.ring = ring
        self.depth = len(ring)
        self.mmio = mmio
        self.doorbell = doorbell
        self.vector = vector
        self.head = 0
        self.phase = 1  # the controller writes phase 1 on its first pass (3.3.3.2.2)
        self._status = ring["status"]

    def pending(self) -> bool:
        """Is the entry at the head new? (its phase tag equals the expected phase)."""
        return (int(self._status[self.head]) & 1) == self.phase

    def _run(self, start: int, phase: int, limit: int) -> int:
        """Length of the run of entries from ``start`` whose phase tag is ``phase``."""
        seg = self._status[start : start + limit] & 1
        mismatch = np.flatnonzero(seg != phase)
        return int(mismatch[0]) if len(mismatch) else len(seg)

    def reap(self, limit: int | None = None) -> np.ndarray:
        """Consume every new completion (up to ``limit``); returns a copy of them. No doorbell."""
        limit = self.depth if limit is None else min(limit, self.depth)
        first = self._run(self.head, self.phase, min(limit, self.depth - self.head))
        n = first
        if self.head + first == self.depth and first < limit:
            n += self._run(0, self.phase ^ 1, limit - first)
        if n == 0:
            return np.empty(0, dtype=CQE)
        # The phase tags were read above; the rest of each entry must not be read
        # from before the phase tag was seen (the device writes the whole entry,
        # the tag last in effect): a read barrier between the two.
        self.mmio.rmb()
        slots = ring_slots(self.head, n, self.depth)
        out = self.ring[slots].copy()
        if self.head + n >= self.depth:
            self.phase ^= 1  # the head wrapped: new entries now carry the other phase
        self.head = (self.head + n) % self.depth
        return out

    def ring_head(self) -> None:
        """Tell the controller the entries up to the head are consumed: the CQ head doorbell."""
        self.mmio.doorbell(self.doorbell, self.head)
