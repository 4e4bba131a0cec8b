"""VFIO: the IOMMU backend and the device for one PCI function (linux/vfio.h, linux/iommufd.h).

``open_function(address)`` does the whole dance, with one of two IOMMU backends:

- ``type1``: IOMMU group from sysfs, the container with a type1 IOMMU (v2 preferred), the
  device fd from the group;
- ``iommufd`` (Linux 6.6+ with VFIO_DEVICE_CDEV): the device's cdev
  (/dev/vfio/devices/vfioN) bound to /dev/iommu, attached to an IOAS of its own.

then BAR0 mapped, and the PCI command register with memory space and bus master enabled.
``backend="auto"`` (the default, or $NVMEVFIO_BACKEND) takes iommufd when the function has a
cdev and /dev/iommu exists, as libvfn does, else type1. Either way the broker chooses every
IOVA. Everything closes in reverse order (context managers).
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nvmevfio._ffi import check, const, ffi, lib
from nvmevfio.errors import ShimError, VfioError
from nvmevfio.mmio import BarMmio

log = logging.getLogger(__name__)

SYSFS_PCI = Path("/sys/bus/pci/devices")
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 1 << 1
PCI_COMMAND_MASTER = 1 << 2
PCI_COMMAND_INTX_DISABLE = 1 << 10
_MAX_CAPS = 64


@dataclass(frozen=True)
class RegionInfo:
    index: int
    flags: int
    size: int
    offset: int
    sparse: tuple[tuple[int, int], ...] = ()

    @property
    def mmap_ok(self) -> bool:
        return bool(self.flags & const("VFIO_REGION_INFO_FLAG_MMAP"))


@dataclass(frozen=True)
class IrqInfo:
    index: int
    flags: int
    count: int


@dataclass(frozen=True)
class IommuInfo:
    flags: int
    iova_pgsizes: int
    ranges: tuple[tuple[int, int], ...]
    dma_avail: int | None
    backend: str = "type1"  # "type1" (VFIO container), "iommufd", or "noiommu" (no IOVA ranges)

    @property
    def min_page_size(self) -> int:
        pgs = self.iova_pgsizes
        return pgs & -pgs if pgs else 4096


class Container:
    """An open /dev/vfio/vfio with (after a group joined) a type1 IOMMU set."""

    def __init__(self, path: str = "/dev/vfio/vfio") -> None:
        self.path = path
        self.fd = check(lib.nv_container_open(path.encode()), "open VFIO container", path,
                        "is the vfio module loaded and are you root?")
        self.iommu_type: int | None = None

    def check_extension(self, extension: int) -> bool:
        return check(lib.nv_container_check_extension(self.fd, extension), "VFIO_CHECK_EXTENSION",
                     self.path) > 0

    def set_iommu(self) -> int:
        """VFIO_SET_IOMMU with the best type the kernel offers: type1v2, then type1."""
        for name in ("VFIO_TYPE1v2_IOMMU", "VFIO_TYPE1_IOMMU", "VFIO_NOIOMMU_IOMMU"):
            kind = const(name)
            if self.check_extension(kind):
                check(lib.nv_container_set_iommu(self.fd, kind), "VFIO_SET_IOMMU", f"{self.path} ({name})")
                self.iommu_type = kind
                return kind
        raise VfioError("the VFIO container supports no type1 IOMMU (is the IOMMU enabled?)",
                        reason="no-iommu-type")

    @property
    def noiommu(self) -> bool:
        return self.iommu_type == const("VFIO_NOIOMMU_IOMMU")

    def iommu_info(self) -> IommuInfo:
        info = ffi.new("struct nv_iommu_info *")
        ranges = ffi.new("struct nv_iova_range[]", _MAX_CAPS)
        check(lib.nv_iommu_info(self.fd, info, ranges, _MAX_CAPS), "VFIO_IOMMU_GET_INFO", self.path)
        n = min(info.nr_ranges, _MAX_CAPS)
        got = tuple((int(ranges[i].start), int(ranges[i].end)) for i in range(n))
        if not got:  # kernels before 5.4 report no ranges: assume the 48-bit space
            got = ((0, (1 << 48) - 1),)
        avail = None if info.dma_avail == 0xFFFFFFFF else int(info.dma_avail)
        return IommuInfo(int(info.flags), int(info.iova_pgsizes), got, avail)

    def map_dma(self, vaddr: int, iova: int, size: int, device_writable: bool = True) -> None:
        check(lib.nv_dma_map(self.fd, vaddr, iova, size, int(device_writable)), "VFIO_IOMMU_MAP_DMA",
              f"iova {iova:#x}+{size:#x}")

    def unmap_dma(self, iova: int, size: int) -> None:
        check(lib.nv_dma_unmap(self.fd, iova, size), "VFIO_IOMMU_UNMAP_DMA", f"iova {iova:#x}+{size:#x}")

    def close(self) -> None:
        if self.fd >= 0:
            lib.nv_close(self.fd)
            self.fd = -1


IOMMUFD_PATH = "/dev/iommu"
DEV_VFIO_DEVICES = Path("/dev/vfio/devices")
BACKENDS = ("auto", "type1", "iommufd", "noiommu")
NOIOMMU_RISK = ("no IOMMU: the device reaches all of physical memory and nothing checks where it writes; the "
                "broker keeps every device address inside its own pinned pool, but a faulty device or a bug "
                "can corrupt any memory. Use it only where no IOMMU can be had (a cloud VM without a vIOMMU)")


class Iommufd:
    """An open /dev/iommu with one I/O address space (IOAS) for the device (linux/iommufd.h).

    The same two calls as a type1 container (``map_dma``/``unmap_dma``, the ledger's
    ``DmaMapper``), done with IOMMU_IOAS_MAP at the IOVA the broker chose (FIXED_IOVA)."""

    def __init__(self, path: str = IOMMUFD_PATH) -> None:
        self.path = path
        self.fd = check(lib.nv_open_rw(path.encode()), "open iommufd", path,
                        "does the kernel have CONFIG_IOMMUFD, and are you root?")
        ioas = ffi.new("uint32_t *")
        try:
            check(lib.nv_ioas_alloc(self.fd, ioas), "IOMMU_IOAS_ALLOC", path)
        except BaseException:
            lib.nv_close(self.fd)
            raise
        self.ioas_id = int(ioas[0])

    def iommu_info(self) -> IommuInfo:
        """IOMMU_IOAS_IOVA_RANGES: the IOAS's usable IOVA ranges (holes reserved by the attached
        devices, such as the MSI window, already removed) and the mapping alignment."""
        ranges = ffi.new("struct nv_iova_range[]", _MAX_CAPS)
        nr = ffi.new("uint32_t *")
        alignment = ffi.new("uint64_t *")
        check(lib.nv_ioas_iova_ranges(self.fd, self.ioas_id, ranges, _MAX_CAPS, nr, alignment),
              "IOMMU_IOAS_IOVA_RANGES", f"{self.path} IOAS {self.ioas_id}")
        got = tuple((int(ranges[i].start), int(ranges[i].end)) for i in range(min(nr[0], _MAX_CAPS)))
        if not got:
            raise VfioError(f"IOAS {self.ioas_id} has no usable IOVA range", reason="no-iova-range")
        # iommufd reports an alignment (at most PAGE_SIZE), not page sizes: the ledger maps pages.
        return IommuInfo(0, max(int(alignment[0]), mmap.PAGESIZE), got, None, backend="iommufd")

    def map_dma(self, vaddr: int, iova: int, size: int, device_writable: bool = True) -> None:
        check(lib.nv_ioas_map(self.fd, self.ioas_id, vaddr, iova, size, int(device_writable)), "IOMMU_IOAS_MAP",
              f"iova {iova:#x}+{size:#x}")

    def unmap_dma(self, iova: int, size: int) -> None:
        check(lib.nv_ioas_unmap(self.fd, self.ioas_id, iova, size), "IOMMU_IOAS_UNMAP", f"iova {iova:#x}+{size:#x}")

    def attach(self, device_fd: int, address: str) -> int:
        """VFIO_DEVICE_BIND_IOMMUFD, then VFIO_DEVICE_ATTACH_IOMMUFD_PT to this IOAS; returns the
        device's iommufd object id."""
        dev_id = ffi.new("uint32_t *")
        check(lib.nv_device_bind_iommufd(device_fd, self.fd, dev_id), "VFIO_DEVICE_BIND_IOMMUFD", address,
              "is another process using the device, or its IOMMU group through /dev/vfio/N?")
        check(lib.nv_device_attach_pt(device_fd, self.ioas_id), "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
              f"{address} to IOAS {self.ioas_id}")
        return int(dev_id[0])

    def close(self) -> None:
        if self.fd >= 0:
            lib.nv_iommufd_destroy(self.fd, self.ioas_id)
            lib.nv_close(self.fd)
            self.fd = -1


class Group:
    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = check(lib.nv_open_rw(path.encode()), "open VFIO group", path,
                        "is the function bound to vfio-pci (`nvmevfio bind`) and are you root?")
        self.attached = False

    def status(self) -> int:
        flags = ffi.new("uint32_t *")
        check(lib.nv_group_status(self.fd, flags), "VFIO_GROUP_GET_STATUS", self.path)
        return int(flags[0])

    @property
    def viable(self) -> bool:
        return bool(self.status() & const("VFIO_GROUP_FLAGS_VIABLE"))

    def attach(self, container: Container) -> None:
        if not self.viable:
            raise VfioError(
                f"VFIO group {self.path} is not viable: every device in the IOMMU group must be "
                "bound to vfio-pci (or have no driver)", reason="group-not-viable")
        check(lib.nv_group_set_container(self.fd, container.fd), "VFIO_GROUP_SET_CONTAINER", self.path)
        self.attached = True

    def get_device(self, address: str) -> int:
        return check(lib.nv_group_get_device(self.fd, address.encode()), "VFIO_GROUP_GET_DEVICE_FD",
                     f"{address} in {self.path}")

    def close(self) -> None:
        if self.fd >= 0:
            if self.attached:
                lib.nv_group_unset_container(self.fd)
                self.attached = False
            lib.nv_close(self.fd)
            self.fd = -1


class Device:
    """A VFIO device fd: regions, config space, BAR mapping, IRQs, reset."""

    def __init__(self, fd: int, address: str) -> None:
        self.fd = fd
        self.address = address
        info = ffi.new("struct nv_device_info *")
        check(lib.nv_device_info(fd, info), "VFIO_DEVICE_GET_INFO", address)
        self.flags = int(info.flags)
        self.num_regions = int(info.num_regions)
        self.num_irqs = int(info.num_irqs)
        self._maps: list[tuple[Any, int]] = []
        self.eventfds: list[int] = []
        self.request_fd = -1  # VFIO device request eventfd (enable_request)

    @property
    def can_reset(self) -> bool:
        return bool(self.flags & const("VFIO_DEVICE_FLAGS_RESET"))

    def region(self, index: int) -> RegionInfo:
        info = ffi.new("struct nv_region_info *")
        areas = ffi.new("struct nv_sparse_area[]", _MAX_CAPS)
        check(lib.nv_region_info(self.fd, index, info, areas, _MAX_CAPS), "VFIO_DEVICE_GET_REGION_INFO",
              f"{self.address} region {index}")
        sparse = tuple((int(areas[i].offset), int(areas[i].size)) for i in range(min(info.nr_sparse, _MAX_CAPS)))
        return RegionInfo(int(info.index), int(info.flags), int(info.size), int(info.offset), sparse)

    def irq(self, index: int) -> IrqInfo:
        info = ffi.new("struct nv_irq_info *")
        check(lib.nv_irq_info(self.fd, index, info), "VFIO_DEVICE_GET_IRQ_INFO", f"{self.address} irq {index}")
        return IrqInfo(int(info.index), int(info.flags), int(info.count))

    # -- config space ------------------------------------------------------------
    @functools.cached_property
    def _config_offset(self) -> int:
        """Where PCI config space sits in the device fd (VFIO_PCI_CONFIG_REGION_INDEX)."""
        return self.region(const("VFIO_PCI_CONFIG_REGION_INDEX")).offset

    def config_read(self, offset: int, width: int) -> int:
        buf = ffi.new("uint8_t[]", width)
        check(lib.nv_region_pread(self.fd, self._config_offset + offset, buf, width), "config read",
              f"{self.address} +{offset:#x}")
        return int.from_bytes(bytes(ffi.buffer(buf, width)), "little")

    def config_write(self, offset: int, width: int, value: int) -> None:
        data = value.to_bytes(width, "little")
        check(lib.nv_region_pwrite(self.fd, self._config_offset + offset, data, width), "config write",
              f"{self.address} +{offset:#x}")

    def enable_bus_master(self) -> int:
        """Set memory space and bus master in the PCI command register; returns the new value."""
        cmd = self.config_read(PCI_COMMAND, 2)
        new = cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
        if new != cmd:
            self.config_write(PCI_COMMAND, 2, new)
        return self.config_read(PCI_COMMAND, 2)

    # -- BAR ---------------------------------------------------------------------
    def map_bar(self, index: int = 0) -> BarMmio:
        region = self.region(index)
        if region.size == 0:
            raise VfioError(f"{self.address} BAR{index} is not implemented", reason="bar-missing")
        if not region.mmap_ok:
            raise VfioError(f"{self.address} BAR{index} cannot be mmapped", reason="bar-not-mappable")
        out = ffi.new("void **")
        try:
            check(lib.nv_region_mmap(self.fd, region.offset, region.size, 1, out), "mmap", f"{self.address} BAR{index}")
            size = region.size
        except ShimError:
            # Older kernels refuse mapping the MSI-X table: map the sparse area at offset 0
            # (the registers and doorbells come first in an NVMe BAR0).
            first = next((a for a in region.sparse if a[0] == 0), None)
            if first is None:
                raise
            check(lib.nv_region_mmap(self.fd, region.offset, first[1], 1, out), "mmap",
                  f"{self.address} BAR{index} sparse area")
            size = first[1]
        self._maps.append((out[0], size))
        return BarMmio(out[0], size)

    # -- interrupts --------------------------------------------------------------
    def enable_msix(self, count: int) -> list[int]:
        """Attach ``count`` fresh eventfds to MSI-X vectors 0..count-1."""
        index = const("VFIO_PCI_MSIX_IRQ_INDEX")
        info = self.irq(index)
        if count > info.count:
            raise VfioError(f"{self.address} has {info.count} MSI-X vectors, {count} asked",
                            reason="msix-vectors", available=info.count)
        self.disable_msix()
        fds = [check(lib.nv_eventfd_open(), "eventfd", self.address) for _ in range(count)]
        try:
            check(lib.nv_irq_set_eventfds(self.fd, index, 0, count, ffi.new("int32_t[]", fds)),
                  "VFIO_DEVICE_SET_IRQS (MSI-X eventfds)", self.address)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self.eventfds = fds
        return fds

    def disable_msix(self) -> None:
        if self.eventfds:
            lib.nv_irq_disable(self.fd, const("VFIO_PCI_MSIX_IRQ_INDEX"))
            for fd in self.eventfds:
                os.close(fd)
            self.eventfds = []

    def enable_request(self) -> int | None:
        """An eventfd on VFIO's device request interrupt (VFIO_PCI_REQ_IRQ_INDEX): the kernel signals
        it when it wants the device back (hot-unplug, unbind, ``remove``) and waits until every fd
        and mapping of the device is released. None when the device has no such interrupt."""
        index = const("VFIO_PCI_REQ_IRQ_INDEX")
        if index >= self.num_irqs or self.irq(index).count < 1:
            return None
        fd = check(lib.nv_eventfd_open(), "eventfd", self.address)
        try:
            check(lib.nv_irq_set_eventfds(self.fd, index, 0, 1, ffi.new("int32_t[]", [fd])),
                  "VFIO_DEVICE_SET_IRQS (device request eventfd)", self.address)
        except BaseException:
            os.close(fd)
            raise
        self.request_fd = fd
        return fd

    def detach_bars(self) -> None:
        """Drop the BAR mappings' hold on the device: each becomes anonymous memory reading all
        ones (a removed device's answer), so a late register access reads "gone", never faults.
        Those few pages stay mapped until the process exits."""
        for ptr, size in self._maps:
            check(lib.nv_map_ones(ptr, size), "mmap (BAR detach)", self.address)
        self._maps = []

    def hot_reset(self, group_fds: list[int]) -> None:
        """PCI hot reset (VFIO_DEVICE_PCI_HOT_RESET: a secondary bus reset), ownership proven with
        ``group_fds`` (a cdev-opened device passes none); see VfioFunction.reset_unavailable."""
        fds = ffi.new("int32_t[]", group_fds or [0])
        check(lib.nv_device_hot_reset(self.fd, fds, len(group_fds)), "VFIO_DEVICE_PCI_HOT_RESET", self.address)

    def reset(self) -> bool:
        """VFIO_DEVICE_RESET when the device supports it; returns whether it was done."""
        if not self.can_reset:
            return False
        check(lib.nv_device_reset(self.fd), "VFIO_DEVICE_RESET", self.address)
        return True

    def close(self) -> None:
        if self.fd < 0:
            return
        self.disable_msix()
        if self.request_fd >= 0:
            lib.nv_irq_disable(self.fd, const("VFIO_PCI_REQ_IRQ_INDEX"))
            os.close(self.request_fd)
            self.request_fd = -1
        for ptr, size in self._maps:
            lib.nv_munmap(ptr, size)
        self._maps = []
        lib.nv_close(self.fd)
        self.fd = -1


def iommu_group_of(address: str) -> str:
    """The /dev/vfio path of a function's IOMMU group (noiommu groups included)."""
    link = SYSFS_PCI / address / "iommu_group"
    if not link.exists():
        raise VfioError(f"{address} has no IOMMU group: is the IOMMU on (intel_iommu=on / amd_iommu=on)?",
                        reason="no-iommu-group", address=address)
    group = os.path.basename(os.readlink(link))
    for path in (f"/dev/vfio/{group}", f"/dev/vfio/noiommu-{group}"):
        if os.path.exists(path):
            return path
    raise VfioError(f"{address}: /dev/vfio/{group} does not exist; bind the function to vfio-pci "
                    f"first (`nvmevfio bind {address}`)", reason="not-bound-to-vfio", address=address)


def device_cdev_of(address: str) -> str | None:
    """The function's VFIO device cdev (/dev/vfio/devices/vfioN), or None when the kernel made
    none (no CONFIG_VFIO_DEVICE_CDEV, or not bound to vfio-pci)."""
    for entry in sorted((SYSFS_PCI / address / "vfio-dev").glob("vfio*")):
        path = DEV_VFIO_DEVICES / entry.name
        if path.exists():
            return str(path)
    return None


def choose_backend(address: str, backend: str | None = None) -> str:
    """``type1``, ``iommufd`` or ``noiommu`` for ``address``. ``None`` reads $NVMEVFIO_BACKEND
    (default ``auto``); ``auto`` takes iommufd when the function has a device cdev and /dev/iommu
    exists, noiommu when its group is a no-IOMMU group, else type1."""
    wanted = (backend or os.environ.get("NVMEVFIO_BACKEND") or "auto").lower()
    if wanted not in BACKENDS:
        raise VfioError(f"unknown IOMMU backend {wanted!r}; choose one of {', '.join(BACKENDS)}",
                        reason="invalid-argument", backend=wanted)
    if wanted != "auto":
        return wanted
    if device_cdev_of(address) and os.path.exists(IOMMUFD_PATH):
        return "iommufd"
    group = SYSFS_PCI / address / "iommu_group"
    if group.exists() and os.path.exists(f"/dev/vfio/noiommu-{os.path.basename(os.readlink(group))}"):
        return "noiommu"  # VFIO's no-IOMMU mode (vfio.enable_unsafe_noiommu_mode=1)
    return "type1"


@dataclass
class VfioFunction:
    """One PCI function opened through VFIO: its IOMMU backend (a type1 container and group, or
    an iommufd IOAS), the device, BAR0."""

    address: str
    mapper: Container | Iommufd
    group: Group | None
    device: Device
    bar0: BarMmio
    iommu: IommuInfo
    pci_command: int
    _closed: bool = field(default=False, repr=False)

    @property
    def backend(self) -> str:
        return self.iommu.backend

    def reset_unavailable(self, kind: str) -> str | None:
        """Why VFIO offers no ``kind`` reset (``flr``, ``hot``) for this function; None when it does."""
        if kind == "flr":
            return None if self.device.can_reset else "VFIO_DEVICE_FLAGS_RESET is clear for this function"
        affected = int(lib.nv_device_hot_reset_count(self.device.fd))
        if affected < 0:
            return (f"VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: {os.strerror(-affected)} (a function on a root bus has "
                    "no secondary bus to reset)")
        if affected > 1:
            return f"a hot reset would reset {affected} devices; nvmevfio owns only its own function"
        return None

    def function_reset(self, kind: str) -> None:
        """A PCI-level reset: ``flr`` (VFIO_DEVICE_RESET: FLR, or whatever reset VFIO has for the
        function) or ``hot`` (a secondary bus reset); the controller comes back with CC.EN=0 and
        config space restored by VFIO. ``VfioError`` (``reset-kind-unavailable``) where VFIO has none."""
        if kind == "flr":
            if not self.device.reset():
                raise VfioError(f"{self.address}: VFIO_DEVICE_FLAGS_RESET is clear", reason="reset-kind-unavailable")
        elif kind == "hot":
            self.device.hot_reset([self.group.fd] if self.group is not None else [])
        else:
            raise ValueError(f"function reset kind {kind!r}")

    def bar_memory(self, index: int) -> tuple[np.ndarray, int]:
        """BAR ``index`` mapped as bytes (for memory the controller exposes there, the Controller
        Memory Buffer) and its PCI bus address (sysfs ``resource``: start, end, flags per BAR)."""
        bar = self.device.map_bar(index)
        memory = np.frombuffer(ffi.buffer(bar.base, bar.size), dtype=np.uint8)
        lines = (Path("/sys/bus/pci/devices") / self.address / "resource").read_text().split("\n")
        return memory, int(lines[index].split()[0], 16)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.device.close()
        if self.group is not None:
            self.group.close()
        self.mapper.close()

    def release(self) -> None:
        """Hand the device back to the kernel now: BAR mappings replaced by all-ones memory, then
        the device, group and container fds closed (the IOMMU mappings go with the container)."""
        if self._closed:
            return
        self.device.detach_bars()
        self.close()

    def __enter__(self) -> VfioFunction:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def noiommu_allowed(unsafe_noiommu: bool | None) -> bool:
    """The no-IOMMU opt-in: the argument, else $NVMEVFIO_UNSAFE_NOIOMMU=1."""
    if unsafe_noiommu is not None:
        return unsafe_noiommu
    return os.environ.get("NVMEVFIO_UNSAFE_NOIOMMU", "") == "1"


def open_function(address: str, *, reset: bool = False, backend: str | None = None,
                  unsafe_noiommu: bool | None = None) -> VfioFunction:
    """Open a PCI function bound to vfio-pci: IOMMU backend (see :func:`choose_backend`), device,
    BAR0, bus master. A function in a no-IOMMU group opens only with ``unsafe_noiommu`` (or
    $NVMEVFIO_UNSAFE_NOIOMMU=1); it is refused with ``noiommu-not-allowed`` otherwise."""
    from nvmevfio.pci import normalize_address

    address = normalize_address(address)
    chosen = choose_backend(address, backend)
    if chosen == "iommufd":
        return _open_iommufd(address, reset)
    return _open_type1(address, reset, noiommu_ok=chosen == "noiommu" and noiommu_allowed(unsafe_noiommu))


def _finish(address: str, mapper: Container | Iommufd, group: Group | None, device: Device,
            reset: bool, iommu: IommuInfo | None = None) -> VfioFunction:
    if reset:
        device.reset()
    bar0 = device.map_bar(0)
    command = device.enable_bus_master()
    return VfioFunction(address, mapper, group, device, bar0, iommu or mapper.iommu_info(), command)


def _open_iommufd(address: str, reset: bool) -> VfioFunction:
    cdev = device_cdev_of(address)
    if cdev is None:
        raise VfioError(f"{address} has no VFIO device cdev (/dev/vfio/devices/vfioN): the kernel needs "
                        "CONFIG_VFIO_DEVICE_CDEV and the function must be bound to vfio-pci; use the type1 "
                        "backend otherwise", reason="no-iommufd", address=address)
    iommufd = Iommufd()
    fd = -1
    device = None
    try:
        fd = check(lib.nv_open_rw(cdev.encode()), "open VFIO device cdev", cdev)
        iommufd.attach(fd, address)
        device = Device(fd, address)
        return _finish(address, iommufd, None, device, reset)
    except BaseException:
        if device is not None:
            device.close()
        elif fd >= 0:
            lib.nv_close(fd)
        iommufd.close()
        raise


def _open_type1(address: str, reset: bool, noiommu_ok: bool = False) -> VfioFunction:
    group_path = iommu_group_of(address)
    container = Container()
    group = device = None
    try:
        group = Group(group_path)
        group.attach(container)
        container.set_iommu()
        if container.noiommu:
            if not noiommu_ok:
                raise VfioError(f"{address} is in a no-IOMMU VFIO group: {NOIOMMU_RISK}. Opt in with "
                                "--unsafe-noiommu / open(unsafe_noiommu=True) / NVMEVFIO_UNSAFE_NOIOMMU=1",
                                reason="noiommu-not-allowed", address=address)
            log.warning("%s: %s", address, NOIOMMU_RISK)
            device = Device(group.get_device(address), address)
            # no IOVA space: the ledger's device addresses are its pinned pool's physical ones
            return _finish(address, container, group, device, reset, IommuInfo(0, mmap.PAGESIZE, (), None, "noiommu"))
        device = Device(group.get_device(address), address)
        return _finish(address, container, group, device, reset)
    except BaseException:
        if device is not None:
            device.close()
        if group is not None:
            group.close()
        container.close()
        raise


class VfioIrq:
    """MSI-X completions through VFIO eventfds (the broker's IrqWaiter)."""

    def __init__(self, device: Device) -> None:
        self.device = device

    def vectors(self, count: int) -> None:
        self.device.enable_msix(count)

    def fd(self, vector: int) -> int:
        """The eventfd MSI-X ``vector`` signals (the C queue pair polls it)."""
        return int(self.device.eventfds[vector])

    def close(self) -> None:
        self.device.disable_msix()
