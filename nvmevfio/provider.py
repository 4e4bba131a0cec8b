"""The Provider: what callers get. Verbs carry no address.

No verb takes an IOVA, a physical address, a PRP, a queue base, an arbitrary admin
opcode, a doorbell offset or value. What remains is non-addressing: namespace id,
LBA, block count, the data itself, and DMA buffer *handles* (slot + generation)
from :meth:`alloc_buffer`, whose device address stays inside the broker.
"""

from __future__ import annotations

import functools
import logging
import os
import select
import threading
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np

from nvmevfio.broker import Broker, RegisteredBuffer
from nvmevfio.broker.admin import AdminVerbs
from nvmevfio.broker.core import Core
from nvmevfio.broker.events import Events
from nvmevfio.broker.namespaces import Namespaces
from nvmevfio.broker.queues import Queues
from nvmevfio.broker.recovery import Recovery
from nvmevfio.broker.service import ServicePath
from nvmevfio.broker.submit import Submit
from nvmevfio.broker.syncio import SyncIO
from nvmevfio.broker.zones import ZoneVerbs
from nvmevfio.dma import DmaBuffer
from nvmevfio.errors import Refused
from nvmevfio.events import AsyncEvent
from nvmevfio.nvme import regs
from nvmevfio.nvme.spec import IoOpcode, LogPage
from nvmevfio.verbs import Verb

log = logging.getLogger("nvmevfio")

# How long the device-request thread waits for a queue's thread to let go before releasing anyway.
RELEASE_WAIT_S = 3.0
REQUEST_WHY = "the kernel asked for the device back (VFIO device request: hot-unplug, unbind or remove)"

# Registers a caller may write through write_register(); everything else is the broker's.
_WRITABLE = {"INTMS": regs.INTMS, "INTMC": regs.INTMC}
_REGISTER_OFFSETS = {"CAP": regs.CAP, "VS": regs.VS, "INTMS": regs.INTMS, "INTMC": regs.INTMC, "CC": regs.CC,
                     "CSTS": regs.CSTS, "NSSR": regs.NSSR, "AQA": regs.AQA, "ASQ": regs.ASQ, "ACQ": regs.ACQ}


class Provider:
    # The synchronous zero-copy verbs are the broker's transfer() with the opcode bound
    # (functools.partial), without a Python frame of their own: under an emulated CPU every frame
    # on the per-command path costs microseconds.
    read_into: Callable[..., None]
    """read_into(nsid, slba, count, buf, offset=0, qid=1): READ ``count`` blocks into the DMA
    buffer (or registration) ``buf`` at ``offset``; refused with a named reason before the device
    sees anything when the window, the buffer range or the handle is not right."""
    write_from: Callable[..., None]
    """write_from(nsid, slba, count, buf, offset=0, qid=1): WRITE, as read_into."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self.read_into = functools.partial(broker.transfer, IoOpcode.READ)
        self.write_from = functools.partial(broker.transfer, IoOpcode.WRITE)

    # -- the broker's verbs, each written once where the work is done (nvmevfio/verbs.py): reading
    # one gives the broker component's bound method, with its signature, docstring and refusals
    # controller state and bring-up
    bind = Verb(Core.bind)
    registers = Verb(Core.registers)
    reset = Verb(Core.reset)
    reset_controller = Verb(Recovery.reset, name="reset_controller")
    check_reset_kind = Verb(Recovery.check_reset_kind)
    enable = Verb(Core.enable)
    shutdown = Verb(Queues.shutdown)
    # identify and the namespace table
    identify_controller = Verb(Namespaces.identify_controller)
    identify_namespace = Verb(Namespaces.identify_namespace)
    active_namespaces = Verb(Namespaces.active_namespaces)
    refresh_namespaces = Verb(Namespaces.refresh_namespaces)
    namespace = Verb(Namespaces.namespace)
    # the named admin verbs
    get_features = Verb(AdminVerbs.get_features)
    set_features = Verb(AdminVerbs.set_features)
    format_nvm = Verb(AdminVerbs.format_nvm)
    compare = Verb(AdminVerbs.compare)
    verify = Verb(AdminVerbs.verify)
    create_namespace = Verb(AdminVerbs.create_namespace)
    attach_namespace = Verb(AdminVerbs.attach_namespace)
    delete_namespace = Verb(AdminVerbs.delete_namespace)
    sanitize = Verb(AdminVerbs.sanitize)
    firmware_download = Verb(AdminVerbs.firmware_download)
    firmware_commit = Verb(AdminVerbs.firmware_commit)
    device_self_test = Verb(AdminVerbs.device_self_test)
    # asynchronous events: AERs stay outstanding once the controller is identified; each event's
    # log page is read (which clears it), a namespace notice refreshes the table first
    poll_events = Verb(Events.poll_events)
    on_event = Verb(Events.on_event)
    # synchronous I/O
    read = Verb(SyncIO.read)
    read_sparse = Verb(SyncIO.read_sparse)
    write = Verb(SyncIO.write)
    flush = Verb(SyncIO.flush)
    write_zeroes = Verb(SyncIO.write_zeroes)
    deallocate = Verb(SyncIO.deallocate)
    # zoned namespaces
    zone_report = Verb(ZoneVerbs.zone_report)
    zones = Verb(ZoneVerbs.zones)
    zone_action = Verb(ZoneVerbs.zone_action)
    zone_append = Verb(ZoneVerbs.zone_append)
    zone_write = Verb(ZoneVerbs.zone_write)
    # zero-copy buffers, batches and the perf loop
    free_buffer = Verb(Submit.free_buffer)
    register_buffer = Verb(Submit.register_buffer)
    unregister_buffer = Verb(Submit.unregister_buffer)
    perf_loop = Verb(Submit.perf_loop)
    ring_doorbell = Verb(Submit.ring_doorbell)
    completion_fd = Verb(Submit.completion_fd)
    reap = Verb(Submit.reap)
    in_flight = Verb(Submit.in_flight)
    capacity = Verb(Submit.capacity)
    # the service: its compiled data path (cbits/service.c) and the validated lane's posting
    service_attach = Verb(ServicePath.service_attach)
    service_buffer = Verb(ServicePath.service_buffer)
    service_serve = Verb(ServicePath.service_serve)
    service_pump = Verb(ServicePath.service_pump)
    service_drain = Verb(ServicePath.service_drain)
    submit_validated = Verb(ServicePath.submit_validated)
    close = Verb(Broker.close)

    # -- controller -------------------------------------------------------------------
    @property
    def state(self) -> str:
        return self._broker.state.value

    def write_register(self, name: str, value: int) -> None:
        """Write a caller-claimable register (INTMS/INTMC). CC and queue registers are the broker's."""
        name = name.upper()
        if name == "CC" and value & 1:
            raise Refused("cc-enable-raw-blocked", "CC.EN is set only by enable(), which authors the admin "
                          "queues first", register=name, value=value)
        if name not in _WRITABLE:
            raise Refused("register-write-unclaimed", f"register {name} is owned by the broker and cannot be "
                          "written by a caller", register=name, value=value)
        self._broker.write_interrupt_mask(_WRITABLE[name], value)

    # -- admin ------------------------------------------------------------------------
    @property
    def id_ctrl(self) -> dict[str, Any]:
        """The last Identify Controller data (identifies now when there is none)."""
        return self._broker.id_ctrl or self._broker.identify_controller()

    def create_io_queues(self, count: int = 1, depth: int | None = None, *, irq: bool = False,
                         shadow_doorbells: bool | None = None, sgl: bool = False, sq_in_cmb: bool = False) -> int:
        """Create ``count`` I/O queue pairs (depth: CAP.MQES+1 up to 128 by default); ``irq``: MSI-X
        completions; ``shadow_doorbells``: Doorbell Buffer Config where offered (None: where it pays,
        not on QEMU's nvme model; see nvme.structures.shadow_doorbells_pay); ``sgl``: READ and
        WRITE carry SGLs instead of PRPs (refused ``sgl-unsupported`` where SGLS does not offer them);
        ``sq_in_cmb``: the submission queues in the Controller Memory Buffer (``cmb-unavailable``)."""
        from nvmevfio.broker import DEFAULT_IO_DEPTH

        return self._broker.create_io_queues(count, depth or min(DEFAULT_IO_DEPTH, self._broker.ctrl.mqes),
                                             irq=irq, shadow_doorbells=shadow_doorbells, sgl=sgl,
                                             sq_in_cmb=sq_in_cmb)

    @property
    def shadow_doorbells(self) -> bool:
        """Are the I/O queues' doorbells shadowed (Doorbell Buffer Config in use)?"""
        return self._broker.shadow_doorbells_active

    @property
    def dma_lane(self) -> str:
        """How device addresses are made: ``type1`` or ``iommufd`` (an IOMMU translates the
        broker's IOVAs), ``noiommu`` (physical addresses inside the broker's pinned pool; caller
        buffers are bounced), ``simulated`` for the in-process controller model."""
        return "simulated"

    def recovery_counters(self) -> dict[str, int]:
        """What the broker's recovery did since the controller was opened, whichever thread caused
        it: ``resets`` (controller resets of every kind, asked for or after a late command),
        ``aborts`` (Abort commands sent for late commands), ``retries`` (commands issued again)."""
        b = self._broker
        return {"resets": int(b.resets), "aborts": int(b.aborts), "retries": int(b.retries)}

    def doorbell_counters(self, qid: int = 1) -> dict[str, int]:
        """MMIO doorbell writes and shadow-only updates of an I/O queue pair, with its ring state."""
        return self._broker._queue(qid).ring.state()

    def get_log_page(self, page: str | int, *, entries: int = 64) -> bytes:
        """``smart``, ``error`` (``entries`` 64-byte entries) or ``firmware``."""
        lid, length = {
            "smart": (LogPage.SMART, 512), "error": (LogPage.ERROR, 64 * entries),
            "firmware": (LogPage.FIRMWARE_SLOT, 512),
        }.get(page, (None, 0)) if isinstance(page, str) else (page, 512)
        if lid not in (LogPage.SMART, LogPage.ERROR, LogPage.FIRMWARE_SLOT):
            raise Refused("unsupported-log-page", f"log page {page!r}: use smart, error or firmware", page=page)
        return self._broker.get_log_page(int(lid), length)

    def get_log(self, lid: int, length: int, *, nsid: int = 0xFFFFFFFF, offset: int = 0) -> bytes:
        """Any log page: ``length`` bytes (a multiple of 4, up to 1 MiB) from byte ``offset`` (LPO)."""
        return self._broker.get_log_page(lid, length, nsid=nsid, offset=offset)

    # -- asynchronous events ------------------------------------------------------------
    # The broker keeps Asynchronous Event Requests outstanding once the controller is identified;
    # each event's log page is read (which clears it) and a namespace notice refreshes the
    # namespace table before the event is delivered.
    def events(self, timeout_s: float | None = None) -> Iterator[AsyncEvent]:
        """Yield events as they arrive; stop once ``timeout_s`` passes without one (None: never)."""
        while True:
            got = self._broker.poll_events(1.0 if timeout_s is None else timeout_s)
            if not got and timeout_s is not None:
                return
            yield from got

    @property
    def event_config(self) -> dict[str, Any]:
        """The Asynchronous Event Configuration set, AERs outstanding, and why events are off."""
        b = self._broker
        return {"aec": b.aec, "outstanding": b.admin.ring.standing if b.admin else 0,
                "events_seen": b.events_seen, "events_off": b.events_off}

    def detach_namespace(self, nsid: int, controllers: list[int]) -> None:
        self._broker.attach_namespace(nsid, controllers, detach=True)

    @property
    def max_transfer(self) -> int:
        return self._broker.max_transfer

    @property
    def mqes(self) -> int:
        return self._broker.ctrl.mqes

    # -- data -------------------------------------------------------------------------
    def check_window(self, nsid: int, slba: int, count: int) -> None:
        """Refuse (window-past-namespace-end / count-out-of-range) without touching the device."""
        self._broker.check_window(self._broker.namespace(nsid, metadata=True), slba, count)

    def admin_passthru(self, opcode: int, *, nsid: int = 0, data: Any = None, data_len: int = 0,
                       timeout_s: float | None = None, **cdws: int) -> tuple[int, bytes | None]:
        """Any admin command the broker does not own (vendor-specific C0h-FFh included): CDW2/3 and
        CDW10..15 as ``cdw10=...``; ``data`` (bytes to send) or ``data_len`` (bytes to receive),
        never an address. Returns (DW0, the bytes received or None); a status raises CommandError."""
        return self._broker.passthru(0, opcode, nsid=nsid, cdws=cdws, data=data, data_len=data_len,
                                     timeout_s=timeout_s)

    def io_passthru(self, opcode: int, *, nsid: int = 1, data: Any = None, data_len: int = 0, qid: int = 1,
                    timeout_s: float | None = None, metadata: Any = None, **cdws: int) -> tuple[int, bytes | None]:
        """:meth:`admin_passthru` for an I/O queue (``qid``); ``metadata``: a buffer of the
        metadata's length, sent with ``data`` or filled in when receiving (the broker authors MPTR)."""
        return self._broker.passthru(qid, opcode, nsid=nsid, cdws=cdws, data=data, data_len=data_len,
                                     timeout_s=timeout_s, metadata=metadata)

    # -- zero-copy buffers and batches ------------------------------------------------
    def alloc_buffer(self, nbytes: int, *, shared: bool = False, owner: str = "caller") -> DmaBuffer:
        """A DMA buffer handle; its bytes are ``buf.array``. Free it with :meth:`free_buffer`.
        ``shared``: in a sealed memfd (:meth:`buffer_memfd`) that another process may map (the
        service hands it to its client); ``owner`` names whose it is in the ledger."""
        return self._broker.ledger.alloc(nbytes, owner=owner, shared=shared)

    def buffer_memfd(self, buf: DmaBuffer) -> int:
        """The memfd of a ``shared`` buffer (still the ledger's: pass it on, never close it)."""
        return self._broker.ledger.memfd(buf)

    # -- the service's validated (Model B) lane: a client is told its own buffers' device
    # addresses and writes its own entries; the validator checks every one before it is posted
    @property
    def commands_completed(self) -> int:
        """Every command the controller completed since this provider opened it."""
        return self._broker.commands_completed

    @property
    def memory_page_size(self) -> int:
        """CC.MPS's page size: the unit of PRP entries."""
        return self._broker.page_size

    def device_address(self, buf: DmaBuffer) -> int:
        """A buffer's device address (IOVA). Only for the validated lane, whose clients are
        told their own buffers' addresses; nothing else in nvmevfio hands one out."""
        return self._broker.ledger.iova(buf)

    def device_regions(self) -> list[tuple[int, int, str, int]]:
        """(device address, bytes, owner, generation) of every live DMA buffer, the broker's own
        included: the validator's map of who owns what. ``regions_version`` changes with it."""
        return self._broker.ledger.regions()

    @property
    def regions_version(self) -> int:
        return self._broker.ledger.version

    def device_address_ranges(self) -> list[tuple[int, int]]:
        """The usable device address space (inclusive ranges): outside it is no IOVA at all."""
        return list(self._broker.ledger.ranges)

    # -- the service's compiled data path (nvmevfio/service/daemon.py; cbits/service.c) --
    def submit(self, op: str, nsid: int, slbas: Any, counts: Any, buf: DmaBuffer | RegisteredBuffer, offsets: Any, *,
               qid: int = 1, sgl: bool | None = None) -> np.ndarray:
        """Post a batch of ``read``, ``write`` or ``append`` (Zone Append: each LBA a zone's start)
        commands and ring the doorbell once; returns their tags (int64 array; ``reap()`` reports each
        tag once, an append's with the LBA it wrote: ``nvme.zns.appended_lbas``). ``sgl``: SGLs
        instead of PRPs for this batch (None: as the queues were created)."""
        opcode = {"read": IoOpcode.READ, "write": IoOpcode.WRITE, "append": IoOpcode.ZONE_APPEND}.get(op)
        if opcode is None:
            raise Refused("unsupported-command", f"batch op {op!r}: use read, write or append", op=op)
        return self._broker.submit_rw(opcode, nsid, slbas, counts, buf, offsets, qid=qid, sgl=sgl)


class ControllerSession(Provider):
    """A Provider over a PCI function opened through VFIO; closing shuts the controller
    down (CC.SHN) and releases the ledger and the VFIO fds in order."""

    def __init__(self, broker: Broker, function: Any, ledger: Any) -> None:
        super().__init__(broker)
        self._function = function
        self._ledger = ledger
        self.address: str = function.address
        self.released: str | None = None  # why the device was handed back to the kernel
        self.numa: Any = None  # pci.NumaPlacement: the function's node and CPUs (open_controller sets it)
        self.on_release: Callable[[str], None] | None = None  # called (from the watcher thread) after it
        self._release_lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._wake = self._wake_w = -1
        request_fd = function.device.enable_request()
        if request_fd is not None:
            self._wake, self._wake_w = os.pipe()  # close() writes a byte: the watcher returns
            self._watcher = threading.Thread(target=self._watch_request, args=(request_fd,),
                                             name=f"nvmevfio-request-{self.address}", daemon=True)
            self._watcher.start()

    def _watch_request(self, request_fd: int) -> None:
        """Wait for VFIO's device request (or close()); on a request, give the device back."""
        poller = select.poll()
        poller.register(request_fd, select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._wake in ready:
                return
            if request_fd in ready:
                try:
                    self.release(REQUEST_WHY)
                except Exception:  # released anyway (see release); a thread has no caller to tell
                    log.exception("%s: error while releasing the device", self.address)
                return

    def release(self, why: str) -> None:
        """Give the device back to the kernel now, whatever is running: in-flight commands end with
        ``device-gone`` (threads waiting on them get ``DeviceGone``), every later call is refused
        ``device-gone``, the IOMMU mappings and VFIO fds are released. Host memory stays valid: a
        caller's buffer array never faults; ``close()`` frees it. Called by the device-request
        watcher; callable directly."""
        stuck: list[int] = []
        with self._release_lock:
            if self.released is not None:
                return
            self.released = why
            try:
                stuck = self._broker.device_removed(why, RELEASE_WAIT_S)
            finally:  # whatever happened above, the kernel gets its device back
                self._ledger.detach()
                self._function.release()
        log.warning("%s released: %s%s", self.address, why,
                    f" (queue(s) {stuck} still busy in their thread)" if stuck else "")
        if self.on_release is not None:
            self.on_release(why)

    @property
    def iommu(self) -> Any:
        return self._function.iommu

    @property
    def dma_lane(self) -> str:
        return str(self._function.backend)

    @property
    def pci_command(self) -> int:
        return int(self._function.pci_command)

    @property
    def bar0_size(self) -> int:
        return int(self._function.bar0.size)

    def close(self) -> None:
        if self._watcher is not None:
            os.write(self._wake_w, b"x")
            if self._watcher is not threading.current_thread():
                self._watcher.join()
            os.close(self._wake)
            os.close(self._wake_w)
            self._watcher = None
        with self._release_lock:
            try:
                super().close()
            finally:
                try:
                    self._ledger.close()
                finally:
                    self._function.close()

    def __enter__(self) -> ControllerSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_controller(address: str, *, reset: bool = False, staging_bytes: int | None = None,
                    command_timeout_s: float | None = None, hugetlb: bool = False,
                    backend: str | None = None, unsafe_noiommu: bool | None = None,
                    noiommu_pool_bytes: int | None = None) -> ControllerSession:
    """Open a controller bound to vfio-pci: VFIO function, DMA ledger over its IOVA ranges, broker.

    The controller is only bound (registers read); call ``enable()`` next. ``hugetlb`` backs the
    broker's queues, PRP lists and staging buffer with 2 MiB pages (reserve them first:
    /proc/sys/vm/nr_hugepages). ``backend``: the IOMMU interface, ``type1``, ``iommufd`` or
    ``auto`` (the default, or $NVMEVFIO_BACKEND: iommufd when the function has a VFIO device cdev).
    A function in a no-IOMMU group (a machine without an IOMMU) opens only with ``unsafe_noiommu``
    (or $NVMEVFIO_UNSAFE_NOIOMMU=1): the broker then keeps all device-visible memory in a pinned
    pool of 2 MiB huge pages (``noiommu_pool_bytes``, default 64 MiB, or
    $NVMEVFIO_NOIOMMU_POOL_MB) and bounces caller buffers through it.
    On a host of several NUMA nodes, DMA memory is placed on the function's node (``session.numa``
    says which, and its CPUs; pci.numa_placement).
    """
    from nvmevfio import broker as _b
    from nvmevfio.dma import PAGE_SIZE, DmaLedger
    from nvmevfio.noiommu_pool import PhysicalPool
    from nvmevfio.pci import numa_placement
    from nvmevfio.vfio import VfioIrq, open_function

    fn = open_function(address, reset=reset, backend=backend, unsafe_noiommu=unsafe_noiommu)
    try:
        if fn.backend == "noiommu":
            pool_bytes = noiommu_pool_bytes or int(os.environ.get("NVMEVFIO_NOIOMMU_POOL_MB", "64")) << 20
            ledger = DmaLedger(fn.mapper, [], pool=PhysicalPool.pinned(pool_bytes))
        else:
            ledger = DmaLedger(fn.mapper, list(fn.iommu.ranges),
                               page_size=max(PAGE_SIZE, fn.iommu.min_page_size), hugetlb=hugetlb)
        placement = numa_placement(fn.address)
        ledger.numa_node = placement.node  # before the broker's first allocation (its queues)
        br = _b.Broker(fn.bar0, ledger, irq=VfioIrq(fn.device),
                       staging_bytes=staging_bytes or _b.DEFAULT_STAGING,
                       command_timeout_s=command_timeout_s or _b.COMMAND_TIMEOUT_S, bar_map=fn.bar_memory,
                       function_reset=fn)
        session = ControllerSession(br, fn, ledger)
        session.numa = placement
        session.bind()
        return session
    except BaseException:
        fn.close()
        raise
