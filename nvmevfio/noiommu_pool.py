"""The no-IOMMU lane's device-visible memory (VFIO's no-IOMMU mode: the device sees physical
addresses): :class:`PhysicalPool`, pinned hugetlb memory whose frame numbers come from
/proc/self/pagemap, and the pure pieces it is built from (pagemap entries to frame numbers, runs
of physically contiguous huge pages). The ledger (:mod:`nvmevfio.dma`) allocates pool addresses
in it; the broker translates each device-visible field to the physical address. No physical
address ever leaves the broker.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import numpy as np

from nvmevfio.dma import HUGE_PAGE, HUGE_SHIFT, PAGE_SIZE, align_up
from nvmevfio.errors import VfioError

log = logging.getLogger(__name__)

# /proc/self/pagemap entries (Documentation/admin-guide/mm/pagemap.rst): bit 63 "present",
# bits 0-54 the page frame number (zero unless the reader has CAP_SYS_ADMIN).
PAGEMAP_PRESENT = 1 << 63
PAGEMAP_PFN_MASK = (1 << 55) - 1


def frames_from_pagemap(entries: np.ndarray) -> np.ndarray:
    """Page frame numbers from pagemap entries; 0 where a page is not present or the frame
    number is hidden (not root). Pure."""
    entries = np.asarray(entries, dtype=np.uint64)
    present = (entries & np.uint64(PAGEMAP_PRESENT)) != 0
    return np.where(present, entries & np.uint64(PAGEMAP_PFN_MASK), np.uint64(0))


def contiguous_runs(physical: list[int], chunk: int) -> list[tuple[int, int, int]]:
    """Runs of chunks that are contiguous both virtually (consecutive in ``physical``, the
    physical address of each ``chunk``-byte piece of one mapping) and physically: returns
    ``(physical start, offset in the mapping, length)`` for each. Pure."""
    runs: list[tuple[int, int, int]] = []
    for i, pa in enumerate(physical):
        if runs and runs[-1][0] + runs[-1][2] == pa:
            start, offset, length = runs[-1]
            runs[-1] = (start, offset, length + chunk)
        else:
            runs.append((pa, i * chunk, chunk))
    return runs


# The no-IOMMU lane's ledger allocates in a linear "pool address" space, one address per byte
# of the pool's memory from POOL_BASE; the broker turns each of those into the physical address
# the device needs (:meth:`PhysicalPool.translate`) as it authors a device-visible field. Far
# above any physical address (2**46 = 64 TiB), so that translating twice changes nothing.
POOL_BASE = 1 << 46


class PhysicalPool:
    """The no-IOMMU lane's device-visible memory: one virtually contiguous piece of pinned
    memory, and the physical address of each 2 MiB huge page of it (``frames``). The ledger
    allocates pool addresses (``POOL_BASE`` + offset); :meth:`translate` gives the device the
    physical address of each, page by page. So a buffer needs no physically contiguous memory:
    a PRP entry names one memory page, and a memory page never spans two huge pages. Only the
    queues, which the controller reads as one piece (CAP.CQR), must not cross a huge page
    boundary unless the pages are physically adjacent (:meth:`contiguous`). The physical
    addresses never leave the broker. :meth:`pinned` makes the real one."""

    def __init__(self, array: np.ndarray, physical: list[int], release: Callable[[], object] | None = None) -> None:
        self.array = array
        self.size = array.size
        self.frames = np.array(physical, dtype=np.uint64)
        self.runs = contiguous_runs(physical, HUGE_PAGE)  # (physical start, offset, length): for checks
        self._release = release

    @classmethod
    def pinned(cls, size: int, *, pagemap: str = "/proc/self/pagemap") -> PhysicalPool:
        """Locked huge pages (they stay put, and are physically contiguous inside each one) in
        a hugetlbfs memfd, with every huge page's physical address from /proc/self/pagemap."""
        from nvmevfio._ffi import check, ffi, lib

        size = align_up(max(size, HUGE_PAGE), HUGE_PAGE)
        fd, ptr = ffi.new("int *"), ffi.new("void **")
        try:
            check(lib.nv_hugepool_create(size, fd, ptr), "hugetlbfs memfd", f"{size >> 20} MiB")
        except OSError as exc:
            raise VfioError(
                f"the no-IOMMU lane needs {size >> 20} MiB of 2 MiB huge pages for its pinned pool and could not "
                f"map them ({exc}): reserve them first, e.g. echo {size // HUGE_PAGE} > /proc/sys/vm/nr_hugepages "
                "(or hugepages=N on the kernel command line)", reason="noiommu-no-hugepages", size=size) from None
        memfd, base = fd[0], ptr[0]

        def release() -> None:
            lib.nv_mem_free(base, size)
            lib.nv_close(memfd)

        try:
            physical = _physical_chunks(int(ffi.cast("uintptr_t", base)), size, pagemap)
            pool = cls(np.frombuffer(ffi.buffer(base, size), dtype=np.uint8), physical, release)
        except BaseException:
            release()
            raise
        log.debug("no-IOMMU pool: %d MiB in %d physically contiguous run(s)", size >> 20, len(pool.runs))
        return pool

    def ranges(self, page_size: int) -> list[tuple[int, int]]:
        """The ledger's allocator range: the pool's addresses (inclusive end)."""
        return [(POOL_BASE, POOL_BASE + self.size - 1)]

    def view(self, start: int, size: int) -> np.ndarray:
        """The pool memory at pool addresses ``[start, start + size)``."""
        at = start - POOL_BASE
        if at < 0 or at + size > self.size:
            raise ValueError(f"range of {size:#x} bytes is not inside the pool")
        return self.array[at : at + size]

    def contiguous(self, start: int, size: int) -> bool:
        """Whether the device sees pool addresses ``[start, start + size)`` as one physically
        contiguous piece (every huge page it crosses follows the one before)."""
        first, last = (start - POOL_BASE) // HUGE_PAGE, (start - POOL_BASE + size - 1) // HUGE_PAGE
        frames = self.frames[first : last + 1]
        return bool((np.diff(frames.astype(np.int64)) == HUGE_PAGE).all())

    def translate(self, values: np.ndarray) -> None:
        """Pool addresses in ``values`` (uint64, in place) become physical addresses; anything
        else (0, or an address already translated) is left as it is."""
        rel = values - np.uint64(POOL_BASE)  # wraps around (huge) below the pool
        inside = rel < np.uint64(self.size)
        if inside.any():
            r = rel[inside]
            values[inside] = self.frames[r >> np.uint64(HUGE_SHIFT)] + (r & np.uint64(HUGE_PAGE - 1))

    def translate_one(self, value: int) -> int:
        """:meth:`translate` for one Python int."""
        rel = value - POOL_BASE
        if 0 <= rel < self.size:
            return int(self.frames[rel >> HUGE_SHIFT]) + (rel & (HUGE_PAGE - 1))
        return value

    def close(self) -> None:
        self.array = np.empty(0, dtype=np.uint8)
        if self._release is not None:
            self._release()
            self._release = None


def _physical_chunks(addr: int, size: int, pagemap: str) -> list[int]:
    """The physical address of each HUGE_PAGE chunk of the mapping at ``addr``."""
    try:
        fd = os.open(pagemap, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise VfioError(f"cannot read {pagemap} ({exc.strerror}): the no-IOMMU lane needs it to learn the "
                        "pool's physical addresses", reason="noiommu-no-pagemap") from None
    try:
        raw = [os.pread(fd, 8, (addr + i * HUGE_PAGE) // PAGE_SIZE * 8) for i in range(size // HUGE_PAGE)]
    finally:
        os.close(fd)
    frames = frames_from_pagemap(np.frombuffer(b"".join(raw), dtype="<u8"))
    if not frames.all():
        raise VfioError(f"{pagemap} gives no page frame numbers: the no-IOMMU lane must run as root "
                        "(CAP_SYS_ADMIN) to learn its pool's physical addresses", reason="noiommu-no-pagemap")
    return [int(f) * PAGE_SIZE for f in frames]
