"""The service daemon's validated lane (Model B): a client's raw 64-byte entries copied out of
its ring, checked by :mod:`nvmevfio.service.validator` against who owns which device address,
and posted as the validator's copy (PRP2 the broker's); a Dataset Management entry run as the
broker's own deallocate commands, a few ranges a turn. :class:`ValidatedLane` is a part of
:class:`nvmevfio.service.daemon.Service`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from nvmevfio.errors import CommandError, Refused
from nvmevfio.nvme.spec import IoOpcode
from nvmevfio.provider import Provider
from nvmevfio.service import ring as rings
from nvmevfio.service import validator
from nvmevfio.service.session import Deallocating, Session

log = logging.getLogger("nvmevfio.service.daemon")  # the daemon's one logger, whichever part logs

# The validated lane's Dataset Management runs one deallocate command per range (the broker's
# verb); a turn of the loop runs at most this many, so that other clients' commands go in between.
DSM_RANGES_PER_TURN = 8


def _status_field(exc: CommandError) -> int:
    """The NVMe status field (without the phase tag) a client's completion carries for it."""
    return (exc.dnr << 14) | (exc.sct << 8) | exc.sc


class ValidatedLane:
    """The validated lane's requests, a part of the daemon's :class:`Service` (which holds the
    provider and the taking and completing this part calls)."""

    provider: Provider
    _take: Callable[[Session], np.ndarray]
    _complete: Callable[[Session, list[tuple[int, int, str]]], None]

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
