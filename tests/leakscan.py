"""The no-IOMMU lane's leak scan: walk every public attribute of what an API call returned and
look for the physical address of any page of the broker's pool.

Shared by tests/sim/test_noiommu.py (made-up physical addresses) and tests/vm/test_lanes.py
(the guest's real pool, from /proc/self/pagemap). A value is a hit when ``value >> 12`` is the
frame number of a pool page: page-aligned addresses and addresses inside a page alike. Nothing
is skipped for its shape (powers of two included)."""

from __future__ import annotations

import dataclasses
import enum
import inspect
import io
import re
from collections import deque
from typing import Any

import numpy as np

from nvmevfio import dma, noiommu_pool

PAGE_SHIFT = 12
_NUMBER = re.compile(r"0x[0-9a-fA-F]+|\b\d+\b")


def pool_frames(pool: noiommu_pool.PhysicalPool) -> np.ndarray:
    """The 4 KiB page frame numbers of every page of ``pool`` (sorted, unique)."""
    per = dma.HUGE_PAGE >> PAGE_SHIFT
    frames = (pool.frames >> np.uint64(PAGE_SHIFT))[:, None] + np.arange(per, dtype=np.uint64)
    return np.unique(frames.reshape(-1))


class LeakScan:
    """``scan(value, path)`` walks dataclasses, nvmevfio objects' public attributes (properties
    included, callables not: they are behaviour, not data), dicts (keys and values), sequences,
    numpy arrays element by element (structured ones field by field), bytes (each byte and each
    aligned 8-byte word), strings (every number written in them) and exceptions (text and
    context). ``objects`` and ``fields`` count what was looked at; ``hits`` names every leak."""

    def __init__(self, frames: np.ndarray, sizes: frozenset[int] = frozenset()) -> None:
        """``sizes``: byte counts the caller knows independently (a namespace's capacity as
        configured): a value equal to one of them that falls in a pool page is a coincidence of
        where the pool landed (a 64 MiB pool at physical 64 MiB holds the value 64 Mi), listed in
        ``coincidences`` instead of ``hits``. Nothing else is excused."""
        self.frames = np.unique(np.asarray(frames, dtype=np.uint64))
        self.sizes = sizes
        self.objects = 0
        self.fields = 0
        self.hits: list[str] = []
        self.coincidences: list[str] = []
        self._seen: set[int] = set()
        self._keep: list[Any] = []  # what was seen stays alive: an id is not reused mid-scan

    def _check(self, value: int, path: str) -> None:
        self.fields += 1
        if value >= 0 and (value >> PAGE_SHIFT) < (1 << 64) and self._pfn(value >> PAGE_SHIFT):
            (self.coincidences if value in self.sizes else self.hits).append(f"{path} = {value:#x}")

    def _pfn(self, pfn: int) -> bool:
        i = int(np.searchsorted(self.frames, np.uint64(pfn)))
        return i < len(self.frames) and int(self.frames[i]) == pfn

    def _array(self, arr: np.ndarray, path: str) -> None:
        self.objects += 1
        if arr.dtype.names:
            for name in arr.dtype.names:
                self._array(np.ascontiguousarray(arr[name]), f"{path}[{name!r}]")
            return
        if arr.dtype == object:
            for i, x in enumerate(arr.reshape(-1).tolist()):
                self.scan(x, f"{path}[{i}]")
            return
        if arr.dtype.kind in "fc":
            flat = arr.real.reshape(-1).astype(np.float64)
            arr = np.where(np.isfinite(flat) & (flat >= 0) & (flat < 2.0**64), flat, 0).astype(np.uint64)
        elif arr.dtype.kind not in "biu":
            self.fields += arr.size  # strings, datetimes: not addresses
            return
        values = arr.reshape(-1).astype(np.uint64)  # negative values wrap to huge ones: no frame
        self.fields += values.size
        found = np.flatnonzero(np.isin(values >> np.uint64(PAGE_SHIFT), self.frames))
        for i in found[:8].tolist():
            value = int(values[i])
            (self.coincidences if value in self.sizes else self.hits).append(f"{path}[{i}] = {value:#x}")

    def scan(self, value: Any, path: str) -> None:
        if value is None or isinstance(value, (bool, np.bool_)):
            self.fields += 1
        elif isinstance(value, enum.Enum):
            self.scan(value.value, f"{path}.value")
        elif isinstance(value, (int, np.integer)):
            self._check(int(value), path)
        elif isinstance(value, (float, np.floating)):
            self.fields += 1
            if np.isfinite(value) and float(value).is_integer() and value >= 0:
                self._check(int(value), path)
                self.fields -= 1
        elif isinstance(value, str):
            self.fields += 1
            for number in _NUMBER.findall(value):
                self._check(int(number, 0) if number.startswith("0x") else int(number), f"{path} ({number!r} in text)")
                self.fields -= 1
        elif isinstance(value, np.ndarray):
            self._array(value, path)
        elif isinstance(value, (bytes, bytearray, memoryview)):
            raw = np.frombuffer(bytes(value), dtype=np.uint8)
            self._array(raw, path)
            words = raw[: len(raw) // 8 * 8].view("<u8")
            self._array(words, f"{path} as 8-byte words")
        elif id(value) in self._seen:
            return
        else:
            self._seen.add(id(value))
            self._keep.append(value)
            self._container(value, path)

    def _container(self, value: Any, path: str) -> None:
        self.objects += 1
        if isinstance(value, dict):
            for k, v in value.items():
                self.scan(k, f"{path} key")
                self.scan(v, f"{path}[{k!r}]")
        elif isinstance(value, (list, tuple, set, frozenset, deque)):
            for i, x in enumerate(value):
                self.scan(x, f"{path}[{i}]")
        elif isinstance(value, BaseException):
            self.scan(str(value), f"{path} text")
            self.scan(self._public(vars(value)), f"{path}.__dict__")
        elif dataclasses.is_dataclass(value) or self._ours(value):
            for name in dir(value):
                if name.startswith("_"):
                    continue
                try:
                    attr = getattr(value, name)
                except Exception as exc:  # a property refused: its message is output too
                    self.scan(exc, f"{path}.{name} raised")
                    continue
                if callable(attr) or inspect.ismodule(attr) or isinstance(attr, type):
                    continue
                self.scan(attr, f"{path}.{name}")
        else:
            self.scan(repr(value), f"{path} repr")

    @staticmethod
    def _public(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if not k.startswith("_")}

    @staticmethod
    def _ours(value: Any) -> bool:
        return type(value).__module__.startswith("nvmevfio") or isinstance(value, io.IOBase)

    def report(self, what: str) -> str:
        said = f"; {len(self.coincidences)} equal to a known size: {self.coincidences}" if self.coincidences else ""
        return f"leak scan ({what}): {self.objects} objects, {self.fields} fields, {len(self.hits)} physical{said}"


def api_results(dev: Any) -> dict[str, Any]:
    """One result of every verb of the BlockDevice ``dev`` (ready, I/O queues created) and of
    its Provider, by name: registers, identify data, log pages, features, passthrough, every
    data path (synchronous, staged, batched, registered slots, the C perf loop, the file view),
    handles, counters, a refusal, and the two objects themselves (their public attributes)."""
    from nvmevfio import perf
    from nvmevfio.errors import NvmeVfioError
    from nvmevfio.nvme.spec import AdminOpcode

    p = dev.provider
    bs = dev.block_size
    out: dict[str, Any] = {"device": dev, "provider": p, "info": dev.info, "registers": p.registers(),
                           "state": p.state, "identify_controller": p.identify_controller(), "id_ctrl": p.id_ctrl,
                           "identify_namespace": p.identify_namespace(dev.nsid), "namespace": p.namespace(dev.nsid),
                           "active_namespaces": p.active_namespaces(), "refresh_namespaces": p.refresh_namespaces()}
    for page in ("smart", "error", "firmware"):
        out[f"log {page}"] = p.get_log_page(page)
    out["get_log"] = p.get_log(2, 512)
    out["get_features"] = p.get_features(7)  # Number of Queues
    out["event_config"] = p.event_config
    out["poll_events"] = p.poll_events()
    out["admin_passthru"] = p.admin_passthru(AdminOpcode.IDENTIFY, cdw10=1, data_len=4096)
    out["write_blocks"] = dev.write_blocks(64, np.full(8 * bs, 0x5A, dtype=np.uint8))
    out["read_blocks"] = dev.read_blocks(64, 8)
    out["io_passthru"] = p.io_passthru(0x02, nsid=dev.nsid, cdw10=64, cdw12=0, data_len=bs)  # READ one block
    buf = dev.alloc_buffer(64 << 10)
    buf.array[:] = np.arange(buf.size, dtype=np.uint64).astype(np.uint8)
    out["alloc_buffer"] = buf
    out["write_from"] = dev.write_from(128, (64 << 10) // bs, buf)
    out["read_into"] = dev.read_into(128, (64 << 10) // bs, buf)
    out["submit_writes"] = dev.submit_writes(np.arange(4) * 16 + 512, [8 * 512 // bs] * 4, buf, np.arange(4) * 4096)
    out["reap writes"] = dev.reap(4)
    out["submit_reads"] = dev.submit_reads(np.arange(4) * 16 + 512, [8 * 512 // bs] * 4, buf, np.arange(4) * 4096)
    out["in_flight"], out["capacity"] = dev.in_flight(), dev.capacity()
    out["reap reads"] = dev.reap(4)
    out["doorbell_counters"] = dev.doorbell_counters()
    slots = dev.alloc_buffer(8 * 16384)
    reg = dev.register_buffer(slots, 16384)  # 4 pages a slot: a PRP list each
    out["register_buffer"] = reg
    out["submit_writes registered"] = dev.submit_writes([1024], [16384 // bs], reg, [16384])
    out["reap registered"] = dev.reap(1)
    loop = dev.perf_loop(reg, io_size=4096, lba_range=(0, 2048), random=True, read_pct=50, depth=4, max_ios=64)
    while not loop.step(0.5):
        pass
    out["perf_loop"], out["perf_loop stats"] = loop, loop.stats()
    out["perf.run"] = perf.run(dev, workload="randrw", queue_depth=4, count=64, io_size=4096, lba_range=(0, 2048))
    f = dev.file()
    out["file"], out["file read"] = f, f.read(3 * bs + 5)
    out["device_address"] = p.device_address(buf)  # the ledger's own address (the validated lane's verb)
    out["device_regions"] = p.device_regions()
    out["device_address_ranges"] = p.device_address_ranges()
    try:
        dev.read_into(dev.block_count, 1, buf)
    except NvmeVfioError as exc:
        out["refusal"] = exc
    return out  # the buffers stay live (and registered) for the scan: closing the device frees them
