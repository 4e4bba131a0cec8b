"""The DMA ledger: every buffer the device may touch comes from here.

Memory is page-aligned, mapped at an IOVA the ledger chose inside the IOMMU's
usable ranges (``VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE``), never in a reserved
hole. A :class:`DmaBuffer` is a handle (slot, generation); after ``free`` the
handle is stale and every use raises ``stale-handle``. Memory is zeroed before
it is unmapped and freed. The IOVA is not part of the public API: only the
broker asks the ledger for it.

Without an IOMMU (VFIO's no-IOMMU mode) the device sees physical addresses. The ledger
then works over a :class:`~nvmevfio.noiommu_pool.PhysicalPool` (a :class:`DevicePool`):
pinned hugetlb memory whose frame numbers come from /proc/self/pagemap. The ledger hands
out pool addresses, and the broker translates each device-visible field, page by page, to
the physical address inside broker memory. Caller buffers become *bounce* buffers, as
Linux's swiotlb does: the caller's bytes live in ordinary memory the device never sees, and
the broker copies them to their shadow in the pool before a write (``sync_for_device``) and
back after a read (``sync_for_cpu``).
No physical address is ever part of a result, handle or message.
"""

from __future__ import annotations

import bisect
import ctypes
import fcntl
import mmap
import os
import threading
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from nvmevfio.errors import Refused, StaleHandle

PAGE_SIZE = mmap.PAGESIZE
HUGE_SHIFT = 21
HUGE_PAGE = 1 << HUGE_SHIFT  # broker-private memory uses 2 MiB pages when the ledger asks for hugetlb
# IOVA 0 and the page above it are never handed out: a zero PRP is the
# classic symptom of a missing address, and must fault, not hit a buffer.
DEFAULT_IOVA_FLOOR = 1 << 20

# mbind(2) and get_mempolicy(2) (no libnuma: the raw system calls); numaif.h's names
_SYS_MBIND = {"x86_64": 237, "aarch64": 235}.get(os.uname().machine)
_SYS_GET_MEMPOLICY = {"x86_64": 239, "aarch64": 236}.get(os.uname().machine)
MPOL_PREFERRED = 1
MPOL_F_ADDR = 1 << 1  # get_mempolicy: the policy of the mapping at addr
MPOL_MF_MOVE = 1 << 1  # mbind: move the mapping's pages already there (MAP_POPULATE touched them)


def node_mask(node: int) -> list[int]:
    """A one-node nodemask as mbind(2) reads it: unsigned longs, bit ``node`` set."""
    words = [0] * (node // 64 + 1)
    words[node // 64] = 1 << (node % 64)
    return words


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def prefer_node(addr: int, size: int, node: int) -> int:
    """Ask the kernel to keep the pages of ``[addr, addr + size)`` on NUMA node ``node``
    (MPOL_PREFERRED; the pages already there moved). Before the IOMMU mapping pins them. Returns 0
    or the errno (the placement is a preference: a failure leaves the memory where it is)."""
    if _SYS_MBIND is None:
        return 38  # ENOSYS: an architecture whose number we do not carry
    words = node_mask(node)
    mask = (ctypes.c_ulong * len(words))(*words)
    rc = _libc().syscall(_SYS_MBIND, ctypes.c_void_p(addr), ctypes.c_ulong(size), MPOL_PREFERRED, mask,
                         ctypes.c_ulong(64 * len(words) + 1), MPOL_MF_MOVE)
    return 0 if rc == 0 else ctypes.get_errno()


def memory_policy(addr: int) -> int:
    """The NUMA policy mode (MPOL_*) of the mapping holding ``addr`` (get_mempolicy, MPOL_F_ADDR)."""
    if _SYS_GET_MEMPOLICY is None:
        return -1
    mode = ctypes.c_int(-1)
    _libc().syscall(_SYS_GET_MEMPOLICY, ctypes.byref(mode), None, ctypes.c_ulong(0), ctypes.c_void_p(addr),
                    ctypes.c_ulong(MPOL_F_ADDR))
    return mode.value


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


class IovaAllocator:
    """First-fit allocator over inclusive ``(start, end)`` ranges, with coalescing on free.

    Pure: it knows nothing of VFIO. Holes between ranges are never returned.
    """

    def __init__(self, ranges: list[tuple[int, int]], page_size: int = PAGE_SIZE,
                 floor: int = DEFAULT_IOVA_FLOOR) -> None:
        self.page_size = page_size
        free: list[tuple[int, int]] = []  # [start, end) half-open, sorted, disjoint
        for start, end_incl in sorted(ranges):
            lo = align_up(max(start, floor), page_size)
            hi = (end_incl + 1) // page_size * page_size
            if hi > lo:
                free.append((lo, hi))
        self._free = free
        self.total = sum(hi - lo for lo, hi in free)

    @property
    def free_bytes(self) -> int:
        return sum(hi - lo for lo, hi in self._free)

    @property
    def free_extents(self) -> list[tuple[int, int]]:
        """Free extents as half-open ``(start, end)`` pairs."""
        return list(self._free)

    def alloc(self, size: int, alignment: int | None = None) -> int:
        alignment = max(alignment or self.page_size, self.page_size)
        size = align_up(size, self.page_size)
        for i, (lo, hi) in enumerate(self._free):
            start = align_up(lo, alignment)
            if start + size <= hi:
                pieces = []
                if start > lo:
                    pieces.append((lo, start))
                if start + size < hi:
                    pieces.append((start + size, hi))
                self._free[i : i + 1] = pieces
                return start
        raise Refused(
            "iova-exhausted",
            f"no free IOVA extent of {size:#x} bytes (alignment {alignment:#x}); "
            f"{self.free_bytes:#x} bytes free in {len(self._free)} extents",
            size=size, free=self.free_bytes,
        )

    def free(self, iova: int, size: int) -> None:
        size = align_up(size, self.page_size)
        end = iova + size
        i = bisect.bisect_left(self._free, (iova, end))
        if (i > 0 and self._free[i - 1][1] > iova) or (i < len(self._free) and self._free[i][0] < end):
            raise ValueError(f"IOVA [{iova:#x}, {end:#x}) is already free")
        lo, hi = iova, end
        if i < len(self._free) and self._free[i][0] == hi:
            hi = self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][1] == lo:
            lo = self._free.pop(i - 1)[0]
            i -= 1
        self._free.insert(i, (lo, hi))


class DmaMapper(Protocol):
    """What maps host memory into the device's IOVA space (a VFIO container, or the simulator)."""

    def map_dma(self, vaddr: int, iova: int, size: int, device_writable: bool = True) -> None: ...
    def unmap_dma(self, iova: int, size: int) -> None: ...


class DevicePool(Protocol):
    """The no-IOMMU lane's device-visible memory as the ledger uses it
    (:class:`nvmevfio.noiommu_pool.PhysicalPool`): pool addresses, their memory, and their
    translation to the addresses the device sees."""

    def ranges(self, page_size: int) -> list[tuple[int, int]]: ...
    def view(self, start: int, size: int) -> np.ndarray: ...
    def contiguous(self, start: int, size: int) -> bool: ...
    def translate(self, values: np.ndarray) -> None: ...
    def translate_one(self, value: int) -> int: ...
    def close(self) -> None: ...


class _Memory:
    """Caller-visible memory: one page-aligned anonymous mapping from Python's mmap, which
    refuses to close while a numpy view of it exists. A freed buffer's memory is scrubbed
    and unmapped from the IOMMU at once, and released from the process only once the
    caller's last view is gone, so a stale view can never crash."""

    def __init__(self, size: int, shared: bool = False) -> None:
        """``shared``: a sealed memfd (:attr:`fd`) that another process may map too (the service
        passes it to its client); its size is sealed, so a client cannot shrink it under the
        broker's feet (which would fault the broker's own accesses)."""
        populate = getattr(mmap, "MAP_POPULATE", 0)
        self.size = size
        self.fd: int | None = None
        if shared:
            fd = os.memfd_create("nvmevfio-dma", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                os.ftruncate(fd, size)
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
                self._mm: mmap.mmap | None = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | populate)
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
        else:
            self._mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
        self.array = np.frombuffer(self._mm, dtype=np.uint8)
        self.addr = int(self.array.ctypes.data)

    def try_release(self) -> bool:
        if self.fd is not None:  # the memory stays while our mapping (or a client's) does
            os.close(self.fd)
            self.fd = None
        if self._mm is None:
            return True
        self.array = np.empty(0, dtype=np.uint8)
        try:
            self._mm.close()
        except BufferError:
            return False  # a caller still holds a view; retried on later frees
        self._mm = None
        return True


class _PrivateMemory:
    """Broker-private memory (queues, PRP lists, staging) from the C shim: populated,
    locked, hugetlb on request. Its views never leave the broker, so it is released
    as soon as it is freed."""

    def __init__(self, size: int, hugetlb: bool = False) -> None:
        from nvmevfio._ffi import check, ffi, lib

        self._lib = lib
        out = ffi.new("void **")
        check(lib.nv_mem_alloc(size, int(hugetlb), out), "mmap anonymous memory", f"{size:#x} bytes",
              "hugetlb pages reserved? (/proc/sys/vm/nr_hugepages)" if hugetlb else "")
        self._ptr = out[0]
        self.size = size
        self.addr = int(ffi.cast("uintptr_t", self._ptr))
        self.array = np.frombuffer(ffi.buffer(self._ptr, size), dtype=np.uint8)

    def try_release(self) -> bool:
        if self._ptr is not None:
            self.array = np.empty(0, dtype=np.uint8)
            self._lib.nv_mem_free(self._ptr, self.size)
            self._ptr = None
        return True


class _PoolMemory:
    """A piece of the physical pool (broker memory the device sees in the no-IOMMU lane)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.size = array.size
        self.addr = int(array.ctypes.data)

    def try_release(self) -> bool:
        self.array = np.empty(0, dtype=np.uint8)
        return True


@dataclass(eq=False)
class _Slot:
    generation: int = 0
    mem: _Memory | _PrivateMemory | _PoolMemory | None = None
    iova: int = 0
    size: int = 0
    owner: str = ""
    in_flight: int = 0
    shadow: _PoolMemory | None = None  # no-IOMMU lane: the device-visible copy of a caller buffer


@dataclass(frozen=True, eq=False)
class DmaBuffer:
    """A handle to ledger memory. Holds no address; the ledger checks its generation on every use."""

    slot: int
    generation: int
    size: int
    owner: str
    _ledger: DmaLedger = field(repr=False)

    @property
    def array(self) -> np.ndarray:
        """The buffer's bytes as a writable uint8 numpy array (zero copy)."""
        return self._ledger.array(self)

    @property
    def live(self) -> bool:
        return self._ledger.is_live(self)


class DmaLedger:
    def __init__(self, mapper: DmaMapper, ranges: list[tuple[int, int]], *,
                 page_size: int = PAGE_SIZE, hugetlb: bool = False, pool: DevicePool | None = None) -> None:
        """``hugetlb``: back broker-private memory (queues, PRP lists, staging) with 2 MiB pages.
        ``pool``: the no-IOMMU lane; device addresses are the pool's physical addresses (``ranges``
        and ``mapper`` are not used), and caller buffers are bounce buffers."""
        self._mapper = mapper
        self.page_size = page_size
        self.hugetlb = hugetlb
        self.pool = pool
        self.bounce = pool is not None
        self.ranges = pool.ranges(page_size) if pool is not None else list(ranges)  # usable device addresses
        self.iovas = IovaAllocator(self.ranges, page_size)
        self._slots: list[_Slot] = []
        self._vacant: list[int] = []
        self._zombies: list[_Memory | _PrivateMemory | _PoolMemory] = []
        self._lock = threading.Lock()  # alloc and free may come from several threads (one per queue)
        self.detached = False  # the container is closed: its IOMMU mappings went with it
        self.version = 0  # counts allocations and frees: a snapshot of regions() is current while it holds
        # the function's NUMA node on a host of several (pci.numa_placement): memory placed there
        # before the IOMMU mapping pins it; None: nothing to choose
        self.numa_node: int | None = None
        self.numa_errors = 0  # allocations the kernel would not place (mbind's errno aside)

    # -- allocation ---------------------------------------------------------
    def alloc(self, size: int, *, owner: str = "caller", device_writable: bool = True,
              alignment: int | None = None, contiguous: bool = False, shared: bool = False) -> DmaBuffer:
        """``contiguous``: the device reads the buffer as one piece from its first address (a
        queue, 4.1.3 with CAP.CQR), not page by page through PRP entries. It matters only in
        the no-IOMMU lane, whose pool memory is contiguous within each huge page only.
        ``shared``: a caller buffer in a sealed memfd (:meth:`memfd`), for another process."""
        with self._lock:
            return self._alloc(size, owner, device_writable, alignment, contiguous, shared)

    def _alloc(self, size: int, owner: str, device_writable: bool, alignment: int | None,
               contiguous: bool, shared: bool = False) -> DmaBuffer:
        if size <= 0:
            raise Refused("length-mismatch", f"DMA buffer size must be positive, got {size}", size=size)
        private = owner.startswith("broker:")
        huge = self.hugetlb and private and self.pool is None
        mapped = align_up(size, HUGE_PAGE if huge else self.page_size)
        if contiguous and self.pool is not None and mapped <= HUGE_PAGE:
            # aligned to a power of two at least its size, it cannot cross a huge page boundary
            alignment = max(alignment or self.page_size, 1 << (mapped - 1).bit_length())
        iova = self.iovas.alloc(mapped, alignment)
        if contiguous and self.pool is not None and not self.pool.contiguous(iova, mapped):
            self.iovas.free(iova, mapped)
            raise Refused("noiommu-contiguity",
                          f"a {mapped >> 10} KiB queue would span huge pages of the no-IOMMU pool that are not "
                          "physically adjacent; use a queue of at most 2 MiB", size=size)
        shadow = None
        try:
            mem: _Memory | _PrivateMemory | _PoolMemory
            if self.pool is not None:  # no IOMMU: pool memory, at its physical address
                shadow = _PoolMemory(self.pool.view(iova, mapped))
                mem = shadow if private else _Memory(mapped, shared)
            else:
                mem = _PrivateMemory(mapped, huge) if private else _Memory(mapped, shared)
        except BaseException:
            self.iovas.free(iova, mapped)
            raise
        if self.pool is None:
            if self.numa_node is not None and prefer_node(mem.addr, mapped, self.numa_node):
                self.numa_errors += 1
            try:
                self._mapper.map_dma(mem.addr, iova, mapped, device_writable)
            except BaseException:
                self.iovas.free(iova, mapped)
                mem.try_release()
                raise
        if self._vacant:
            index = self._vacant.pop()
        else:
            index = len(self._slots)
            self._slots.append(_Slot())
        slot = self._slots[index]
        slot.mem, slot.iova, slot.size, slot.owner, slot.in_flight = mem, iova, size, owner, 0
        slot.shadow = shadow if shadow is not mem else None
        self.version += 1
        return DmaBuffer(index, slot.generation, size, owner, self)

    def free(self, buf: DmaBuffer) -> None:
        with self._lock:
            self._free(buf)

    def _free(self, buf: DmaBuffer) -> None:
        slot = self._live_slot(buf)
        if slot.in_flight:
            raise Refused("buffer-in-flight",
                          f"buffer slot {buf.slot} has {slot.in_flight} command(s) in flight",
                          slot=buf.slot)
        self._release(buf.slot, slot)

    def _release(self, index: int, slot: _Slot) -> None:
        mem = slot.mem
        assert mem is not None  # _live_slot guarantees it; internal invariant
        mem.array.fill(0)  # scrub before the memory leaves the ledger
        shadow, slot.shadow = slot.shadow, None
        if shadow is not None:  # and the bounce copy, before the pool hands it to another owner
            shadow.array.fill(0)
            shadow.try_release()
        mapped = mem.size
        slot.generation += 1  # every outstanding handle is stale from here on
        self.version += 1
        slot.mem = None
        self._vacant.append(index)
        try:
            if not self.detached and self.pool is None:
                self._mapper.unmap_dma(slot.iova, mapped)
        finally:
            self.iovas.free(slot.iova, mapped)
            if not mem.try_release():
                self._zombies.append(mem)
            self._zombies = [z for z in self._zombies if not z.try_release()]

    def detach(self) -> None:
        """The IOMMU mappings are gone with the VFIO container (the device was handed back to the
        kernel): from now on frees scrub and release host memory without unmapping. Host memory
        stays valid, so a caller's array over a buffer never faults."""
        with self._lock:
            self.detached = True

    def close(self) -> None:
        """Free every live buffer (in-flight ones too: the device is gone), then the pool."""
        for index, slot in enumerate(self._slots):
            if slot.mem is not None:
                slot.in_flight = 0
                self._release(index, slot)
        if self.pool is not None:
            self.pool.close()

    # -- the no-IOMMU lane's bounce copies ----------------------------------------
    def sync_for_device(self, buf: DmaBuffer, offset: int, length: int) -> None:
        """Before the device reads ``buf[offset:offset+length]`` (a WRITE command): copy the
        caller's bytes to the buffer's device-visible shadow. Nothing to do with an IOMMU."""
        shadow = self._slots[buf.slot].shadow if self.bounce else None
        if shadow is not None:
            shadow.array[offset : offset + length] = self.array(buf)[offset : offset + length]

    def sync_for_cpu(self, buf: DmaBuffer, offset: int, length: int) -> None:
        """After the device wrote ``buf[offset:offset+length]`` (a READ completed): copy the
        shadow's bytes back to the caller's memory. Nothing to do with an IOMMU."""
        shadow = self._slots[buf.slot].shadow if self.bounce else None
        if shadow is not None and self.is_live(buf):
            self.array(buf)[offset : offset + length] = shadow.array[offset : offset + length]

    def bounce_arrays(self, buf: DmaBuffer) -> tuple[np.ndarray, np.ndarray | None]:
        """The caller's memory of ``buf`` and, in the no-IOMMU lane, its device-visible shadow (for
        C code that makes the bounce copies itself); None: the device uses the memory itself."""
        slot = self._live_slot(buf)
        shadow = slot.shadow if self.bounce else None
        return self.array(buf), (shadow.array if shadow is not None else None)

    def translate(self, values: np.ndarray) -> None:
        """Ledger addresses in ``values`` (uint64, in place) become what the device must see:
        unchanged with an IOMMU; physical addresses in the no-IOMMU lane (page by page, see
        :class:`~nvmevfio.noiommu_pool.PhysicalPool`). Zero and already translated values stay as they are."""
        if self.pool is not None:
            self.pool.translate(values)

    def device_address(self, iova: int) -> int:
        """:meth:`translate` for one address."""
        return self.pool.translate_one(iova) if self.pool is not None else iova

    def reserve_device_range(self, size: int, alignment: int) -> int:
        """IOVA space no buffer will ever get, nothing mapped at it: for an address the device
        resolves itself (the Controller Memory Buffer's base), so no DMA address can collide."""
        if self.pool is not None:
            raise Refused("invalid-argument", "the no-IOMMU lane has no IOVA space to reserve")
        return self.iovas.alloc(size, alignment)

    def device_ranges(self, iova: int, length: int) -> list[tuple[int, int]]:
        """``[iova, iova + length)`` as the device sees it, as (address, length) ranges each
        contiguous for the device: one with an IOMMU; in the no-IOMMU lane one per physically
        contiguous run (the pool is contiguous within each huge page, see :meth:`translate`)."""
        if self.pool is None:
            return [(iova, length)]
        out: list[tuple[int, int]] = []
        pos, end = iova, iova + length
        while pos < end:
            piece = min(end, pos - pos % HUGE_PAGE + HUGE_PAGE) - pos
            pa = self.pool.translate_one(pos)
            if out and out[-1][0] + out[-1][1] == pa:
                out[-1] = (out[-1][0], out[-1][1] + piece)
            else:
                out.append((pa, piece))
            pos += piece
        return out

    # -- lookups ---------------------------------------------------------------
    def _live_slot(self, buf: DmaBuffer) -> _Slot:
        if not isinstance(buf, DmaBuffer):
            raise Refused("invalid-argument", f"not a DMA buffer handle: {type(buf).__name__}",
                          type=type(buf).__name__)
        if buf._ledger is not self or buf.slot >= len(self._slots):
            raise StaleHandle(f"buffer handle {buf.slot}/{buf.generation} is not from this ledger",
                              slot=buf.slot, generation=buf.generation)
        slot = self._slots[buf.slot]
        if slot.generation != buf.generation or slot.mem is None:
            raise StaleHandle(
                f"buffer handle slot {buf.slot} generation {buf.generation} is stale "
                f"(slot is at generation {slot.generation})",
                slot=buf.slot, generation=buf.generation, current=slot.generation,
            )
        return slot

    def regions(self) -> list[tuple[int, int, str, int]]:
        """(device address, size, owner, generation) of every live buffer: who owns which device
        addresses (the validator's map). The size is the one asked for: a transfer past it runs
        past the end of the buffer, even inside its last mapped page."""
        with self._lock:
            return [(s.iova, s.size, s.owner, s.generation) for s in self._slots if s.mem is not None]

    def memfd(self, buf: DmaBuffer) -> int:
        """The memfd behind a ``shared`` buffer (the broker's; dup it to pass it on)."""
        mem = self._live_slot(buf).mem
        fd = getattr(mem, "fd", None)
        if fd is None:
            raise Refused("invalid-argument", f"buffer slot {buf.slot} is not shared memory", slot=buf.slot)
        return int(fd)

    def is_live(self, buf: DmaBuffer) -> bool:
        try:
            self._live_slot(buf)
        except StaleHandle:
            return False
        return True

    def array(self, buf: DmaBuffer) -> np.ndarray:
        slot = self._live_slot(buf)
        assert slot.mem is not None
        return slot.mem.array[: buf.size]

    def iova(self, buf: DmaBuffer) -> int:
        """The buffer's device address. For the broker only; never handed to callers."""
        return self._live_slot(buf).iova

    def live_iova(self, buf: DmaBuffer) -> int | None:
        """``iova()`` for the hot path: None (instead of a refusal) when the handle is not live."""
        slots = self._slots
        if buf._ledger is self and buf.slot < len(slots):
            slot = slots[buf.slot]
            if slot.generation == buf.generation and slot.mem is not None:
                return slot.iova
        return None

    def pin(self, buf: DmaBuffer, commands: int = 1) -> None:
        """Count commands in flight on ``buf``; free() refuses it until they complete."""
        self._live_slot(buf).in_flight += commands

    def unpin(self, slot: int, generation: int, commands: int = 1) -> None:
        """The device is done with ``commands`` commands on buffer (slot, generation)."""
        if 0 <= slot < len(self._slots):
            s = self._slots[slot]
            if s.generation == generation and s.mem is not None:
                s.in_flight = max(0, s.in_flight - commands)

    def in_flight(self, buf: DmaBuffer) -> int:
        """Commands in flight on ``buf`` (pinned)."""
        return self._live_slot(buf).in_flight

    def live_buffers(self) -> int:
        return sum(1 for s in self._slots if s.mem is not None)
