"""Controller registers (NVMe base spec 2.0, section 3.1.4): offsets and fields.

A field is ``(shift, width)``; helpers are pure functions of their inputs.
"""

from __future__ import annotations

from typing import NamedTuple


class Field(NamedTuple):
    shift: int
    width: int

    @property
    def mask(self) -> int:
        return ((1 << self.width) - 1) << self.shift


def get(value: int, field: Field) -> int:
    return (value >> field.shift) & ((1 << field.width) - 1)


def put(value: int, field: Field, x: int) -> int:
    if x < 0 or x >= (1 << field.width):
        raise ValueError(f"{x:#x} does not fit a {field.width}-bit field")
    return (value & ~field.mask) | (x << field.shift)


def pack(fields: dict[Field, int], value: int = 0) -> int:
    for f, x in fields.items():
        value = put(value, f, x)
    return value


# Offsets (3.1.4)
CAP, VS, INTMS, INTMC, CC, CSTS, NSSR, AQA, ASQ, ACQ, CMBLOC, CMBSZ = (
    0x00, 0x08, 0x0C, 0x10, 0x14, 0x1C, 0x20, 0x24, 0x28, 0x30, 0x38, 0x3C)
CMBMSC, CMBSTS = 0x50, 0x58  # Controller Memory Buffer Memory Space Control (64-bit) and Status
DOORBELL_BASE = 0x1000
# The registers nvme-cli's show-regs reads besides CAP, VS, CC, CSTS, AQA, ASQ, ACQ: (name, offset, bytes)
SHOWN = (("intms", 0x0C, 4), ("intmc", 0x10, 4), ("nssr", 0x20, 4), ("cmbloc", 0x38, 4), ("cmbsz", 0x3C, 4),
         ("bpinfo", 0x40, 4), ("bprsel", 0x44, 4), ("bpmbl", 0x48, 8), ("cmbmsc", 0x50, 8), ("cmbsts", 0x58, 4),
         ("crto", 0x68, 4), ("pmrcap", 0xE00, 4), ("pmrctl", 0xE04, 4), ("pmrsts", 0xE08, 4), ("pmrebs", 0xE0C, 4),
         ("pmrswtp", 0xE10, 4), ("pmrmscl", 0xE14, 4), ("pmrmscu", 0xE18, 4))


class CAP_:
    MQES = Field(0, 16)     # Maximum Queue Entries Supported (0's based)
    CQR = Field(16, 1)      # Contiguous Queues Required
    AMS = Field(17, 2)      # Arbitration Mechanism Supported
    TO = Field(24, 8)       # Timeout, 500 ms units
    DSTRD = Field(32, 4)    # Doorbell Stride: 4 << DSTRD bytes
    NSSRS = Field(36, 1)
    CSS = Field(37, 8)      # Command Sets Supported (bit 0 NVM, bit 6 I/O sets, bit 7 admin only)
    BPS = Field(45, 1)
    CPS = Field(46, 2)
    MPSMIN = Field(48, 4)   # 2 ^ (12 + MPSMIN)
    MPSMAX = Field(52, 4)
    PMRS = Field(56, 1)
    CMBS = Field(57, 1)
    NSSS = Field(58, 1)
    CRMS = Field(59, 2)


class VS_:
    MJR = Field(16, 16)
    MNR = Field(8, 8)
    TER = Field(0, 8)


class CC_:
    EN = Field(0, 1)
    CSS = Field(4, 3)       # 000b NVM command set, 110b all supported I/O sets, 111b admin only
    MPS = Field(7, 4)
    AMS = Field(11, 3)
    SHN = Field(14, 2)      # 01b normal, 10b abrupt
    IOSQES = Field(16, 4)
    IOCQES = Field(20, 4)
    CRIME = Field(24, 1)


class CSTS_:
    RDY = Field(0, 1)
    CFS = Field(1, 1)
    SHST = Field(2, 2)      # 00b normal, 01b occurring, 10b complete
    NSSRO = Field(4, 1)
    PP = Field(5, 1)
    ST = Field(6, 1)


class AQA_:
    ASQS = Field(0, 12)
    ACQS = Field(16, 12)


SHN_NORMAL = 0b01
SHST_COMPLETE = 0b10
CSS_NVM = 0b000
CSS_ALL_IO = 0b110
CAP_TO_UNIT_MS = 500


def doorbell_offset(qid: int, is_cq: bool, dstrd: int) -> int:
    """SQ y tail doorbell / CQ y head doorbell: 1000h + (2y + is_cq) * (4 << CAP.DSTRD) (3.1.4.x)."""
    return DOORBELL_BASE + (2 * qid + int(is_cq)) * (4 << dstrd)


def timeout_ms(cap: int, floor_ms: int = CAP_TO_UNIT_MS) -> int:
    """CAP.TO in milliseconds, with a floor for controllers that report 0."""
    return max(get(cap, CAP_.TO) * CAP_TO_UNIT_MS, floor_ms)


def choose_mps(cap: int, host_page_size: int) -> int:
    """CC.MPS: the host page size when the controller allows it, else the nearest allowed value."""
    want = host_page_size.bit_length() - 1 - 12
    return min(max(want, get(cap, CAP_.MPSMIN)), get(cap, CAP_.MPSMAX))


def _decode(value: int, cls: type) -> dict[str, int]:
    return {name: get(value, f) for name, f in vars(cls).items() if isinstance(f, Field)}


def decode_cap(v: int) -> dict[str, int]:
    return _decode(v, CAP_)


def decode_vs(v: int) -> dict[str, int]:
    return _decode(v, VS_)


def decode_cc(v: int) -> dict[str, int]:
    return _decode(v, CC_)


def decode_csts(v: int) -> dict[str, int]:
    return _decode(v, CSTS_)


def version_string(vs: int) -> str:
    return f"{get(vs, VS_.MJR)}.{get(vs, VS_.MNR)}.{get(vs, VS_.TER)}"
