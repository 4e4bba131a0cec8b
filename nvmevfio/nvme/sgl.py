"""Scatter Gather Lists (NVMe base spec 2.0, 4.1.2 "Scatter Gather List (SGL)").

Pure functions of their inputs. A descriptor is 16 bytes: Address (bytes 0-7), Length (8-11),
reserved (12-14) and the SGL Identifier (byte 15: Descriptor Type in bits 7:4, Sub Type in bits
3:0). Here a descriptor is the pair of little-endian quadwords the SQE's DPTR holds in its PRP1
and PRP2 fields when CDW0.PSDT is 01b: ``(address, length | identifier << 56)``.

A transfer that is one contiguous range in the device's address space is one Data Block
descriptor in the SQE itself: no list memory. Several ranges (the no-IOMMU lane's physical runs,
or a read with Bit Bucket holes) are a list: SGL1 is a Last Segment descriptor pointing to it;
a list longer than one page is chained, each full page's last descriptor a Segment (or, for the
page before the last, a Last Segment) descriptor pointing to the next page.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DESCRIPTOR_SIZE = 16
# CDW0 bits 15:14, PSDT (PRP or SGL for Data Transfer), as the SQE's flags byte (bits 7:6):
# 01b, SGLs for the data, MPTR a contiguous metadata buffer.
PSDT_SGL = 0x40
PSDT_MASK = 0xC0


class DescriptorType(enum.IntEnum):
    """Figure 115 "SGL Descriptor Type" (the identifier's bits 7:4)."""

    DATA_BLOCK = 0x0
    BIT_BUCKET = 0x1
    SEGMENT = 0x2
    LAST_SEGMENT = 0x3


# Identify Controller SGLS (Figure 275): bits 1:0 SGL support (01b: any alignment; 10b: dword
# aligned and granular), bit 16 Bit Bucket descriptors supported.
SGLS_SUPPORT_MASK = 0x3
SGLS_DWORD_ALIGNED = 0x2
SGLS_BIT_BUCKET = 1 << 16


def supported(sgls: int) -> bool:
    """Does Identify Controller SGLS say the NVM command set takes SGLs (bits 1:0 01b or 10b)?"""
    return sgls & SGLS_SUPPORT_MASK in (1, 2)


def bit_bucket_supported(sgls: int) -> bool:
    return supported(sgls) and bool(sgls & SGLS_BIT_BUCKET)


def dword_aligned(sgls: int) -> bool:
    """SGLS bits 1:0 = 10b: every data block's address and length must be dword aligned."""
    return sgls & SGLS_SUPPORT_MASK == SGLS_DWORD_ALIGNED


def identifier(kind: DescriptorType) -> int:
    """The SGL Identifier byte: the type in bits 7:4, Sub Type 0h (Address) in bits 3:0."""
    return int(kind) << 4


def descriptor(kind: DescriptorType, address: int, length: int) -> tuple[int, int]:
    """One descriptor as its two quadwords."""
    if not 0 <= length < 1 << 32:
        raise ValueError(f"SGL descriptor length {length} does not fit 32 bits")
    return address, length | identifier(kind) << 56


def data_block(address: int, length: int) -> tuple[int, int]:
    return descriptor(DescriptorType.DATA_BLOCK, address, length)


def bit_bucket(length: int) -> tuple[int, int]:
    """A hole in a read: the controller discards ``length`` bytes (the Address field is ignored)."""
    return descriptor(DescriptorType.BIT_BUCKET, 0, length)


def data_block_words(addresses: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorized :func:`data_block`: the SGL1 quadwords (PRP1, PRP2 fields) of a batch whose
    transfers are each one contiguous range. Data Block's identifier is 00h, so PRP2 is the length."""
    return addresses.astype(np.uint64), lengths.astype(np.uint64)


@dataclass(frozen=True)
class Sgl:
    sgl1: tuple[int, int]  # the SQE's DPTR: (PRP1 field, PRP2 field)
    lists: tuple[np.ndarray, ...]  # uint64 pairs per list page, copied to the list pages in order


def list_pages_for(descriptors: int, page_size: int) -> int:
    """How many list pages hold ``descriptors`` data/bit bucket descriptors (chain pointers
    included); 0 when one descriptor fits the SQE."""
    per = page_size // DESCRIPTOR_SIZE
    if descriptors <= 1:
        return 0
    return 1 if descriptors <= per else 1 + -(-(descriptors - per) // (per - 1))


def build(extents: Sequence[tuple[int, int, int]], page_size: int, list_iovas: Sequence[int] = ()) -> Sgl:
    """SGL1 and the list pages' contents for one command whose data is ``extents``: each
    ``(DescriptorType, address, length)``, Data Block or Bit Bucket, in transfer order.

    One extent is SGL1 itself. More go in list pages at ``list_iovas`` (page aligned, at least
    :func:`list_pages_for` of them): SGL1 is a Last Segment descriptor when one page holds them
    all, else a Segment descriptor, and each full page ends in the descriptor of the next (Last
    Segment for the final page)."""
    if not extents:
        raise ValueError("an SGL needs at least one descriptor")
    for kind, _, length in extents:
        if kind not in (DescriptorType.DATA_BLOCK, DescriptorType.BIT_BUCKET) or length <= 0:
            raise ValueError(f"extents are Data Block or Bit Bucket with a positive length, got {kind!r}, {length}")
    words = [descriptor(DescriptorType(k), a if k == DescriptorType.DATA_BLOCK else 0, n) for k, a, n in extents]
    if len(words) == 1:
        return Sgl(words[0], ())
    need = list_pages_for(len(words), page_size)
    if len(list_iovas) < need:
        raise ValueError(f"{need} SGL list pages needed, {len(list_iovas)} given")
    per = page_size // DESCRIPTOR_SIZE
    pages: list[np.ndarray] = []
    pos = 0
    for k in range(need):
        last = k == need - 1
        take = len(words) - pos if last else per - 1
        page = np.array(words[pos : pos + take], dtype=np.uint64).reshape(-1)
        pos += take
        if not last:
            if list_iovas[k + 1] % page_size:
                raise ValueError(f"SGL list page {list_iovas[k + 1]:#x} is not page aligned")
            # the next page's descriptors: a full page (its last one a chain pointer), or the rest
            nxt = per if k + 1 < need - 1 else len(words) - pos
            kind = DescriptorType.LAST_SEGMENT if k + 1 == need - 1 else DescriptorType.SEGMENT
            page = np.concatenate([page, np.array(descriptor(kind, list_iovas[k + 1], nxt * DESCRIPTOR_SIZE),
                                                  dtype=np.uint64)])
        pages.append(page)
    first = len(pages[0]) // 2
    kind = DescriptorType.LAST_SEGMENT if need == 1 else DescriptorType.SEGMENT
    return Sgl(descriptor(kind, list_iovas[0], first * DESCRIPTOR_SIZE), tuple(pages))

