"""The Zoned Namespace Command Set's data (ZNS Command Set Specification 1.1): the zone send and
receive actions, zone states and types, the I/O Command Set specific Identify Controller (CNS 06h)
and Identify Namespace (CNS 05h) with CSI 02h, and the Report Zones data structure.

The command builders are in :mod:`nvmevfio.nvme.builders` (``zone_management_send``,
``zone_management_receive``, ``zone_append``), the statuses (SCT 1, B8h..BFh) in
:mod:`nvmevfio.nvme.spec`. Field names follow nvme-cli's ``zns`` plugin (its JSON keys).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np


class ZoneSendAction(enum.IntEnum):
    """Zone Management Send CDW13 ZSA (Figure 42)."""

    CLOSE = 0x01
    FINISH = 0x02
    OPEN = 0x03
    RESET = 0x04
    OFFLINE = 0x05
    SET_ZONE_DESCRIPTOR_EXTENSION = 0x10


class ZoneReceiveAction(enum.IntEnum):
    """Zone Management Receive CDW13 ZRA (Figure 38)."""

    REPORT_ZONES = 0x00
    EXTENDED_REPORT_ZONES = 0x01


class ZoneState(enum.IntEnum):
    """A zone descriptor's ZS, bits 7:4 of byte 1 (Figure 40)."""

    EMPTY = 0x1
    IMPLICITLY_OPENED = 0x2
    EXPLICITLY_OPENED = 0x3
    CLOSED = 0x4
    READ_ONLY = 0xD
    FULL = 0xE
    OFFLINE = 0xF


# nvme-cli 2.3's words for the states (its report-zones JSON "state")
STATE_NAMES = {ZoneState.EMPTY: "EMPTY", ZoneState.IMPLICITLY_OPENED: "IMP_OPENED",
               ZoneState.EXPLICITLY_OPENED: "EXP_OPENED", ZoneState.CLOSED: "CLOSED",
               ZoneState.READ_ONLY: "READONLY", ZoneState.FULL: "FULL", ZoneState.OFFLINE: "OFFLINE"}
# Zone Receive Action Specific Field for Report Zones (Figure 38): which zones are listed; 0 is all
REPORT_FILTER = {ZoneState.EMPTY: 1, ZoneState.IMPLICITLY_OPENED: 2, ZoneState.EXPLICITLY_OPENED: 3,
                 ZoneState.CLOSED: 4, ZoneState.FULL: 5, ZoneState.READ_ONLY: 6, ZoneState.OFFLINE: 7}
ZONE_TYPE_SEQUENTIAL_WRITE_REQUIRED = 0x2
ZONE_TYPE_NAMES = {ZONE_TYPE_SEQUENTIAL_WRITE_REQUIRED: "SEQWRITE_REQ"}
ZA_ZDEV = 1 << 7  # Zone Attributes: Zone Descriptor Extension Valid
ACTIVE_STATES = frozenset({ZoneState.IMPLICITLY_OPENED, ZoneState.EXPLICITLY_OPENED, ZoneState.CLOSED})
OPEN_STATES = frozenset({ZoneState.IMPLICITLY_OPENED, ZoneState.EXPLICITLY_OPENED})
WRITABLE_STATES = frozenset({ZoneState.EMPTY, *ACTIVE_STATES})
NO_LIMIT = 0xFFFFFFFF  # MAR / MOR: no limit (a 0's based count otherwise)

# Report Zones data structure (Figure 39): a 64-byte header (Number of Zones), then descriptors
REPORT_HEADER_BYTES = 64
ZONE_DESCRIPTOR = np.dtype([
    ("zt", "u1"), ("zs", "u1"), ("za", "u1"), ("zai", "u1"), ("rsvd4", "V4"),
    ("zcap", "<u8"), ("zslba", "<u8"), ("wp", "<u8"), ("rsvd32", "V32"),
])
if ZONE_DESCRIPTOR.itemsize != 64:  # pragma: no cover - a dtype typo
    raise ImportError(f"a zone descriptor is 64 bytes, the dtype is {ZONE_DESCRIPTOR.itemsize}")

# ZNS Identify Namespace (Figure 49), nvme-cli's names; LBA Format Extensions from byte 2816
ID_NS_ZNS = [("zoc", 0, 2), ("ozcs", 2, 4), ("mar", 4, 8), ("mor", 8, 12), ("rrl", 12, 16), ("frl", 16, 20),
             ("rrl1", 20, 24), ("rrl2", 24, 28), ("rrl3", 28, 32), ("frl1", 32, 36), ("frl2", 36, 40),
             ("frl3", 40, 44), ("numzrwa", 44, 48), ("zrwafg", 48, 50), ("zrwasz", 50, 52), ("zrwacap", 52, 53)]
LBAFE_OFFSET = 2816


def _le(buf: bytes, lo: int, hi: int) -> int:
    return int.from_bytes(buf[lo:hi], "little")


def parse_zns_identify_controller(buf: bytes) -> dict[str, int]:
    """Identify CNS 06h CSI 02h (Figure 48): ZASL, the Zone Append Size Limit (a power of two in
    units of CAP.MPSMIN; 0: MDTS applies)."""
    if len(buf) < 4096:
        raise ValueError(f"ZNS Identify Controller data is 4096 bytes, got {len(buf)}")
    return {"zasl": buf[0]}


def parse_zns_identify_namespace(buf: bytes, nlbaf: int) -> dict[str, Any]:
    """Identify CNS 05h CSI 02h: the zone operation characteristics, MAR and MOR (0's based;
    FFFFFFFFh no limit), the recommended limits, and for each LBA format 0..NLBAF its zone size
    in blocks (ZSZE) and descriptor extension size in 64-byte units (ZDES)."""
    if len(buf) < 4096:
        raise ValueError(f"ZNS Identify Namespace data is 4096 bytes, got {len(buf)}")
    out: dict[str, Any] = {name: _le(buf, lo, hi) for name, lo, hi in ID_NS_ZNS}
    out["lbafe"] = [{"zsze": _le(buf, LBAFE_OFFSET + 16 * i, LBAFE_OFFSET + 16 * i + 8),
                     "zdes": buf[LBAFE_OFFSET + 16 * i + 8]} for i in range(nlbaf + 1)]
    return out


def namespace_csi(buf: bytes) -> int | None:
    """The Command Set Identifier in a Namespace Identification Descriptor list (Identify CNS 03h,
    Base 2.0 Figure 283: NIDT 04h, one byte); None when the list has none."""
    at = 0
    while at + 4 <= len(buf) and buf[at]:
        nidt, nidl = buf[at], buf[at + 1]
        if nidt == 0x04 and nidl >= 1:
            return int(buf[at + 4])
        at += 4 + nidl
    return None


def limit(zero_based: int) -> int | None:
    """MAR / MOR as a number of zones; None when there is no limit."""
    return None if zero_based == NO_LIMIT else zero_based + 1


@dataclass(frozen=True)
class Zone:
    """One zone of a zoned namespace, as a Report Zones descriptor gives it."""

    slba: int  # ZSLBA: the zone's first LBA
    wp: int  # the write pointer (undefined in Full, Read Only, Offline)
    capacity: int  # ZCAP: writable blocks from slba
    state: ZoneState
    type: int  # ZT
    attributes: int  # ZA
    attributes_info: int  # ZAI
    extension: bytes = b""  # the descriptor extension (an extended report with ZA.ZDEV set)

    @property
    def state_name(self) -> str:
        return STATE_NAMES.get(self.state, "Unknown State")

    @property
    def written(self) -> int:
        """Blocks written so far (the write pointer's distance from the zone start)."""
        return self.wp - self.slba if self.state in WRITABLE_STATES else self.capacity

    def as_json(self) -> dict[str, Any]:
        """nvme-cli 2.3's report-zones JSON entry. Its ``attrs`` is set twice (ZA, then ZAI) and
        the second wins: ``attrs`` is ZAI, kept so for equal output."""
        out: dict[str, Any] = {"slba": self.slba, "wp": self.wp, "cap": self.capacity, "state": self.state_name,
                               "type": ZONE_TYPE_NAMES.get(self.type, "Unknown"), "attrs": self.attributes_info}
        return out


def appended_lbas(records: np.ndarray) -> np.ndarray:
    """The LBAs reaped Zone Appends wrote at: each completion's DW1:DW0 (``result_hi``, ``result``
    of ``nvme.queue.COMPLETION`` records), as uint64."""
    return records["result"].astype(np.uint64) | (records["result_hi"].astype(np.uint64) << np.uint64(32))


def parse_report_zones(buf: bytes, ext_bytes: int = 0) -> tuple[int, list[Zone]]:
    """The Report Zones (or Extended Report Zones, with ``ext_bytes`` of extension after each
    descriptor) data: (Number of Zones from the header, the descriptors the buffer holds, at most
    that many)."""
    if len(buf) < REPORT_HEADER_BYTES:
        raise ValueError(f"a zone report has a {REPORT_HEADER_BYTES}-byte header, got {len(buf)} bytes")
    nr_zones = _le(buf, 0, 8)
    stride = ZONE_DESCRIPTOR.itemsize + ext_bytes
    count = min(nr_zones, (len(buf) - REPORT_HEADER_BYTES) // stride)
    zones = []
    for i in range(count):
        at = REPORT_HEADER_BYTES + i * stride
        d = np.frombuffer(bytes(buf[at : at + ZONE_DESCRIPTOR.itemsize]), dtype=ZONE_DESCRIPTOR)[0]
        zs = int(d["zs"]) >> 4
        zones.append(Zone(int(d["zslba"]), int(d["wp"]), int(d["zcap"]),
                          ZoneState(zs) if zs in ZoneState._value2member_map_ else zs,  # type: ignore[arg-type]
                          int(d["zt"]), int(d["za"]), int(d["zai"]),
                          bytes(buf[at + 64 : at + stride]) if ext_bytes else b""))
    return nr_zones, zones
