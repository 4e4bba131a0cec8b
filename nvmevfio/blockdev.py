"""Block access to one namespace: ``nvmevfio.open(address, nsid=1)``.

``BlockDevice`` binds, enables, identifies and creates I/O queues on entry and
shuts the controller down on exit. Data goes in and out as numpy uint8 arrays or
any bytes-like object; the batched form keeps many commands in flight.
"""

from __future__ import annotations

import functools
import io
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from nvmevfio.broker import Broker, RegisteredBuffer
from nvmevfio.broker.recovery import Recovery
from nvmevfio.broker.submit import Submit
from nvmevfio.broker.syncio import SyncIO
from nvmevfio.broker.zones import ZoneVerbs
from nvmevfio.dma import DmaBuffer
from nvmevfio.errors import Refused
from nvmevfio.provider import ControllerSession, Provider, open_controller
from nvmevfio.verbs import NamespaceVerb, Verb


@dataclass(frozen=True)
class DeviceInfo:
    address: str
    nsid: int
    block_size: int
    block_count: int
    capacity_bytes: int
    max_transfer_bytes: int
    model: str
    serial: str
    firmware: str
    queue_depth: int
    completion_mode: str
    shadow_doorbells: bool
    data_descriptors: str  # "prp" or "sgl": what describes READ and WRITE data (create_io_queues(sgl=))
    sq_in_cmb: bool  # the submission queues live in the Controller Memory Buffer
    dma_lane: str  # "type1" or "iommufd" (the IOMMU interface), "noiommu" (bounced), "simulated"
    io_queues: int = 1  # I/O queue pairs created (qids 1..io_queues); a service session is one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BlockDevice:
    # The provider's read_into/write_from with the namespace bound (functools.partial): no Python
    # frame of their own on the synchronous hot path.
    read_into: Callable[..., None]
    """read_into(lba, count, buf, offset=0, qid=1): read into a DMA buffer (or registration); one
    command (the usual case) is one C call that posts it and waits for its completion (spinning,
    or on the MSI-X eventfd)."""
    write_from: Callable[..., None]
    """write_from(lba, count, buf, offset=0, qid=1): write from a DMA buffer, as read_into."""

    def __init__(self, provider: Provider, nsid: int = 1, *, address: str = "", queue_depth: int | None = None,
                 irq: bool = False, queues: int = 1, shadow_doorbells: bool | None = None, sgl: bool = False,
                 sq_in_cmb: bool = False, queues_up_to: bool = False, queue_depth_up_to: bool = False) -> None:
        self.provider = provider
        self.nsid = nsid
        try:
            if provider.state != "ready":
                provider.enable()
            ctrl = provider.identify_controller()
            if queue_depth_up_to and queue_depth:
                queue_depth = min(queue_depth, provider.mqes)  # a wish: at most CAP.MQES+1 entries
            try:
                depth = provider.create_io_queues(queues, queue_depth, irq=irq, shadow_doorbells=shadow_doorbells,
                                                  sgl=sgl, sq_in_cmb=sq_in_cmb)
            except Refused as exc:
                # ``queues_up_to``: a default count, not the caller's: as many as the controller
                # grants (Set Features Number of Queues answered fewer; nothing was created)
                allowed = int(exc.context.get("allowed", 0))
                if not (queues_up_to and exc.reason == "count-out-of-range" and 1 <= allowed < queues):
                    raise
                queues = allowed
                depth = provider.create_io_queues(queues, queue_depth, irq=irq, shadow_doorbells=shadow_doorbells,
                                                  sgl=sgl, sq_in_cmb=sq_in_cmb)
            ns = provider.namespace(nsid, metadata=True)
        except BaseException:
            provider.close()
            raise
        self.info = DeviceInfo(
            address=address, nsid=nsid, block_size=ns.block_size, block_count=ns.size_blocks,
            capacity_bytes=ns.size_bytes, max_transfer_bytes=provider.max_transfer,
            model=ctrl["mn"].strip(), serial=ctrl["sn"].strip(), firmware=ctrl["fr"].strip(),
            queue_depth=depth, completion_mode="irq" if irq else "poll",
            shadow_doorbells=provider.shadow_doorbells, data_descriptors="sgl" if sgl else "prp", sq_in_cmb=sq_in_cmb,
            dma_lane=provider.dma_lane, io_queues=queues)
        self.block_size = ns.block_size
        self.block_count = ns.size_blocks
        self.metadata_size = ns.metadata_size  # bytes per block; read_blocks/write_blocks move it
        self.protection = ns.protection  # end-to-end protection (nvme/pi.py), None without
        self.read_into = functools.partial(provider.read_into, nsid)
        self.write_from = functools.partial(provider.write_from, nsid)

    # -- the provider's verbs with this device's namespace bound (nvmevfio/verbs.py): each is
    # written once, in the broker component that does it
    check_window = NamespaceVerb(Provider.check_window)
    read_blocks = NamespaceVerb(SyncIO.read)
    read_sparse = NamespaceVerb(SyncIO.read_sparse)
    write_blocks = NamespaceVerb(SyncIO.write)
    flush = NamespaceVerb(SyncIO.flush)
    write_zeroes = NamespaceVerb(SyncIO.write_zeroes)
    deallocate = NamespaceVerb(SyncIO.deallocate)
    # a zoned namespace (refused not-zoned otherwise): its zones, append, the zone actions, writes at the pointer
    zone_report = NamespaceVerb(ZoneVerbs.zone_report)
    zones = NamespaceVerb(ZoneVerbs.zones)
    zone_action = NamespaceVerb(ZoneVerbs.zone_action)
    zone_append = NamespaceVerb(ZoneVerbs.zone_append)
    zone_write = NamespaceVerb(ZoneVerbs.zone_write)
    perf_loop = NamespaceVerb(Submit.perf_loop)
    free_buffer = Verb(Submit.free_buffer, via="provider")
    register_buffer = Verb(Submit.register_buffer, via="provider")
    unregister_buffer = Verb(Submit.unregister_buffer, via="provider")
    in_flight = Verb(Submit.in_flight, via="provider")
    capacity = Verb(Submit.capacity, via="provider")
    doorbell_counters = Verb(Provider.doorbell_counters, via="provider")
    reset_controller = Verb(Recovery.reset, via="provider", name="reset_controller")
    alloc_buffer = Verb(Provider.alloc_buffer, via="provider")
    reap = Verb(Submit.reap, via="provider")
    close = Verb(Broker.close, via="provider")  # a ControllerSession's own close, when it is one

    # -- synchronous ----------------------------------------------------------------
    # -- zero copy and batches ------------------------------------------------------------
    def submit_reads(self, lbas: Any, counts: Any, buf: DmaBuffer | RegisteredBuffer, offsets: Any,
                     qid: int = 1) -> np.ndarray:
        """Post a batch of reads (one doorbell); returns their tags. Collect with :meth:`reap`."""
        return self.provider.submit("read", self.nsid, lbas, counts, buf, offsets, qid=qid)

    def submit_writes(self, lbas: Any, counts: Any, buf: DmaBuffer | RegisteredBuffer, offsets: Any,
                      qid: int = 1) -> np.ndarray:
        return self.provider.submit("write", self.nsid, lbas, counts, buf, offsets, qid=qid)

    def submit_appends(self, zslbas: Any, counts: Any, buf: DmaBuffer | RegisteredBuffer, offsets: Any,
                       qid: int = 1) -> np.ndarray:
        """Post a batch of Zone Appends (a zoned namespace; each LBA a zone's start); returns their
        tags. :meth:`reap`'s records carry the LBA each was written at (``nvme.zns.appended_lbas``)."""
        return self.provider.submit("append", self.nsid, zslbas, counts, buf, offsets, qid=qid)

    def file(self) -> BlockFile:
        """A file-like view of the namespace (io.RawIOBase)."""
        return BlockFile(self)

    def __enter__(self) -> BlockDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlockFile(io.RawIOBase):
    """``io.RawIOBase`` over a namespace: read, readinto, write, seek, tell.

    Aligned requests go straight to the device; unaligned ones read-modify-write
    the edge blocks. Writing past the end of the namespace is refused.
    """

    def __init__(self, dev: BlockDevice) -> None:
        super().__init__()
        self.dev = dev
        self.size = dev.info.capacity_bytes
        self.pos = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self.pos = base + offset
        return self.pos

    def readinto(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        n = max(0, min(len(mv), self.size - self.pos))
        if n == 0:
            return 0
        bs = self.dev.block_size
        first, last = self.pos // bs, (self.pos + n + bs - 1) // bs
        data = self.dev.read_blocks(first, last - first)
        skip = self.pos - first * bs
        np.frombuffer(mv, dtype=np.uint8, count=n)[:] = data[skip : skip + n]
        self.pos += n
        return n

    def write(self, b: Any) -> int:
        mv = np.frombuffer(memoryview(b).cast("B"), dtype=np.uint8)
        n = len(mv)
        if n == 0:
            return 0
        if self.pos + n > self.size:
            raise Refused("window-past-namespace-end", f"write of {n} bytes at {self.pos} passes the end of the "
                          f"namespace ({self.size} bytes)", offset=self.pos, length=n)
        bs = self.dev.block_size
        first, last = self.pos // bs, (self.pos + n + bs - 1) // bs
        if self.pos % bs == 0 and n % bs == 0:
            self.dev.write_blocks(first, mv)
        else:
            buf = np.empty((last - first) * bs, dtype=np.uint8)
            buf[:bs] = self.dev.read_blocks(first, 1)
            if last - 1 > first:
                buf[-bs:] = self.dev.read_blocks(last - 1, 1)
            skip = self.pos - first * bs
            buf[skip : skip + n] = mv
            self.dev.write_blocks(first, buf)
        self.pos += n
        return n


def open(address: str, nsid: int = 1, *, irq: bool = False, queue_depth: int | None = None, queues: int = 1,
         reset: bool = False, hugetlb: bool = False, shadow_doorbells: bool | None = None, sgl: bool = False,
         sq_in_cmb: bool = False, command_timeout_s: float | None = None, backend: str | None = None,
         unsafe_noiommu: bool | None = None, queues_up_to: bool = False,
         queue_depth_up_to: bool = False) -> BlockDevice:
    """Open namespace ``nsid`` of the controller at ``address`` (bound to vfio-pci).

    ``irq``: completions by MSI-X instead of polling; ``queue_depth``: I/O queue entries (up to
    CAP.MQES+1); ``reset``: VFIO function reset first; ``hugetlb``: 2 MiB pages for the broker's
    queues and staging memory; ``shadow_doorbells``: use Doorbell Buffer Config when the
    controller offers it (MMIO doorbells only when the EventIdx rule asks for them); None, the
    default: where it pays, which is not on QEMU's nvme model (docs/benchmarks.md); ``sgl``:
    READ and WRITE describe their data with SGL descriptors (4.1.2) instead of PRPs, where
    Identify Controller SGLS offers them (refused ``sgl-unsupported`` otherwise); ``sq_in_cmb``:
    the I/O submission queues live in the controller's Controller Memory Buffer (refused
    ``cmb-unavailable`` where it has none that may hold them);
    ``command_timeout_s``: how long a command may take (default 30 s) before the broker aborts
    it, then resets the controller and requeues what was in flight; ``backend``: the IOMMU
    interface, ``type1`` (VFIO container), ``iommufd`` (VFIO device cdev, Linux 6.6+) or ``auto``
    (the default, or $NVMEVFIO_BACKEND: iommufd when the function has a cdev); ``unsafe_noiommu``:
    allow a function without an IOMMU (VFIO no-IOMMU mode; also $NVMEVFIO_UNSAFE_NOIOMMU=1), with
    every caller buffer bounced through the broker's pinned pool; ``queues_up_to``: ``queues`` is
    a wish, not a requirement: fewer when the controller grants fewer (``info.io_queues`` says
    how many), where otherwise that is refused ``count-out-of-range``; ``queue_depth_up_to``
    likewise for ``queue_depth``: at most CAP.MQES+1 entries (``info.queue_depth`` says how many)."""
    session: ControllerSession = open_controller(address, reset=reset, hugetlb=hugetlb,
                                                 command_timeout_s=command_timeout_s, backend=backend,
                                                 unsafe_noiommu=unsafe_noiommu)
    return BlockDevice(session, nsid, address=session.address, queue_depth=queue_depth, irq=irq, queues=queues,
                       shadow_doorbells=shadow_doorbells, sgl=sgl, sq_in_cmb=sq_in_cmb, queues_up_to=queues_up_to,
                       queue_depth_up_to=queue_depth_up_to)
