"""PRP construction (NVMe base spec 2.0, 4.1.1 "Physical Region Page Entry and List").

Pure functions of their inputs. A transfer of ``length`` bytes at device address
``iova`` (contiguous in IOVA space, dword aligned) is described by PRP1, which may
carry an offset into its page, and PRP2, which is 0 (one page), the second page
(two pages) or a pointer to a PRP list. A list page holds ``page_size / 8``
entries; when more are needed, the last entry of each full page points to the
next list page (a chain).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Prp:
    prp1: int
    prp2: int
    lists: tuple[np.ndarray, ...]  # one uint64 array per list page, to be copied to the list IOVAs in order


def data_pages(iova: int, length: int, page_size: int) -> int:
    """How many memory pages the transfer touches."""
    if length <= 0:
        raise ValueError(f"transfer length must be positive, got {length}")
    first = page_size - iova % page_size
    return 1 if length <= first else 1 + -(-(length - first) // page_size)


def list_pages_needed(iova: int, length: int, page_size: int) -> int:
    """How many PRP list pages the transfer needs (0 for one or two data pages)."""
    n = data_pages(iova, length, page_size) - 1  # entries after PRP1
    return 0 if n <= 1 else list_pages_for(n, page_size)


def list_pages_for(entries: int, page_size: int) -> int:
    """How many PRP list pages hold ``entries`` data-page entries (the chain pointers included)."""
    per = page_size // 8
    return 1 if entries <= per else 1 + -(-(entries - per) // (per - 1))


def build(iova: int, length: int, page_size: int, list_iovas: Sequence[int] = ()) -> Prp:
    """PRP1, PRP2 and the list pages' contents for one command.

    ``list_iovas`` are the device addresses of page-aligned list pages the caller
    owns; at least ``list_pages_needed()`` of them.
    """
    if iova % 4:
        raise ValueError(f"PRP1 {iova:#x} is not dword aligned")
    pages = data_pages(iova, length, page_size)
    if pages == 1:
        return Prp(iova, 0, ())
    base = iova - iova % page_size + page_size
    entries = base + page_size * np.arange(pages - 1, dtype=np.uint64)
    if pages == 2:
        return Prp(iova, int(entries[0]), ())
    lists = list_pages(entries, page_size, list_iovas)  # refuses too few list pages
    return Prp(iova, int(list_iovas[0]), lists)


def list_pages(entries: np.ndarray, page_size: int, list_iovas: Sequence[int]) -> tuple[np.ndarray, ...]:
    """The PRP-list pages for data-page addresses ``entries`` (every page after PRP1's): a
    page holds ``page_size / 8`` entries, and when more follow, its last entry points to the
    next list page, at ``list_iovas[k + 1]`` (a chain)."""
    n = len(entries)
    per = page_size // 8
    need = list_pages_for(n, page_size)
    if len(list_iovas) < need:
        raise ValueError(f"{need} PRP list pages needed, {len(list_iovas)} given")
    lists = []
    pos = 0
    for k in range(need):
        last = k == need - 1
        take = n - pos if last else per - 1
        page = np.zeros(take if last else per, dtype=np.uint64)
        page[:take] = entries[pos : pos + take]
        if not last:
            if list_iovas[k + 1] % page_size:
                raise ValueError(f"PRP list page {list_iovas[k + 1]:#x} is not page aligned")
            page[per - 1] = list_iovas[k + 1]
        pos += take
        lists.append(page)
    return tuple(lists)
