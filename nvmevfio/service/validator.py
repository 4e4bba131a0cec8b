"""The Model B validator (design.md, "The validator lane"; issue #9 point 3).

In the validated lane a client of the service writes raw 64-byte submission queue entries,
PRP fields and PRP-list pages included, pointing into its own granted buffers. When it rings,
every entry is checked here *before* anything reaches the device. What is accepted comes out
as a copy: the entry (with the window's LBA offset applied) and the flat list of data-page
addresses its PRPs describe, which the broker then writes into PRP-list pages of its own.
A client rewriting its ring or its list pages after the check changes nothing (time of check
is time of use). A refused entry comes out as a label and a reason; none of it reaches the
device.

Pure: the caller supplies the grant, the map of who owns which IOVAs and a reader for the
client's memory. Nothing here touches a device.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from nvmevfio.nvme.prp import data_pages
from nvmevfio.nvme.spec import SQE, IoOpcode

# Refusal labels, one per rule (issue #9): each refused entry completes with one of them.
OUT_OF_WINDOW = "out-of-window"  # an LBA range outside the client's grant
HOST_PHYSICAL = "host-physical"  # an address outside the IOMMU's usable IOVA space
CROSS_OWNER_ALIAS = "cross-owner-alias"  # another client's or the broker's memory
REGION_OVERRUN = "region-overrun"  # a transfer running past the end of the client's buffer
UNALIGNED = "unaligned"  # PRP rules: PRP1 dword aligned, PRP2 / list entries page aligned
DEEP_PRP_CHAIN = "deep-prp-chain"  # a transfer (so a chain) longer than MDTS allows
STALE_GENERATION = "stale-generation"  # a buffer the client freed (its IOVAs are quarantined)
INVALID_REGION = "invalid-region"  # inside the IOVA space, but no buffer there
DISALLOWED_OPCODE = "disallowed-opcode"  # not READ/WRITE/FLUSH/WRITE ZEROES/DSM, or a write on a read-only grant
DISALLOWED_NAMESPACE = "disallowed-namespace"  # another namespace than the grant's
LABELS = (OUT_OF_WINDOW, HOST_PHYSICAL, CROSS_OWNER_ALIAS, REGION_OVERRUN, UNALIGNED, DEEP_PRP_CHAIN,
          STALE_GENERATION, INVALID_REGION, DISALLOWED_OPCODE, DISALLOWED_NAMESPACE)

ALLOWED = (IoOpcode.FLUSH, IoOpcode.WRITE, IoOpcode.READ, IoOpcode.WRITE_ZEROES, IoOpcode.DATASET_MANAGEMENT)
WRITES = (IoOpcode.WRITE, IoOpcode.WRITE_ZEROES, IoOpcode.DATASET_MANAGEMENT)
DSM_RANGE = np.dtype([("cattr", "<u4"), ("nlb", "<u4"), ("slba", "<u8")])  # Figure 390: 16 bytes a range


@dataclass(frozen=True)
class Region:
    """IOVAs the ledger handed out: ``[start, start + size)``, its owner and generation.
    ``live=False`` is a freed buffer whose IOVAs are quarantined (not yet reused)."""

    start: int
    size: int
    owner: str
    generation: int
    live: bool = True

    @property
    def end(self) -> int:
        return self.start + self.size


class RegionMap:
    """Who owns each IOVA: a sorted, non-overlapping set of regions."""

    def __init__(self, regions: Iterable[Region]) -> None:
        self._regions = sorted(regions, key=lambda r: r.start)
        self._starts = [r.start for r in self._regions]
        for a, b in zip(self._regions, self._regions[1:]):
            if a.end > b.start:
                raise ValueError(f"regions overlap at {b.start:#x}")

    def find(self, iova: int) -> Region | None:
        i = bisect.bisect_right(self._starts, iova) - 1
        if i >= 0 and iova < self._regions[i].end:
            return self._regions[i]
        return None


@dataclass(frozen=True)
class Grant:
    """What a client may do: namespace ``nsid``, blocks ``[first_lba, first_lba + blocks)``
    (its LBA 0 is ``first_lba``), writes or not."""

    client: str
    nsid: int
    first_lba: int
    blocks: int
    writable: bool


@dataclass(frozen=True)
class Device:
    """What the validator needs of the controller and the IOMMU."""

    block_size: int
    page_size: int
    max_transfer: int  # bytes (MDTS)
    iova_ranges: tuple[tuple[int, int], ...]  # usable IOVA space, inclusive ranges


@dataclass(frozen=True)
class Accepted:
    """A copy of an accepted entry: LBAs moved into the window, and the data pages its PRPs
    name after PRP1 (the broker authors PRP2 or its own list pages from ``pages``). For DSM,
    ``ranges`` is a checked copy of the range list (LBAs moved) for a buffer of the broker's."""

    sqe: np.ndarray  # one SQE record
    pages: np.ndarray  # uint64 data-page addresses after PRP1
    ranges: np.ndarray | None = None


@dataclass(frozen=True)
class Rejected:
    label: str
    reason: str


class _Refuse(Exception):
    def __init__(self, label: str, reason: str) -> None:
        super().__init__(reason)
        self.label = label


def validate(raw: bytes | np.ndarray, grant: Grant, regions: RegionMap, device: Device,
             read: Callable[[int, int], np.ndarray]) -> Accepted | Rejected:
    """Check one raw 64-byte entry. ``read(iova, nbytes)`` returns a copy of the client's
    memory (its PRP-list pages, a DSM range list); it is only called for addresses already
    found to be the client's own."""
    sqe = np.frombuffer(bytes(raw), dtype=SQE, count=1).copy()
    try:
        return _validate(sqe, grant, regions, device, read)
    except _Refuse as r:
        return Rejected(r.label, str(r))


def _validate(sqe: np.ndarray, grant: Grant, regions: RegionMap, device: Device,
              read: Callable[[int, int], np.ndarray]) -> Accepted:
    e = sqe[0]
    opc = int(e["opc"])
    if opc not in ALLOWED:
        raise _Refuse(DISALLOWED_OPCODE, f"opcode {opc:#04x} is not one of READ, WRITE, FLUSH, WRITE ZEROES, DSM")
    if opc in WRITES and not grant.writable:
        raise _Refuse(DISALLOWED_OPCODE, f"opcode {opc:#04x} writes; the grant is read-only")
    if int(e["flags"]):
        raise _Refuse(DISALLOWED_OPCODE, f"CDW0 flags {int(e['flags']):#x}: fused or SGL commands are not allowed")
    if int(e["mptr"]):
        raise _Refuse(DISALLOWED_OPCODE, "a metadata pointer is not allowed")
    if int(e["nsid"]) != grant.nsid:
        raise _Refuse(DISALLOWED_NAMESPACE, f"namespace {int(e['nsid'])}: the grant is for namespace {grant.nsid}")
    if opc == IoOpcode.FLUSH:
        return Accepted(sqe, np.empty(0, dtype=np.uint64))
    if opc == IoOpcode.DATASET_MANAGEMENT:
        return _dsm(sqe, grant, regions, device, read)
    slba = int(e["cdw10"]) | int(e["cdw11"]) << 32
    nlb = (int(e["cdw12"]) & 0xFFFF) + 1
    _window(slba, nlb, grant)
    sqe["cdw10"], sqe["cdw11"] = (slba + grant.first_lba) & 0xFFFFFFFF, (slba + grant.first_lba) >> 32
    if opc == IoOpcode.WRITE_ZEROES:
        return Accepted(sqe, np.empty(0, dtype=np.uint64))
    pages = _prps(int(e["prp1"]), int(e["prp2"]), nlb * device.block_size, grant, regions, device, read)
    return Accepted(sqe, pages)


def _window(slba: int, nlb: int, grant: Grant) -> None:
    if slba < 0 or slba + nlb > grant.blocks:
        raise _Refuse(OUT_OF_WINDOW, f"blocks {slba}..{slba + nlb - 1} are outside the grant's 0..{grant.blocks - 1}")


def _owned(iova: int, span: int, grant: Grant, regions: RegionMap, device: Device, what: str) -> None:
    """``[iova, iova + span)`` must be inside one live buffer of the client's."""
    if not any(lo <= iova and iova + span - 1 <= hi for lo, hi in device.iova_ranges):
        raise _Refuse(HOST_PHYSICAL, f"{what} is outside the IOMMU's IOVA space")
    region = regions.find(iova)
    if region is None:
        raise _Refuse(INVALID_REGION, f"{what} is in no buffer")
    if region.owner != grant.client:
        raise _Refuse(CROSS_OWNER_ALIAS, f"{what} is in memory that is not the client's")
    if not region.live:
        raise _Refuse(STALE_GENERATION, f"{what} is in a buffer that was freed (generation {region.generation})")
    if iova + span > region.end:
        raise _Refuse(REGION_OVERRUN, f"{what} runs {iova + span - region.end} bytes past the end of its buffer")


def _prps(prp1: int, prp2: int, length: int, grant: Grant, regions: RegionMap, device: Device,
          read: Callable[[int, int], np.ndarray]) -> np.ndarray:
    """The data pages after PRP1 (4.1.1), every one checked; the list pages are read once."""
    ps = device.page_size
    if length > device.max_transfer:
        raise _Refuse(DEEP_PRP_CHAIN, f"{length} bytes is more than one command may carry "
                      f"({device.max_transfer}, MDTS): the PRP chain would be deeper than allowed")
    if prp1 % 4:
        raise _Refuse(UNALIGNED, "PRP1 is not dword aligned")
    first = min(length, ps - prp1 % ps)
    _owned(prp1, first, grant, regions, device, "PRP1")
    count = data_pages(prp1, length, ps) - 1  # pages after PRP1's
    if count == 0:
        return np.empty(0, dtype=np.uint64)
    spans = [ps] * (count - 1) + [length - first - ps * (count - 1)]  # bytes used of each
    entries = np.array([prp2], dtype=np.uint64) if count == 1 else _walk_list(prp2, count, grant, regions, device,
                                                                               read)
    for i, (page, span) in enumerate(zip(entries.tolist(), spans)):
        if page % ps:
            raise _Refuse(UNALIGNED, f"data page {i + 2} of the transfer is not page aligned")
        _owned(page, span, grant, regions, device, f"data page {i + 2}")
    return entries


def _walk_list(pointer: int, count: int, grant: Grant, regions: RegionMap, device: Device,
               read: Callable[[int, int], np.ndarray]) -> np.ndarray:
    """Follow a PRP list from PRP2: ``count`` entries, the last entry of a full page pointing
    to the next page. Each list page is checked, then copied once."""
    ps = device.page_size
    if pointer % 8:
        raise _Refuse(UNALIGNED, "PRP2 (the PRP list pointer) is not quadword aligned")
    out: list[np.ndarray] = []
    left = count
    at = pointer
    hops = 0
    while True:
        room = (ps - at % ps) // 8  # entries from here to the end of this list page
        last = left <= room  # the rest fits: no chain pointer on this page
        take = left if last else room - 1
        used = 8 * (take if last else room)
        _owned(at, used, grant, regions, device, f"PRP list page {hops + 1}")
        raw = np.asarray(read(at, used)).view(np.uint64)  # the one read of this page
        out.append(raw[:take])
        left -= take
        if left == 0:
            return np.concatenate(out)  # a copy: what the client writes from now on changes nothing
        at = int(raw[room - 1])
        hops += 1
        if at % ps:
            raise _Refuse(UNALIGNED, f"PRP list page {hops + 1} (a chain pointer) is not page aligned")


def _dsm(sqe: np.ndarray, grant: Grant, regions: RegionMap, device: Device,
         read: Callable[[int, int], np.ndarray]) -> Accepted:
    """Dataset Management: the range list (up to 256 ranges of 16 bytes) is copied, every
    range checked against the window and moved into it."""
    e = sqe[0]
    nr = (int(e["cdw10"]) & 0xFF) + 1
    length = 16 * nr
    pages = _prps(int(e["prp1"]), int(e["prp2"]), length, grant, regions, device, read)
    ps = device.page_size
    first = min(length, ps - int(e["prp1"]) % ps)
    parts = [np.asarray(read(int(e["prp1"]), first))]
    if len(pages):
        parts.append(np.asarray(read(int(pages[0]), length - first)))
    ranges = np.frombuffer(np.concatenate([p.view(np.uint8) for p in parts]).tobytes(), dtype=DSM_RANGE).copy()
    for r in ranges:
        if int(r["nlb"]):
            _window(int(r["slba"]), int(r["nlb"]), grant)
    ranges["slba"] += np.uint64(grant.first_lba)
    return Accepted(sqe, pages, ranges)
