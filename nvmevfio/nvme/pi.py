"""End-to-end data protection (NVM Command Set 1.0, 5.2), pure: the 16-bit guard (CRC-16
T10-DIF) and its 8-byte tuple, the 64-bit guard (CRC-64/NVME, Protection Information Format 2)
and its 16-byte tuple, their generation and checking for a buffer of blocks (types 1, 2 and 3),
and the PRINFO field of a Read or Write (CDW12 bits 29:26).

A tuple is big-endian on the wire: Guard 15:0 (bytes 0-1), Application Tag (bytes 2-3),
Reference Tag (bytes 4-7); with the 64-bit guard: Guard (bytes 0-7), Application Tag (8-9),
Storage and Reference Tag (10-15; without a storage tag, a 48-bit reference tag). It sits first
in a block's metadata when Identify Namespace DPS bit 3 is set, else last; in the latter case
the guard covers the data and the metadata bytes before the tuple. Type 1: the reference tag of
each block is the low 32 (48) bits of its LBA; type 2: the command's EILBRT for the first
block, one more for each next; type 3: the reference tag is not incremented and not checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

TUPLE_BYTES = 8
TUPLE64_BYTES = 16
PIF_16 = 0  # Protection Information Format (ELBAF bits 8:7): 16-bit guard
PIF_64 = 2  # 64-bit guard
CRC16_T10DIF_POLY = 0x8BB7
CRC64_NVME_POLY_REFLECTED = 0x9A6C9329AC4BC9B5  # 0xAD93D23594C93659, bit-reversed
_ONES64 = np.uint64(0xFFFFFFFFFFFFFFFF)
# CDW12 PRINFO (NVM Command Set 1.0, 3.2.4 and 5.2): PRACT bit 29, PRCHK bits 28:26
PRACT = 1 << 29
PRCHK_SHIFT = 26
# PRCHK as nvme-cli's --prinfo bits 2:0: guard, application tag, reference tag
PRCHK_GUARD, PRCHK_APPTAG, PRCHK_REFTAG = 4, 2, 1
PRCHK_ALL = PRCHK_GUARD | PRCHK_APPTAG | PRCHK_REFTAG
# An application tag of FFFFh (and, type 3, a reference tag of all ones too) turns the checks off
# for the block (5.2): what a controller returns for a block never written.
ESCAPE_APPTAG = 0xFFFF


def _crc_table() -> np.ndarray:
    """The byte table of CRC-16 T10-DIF (poly 8BB7h, init 0, not reflected, no final xor)."""
    t = np.arange(256, dtype=np.uint32) << 8
    for _ in range(8):
        t = np.where(t & 0x8000, (t << 1) ^ CRC16_T10DIF_POLY, t << 1) & 0xFFFF
    return t.astype(np.uint16)


_TABLE = _crc_table()
# Two bytes at a time: for a 16-bit CRC the next value is a function of (crc ^ next 16 bits) alone.
_HI = _TABLE[np.arange(1 << 16) >> 8].astype(np.uint32)
_TABLE16 = (((_HI << 8) & 0xFFFF) ^ _TABLE[(_HI >> 8) ^ (np.arange(1 << 16) & 0xFF)]).astype(np.uint16)


def crc16_blocks(blocks: np.ndarray, crc: np.ndarray | None = None) -> np.ndarray:
    """CRC-16 T10-DIF of each row of a (n, length) uint8 array, vectorized across the rows;
    ``crc``: the running values to continue from (zeros when None)."""
    rows = np.ascontiguousarray(blocks, dtype=np.uint8)
    n, length = rows.shape
    c = np.zeros(n, dtype=np.uint16) if crc is None else np.asarray(crc, dtype=np.uint16).copy()
    if length % 2:
        c = (c << np.uint16(8)) ^ _TABLE[(c >> np.uint16(8)) ^ rows[:, 0]]
        rows = rows[:, 1:]
    words = rows.view(">u2") if len(rows) else np.zeros((0, length // 2), dtype=">u2")
    for j in range(words.shape[1]):
        c = _TABLE16[c ^ words[:, j]]
    return c


def _crc64_table() -> np.ndarray:
    """The byte table of CRC-64/NVME (reflected; init and final xor all ones)."""
    t = np.arange(256, dtype=np.uint64)
    for _ in range(8):
        t = np.where(t & np.uint64(1), (t >> np.uint64(1)) ^ np.uint64(CRC64_NVME_POLY_REFLECTED), t >> np.uint64(1))
    return t


_TABLE64 = _crc64_table()


def crc64_blocks(blocks: np.ndarray, crc: np.ndarray | None = None) -> np.ndarray:
    """CRC-64/NVME of each row of a (n, length) uint8 array (``crc``: the values to continue from)."""
    rows = np.ascontiguousarray(blocks, dtype=np.uint8)
    c = np.zeros(len(rows), dtype=np.uint64) if crc is None else np.asarray(crc, dtype=np.uint64).copy()
    c ^= _ONES64
    eight = np.uint64(8)
    for j in range(rows.shape[1]):
        c = _TABLE64[(c ^ rows[:, j]) & np.uint64(0xFF)] ^ (c >> eight)
    return c ^ _ONES64


def crc64_nvme(data: Any, crc: int = 0) -> int:
    """CRC-64/NVME of a bytes-like object (``crc``: the value to continue from)."""
    arr = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    return int(crc64_blocks(arr.reshape(1, -1), np.array([crc], dtype=np.uint64))[0])


def crc16_t10dif(data: Any, crc: int = 0) -> int:
    """CRC-16 T10-DIF of a bytes-like object (``crc``: the value to continue from)."""
    arr = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    return int(crc16_blocks(arr.reshape(1, -1), np.array([crc]))[0])


class Tuples(NamedTuple):
    guard: np.ndarray  # uint64 per block (16 or 64 bits)
    apptag: np.ndarray  # uint64 (16 bits)
    reftag: np.ndarray  # uint64 (32 or 48 bits)


# Each format's fields: (start byte, width in bytes) of the guard, application tag, reference tag
_LAYOUT = {PIF_16: ((0, 2), (2, 2), (4, 4)), PIF_64: ((0, 8), (8, 2), (10, 6))}


def _be(values: np.ndarray, width: int) -> np.ndarray:
    """(n, width) uint8: each value's low ``width`` bytes, big-endian."""
    return np.ascontiguousarray(values.astype(">u8")).view(np.uint8).reshape(-1, 8)[:, 8 - width :]


def pack_tuples(guard: Any, apptag: Any, reftag: Any, pif: int = PIF_16) -> np.ndarray:
    """(n, 8) uint8 (``pif`` 2: (n, 16)): each block's tuple, big-endian (Guard, Application Tag,
    Reference Tag)."""
    g, a, r = (x.reshape(-1) for x in np.broadcast_arrays(np.asarray(guard, dtype=np.uint64),
                                                          np.asarray(apptag, dtype=np.uint64),
                                                          np.asarray(reftag, dtype=np.uint64)))
    layout = _LAYOUT[pif]
    out = np.zeros((len(g), TUPLE64_BYTES if pif == PIF_64 else TUPLE_BYTES), dtype=np.uint8)
    for values, (start, width) in zip((g, a, r), layout):
        out[:, start : start + width] = _be(values, width)
    return out


def unpack_tuples(raw: np.ndarray, pif: int = PIF_16) -> Tuples:
    """The fields of (n, 8) (``pif`` 2: (n, 16)) uint8 tuples, as host integers."""
    size = TUPLE64_BYTES if pif == PIF_64 else TUPLE_BYTES
    t = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, size)
    fields = []
    for start, width in _LAYOUT[pif]:
        padded = np.zeros((len(t), 8), dtype=np.uint8)
        padded[:, 8 - width :] = t[:, start : start + width]
        fields.append(padded.view(">u8").reshape(-1).astype(np.uint64))
    return Tuples(*fields)


def prinfo(pract: bool, prchk: int) -> int:
    """CDW12's PRINFO bits: PRACT (29) and PRCHK (28:26: guard, application tag, reference tag)."""
    return (PRACT if pract else 0) | ((prchk & PRCHK_ALL) << PRCHK_SHIFT)


class Mismatch(NamedTuple):
    """The first block whose tuple failed a check, and which check (the status it maps to)."""

    block: int
    check: str  # "guard", "apptag" or "reftag"
    expected: int
    found: int


@dataclass(frozen=True)
class Protection:
    """A namespace's protection: PI type (Identify Namespace DPS 2:0, 1..3), metadata bytes per
    block, where the tuple sits (DPS bit 3: first), and the Protection Information Format (the
    NVM Command Set Identify Namespace's ELBAF bits 8:7: 0 the 16-bit guard, 2 the 64-bit guard)."""

    pi_type: int
    metadata_size: int
    first: bool = False
    pif: int = PIF_16

    @property
    def tuple_bytes(self) -> int:
        return TUPLE64_BYTES if self.pif == PIF_64 else TUPLE_BYTES

    @property
    def reftag_mask(self) -> int:
        return (1 << 48) - 1 if self.pif == PIF_64 else 0xFFFFFFFF

    @property
    def offset(self) -> int:
        """Where the tuple starts within a block's metadata."""
        return 0 if self.first else self.metadata_size - self.tuple_bytes

    def reftags(self, first_ref: int, count: int) -> np.ndarray:
        """Each block's expected reference tag: ``first_ref`` then one more per block (types 1 and
        2, wrapping at 32 bits, 48 with the 64-bit guard), or ``first_ref`` for all (type 3)."""
        step = np.arange(count, dtype=np.uint64) if self.pi_type != 3 else np.zeros(count, dtype=np.uint64)
        mask = np.uint64(self.reftag_mask)
        return (np.uint64(first_ref & self.reftag_mask) + step) & mask

    def guards(self, data: np.ndarray, metadata: np.ndarray) -> np.ndarray:
        """The guard of each block: the CRC of its data, then of the metadata bytes before the tuple."""
        n = len(metadata) // self.metadata_size
        crc_of = crc64_blocks if self.pif == PIF_64 else crc16_blocks
        crc = crc_of(np.asarray(data, dtype=np.uint8).reshape(n, -1))
        if self.offset:
            crc = crc_of(np.asarray(metadata).reshape(n, -1)[:, : self.offset], crc)
        return crc.astype(np.uint64)

    def generate(self, data: np.ndarray, block_size: int, first_ref: int, *, apptag: int = 0,
                 metadata: np.ndarray | None = None) -> np.ndarray:
        """The metadata of ``data``'s blocks (flat uint8, blocks x metadata size) with each tuple
        filled in; the other metadata bytes from ``metadata`` (zeros when None)."""
        data = np.asarray(data, dtype=np.uint8).reshape(-1)
        n = len(data) // block_size
        md = np.zeros(n * self.metadata_size, dtype=np.uint8) if metadata is None \
            else np.array(metadata, dtype=np.uint8).reshape(-1)
        rows = md.reshape(n, self.metadata_size)
        tuples = pack_tuples(self.guards(data, md), apptag & 0xFFFF, self.reftags(first_ref, n), self.pif)
        rows[:, self.offset : self.offset + self.tuple_bytes] = tuples
        return md

    def tuples(self, metadata: np.ndarray) -> Tuples:
        rows = np.asarray(metadata, dtype=np.uint8).reshape(-1, self.metadata_size)
        return unpack_tuples(rows[:, self.offset : self.offset + self.tuple_bytes], self.pif)

    def check(self, data: np.ndarray, metadata: np.ndarray, first_ref: int, prchk: int = PRCHK_ALL, *,
              apptag: int = 0, appmask: int = 0xFFFF) -> Mismatch | None:
        """Check each block's tuple as a controller does (5.2); None when all pass. Blocks whose
        application tag is FFFFh (type 3: and reference tag FFFFFFFFh) are not checked; type 3's
        reference tag is not checked."""
        t = self.tuples(metadata)
        n = len(t.guard)
        live = t.apptag != ESCAPE_APPTAG
        if self.pi_type == 3:
            live = ~((t.apptag == ESCAPE_APPTAG) & (t.reftag == self.reftag_mask))
        checks: list[tuple[str, np.ndarray, np.ndarray]] = []
        if prchk & PRCHK_GUARD:
            checks.append(("guard", self.guards(data, metadata), t.guard))
        if prchk & PRCHK_APPTAG:
            want = np.full(n, apptag & appmask, dtype=np.uint64)
            checks.append(("apptag", want, t.apptag & np.uint64(appmask)))
        if prchk & PRCHK_REFTAG and self.pi_type != 3:  # type 3: the reference tag is not checked
            checks.append(("reftag", self.reftags(first_ref, n), t.reftag))
        first: Mismatch | None = None
        for name, want, got in checks:
            bad = np.flatnonzero((want != got) & live)
            if len(bad) and (first is None or bad[0] < first.block):
                first = Mismatch(int(bad[0]), name, int(want[bad[0]]), int(got[bad[0]]))
        return first

