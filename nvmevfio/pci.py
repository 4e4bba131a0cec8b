"""PCI discovery of NVMe functions (pyudev) and driver binding through sysfs.

``list_functions()`` describes every function of class 0x010802 (NVM Express):
address, ids, model (udev hwdb), driver, IOMMU group, NUMA node and, when the
kernel nvme driver owns it, its namespaces' block devices with their mounts.
``bind()`` moves a function to vfio-pci (``driver_override`` + ``drivers_probe``),
refusing while a namespace is mounted, used as swap or held, unless forced;
``unbind()`` gives it back to the kernel nvme driver.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyudev

from nvmevfio.errors import DeviceInUse, PciError

NVME_CLASS = 0x010802
SYSFS = Path("/sys")
_ADDR_RE = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")


def normalize_address(address: str) -> str:
    """``00:04.0`` or ``0000:00:04.0`` -> ``0000:00:04.0``."""
    m = _ADDR_RE.match(address.strip())
    if m is None:
        raise PciError(f"{address!r} is not a PCI address (expected DDDD:BB:DD.F or BB:DD.F)",
                       reason="bad-address", address=address)
    domain, bus, dev, fn = m.groups()
    return f"{(domain or '0000').lower()}:{bus.lower()}:{dev.lower()}.{fn}"


@dataclass
class BlockDev:
    name: str
    nsid: int | None
    size_bytes: int
    mounts: list[str] = field(default_factory=list)
    swap: bool = False
    holders: list[str] = field(default_factory=list)


@dataclass
class NvmeFunction:
    address: str
    vendor_id: int
    device_id: int
    subsystem_vendor_id: int
    subsystem_device_id: int
    vendor: str
    model: str
    driver: str | None
    iommu_group: int | None
    numa_node: int | None
    namespaces: list[BlockDev] = field(default_factory=list)

    def users(self) -> list[str]:
        out: list[str] = []
        for ns in self.namespaces:
            out += [f"/dev/{ns.name} mounted on {m}" for m in ns.mounts]
            if ns.swap:
                out.append(f"/dev/{ns.name} is in use as swap")
            out += [f"/dev/{ns.name} is held by {h}" for h in ns.holders]
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _mounts() -> dict[str, list[str]]:
    """Mount points by device node (major:minor), from /proc/self/mountinfo."""
    out: dict[str, list[str]] = {}
    text = _read(Path("/proc/self/mountinfo")) or ""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) > 4:
            out.setdefault(parts[2], []).append(parts[4].replace("\\040", " "))
    return out


def _swaps() -> set[str]:
    text = _read(Path("/proc/swaps")) or ""
    return {line.split()[0] for line in text.splitlines()[1:] if line.split()}


def _block_devices(ctx: pyudev.Context, dev: pyudev.Device) -> list[BlockDev]:
    """Namespaces of a kernel-owned controller, and their partitions, with users."""
    mounts, swaps = _mounts(), _swaps()
    result = []
    for blk in sorted(ctx.list_devices(subsystem="block", parent=dev), key=lambda d: d.sys_name):
        sysp = Path(blk.sys_path)
        majmin = _read(sysp / "dev") or ""
        holders = sorted(p.name for p in (sysp / "holders").glob("*")) if (sysp / "holders").exists() else []
        nsid = _read(sysp / "nsid")
        size = int(_read(sysp / "size") or 0) * 512
        result.append(BlockDev(
            name=blk.sys_name,
            nsid=int(nsid) if nsid else None,
            size_bytes=size,
            mounts=mounts.get(majmin, []),
            swap=f"/dev/{blk.sys_name}" in swaps,
            holders=holders,
        ))
    return result


def describe(dev: pyudev.Device, ctx: pyudev.Context | None = None) -> NvmeFunction:
    ctx = ctx or pyudev.Context()
    sysp = Path(dev.sys_path)

    def hexattr(name: str) -> int:
        return int(_read(sysp / name) or "0", 16)

    group = sysp / "iommu_group"
    numa = _read(sysp / "numa_node")
    driver = dev.driver
    props = dev.properties
    return NvmeFunction(
        address=dev.sys_name,
        vendor_id=hexattr("vendor"),
        device_id=hexattr("device"),
        subsystem_vendor_id=hexattr("subsystem_vendor"),
        subsystem_device_id=hexattr("subsystem_device"),
        vendor=props.get("ID_VENDOR_FROM_DATABASE", ""),
        model=props.get("ID_MODEL_FROM_DATABASE", ""),
        driver=driver,
        iommu_group=int(os.path.basename(os.readlink(group))) if group.exists() else None,
        numa_node=int(numa) if numa not in (None, "", "-1") else None,
        namespaces=_block_devices(ctx, dev) if driver == "nvme" else [],
    )


def _hwdb_fill(fn: NvmeFunction) -> None:
    """Fill vendor/model from the udev hardware database when udevd has not tagged the device."""
    if fn.vendor and fn.model:
        return
    key = f"pci:v{fn.vendor_id:08X}d{fn.device_id:08X}sv{fn.subsystem_vendor_id:08X}sd{fn.subsystem_device_id:08X}"
    props = hwdb_properties(key)
    fn.vendor = fn.vendor or props.get("ID_VENDOR_FROM_DATABASE", "")
    fn.model = fn.model or props.get("ID_MODEL_FROM_DATABASE", "")


@functools.lru_cache(maxsize=64)
def hwdb_properties(modalias: str) -> dict[str, str]:
    """Look a modalias up in the udev hwdb (hwdb.bin) through libudev, which pyudev also uses."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("udev") or "libudev.so.1")
    except OSError:  # pragma: no cover - pyudev itself needs libudev
        return {}
    vp, cp = ctypes.c_void_p, ctypes.c_char_p
    for name, res, args in (
        ("udev_new", vp, []), ("udev_unref", vp, [vp]), ("udev_hwdb_new", vp, [vp]),
        ("udev_hwdb_unref", vp, [vp]),
        ("udev_hwdb_get_properties_list_entry", vp, [vp, cp, ctypes.c_uint]),
        ("udev_list_entry_get_next", vp, [vp]), ("udev_list_entry_get_name", cp, [vp]),
        ("udev_list_entry_get_value", cp, [vp]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    udev = lib.udev_new()
    hwdb = lib.udev_hwdb_new(udev) if udev else None
    out: dict[str, str] = {}
    if hwdb:
        entry = lib.udev_hwdb_get_properties_list_entry(hwdb, modalias.encode(), 0)
        while entry:
            value = lib.udev_list_entry_get_value(entry)
            out[lib.udev_list_entry_get_name(entry).decode()] = value.decode() if value else ""
            entry = lib.udev_list_entry_get_next(entry)
        lib.udev_hwdb_unref(hwdb)
    if udev:
        lib.udev_unref(udev)
    return out


def list_functions() -> list[NvmeFunction]:
    ctx = pyudev.Context()
    out = []
    for dev in ctx.list_devices(subsystem="pci"):
        cls = dev.attributes.get("class")
        if cls is None or int(cls.decode(), 16) != NVME_CLASS:
            continue
        fn = describe(dev, ctx)
        _hwdb_fill(fn)
        out.append(fn)
    return sorted(out, key=lambda f: f.address)


def get_function(address: str) -> NvmeFunction:
    address = normalize_address(address)
    ctx = pyudev.Context()
    try:
        dev = pyudev.Devices.from_path(ctx, f"/sys/bus/pci/devices/{address}")
    except pyudev.DeviceNotFoundError as exc:
        raise PciError(f"no PCI function {address}", reason="no-such-function", address=address) from exc
    cls = int((dev.attributes.get("class") or b"0").decode(), 16)
    if cls != NVME_CLASS:
        raise PciError(f"{address} is not an NVMe function (class {cls:#08x}, expected {NVME_CLASS:#08x})",
                       reason="not-nvme", address=address)
    fn = describe(dev, ctx)
    _hwdb_fill(fn)
    return fn


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise PciError(f"writing {value!r} to {path} failed: {exc.strerror}"
                       f"{' (are you root?)' if exc.errno == 13 else ''}",
                       reason="sysfs-write", path=str(path)) from exc


def _load_module(name: str) -> None:
    if (SYSFS / "bus/pci/drivers" / name).exists():
        return
    try:
        subprocess.run(["modprobe", name], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise PciError(f"the {name} driver is not loaded and `modprobe {name}` failed: {exc}",
                       reason="module-missing") from exc


def _wait_driver(address: str, want: str | None, timeout: float = 10.0) -> str | None:
    link = SYSFS / "bus/pci/devices" / address / "driver"
    deadline = time.monotonic() + timeout
    while True:
        drv = os.path.basename(os.readlink(link)) if link.exists() else None
        if drv == want or time.monotonic() > deadline:
            return drv
        time.sleep(0.02)


def _rebind(address: str, driver: str, override: str) -> NvmeFunction:
    dev_dir = SYSFS / "bus/pci/devices" / address
    if (dev_dir / "driver").exists():
        _write(dev_dir / "driver/unbind", address)
    _write(dev_dir / "driver_override", override)
    _write(SYSFS / "bus/pci/drivers_probe", address)
    got = _wait_driver(address, driver)
    if got != driver:
        raise PciError(f"{address} did not bind to {driver} (driver now: {got or 'none'})",
                       reason="bind-failed", address=address, driver=got)
    return get_function(address)


def bind(address: str, *, force: bool = False) -> NvmeFunction:
    """Move an NVMe function to vfio-pci. Refuses an in-use function unless ``force``."""
    fn = get_function(address)
    if fn.driver == "vfio-pci":
        return fn
    users = fn.users()
    if users and not force:
        raise DeviceInUse(fn.address, users)
    _load_module("vfio-pci")
    return _rebind(fn.address, "vfio-pci", "vfio-pci")


def unbind(address: str) -> NvmeFunction:
    """Give an NVMe function back to the kernel nvme driver."""
    fn = get_function(address)
    if fn.driver == "nvme":
        return fn
    _load_module("nvme")
    # An empty driver_override (a newline) clears it, so normal matching picks nvme.
    return _rebind(fn.address, "nvme", "\n")


# ------------------------------------------------------------------ NUMA
@dataclass(frozen=True)
class NumaPlacement:
    """Where a function's DMA memory and its queue threads belong: its NUMA node and the CPUs of
    that node this process may use. ``node`` is None where there is nothing to choose (a host of
    one node, or firmware that gives the function none: numa_node -1); ``why`` says which."""

    node: int | None
    cpus: tuple[int, ...]
    nodes: int  # NUMA nodes online on the host
    why: str


def parse_cpulist(text: str) -> list[int]:
    """A kernel cpulist (``0-3,8,10-11``; empty: none) as CPU numbers, ascending."""
    out: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return sorted(out)


def numa_placement(address: str, *, sysfs: Path | None = None, allowed: set[int] | None = None) -> NumaPlacement:
    """The function's NUMA node (``/sys/bus/pci/devices/ADDR/numa_node``) and the CPUs of its
    ``local_cpulist`` within ``allowed`` (default: this process's affinity), on a host with more
    than one node online (``/sys/devices/system/node/online``). A pure reading of ``sysfs``."""
    root = sysfs if sysfs is not None else SYSFS
    nodes = len(parse_cpulist(_read(root / "devices/system/node/online") or "0"))
    if nodes <= 1:
        return NumaPlacement(None, (), nodes, "one NUMA node: nothing to choose")
    dev = root / "bus/pci/devices" / normalize_address(address)
    raw = _read(dev / "numa_node")
    node = int(raw) if raw not in (None, "") else -1
    if node < 0:
        return NumaPlacement(None, (), nodes, f"{nodes} NUMA nodes, but the function has none (numa_node -1)")
    mine = allowed if allowed is not None else os.sched_getaffinity(0)
    cpus = tuple(c for c in parse_cpulist(_read(dev / "local_cpulist") or "") if c in mine)
    why = f"node {node} of {nodes}" + ("" if cpus else ": none of its CPUs is this process's, threads not pinned")
    return NumaPlacement(node, cpus, nodes, why)
