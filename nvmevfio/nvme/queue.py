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
from nvmevfio.nvme.spec import CQE, SQE, SQE_STRUCT

# Up to this many entries, scanning phase tags and retiring commands entry by entry in
# Python costs less than numpy's fixed per-call overhead; beyond it the vectorized path runs.
SCALAR_BATCH = 8


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
        self._bytes = ring.view(np.uint8).data  # a writable memoryview of the ring

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

    def post_one(self, fields: tuple[int, ...]) -> int:
        """Pack one entry (fields in ``spec.SQE_STRUCT`` order) into the ring at the tail (no
        doorbell). Returns its slot."""
        if self.free < 1:
            raise Refused("queue-full", f"SQ {self.qid} is full", qid=self.qid, free=0, wanted=1)
        slot = self.tail
        SQE_STRUCT.pack_into(self._bytes, slot * 64, *fields)
        self.tail = slot + 1 if slot + 1 < self.depth else 0
        return slot

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
        self._words = ring.view(np.uint16).data  # status of entry i is word 8*i + 7

    def pending(self) -> bool:
        """Is the entry at the head new? (its phase tag equals the expected phase)."""
        return (self._words[self.head * 8 + 7] & 1) == self.phase

    def _run(self, start: int, phase: int, limit: int) -> int:
        """Length of the run of entries from ``start`` whose phase tag is ``phase``."""
        seg = self._status[start : start + limit] & 1
        mismatch = np.flatnonzero(seg != phase)
        return int(mismatch[0]) if len(mismatch) else len(seg)

    def reap(self, limit: int | None = None) -> np.ndarray:
        """Consume every new completion (up to ``limit``); returns a copy of them. No doorbell."""
        limit = self.depth if limit is None else min(limit, self.depth)
        words, depth = self._words, self.depth
        # Phase tags of the first few entries one by one (cheap in Python) ...
        n, h, phase = 0, self.head, self.phase
        while n < limit and n < SCALAR_BATCH and (words[h * 8 + 7] & 1) == phase:
            n += 1
            h += 1
            if h == depth:
                h, phase = 0, phase ^ 1
        # ... and the rest of a long run vectorized.
        if n == SCALAR_BATCH and n < limit:
            more = self._run(h, phase, min(limit - n, depth - h))
            n += more
            if h + more == depth and n < limit:
                n += self._run(0, phase ^ 1, limit - n)
        if n == 0:
            return np.empty(0, dtype=CQE)
        # The phase tags were read above; the rest of each entry must not be read
        # from before the phase tag was seen (the device writes the whole entry,
        # the tag last in effect): a read barrier between the two.
        self.mmio.rmb()
        start = self.head
        # when wrapped: one fancy-indexed copy (concatenating structured arrays is slow)
        out = self.ring[start : start + n].copy() if start + n <= depth else self.ring[ring_slots(start, n, depth)]
        if start + n >= depth:
            self.phase ^= 1  # the head wrapped: new entries now carry the other phase
        self.head = (start + n) % depth
        return out

    def ring_head(self) -> None:
        """Tell the controller the entries up to the head are consumed: the CQ head doorbell."""
        self.mmio.doorbell(self.doorbell, self.head)


# What reap() returns: one record per completed command.
COMPLETION = np.dtype([("tag", "<i8"), ("cid", "<u2"), ("opcode", "<u1"), ("result", "<u4"), ("status", "<u2"),
                       ("latency_s", "<f8")])


class CommandTable:
    """Command ids and what is in flight under each, kept in numpy arrays so that a batch
    of N commands is recorded and retired with a fixed number of vectorized operations."""

    def __init__(self, ncids: int) -> None:
        self.size = ncids
        self._stack = np.arange(ncids - 1, -1, -1, dtype=np.int64)  # free cids, next one last
        self._top = ncids
        self.busy = np.zeros(ncids, dtype=bool)
        self.tag = np.zeros(ncids, dtype=np.int64)
        self.opcode = np.zeros(ncids, dtype=np.uint8)
        self.submitted = np.zeros(ncids, dtype=np.float64)
        self.buf_slot = np.full(ncids, -1, dtype=np.int64)
        self.buf_gen = np.zeros(ncids, dtype=np.int64)
        self.next_tag = 1
        self.in_flight = 0

    @property
    def free(self) -> int:
        return self._top

    def take(self, n: int) -> np.ndarray:
        """Pop ``n`` free command ids (the caller checked ``free``)."""
        if n > self._top:
            raise ValueError(f"{n} command ids asked, {self._top} free")
        cids = self._stack[self._top - n : self._top][::-1].copy()
        self._top -= n
        return cids

    def give_back(self, cids: np.ndarray) -> None:
        """Return ids that were taken but never posted."""
        n = len(cids)
        self._stack[self._top : self._top + n] = cids[::-1]
        self._top += n

    def record(self, cids: np.ndarray, opcode: int, buf_slot: int, buf_gen: int, now: float) -> np.ndarray:
        """Mark posted commands in flight; returns their tags (unique over the queue's life)."""
        n = len(cids)
        tags = self.next_tag + np.arange(n, dtype=np.int64)
        self.next_tag += n
        self.busy[cids] = True
        self.tag[cids] = tags
        self.opcode[cids] = opcode
        self.submitted[cids] = now
        self.buf_slot[cids] = buf_slot
        self.buf_gen[cids] = buf_gen
        self.in_flight += n
        return tags

    def record_one(self, cid: int, opcode: int, buf_slot: int, buf_gen: int, now: float) -> int:
        """``record`` for a single command, without numpy's per-call overhead."""
        tag = self.next_tag
        self.next_tag += 1
        self.busy[cid] = True
        self.tag[cid] = tag
        self.opcode[cid] = opcode
        self.submitted[cid] = now
        self.buf_slot[cid] = buf_slot
        self.buf_gen[cid] = buf_gen
        self.in_flight += 1
        return tag

    def take_one(self) -> int:
        if self._top < 1:
            raise ValueError("no free command id")
        self._top -= 1
        return int(self._stack[self._top])

    def retire(self, cqes: np.ndarray, now: float) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        """Turn CQEs into completion records (dtype COMPLETION) and free their ids; also
        returns (buffer slot, generation, commands) per buffer the commands used, for
        unpinning. Raises ValueError for a CQE whose command id is not in flight."""
        n = len(cqes)
        if n <= SCALAR_BATCH:
            return self._retire_small(cqes, now)
        cids = cqes["cid"].astype(np.int64)
        if int(cids.max()) >= self.size or not self.busy[cids].all() or len(set(cids.tolist())) != n:
            raise ValueError(f"completion for a command id not in flight: {cids.tolist()}")
        out = np.empty(n, dtype=COMPLETION)
        out["tag"] = self.tag[cids]
        out["cid"] = cids
        out["opcode"] = self.opcode[cids]
        out["result"] = cqes["dw0"]
        out["status"] = cqes["status"] >> 1  # without the phase tag
        out["latency_s"] = now - self.submitted[cids]
        counts = self.buffer_counts(cids)
        self.busy[cids] = False
        self._stack[self._top : self._top + n] = cids
        self._top += n
        self.in_flight -= n
        return out, counts

    def _retire_small(self, cqes: np.ndarray, now: float) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        rows = []
        counts: dict[tuple[int, int], int] = {}
        busy, stack = self.busy, self._stack
        for dw0, _dw1, _sqhd, _sqid, cid, status in cqes.tolist():
            if cid >= self.size or not busy[cid]:
                raise ValueError(f"completion for a command id not in flight: {cid}")
            busy[cid] = False
            rows.append((int(self.tag[cid]), cid, int(self.opcode[cid]), dw0, status >> 1,
                         now - float(self.submitted[cid])))
            key = (int(self.buf_slot[cid]), int(self.buf_gen[cid]))
            if key[0] >= 0:
                counts[key] = counts.get(key, 0) + 1
            stack[self._top] = cid
            self._top += 1
            self.in_flight -= 1
        return np.array(rows, dtype=COMPLETION), [(s, g, c) for (s, g), c in counts.items()]

    def buffer_counts(self, cids: np.ndarray) -> list[tuple[int, int, int]]:
        """(slot, generation, commands) per buffer used by ``cids`` (for unpinning)."""
        slots, gens = self.buf_slot[cids], self.buf_gen[cids]
        if len(slots) and (slots == slots[0]).all() and (gens == gens[0]).all():  # the usual batch: one buffer
            return [(int(slots[0]), int(gens[0]), len(slots))] if slots[0] >= 0 else []
        counts: dict[tuple[int, int], int] = {}
        for key in zip(slots.tolist(), gens.tolist()):
            if key[0] >= 0:
                counts[key] = counts.get(key, 0) + 1
        return [(sl, g, c) for (sl, g), c in counts.items()]

    def busy_cids(self) -> np.ndarray:
        return np.flatnonzero(self.busy)
