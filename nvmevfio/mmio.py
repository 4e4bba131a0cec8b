"""MMIO access to the controller's registers.

``BarMmio`` uses the shim's accessors (one volatile access of the right width,
barriers in C). ``ArrayMmio`` is a numpy register file with a write log, for the
simulator and tests. The broker and controller only see the :class:`Mmio` protocol.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np


class Mmio(Protocol):
    size: int

    def read32(self, offset: int) -> int: ...
    def write32(self, offset: int, value: int) -> None: ...
    def read64(self, offset: int) -> int: ...
    def write64(self, offset: int, value: int) -> None: ...
    def doorbell(self, offset: int, value: int) -> None: ...
    def wmb(self) -> None: ...
    def rmb(self) -> None: ...


def _check_access(size: int, offset: int, width: int) -> None:
    if offset % width or offset < 0 or offset + width > size:
        raise ValueError(f"MMIO access of {width} bytes at {offset:#x} outside or misaligned in {size:#x}")


class BarMmio:
    """A mapped BAR (or any buffer) accessed through the C shim."""

    def __init__(self, base: Any, size: int) -> None:
        from nvmevfio._ffi import ffi, lib

        self._lib = lib
        self._ffi = ffi
        self._base = ffi.cast("void *", base) if isinstance(base, int) else base
        self.size = size
        self.base = ffi.cast("uint8_t *", self._base)  # where the C queue pairs store doorbells

    def register_address(self, offset: int) -> int:
        """The virtual address of a register (the C queue pairs read CSTS there while waiting)."""
        _check_access(self.size, offset, 4)
        return int(self._ffi.cast("uintptr_t", self._base)) + offset

    def read32(self, offset: int) -> int:
        _check_access(self.size, offset, 4)
        return int(self._lib.nv_mmio_read32(self._base, offset))

    def write32(self, offset: int, value: int) -> None:
        _check_access(self.size, offset, 4)
        self._lib.nv_mmio_write32(self._base, offset, value)

    def read64(self, offset: int) -> int:
        _check_access(self.size, offset, 8)
        return int(self._lib.nv_mmio_read64(self._base, offset))

    def write64(self, offset: int, value: int) -> None:
        _check_access(self.size, offset, 8)
        self._lib.nv_mmio_write64(self._base, offset, value)

    def doorbell(self, offset: int, value: int) -> None:
        # Hot path: the offset was computed by the broker from CAP.DSTRD; the C
        # function puts the store barrier before the write.
        self._lib.nv_doorbell(self._base, offset, value)

    def wmb(self) -> None:
        self._lib.nv_wmb()

    def rmb(self) -> None:
        self._lib.nv_rmb()


class ArrayMmio:
    """A register file in a numpy array, logging every write (offset, width, value).

    ``on_write`` lets a simulated device react to register writes.
    """

    def __init__(self, size: int, on_write: Callable[[int, int, int], None] | None = None) -> None:
        self.size = size
        self.regs = np.zeros(size, dtype=np.uint8)
        self.writes: list[tuple[int, int, int]] = []
        self.on_write = on_write

    def _view(self, offset: int, width: int) -> np.ndarray:
        _check_access(self.size, offset, width)
        dtype = np.uint32 if width == 4 else np.uint64
        return self.regs[offset : offset + width].view(dtype)

    def register_address(self, offset: int) -> int:
        """Where a register lives in the numpy register file (the C queue pairs read CSTS there)."""
        _check_access(self.size, offset, 4)
        return int(self.regs.ctypes.data) + offset

    def read32(self, offset: int) -> int:
        return int(self._view(offset, 4)[0])

    def write32(self, offset: int, value: int) -> None:
        self.writes.append((offset, 4, value))
        if self.on_write is not None:
            self.on_write(offset, 4, value)
        else:
            self.poke32(offset, value)

    def read64(self, offset: int) -> int:
        return int(self._view(offset, 8)[0])

    def write64(self, offset: int, value: int) -> None:
        self.writes.append((offset, 8, value))
        if self.on_write is not None:
            self.on_write(offset, 8, value)
        else:
            self._view(offset, 8)[0] = value

    def doorbell(self, offset: int, value: int) -> None:
        self.write32(offset, value)

    def poke32(self, offset: int, value: int) -> None:
        """Set a register without logging (the device side)."""
        self._view(offset, 4)[0] = value

    def wmb(self) -> None:
        pass

    def rmb(self) -> None:
        pass
