"""The broker: owns the controller, the DMA ledger and every queue.

It authors every address the device sees (queue bases, PRP entries, PRP-list
pages, doorbell values, CC bits) from its own ledger, and validates every
request before anything touches the device: a refused request raises
:class:`~nvmevfio.errors.Refused` with a reason label and writes no register,
posts no entry and rings no doorbell.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import operator
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn, Protocol, cast

import numpy as np

from nvmevfio import events
from nvmevfio._ffi import ffi, lib
from nvmevfio.dma import DmaBuffer, DmaLedger, align_up
from nvmevfio.errors import (
    CommandError,
    CommandTimeout,
    ControllerFailed,
    ControllerFatal,
    ControllerTimeout,
    DeviceGone,
    NvmeVfioError,
    QueuePaused,
    Refused,
    ShimError,
)
from nvmevfio.mmio import Mmio
from nvmevfio.nvme import prp, regs, spec
from nvmevfio.nvme.controller import Controller, Registers, State
from nvmevfio.nvme.queue import CID_TAKE, COMPLETION, PRP_SLOT, PerfLoop, QueuePair, StopFlag
from nvmevfio.nvme.spec import CQE, SQE, SQE_STRUCT, AdminOpcode, Cns, IoOpcode

log = logging.getLogger("nvmevfio")

ADMIN_DEPTH = 32
# Asynchronous Event Requests kept outstanding (at most AERL+1), events kept for poll_events()
# (the oldest are dropped past it; callbacks see every one), how often a watcher looks.
MAX_AERS = 4
EVENT_BACKLOG = 256
EVENT_POLL_S = 0.02
# Passthrough: the dwords a caller may set, and the commands the broker owns (it authors the
# addresses they carry, or its ledger and queues depend on them); refused `broker-owned-command`.
PASSTHRU_DWORDS = ("cdw2", "cdw3", "cdw10", "cdw11", "cdw12", "cdw13", "cdw14", "cdw15")
PASSTHRU_MAX = 2 << 20  # one PRP-list page per admin command
FORMAT_TIMEOUT_S = 600.0  # Format NVM and Sanitize may take long on real media
BROKER_OWNED_ADMIN = {
    0x00: "Delete I/O Submission Queue", 0x01: "Create I/O Submission Queue",
    0x04: "Delete I/O Completion Queue", 0x05: "Create I/O Completion Queue", 0x08: "Abort",
    0x0C: "Asynchronous Event Request", 0x7C: "Doorbell Buffer Config",
}
BROKER_OWNED_FEATURES = {0x07: "Number of Queues", 0x0D: "Host Memory Buffer"}
DEFAULT_IO_DEPTH = 128
# Per-command transfer cap, also when MDTS=0 ("no limit"). Linux caps at 4 MiB too
# (NVME_MAX_KB_SZ); QEMU's model fails larger transfers whose pages are not
# physically contiguous (its scatter list is bounded by IOV_MAX = 1024 pages).
UNLIMITED_MDTS_CAP = 4 << 20
DEFAULT_STAGING = 8 << 20
COMMAND_TIMEOUT_S = 30.0
MAX_NLB = 1 << 16  # NLB is a 16-bit 0's based field
DSM_MAX_RANGES = 256
ONCS_WRITE_ZEROES = 1 << 3
ONCS_DSM = 1 << 2
OACS_DBBUF = 1 << 8  # Doorbell Buffer Config supported (Identify Controller OACS bit 8)
# Up to this many entries a batch is packed entry by entry (cheaper than numpy's per-call cost).
SCALAR_BATCH = 8
# Recovery (Linux's nvme driver keeps to the same shape: timeout -> abort -> reset -> requeue).
MAX_RETRIES = 5  # requeues of one command across resets, and retries of a transient status
RESET_LIMIT = 3  # controller resets within RESET_WINDOW_S before the controller is declared failed
RESET_WINDOW_S = 60.0
ABORT_TIMEOUT_S = 2.0  # how long an Abort (admin 08h) may take before the broker resets instead
# A command ended by the broker after a reset (no device completion): Command Abort Requested, DNR.
CANCELLED_STATUS = (1 << 14) | 0x07
# Generic statuses worth retrying when DNR=0 (NVMe 2.0 Figure 101): Command Abort Requested,
# Command Interrupted, Transient Transport Error, Namespace Not Ready.
TRANSIENT = {0x07, 0x21, 0x22, 0x82}


def _int_array(x: Any, what: str) -> np.ndarray:
    """LBAs, counts or offsets as int64; integral floats (np.ones) are fine, fractions are refused."""
    a = np.asarray(x)
    if a.dtype.kind in "iu":
        return a.astype(np.int64, copy=False).reshape(-1)
    if a.dtype.kind != "f" or not np.isfinite(a).all() or (a != np.floor(a)).any():
        raise Refused("invalid-argument", f"{what} must be whole numbers, got {a.tolist()!r:.80}", what=what)
    return a.astype(np.int64).reshape(-1)


def _whole(x: Any, what: str) -> int:
    """One LBA, count or offset: an int or numpy integer (not a bool, not a float); else refused."""
    if not isinstance(x, (bool, np.bool_)):
        try:
            return operator.index(x)
        except TypeError:
            pass
    raise Refused("invalid-argument", f"{what} must be a whole number, got {x!r:.40}", what=what)


def _ints(x: Any, what: str) -> list[int]:
    """The same, as Python ints, without numpy for plain lists of ints."""
    if isinstance(x, (list, tuple)) and all(type(v) is int for v in x):
        return list(x)
    return _int_array(x, what).tolist()


class IrqWaiter(Protocol):
    """MSI-X: one eventfd per vector; the C queue pair waits on it with poll(2)."""

    def vectors(self, count: int) -> None: ...
    def fd(self, vector: int) -> int: ...
    def close(self) -> None: ...


@dataclass
class Namespace:
    nsid: int
    size_blocks: int  # NSZE
    capacity_blocks: int  # NCAP
    used_blocks: int  # NUSE
    block_size: int
    metadata_size: int
    lba_format: int
    identify: dict[str, Any] = field(repr=False)

    @property
    def size_bytes(self) -> int:
        return self.size_blocks * self.block_size

    @property
    def extended_lba(self) -> bool:
        """FLBAS bit 4: metadata travels at the end of each block's data (no metadata pointer)."""
        return bool(int(self.identify.get("flbas", 0)) & 0x10)


class BrokerQueue:
    """An I/O (or admin) queue pair: the C rings and command table (``ring``) plus the broker's
    PRP-list pages for it, one set per command id."""

    def __init__(self, qid: int, ring: QueuePair, buffers: list[DmaBuffer], prp_base: int, prp_pages_per_cmd: int,
                 prp_array: np.ndarray | None, page_size: int) -> None:
        self.qid = qid
        self.ring = ring
        self.buffers = buffers
        self.prp_base = prp_base
        self.prp_pages = prp_pages_per_cmd
        self.prp_array = prp_array  # uint64 view of the PRP-list memory
        self.prp_dev: np.ndarray | None = None  # its pages' device addresses, for a service session's C path
        self.page_size = page_size
        self.packed = bytearray(ring.depth * SQE.itemsize)  # small batches are packed here, then posted
        self.cancelled: list[np.ndarray] = []  # records of commands the broker ended (reap returns them first)
        self.lock = threading.RLock()  # one thread at a time per queue pair; others are refused queue-busy
        self.owner: int | None = None  # the thread holding ``lock`` (a controller reset needs to know)
        self.vector: int | None = None

    @property
    def in_flight(self) -> int:
        return self.ring.in_flight

    @property
    def capacity(self) -> int:
        return self.ring.capacity

    def prp_list_iovas(self, cid: int) -> list[int]:
        base = self.prp_base + cid * self.prp_pages * self.page_size
        return [base + k * self.page_size for k in range(self.prp_pages)]

    def author_prps(self, cid: int, iova: int, length: int) -> tuple[int, int]:
        """PRP1 and PRP2 for command ``cid``, writing its PRP-list pages (in this queue's list
        area) when the transfer needs them."""
        p = prp.build(iova, length, self.page_size, self.prp_list_iovas(cid))
        self.write_lists(cid, p.lists)
        return p.prp1, p.prp2

    def write_lists(self, cid: int, lists: tuple[np.ndarray, ...]) -> None:
        """Command ``cid``'s PRP-list pages into its part of this queue's list area."""
        if not lists:
            return
        if self.prp_array is None or len(lists) > self.prp_pages:
            raise Refused("count-out-of-range", f"{len(lists)} PRP-list pages needed; this queue has "
                          f"{self.prp_pages} per command", pages=len(lists))
        per = self.page_size // 8
        base = cid * self.prp_pages * per
        for k, page in enumerate(lists):
            self.prp_array[base + k * per : base + k * per + len(page)] = page


@dataclass(frozen=True, eq=False)
class RegisteredBuffer:
    """A DMA buffer registered with the broker, cut into equal slots whose PRP entries and
    PRP-list pages were authored once (like io_uring's fixed buffers). A command names a slot;
    the C path copies the slot's pre-authored PRPs. Holds no address a caller can use: the PRP
    table (device addresses; physical ones in the no-IOMMU lane) is the broker's, private here."""

    buffer: DmaBuffer
    slot_size: int
    slots: int
    _prps: np.ndarray = field(repr=False)  # PRP_SLOT per slot, read only: for the C path alone
    _lists: DmaBuffer | None = field(repr=False)

    @property
    def array(self) -> np.ndarray:
        return self.buffer.array

    @property
    def size(self) -> int:
        return self.buffer.size


class Broker:
    def __init__(self, mmio: Mmio, ledger: DmaLedger, *, irq: IrqWaiter | None = None,
                 page_size: int | None = None, staging_bytes: int = DEFAULT_STAGING,
                 command_timeout_s: float = COMMAND_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.mmio = mmio
        self.ledger = ledger
        self.irq = irq
        self.host_page_size = page_size or ledger.page_size
        self.ctrl = Controller(mmio)
        self.staging_bytes = staging_bytes
        self.command_timeout_s = command_timeout_s
        self.clock = clock
        self.admin: BrokerQueue | None = None
        self.io: list[BrokerQueue] = []
        self.page_size = 4096  # controller memory page size (CC.MPS), set at enable
        self.id_ctrl: dict[str, Any] | None = None
        self.namespaces: dict[int, Namespace] = {}
        self.max_transfer = 0
        self._staging: DmaBuffer | None = None
        self._scratch: DmaBuffer | None = None
        self.irq_mode = False
        self.commands_completed = 0
        self._service_pages: dict[tuple[int, int], np.ndarray] = {}  # service sessions' page tables
        # Shadow doorbells (Doorbell Buffer Config, 5.8): broker-owned pages, used when the
        # controller offers them (OACS bit 8) and ``shadow_doorbells`` is on.
        self.shadow_doorbells = True
        self._dbbuf: tuple[DmaBuffer, DmaBuffer] | None = None
        self._registered: dict[tuple[int, int], RegisteredBuffer] = {}
        # recovery
        self.sleep: Callable[[float], None] = time.sleep
        self.resets = 0
        self.aborts = 0
        self.retries = 0
        self._reset_times: list[float] = []
        self.failed: str | None = None  # why the controller was declared failed (every call refused)
        self.gone = False  # BAR0 read all ones, or the device was handed back: the device is gone
        self.gone_why = "BAR0 reads all ones"
        self._stop = StopFlag()  # set when the device is taken away: ends every C wait at once
        # A controller reset with several threads: the resetting thread pauses every queue (their C
        # waits end with -EAGAIN), each other thread parks (touches no queue) until it is done.
        self._reset_lock = threading.Lock()
        self._parking = threading.Condition()
        self._parked: set[int] = set()  # threads parked for a reset
        self._resetter: int | None = None
        self._resetting = False  # a reset is running: other threads park (the pause only kicks them out of C)
        self._cc = 0
        self.changed_namespaces: set[int] = set()
        self._hot: dict[int, Namespace] = {}  # namespaces ready for I/O: the synchronous hot path's lookup
        # No-IOMMU lane (ledger.bounce): READ ranges posted, by queue and tag, until reaped; the
        # hot path (zero copy) is off there (_update_hot leaves it no namespace).
        self._bounce_reads: dict[int, dict[int, tuple[DmaBuffer, int, int]]] = {}
        # Asynchronous events (5.2): Asynchronous Event Requests stay outstanding on the admin queue
        # (standing commands in C, never late); each event's log page is read (clearing it) and
        # the event delivered to poll_events() and the callbacks.
        self.async_events = True  # arm them after the first Identify Controller
        self.aec: int | None = None  # the Asynchronous Event Configuration set (None: not set)
        self.events_off: str | None = None  # why no more AERs are posted (the controller refused one)
        self._aer_limit = MAX_AERS
        self._events_armed = False
        self._servicing = False
        self._event_buf: DmaBuffer | None = None
        self.events: deque[events.AsyncEvent] = deque(maxlen=EVENT_BACKLOG)
        self.events_seen = 0
        self._event_cond = threading.Condition()
        self._event_callbacks: list[Callable[[events.AsyncEvent], None]] = []
        self._watch: threading.Thread | None = None
        self._watch_stop = threading.Event()

    # ============================================================ controller state
    def bind(self) -> Registers:
        return self._shown(self.ctrl.bind())

    @property
    def state(self) -> State:
        return self.ctrl.state

    def registers(self) -> Registers:
        return self._shown(self.ctrl.registers())

    def _shown(self, snap: Registers) -> Registers:
        """A register snapshot as a caller gets it: in the no-IOMMU lane ASQ and ACQ hold physical
        addresses (this session's admin queues, or whatever the last one left), so they are
        withheld (None); with an IOMMU they are IOVAs and shown."""
        return snap.withheld() if self.ledger.bounce else snap

    @property
    def _all_queues(self) -> list[BrokerQueue]:
        """The I/O queue pairs, then the admin queue pair (when there is one)."""
        return [*self.io, *([self.admin] if self.admin else [])]

    def _refuse_gone(self) -> None:
        if self.gone:
            raise Refused("device-gone", f"the device is gone ({self.gone_why}); close it", state="gone",
                          why=self.gone_why)

    def _refuse_failed(self) -> None:
        if self.failed is not None:
            raise Refused("controller-failed", f"the controller was declared failed ({self.failed}); reopen it",
                          why=self.failed)

    def _require_ready(self) -> None:
        self._refuse_gone()
        self._refuse_failed()
        if (self.ctrl.state is not State.READY or self.admin is None) and self._resetting \
                and self._resetter != threading.get_ident():
            self._park()  # another thread's controller reset has it disabled for now: wait for it
        if self.ctrl.state is State.FATAL:
            raise Refused("controller-fatal", "controller is in fatal state (CSTS.CFS was set); reset it")
        if self.ctrl.state is not State.READY or self.admin is None:
            raise Refused("controller-not-enabled",
                          f"controller is {self.ctrl.state.value}: enable it first", state=self.ctrl.state.value)

    def _require_io(self) -> BrokerQueue:
        self._require_ready()
        if not self.io:
            raise Refused("io-queues-not-created", "no I/O queues: call create_io_queues() first")
        return self.io[0]

    def reset(self) -> None:
        """CC.EN=0 and wait CSTS.RDY=0; every queue and broker buffer is released."""
        if self.ctrl.state is State.UNBOUND:
            self.ctrl.bind()
        self.ctrl.disable()
        self._drop_queues()

    def _drop_queues(self) -> None:
        self._hot = {}
        self._events_armed, self.aec, self.events_off, self._aer_limit = False, None, None, MAX_AERS
        for qp in self._all_queues:
            busy = qp.ring.busy_cids()
            for slot, gen in zip(qp.ring.buf_slot[busy].tolist(), qp.ring.buf_gen[busy].tolist()):
                if slot >= 0:
                    self.ledger.unpin(slot, gen, 1)
            for buf in qp.buffers:
                if buf.live:
                    self.ledger.free(buf)
        self.io = []
        self.admin = None
        for name in ("_staging", "_scratch", "_event_buf"):
            buf = getattr(self, name)
            if buf is not None and buf.live:
                self.ledger.free(buf)
            setattr(self, name, None)
        for b in self._dbbuf or ():
            if b.live:
                self.ledger.free(b)
        self._dbbuf = None
        if self.irq is not None and self.irq_mode:
            self.irq.close()
        self.irq_mode = False

    def _new_queue_pair(self, qid: int, depth: int, prp_pages_per_cmd: int, vector: int | None) -> BrokerQueue:
        sq_buf = self.ledger.alloc(depth * SQE.itemsize, owner="broker:sq", contiguous=True)
        cq_buf = self.ledger.alloc(depth * CQE.itemsize, owner="broker:cq", contiguous=True)
        bufs = [sq_buf, cq_buf]
        prp_array = None
        prp_base = 0
        if prp_pages_per_cmd:
            prp_buf = self.ledger.alloc((depth - 1) * prp_pages_per_cmd * self.page_size, owner="broker:prp",
                                        device_writable=False)
            bufs.append(prp_buf)
            prp_base = self.ledger.iova(prp_buf)
            prp_array = prp_buf.array.view(np.uint64)
        ring = QueuePair(qid, sq_buf.array.view(SQE), cq_buf.array.view(CQE), self.mmio,
                         self.ctrl.doorbell(qid, False), self.ctrl.doorbell(qid, True))
        if vector is not None and self.irq is not None:
            ring.set_irq(self.irq.fd(vector), vector)
        csts = getattr(self.mmio, "register_address", None)
        if csts is not None:
            ring.watch_csts(csts(regs.CSTS))
        ring.watch_stop(self._stop)
        if qid and self._dbbuf is not None:
            shadow, eventidx = (b.array.view(np.uint32) for b in self._dbbuf)
            stride = 1 << regs.get(self.ctrl.cap, regs.CAP_.DSTRD)  # in dwords, as the doorbell registers
            ring.set_shadow(shadow, eventidx, 2 * qid * stride, (2 * qid + 1) * stride)
        return BrokerQueue(qid, ring, bufs, prp_base, prp_pages_per_cmd, prp_array, self.page_size)

    def enable(self, *, admin_depth: int = ADMIN_DEPTH) -> Registers:
        """Disable, author the admin queues from the ledger, pick CC, enable, wait RDY (CAP.TO)."""
        if self.ctrl.state is State.UNBOUND:
            self.ctrl.bind()
        if self.ctrl.state is State.READY:
            raise Refused("controller-already-enabled", "controller is already enabled; reset() first")
        self.ctrl.disable()
        self._drop_queues()
        admin_depth = min(admin_depth, self.ctrl.mqes, 4096)
        cc = self.ctrl.choose_cc(self.host_page_size)
        self.page_size = 1 << (12 + regs.get(cc, regs.CC_.MPS))
        self._cc = cc
        self.failed, self._reset_times, self.changed_namespaces = None, [], set()
        self.admin = self._new_queue_pair(0, admin_depth, 1, None)
        self._arm_admin_queues(self.admin)
        self.ctrl.enable(cc)
        return self.registers()

    def shutdown(self) -> None:
        """Delete I/O queues, then CC.SHN normal shutdown and wait CSTS.SHST complete."""
        self._require_ready()
        for qp in reversed(self.io):
            self._admin_sync(self._command_sqe(spec.delete_io_sq(qp.qid)), "Delete I/O SQ")
            self._admin_sync(self._command_sqe(spec.delete_io_cq(qp.qid)), "Delete I/O CQ")
        rtd3e = (self.id_ctrl or {}).get("rtd3e", 0)
        self.ctrl.shutdown(rtd3e)
        self._drop_queues()

    def _arm_admin_queues(self, admin: BrokerQueue) -> None:
        """AQA, ASQ and ACQ from the admin queue pair's ledger memory."""
        asq, acq = (self.ledger.device_address(self.ledger.iova(b)) for b in admin.buffers[:2])
        self.ctrl.arm_admin_queues(asq, acq, admin.ring.depth, admin.ring.depth)

    # ============================================================ command authoring
    def _for_device(self, qp: BrokerQueue, sqes: np.ndarray) -> None:
        """The no-IOMMU lane's last step before SQEs go to the ring: the ledger's pool addresses
        in their PRP1 and PRP2, and in the entries and chain pointers of the PRP-list pages of
        this queue that they use, become physical addresses, page by page (the pool is
        contiguous only within a huge page). Translating twice changes nothing. With an IOMMU
        the ledger's addresses are the device's, and this does nothing."""
        ledger = self.ledger
        if ledger.pool is None:
            return
        if qp.prp_array is not None:
            per = qp.prp_pages * self.page_size // 8  # one command's list entries
            listed = (sqes["prp2"] - np.uint64(qp.prp_base)) < np.uint64(qp.prp_array.size * 8)
            if listed.any():
                area = qp.prp_array.reshape(-1, per)
                for cid in np.unique(sqes["cid"][listed]).tolist():
                    ledger.translate(area[cid])
        ledger.translate(sqes["prp1"])
        ledger.translate(sqes["prp2"])

    @staticmethod
    def _sqe(opc: int, **fields: int) -> np.ndarray:
        e = np.zeros(1, dtype=SQE)
        e["opc"] = opc
        for k, v in fields.items():
            e[k] = v
        return e

    @classmethod
    def _command_sqe(cls, cmd: spec.Command, **pointers: int) -> np.ndarray:
        """The SQE of a built command (:mod:`nvmevfio.nvme.spec`'s builders), with the data or
        queue pointers (``prp1``, ``prp2``) the broker authored."""
        return cls._sqe(cmd.opc, nsid=cmd.nsid, **cmd.cdws, **pointers)

    def _author_one(self, qp: BrokerQueue, e: np.ndarray, buf: DmaBuffer, length: int) -> np.ndarray | None:
        """Author PRP1/PRP2 for ``length`` bytes of ``buf``. When PRP-list pages are needed, a
        command id is taken first (its list pages hold them) and returned."""
        iova = self.ledger.iova(buf)
        need = prp.list_pages_needed(iova, length, self.page_size)
        if need > qp.prp_pages:
            raise Refused("count-out-of-range",
                          f"{length} bytes need {need} PRP-list pages; this queue has {qp.prp_pages} per command",
                          length=length)
        cids = None
        if need:
            if qp.in_flight:
                self._refuse_busy(qp)
            cids = qp.ring.take(1)
            e["cid"] = cids[0]
        e["prp1"], e["prp2"] = qp.author_prps(int(e["cid"][0]) if need else 0, iova, length)
        return cids

    @staticmethod
    def _refuse_busy(qp: BrokerQueue) -> None:
        raise Refused("queue-busy", f"queue {qp.qid} has {qp.in_flight} batched commands in flight; reap them "
                      "first", qid=qp.qid, in_flight=qp.in_flight)

    @contextlib.contextmanager
    def _using(self, qp: BrokerQueue) -> Iterator[None]:
        """One thread at a time on a queue pair: a second thread is refused (``queue-busy``), never
        interleaved. Waits instead while a controller reset holds the queue, and for the admin
        queue (the broker's own: another thread's admin command ends soon)."""
        me = threading.get_ident()
        if not qp.lock.acquire(blocking=False):
            self._refuse_gone()  # held by the thread releasing the device: say so
            if self._resetter == me and qp.owner in self._parked:
                yield  # the reset works on a parked thread's queue: that thread touches nothing now
                return
            if not self._wait_for_queue(qp):
                raise Refused("queue-busy", f"queue {qp.qid} is in use by another thread: give each thread its "
                              "own queue (open(queues=N), qid=...)", qid=qp.qid)
        outer, qp.owner = qp.owner, me
        try:
            yield
        finally:
            qp.owner = outer
            qp.lock.release()

    def _wait_for_queue(self, qp: BrokerQueue) -> bool:
        """Wait for a queue held by a controller reset or (admin) another thread's command; parked
        while a reset runs. False: an I/O queue another thread is using (refuse)."""
        if qp.qid and not self._resetting:
            return False
        deadline = time.monotonic() + self._park_limit_s()
        while time.monotonic() < deadline:
            if self._resetting:
                self._park()
            if qp.lock.acquire(timeout=0.002):
                return True
            self._refuse_gone()
        return False

    def _park_limit_s(self) -> float:
        """How long a thread waits for another's reset: its abort, CAP.TO twice, re-creating queues."""
        return 2 * self.command_timeout_s + 2 * self.ctrl.timeout_s + 10

    def _park(self) -> None:
        """Another thread is resetting the controller: touch no queue until it is done (it requeues
        or cancels this thread's commands in flight, whatever queue they are on), then carry on."""
        me = threading.get_ident()
        with self._parking:
            self._parked.add(me)
            self._parking.notify_all()
            try:
                done = self._parking.wait_for(lambda: not self._resetting, timeout=self._park_limit_s())
            finally:
                self._parked.discard(me)
        self._refuse_gone()
        self._refuse_failed()
        if not done:
            raise ControllerTimeout(f"a controller reset by another thread did not finish within "
                                    f"{self._park_limit_s():g} s")

    def _exec(self, qp: BrokerQueue, e: np.ndarray, name: str, buf: DmaBuffer | None = None, length: int = 0,
              timeout_s: float | None = None, retry: bool = True, **context: Any) -> int:
        """One command start to end on an idle queue, in one C call (post, SQ doorbell, wait, reap,
        CQ doorbell); returns its DW0. A transient status (DNR=0) is retried with a backoff; a
        timeout goes through abort / reset (see :meth:`_settle`). Raises CommandError otherwise."""
        with self._using(qp):
            for attempt in range(MAX_RETRIES + 1):
                e["cid"] = CID_TAKE
                cids = self._author_one(qp, e, buf, length) if buf is not None else None
                slot, gen = (buf.slot, buf.generation) if buf is not None else (-1, 0)
                self._for_device(qp, e)
                try:
                    c = qp.ring.exec(e, timeout_s or self.command_timeout_s, slot, gen)
                except (ControllerFatal, DeviceGone, QueuePaused) as exc:
                    c = self._wait_failed(qp, exc, buf)
                except BaseException:
                    if cids is not None and qp.ring.busy[int(cids[0])] == 1:  # taken, never posted
                        qp.ring.untake(cids)
                    raise
                status, result = self._settle(qp, c, buf)
                if not retry or not self._retry(status, attempt):
                    break
            dw0 = self._outcome(status, result, name, **context)
        if qp is self.admin and qp.ring.nevents and buf is not self._scratch:
            self._service_events_quietly()  # _admin_read does it once it has copied the scratch data out
        return dw0

    def _retry(self, status: int, attempt: int) -> bool:
        """Retry a transient status (DNR=0) after a short backoff, up to MAX_RETRIES times."""
        if not status or status & (1 << 14) or (status >> 8) & 7 or status & 0xFF not in TRANSIENT \
                or attempt >= MAX_RETRIES:
            return False
        self.retries += 1
        self.sleep(0.001 * (1 << attempt))
        return True

    def _outcome(self, status: int, result: int, name: str, **context: Any) -> int:
        self.commands_completed += 1
        if status == CANCELLED_STATUS:
            raise CommandTimeout(f"{name}: no completion within {self.command_timeout_s:g} s; the controller was "
                                 "reset and the command not retried", status=status, **context)
        if status:
            self._raise_for(status, name, **context)
        return int(result)

    def _settle(self, qp: BrokerQueue, c: tuple[int, int] | None, buf: DmaBuffer | None) -> tuple[int, int]:
        """The (status, DW0) of the one command an idle queue executed. None means it timed out:
        the buffer stays pinned (the device may still DMA into it), the broker aborts or resets,
        and the command ends exactly once: requeued and completed, or cancelled."""
        if c is not None:
            return c
        if buf is not None:
            self.ledger.pin(buf, 1)  # still in flight: quarantined until it ends
        self._recover_timeout(qp)
        done = self._reap(qp, 1, None)
        return int(done["status"][0]), int(done["result"][0])

    def _wait_failed(self, qp: BrokerQueue, exc: BaseException, buf: DmaBuffer | None) -> tuple[int, int] | None:
        """A C wait ended on CSTS: all ones (the device is gone) or CFS (reset; the command was
        requeued); or another thread is resetting (park; the command was requeued)."""
        if isinstance(exc, DeviceGone):
            self._gone_raise(exc)
        if buf is not None:
            self.ledger.pin(buf, 1)  # requeued by the reset: quarantined until it ends
        if isinstance(exc, QueuePaused):
            self._park()
        else:
            self._reset_controller("CSTS.CFS set")
        done = self._reap(qp, 1, None)
        return int(done["status"][0]), int(done["result"][0])

    @staticmethod
    def _require_room(qp: BrokerQueue, n: int) -> None:
        if n > qp.capacity:
            raise Refused("queue-full", f"queue {qp.qid} has room for {qp.capacity} more commands, {n} asked",
                          qid=qp.qid, free=qp.capacity, wanted=n)

    # ============================================================ completions
    def _reap(self, qp: BrokerQueue, minimum: int, timeout_s: float | None) -> np.ndarray:
        """Reap at least ``minimum`` completions (all that are ready), one CQ head doorbell per batch,
        waiting in C (spinning, or on the MSI-X eventfd).

        Returns a structured array of ``nvme.queue.COMPLETION``: tag, latency_s, result, cookie, cid,
        status (without the phase tag), opcode; commands the broker ended after a reset come first.
        A command older than the command timeout triggers recovery (abort, then reset); a
        caller's shorter ``timeout_s`` only bounds this call's wait."""
        parts = self._take_cancelled(qp)
        got = sum(len(p) for p in parts)
        wait_s = self.command_timeout_s if timeout_s is None else timeout_s
        while qp.in_flight:
            try:
                done, runs = qp.ring.reap_wait(max(0, minimum - got), wait_s)
            except DeviceGone as exc:
                self._gone_raise(exc)
            except (ControllerFatal, QueuePaused) as exc:
                if isinstance(exc, QueuePaused):
                    self._park()  # another thread's reset requeued (or cancelled) ours
                elif not exc.context.get("cfs"):
                    raise
                else:
                    self._reset_controller("CSTS.CFS set")
                more = self._take_cancelled(qp)
                parts += more
                got += sum(len(p) for p in more)
                continue
            for slot, gen, n in runs:
                self.ledger.unpin(slot, gen, n)
            self.commands_completed += len(done)
            parts.append(done)
            got += len(done)
            if got >= minimum or not qp.in_flight:
                break
            # the wait ran out short of the minimum
            if qp.ring.oldest_age_s() >= self.command_timeout_s:
                self._recover_timeout(qp)
                more = self._take_cancelled(qp)
                parts += more
                got += sum(len(p) for p in more)
            elif timeout_s is not None:
                break  # the caller's own wait ran out; nothing is late yet
        out = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.empty(0, dtype=COMPLETION)
        if self._bounce_reads and len(out):
            self._bounce_back(qp, out)
        return out

    # ============================================================ the no-IOMMU lane's bounce copies
    def _bounce_posted(self, qp: BrokerQueue, opcode: int, buf: DmaBuffer, first_tag: int, offsets: Any,
                       lengths: Any) -> None:
        """No-IOMMU lane, a batch just posted (its doorbell not yet rung): a WRITE's bytes go to the
        buffer's device-visible shadow now; a READ's range is remembered, to be copied back to
        the caller's memory when its completion is reaped."""
        pairs = zip(np.atleast_1d(offsets).tolist(), np.atleast_1d(lengths).tolist())
        if opcode == IoOpcode.WRITE:
            for off, length in pairs:
                self.ledger.sync_for_device(buf, off, length)
        else:
            pending = self._bounce_reads.setdefault(qp.qid, {})
            for i, (off, length) in enumerate(pairs):
                pending[first_tag + i] = (buf, off, length)

    def _bounce_back(self, qp: BrokerQueue, done: np.ndarray) -> None:
        """Reaped completions: each successful READ's bytes go from the shadow to the caller."""
        pending = self._bounce_reads.get(qp.qid)
        if not pending:
            return
        for tag, status in zip(done["tag"].tolist(), done["status"].tolist()):
            entry = pending.pop(tag, None)
            if entry is not None and status == 0:
                self.ledger.sync_for_cpu(*entry)

    @staticmethod
    def _take_cancelled(qp: BrokerQueue) -> list[np.ndarray]:
        out, qp.cancelled = qp.cancelled, []
        return out

    # ============================================================ recovery
    def _recover_timeout(self, qp: BrokerQueue) -> None:
        """A command is late: Abort (admin 08h) the oldest one of an I/O queue; when the controller
        does not honour it (QEMU never does) or the abort itself is late, reset the controller.
        An honoured abort ends the command with Command Abort Requested (DNR=0): the synchronous
        path retries it, a batch reports it."""
        csts = self.ctrl.csts()
        if csts == 0xFFFFFFFF:
            self._gone()
            raise DeviceGone(f"queue {qp.qid}: CSTS reads all ones: the device is gone", qid=qp.qid)
        resets = self.resets
        busy = qp.ring.busy_cids()
        if qp.qid and len(busy) and not regs.get(csts, regs.CSTS_.CFS):
            oldest = int(busy[np.argmin(qp.ring.submit_ns[busy])])
            self.aborts += 1
            try:
                dw0 = self._admin_sync(self._command_sqe(spec.abort(qp.qid, oldest)), "Abort",
                                       timeout_s=min(self.command_timeout_s, ABORT_TIMEOUT_S))
                honoured = not dw0 & 1  # DW0 bit 0: 1 = the command was not aborted
            except (CommandTimeout, CommandError):
                honoured = False
            if self.resets != resets:
                return  # another thread reset the controller meanwhile: the late command was requeued
            try:
                if honoured and qp.ring.wait_s(self.command_timeout_s):
                    return
            except QueuePaused:
                self._park()
                return
        self._reset_controller(f"no completion on queue {qp.qid} within {self.command_timeout_s:g} s")

    def _reset_controller(self, why: str) -> None:
        """Reset the controller (see :meth:`_reset_paused`) with every other thread out of the way:
        their waits are ended (the stop flag's pause), and each queue is either taken or held by a
        parked thread. A thread that finds a reset already running parks instead: that reset
        requeues its commands too."""
        me = threading.get_ident()
        if not self._reset_lock.acquire(blocking=False):
            self._park()
            return
        held: list[BrokerQueue] = []
        try:
            self._resetter = me
            self._resetting = True
            self._stop.pause()  # every C wait of another thread ends; that thread parks
            deadline = time.monotonic() + self._park_limit_s()
            for q in self._all_queues:
                while not q.lock.acquire(timeout=0.002):
                    with self._parking:
                        if q.owner in self._parked:
                            break  # its thread is parked: it touches nothing until the reset is done
                    if time.monotonic() > deadline:
                        self._fail(f"queue {q.qid} stayed busy in its thread during a controller reset")
                else:
                    held.append(q)
            # Every queue is this thread's or a parked thread's: the reset's own admin commands
            # must wait normally, so the pause ends here (the others stay parked on _resetting).
            self._stop.resume()
            self._reset_paused(why)
        finally:
            self._resetter = None
            with self._parking:
                self._stop.resume()
                self._resetting = False
                self._parking.notify_all()
            for q in held:
                q.lock.release()
            self._reset_lock.release()

    def _reset_paused(self, why: str) -> None:
        """Controller reset with everything in flight kept: CC.EN=0 and wait CSTS.RDY=0 (the device no
        longer touches host memory), scrub the rings, re-enable with the same broker-owned queue
        memory, restore shadow doorbells and the I/O queues, re-identify namespaces, then requeue
        every in-flight command (same id and tag) or, past MAX_RETRIES or on a namespace whose
        geometry changed, cancel it. At most RESET_LIMIT resets within RESET_WINDOW_S."""
        now = self.clock()
        self._reset_times = [t for t in self._reset_times if now - t < RESET_WINDOW_S]
        if len(self._reset_times) >= RESET_LIMIT:
            self._fail(f"{RESET_LIMIT} controller resets within {RESET_WINDOW_S:g} s; last: {why}")
        self._reset_times.append(now)
        self.resets += 1
        self._hot = {}
        admin = self.admin
        if admin is None:
            raise Refused("controller-not-enabled", "controller is not enabled")
        try:
            self.ctrl.disable()
        except ControllerFatal as exc:
            if self.ctrl.csts() == 0xFFFFFFFF:
                self._gone()
                raise DeviceGone("CSTS reads all ones during a controller reset: the device is gone") from exc
            raise
        # CSTS.RDY=0: the controller no longer reads or writes host memory.
        for cid in admin.ring.busy_cids().tolist():  # admin commands are not replayed
            admin.cancelled.append(self._cancel(admin, cid))
        admin.ring.drop_standing()  # the controller forgot its Asynchronous Event Requests
        for qp in [admin, *self.io]:
            for b in qp.buffers[:2]:
                b.array[:] = 0  # SQ and CQ memory scrubbed before the controller sees it again
            qp.ring.reset_rings()
        for b in self._dbbuf or ():
            b.array[:] = 0
        self._arm_admin_queues(admin)
        self.ctrl.enable(self._cc)
        if self.io:
            self._set_number_of_queues(len(self.io))
            if self._dbbuf is not None:
                self._doorbell_buffer_config(*self._dbbuf)
            for qp in self.io:
                self._create_queue_on_device(qp)
            self._reidentify()
        for qp in self.io:
            busy = qp.ring.busy_cids()
            stale = busy[np.isin(qp.ring.saved["nsid"][busy], list(self.changed_namespaces))]
            for cid in stale.tolist():
                qp.cancelled.append(self._cancel(qp, cid))
            _, over = qp.ring.repost(MAX_RETRIES)
            for cid in over:
                qp.cancelled.append(self._cancel(qp, cid))
            qp.ring.ring_sq()
        self._update_hot()
        if self._events_armed:
            self._arm_events()  # Asynchronous Event Configuration and AERs again

    def _cancel(self, qp: BrokerQueue, cid: int) -> np.ndarray:
        """End an in-flight command the device will never complete (the controller is disabled):
        its buffer leaves quarantine, the caller gets CANCELLED_STATUS."""
        record, (slot, gen) = qp.ring.cancel(cid, CANCELLED_STATUS)
        if slot >= 0:
            self.ledger.unpin(slot, gen, 1)
        return record

    def _fail(self, why: str) -> None:
        """Give up: disable the controller if it answers, end everything in flight, refuse every call."""
        self.failed = why
        self._hot = {}
        try:
            self.ctrl.disable()
            disabled = True
        except Exception:
            disabled = False  # a live controller may still DMA: leave its buffers pinned (quarantined)
        self._end_all(release=disabled)
        raise ControllerFailed(f"controller declared failed: {why}; reopen the device", why=why)

    def _gone_raise(self, exc: DeviceGone) -> NoReturn:
        """A C wait saw the device gone: end everything, and say why (all ones, or the device was
        taken away while this thread waited)."""
        released = self.gone  # device_removed() came first: the wait ended on the stop flag
        self._gone()
        if released:
            raise DeviceGone(f"the device is gone ({self.gone_why})", why=self.gone_why, **exc.context) from exc
        raise exc

    def _gone(self, wait_s: float = 0.0, *, drop_irq: bool = False) -> list[int]:
        """The device is gone: no register access can help. Refuse every later call, end every C
        wait (the stop flag), and end what is in flight (its memory is unmapped from the IOMMU when
        the device is closed) on each queue this thread can take within ``wait_s`` (re-entrant: its
        own queue too); a thread that keeps its queue ends its own when its wait returns.
        ``drop_irq``: the eventfds are about to be closed. Returns the queues not taken."""
        self.gone = True
        self._hot = {}
        self._stop.set()
        deadline = time.monotonic() + wait_s
        stuck = []
        for qp in self._all_queues:
            if not qp.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                stuck.append(qp.qid)
                continue
            try:
                self._end_queue(qp, release=True)  # no device left to DMA into their buffers
                if drop_irq:
                    qp.ring.set_irq(-1, qp.ring.vector)
            finally:
                qp.lock.release()
        return stuck

    def device_removed(self, why: str, timeout_s: float = 3.0) -> list[int]:
        """The device is being taken away (VFIO's device request: hot-unplug, unbind, ``remove``).
        Every C wait ends at once (the stop flag), each queue is taken from the thread using it
        (which sees ``DeviceGone``), everything in flight ends with ``device-gone``, and every later
        call is refused before touching the device. The caller then releases the VFIO fds.
        Returns the ids of queues whose thread did not let go within ``timeout_s`` (normally none)."""
        self.gone_why = why
        return self._gone(timeout_s, drop_irq=True)

    def _end_all(self, *, release: bool) -> None:
        """Cancel every command in flight on every queue; ``release`` unpins their buffers (only when
        the device can no longer DMA into them)."""
        for qp in self._all_queues:
            self._end_queue(qp, release=release)

    def _end_queue(self, qp: BrokerQueue, *, release: bool) -> None:
        for cid in qp.ring.busy_cids().tolist():
            _, (slot, gen) = qp.ring.cancel(cid, CANCELLED_STATUS)
            if release and slot >= 0:
                self.ledger.unpin(slot, gen, 1)

    def _raise_for(self, status: int, name: str, **context: Any) -> None:
        """CommandError for a completion status (without the phase tag)."""
        raise spec.command_error(status, name, **context)

    def _admin_sync(self, e: np.ndarray, name: str, buf: DmaBuffer | None = None, length: int = 0,
                    timeout_s: float | None = None) -> int:
        qp = self.admin
        if qp is None:
            raise Refused("controller-not-enabled", "controller is not enabled")
        return self._exec(qp, e, name, buf, length, timeout_s=timeout_s)

    # ============================================================ admin verbs
    def _scratch_buf(self) -> DmaBuffer:
        if self._scratch is None or not self._scratch.live:
            self._scratch = self.ledger.alloc(4096, owner="broker:scratch")
        return self._scratch

    def _admin_read(self, e: np.ndarray, name: str, length: int) -> bytes:
        buf = self._scratch_buf()
        if length > buf.size:
            self.ledger.free(buf)
            self._scratch = buf = self.ledger.alloc(align_up(length, 4096), owner="broker:scratch")
        arr = buf.array
        arr[:length] = 0
        self._admin_sync(e, name, buf, length)
        data = bytes(arr[:length])
        if self.admin is not None and self.admin.ring.nevents:
            self._service_events_quietly()
        return data

    def identify_controller(self) -> dict[str, Any]:
        self._require_ready()
        raw = self._admin_read(self._command_sqe(spec.identify(Cns.CONTROLLER)), "Identify Controller", 4096)
        self.id_ctrl = spec.parse_identify_controller(raw)
        mdts = self.id_ctrl["mdts"]
        mpsmin = 1 << (12 + regs.get(self.ctrl.cap, regs.CAP_.MPSMIN))
        self.max_transfer = UNLIMITED_MDTS_CAP if mdts == 0 else min((1 << mdts) * mpsmin, UNLIMITED_MDTS_CAP)
        if self.async_events and not self._events_armed:
            self._arm_events()
        return self.id_ctrl

    # ============================================================ asynchronous events (5.2)
    def _arm_events(self) -> None:
        """Asynchronous Event Configuration (Set Features 0Bh: the SMART/health critical warnings,
        and the notices OAES offers), then Asynchronous Event Requests outstanding."""
        qp, ident = self.admin, self.id_ctrl
        if qp is None or ident is None:
            return
        aec = spec.AEC_SMART_WARNINGS | (int(ident["oaes"]) & spec.AEC_NOTICES_FROM_OAES)
        try:
            self._exec(qp, self._command_sqe(spec.set_async_event_configuration(aec)),
                       "Set Features (Asynchronous Event Configuration)")
            self.aec = aec
        except CommandError as exc:  # events still come, as the controller's defaults allow
            self.aec = None
            log.info("Asynchronous Event Configuration not set: %s", exc)
        self._events_armed = True
        self._post_aers()

    def _post_aers(self) -> None:
        """Asynchronous Event Requests outstanding up to AERL+1 (at most MAX_AERS): standing commands,
        never late, beside which every other admin command runs. One SQ doorbell."""
        qp, ident = self.admin, self.id_ctrl
        if qp is None or ident is None or self.events_off is not None:
            return
        want = min(int(ident["aerl"]) + 1, self._aer_limit)
        with self._using(qp):
            posted = 0
            while qp.ring.standing + qp.ring.nevents < want and qp.capacity > 1:  # one id kept for commands
                qp.ring.post_standing(self._command_sqe(spec.async_event_request()))
                posted += 1
            if posted:
                qp.ring.ring_sq()

    def _event_log(self, lid: int) -> bytes:
        """The log page an event names, read with RAE=0 (which clears the event, 5.16.1) into a
        buffer of its own (the scratch buffer may hold another command's data)."""
        length = spec.async_event_log_bytes(lid, int((self.id_ctrl or {}).get("elpe", 0)))
        if self._event_buf is None or not self._event_buf.live:
            self._event_buf = self.ledger.alloc(4096, owner="broker:events")
        buf = self._event_buf
        buf.array[:length] = 0
        e = self._command_sqe(spec.get_log_page(lid, length))  # RAE=0, all namespaces
        self._admin_sync(e, f"Get Log Page {lid:#04x} (asynchronous event)", buf, length)
        return bytes(buf.array[:length])

    def _handle_event(self, rec: np.ndarray) -> events.AsyncEvent | None:
        """One AER completion: decode it, read its log page, refresh the namespaces it changed."""
        status, dw0 = int(rec["status"]), int(rec["result"])
        if status:
            _, sc, sct, _, _, _ = spec.split_status(status << 1)
            if (sct, sc) == (1, 0x05):  # Asynchronous Event Request Limit Exceeded: post fewer
                self._aer_limit = max(1, self._aer_limit - 1)
            elif status != CANCELLED_STATUS:
                self.events_off = f"{spec.status_name(sct, sc)} (SCT {sct:#x}, SC {sc:#04x})"
                log.info("Asynchronous Event Request refused: %s; events are off", self.events_off)
            return None
        _, _, lid = spec.split_async_event(dw0)
        try:
            data, why = self._event_log(lid), ""
        except CommandError as exc:
            data, why = b"", str(exc)
        ev = events.decode(dw0, data, why)
        if ev.namespace_changed:
            self._reidentify(vanished_changed=False)  # the namespace table follows the controller's
        return ev

    def _service_events(self) -> None:
        """Take the AER completions C kept aside, handle each, post AERs again, then deliver the
        events (outside the admin queue's lock)."""
        qp = self.admin
        if qp is None or self._servicing or self._resetting or not self._events_armed:
            return
        new: list[events.AsyncEvent] = []
        with self._using(qp):
            if self._servicing:
                return
            self._servicing = True
            try:
                if qp.ring.pending() and not qp.in_flight:
                    qp.ring.reap()  # only standing commands are outstanding: their completions go aside
                    qp.ring.ring_cq()
                while True:
                    recs = qp.ring.take_events()
                    if not len(recs):
                        break
                    new += [ev for ev in map(self._handle_event, recs) if ev is not None]
                self._post_aers()
            finally:
                self._servicing = False
        with self._event_cond:
            self.events.extend(new)
            self.events_seen += len(new)
            self._event_cond.notify_all()
        for ev in new:
            for callback in list(self._event_callbacks):
                try:
                    callback(ev)
                except Exception:  # a caller's callback must not break the broker
                    log.exception("asynchronous event callback %r failed", callback)

    def _service_events_quietly(self) -> None:
        """Service events after another admin command: a failure here is logged, not raised into
        that command's caller (its own command succeeded)."""
        try:
            self._service_events()
        except NvmeVfioError as exc:
            log.warning("asynchronous events: %s", exc)

    def poll_events(self, timeout_s: float = 0.0) -> list[events.AsyncEvent]:
        """Events that arrived and were not taken yet, waiting up to ``timeout_s`` for one; taken."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._require_ready()
            with self._event_cond:
                if self.events:
                    out = list(self.events)
                    self.events.clear()
                    return out
            qp = self.admin
            if qp is not None and (qp.ring.pending() or qp.ring.nevents):
                self._service_events()
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            with self._event_cond:  # another thread's servicing notifies; else look again soon
                self._event_cond.wait(min(EVENT_POLL_S, left))

    def on_event(self, callback: Callable[[events.AsyncEvent], None]) -> None:
        """Call ``callback(event)`` for every event from now on; a watcher thread services the
        admin queue every EVENT_POLL_S while no other command does."""
        self._event_callbacks.append(callback)
        if self._watch is None:
            self._watch_stop.clear()
            self._watch = threading.Thread(target=self._watch_events, name="nvmevfio-events", daemon=True)
            self._watch.start()

    def _watch_events(self) -> None:
        while not self._watch_stop.wait(EVENT_POLL_S):
            qp = self.admin
            if qp is None or self.gone or self.failed is not None:
                continue
            if qp.ring.pending() or qp.ring.nevents:
                try:
                    self._service_events()
                except NvmeVfioError as exc:
                    log.warning("asynchronous events: %s", exc)

    def _stop_watch(self) -> None:
        if self._watch is not None:
            self._watch_stop.set()
            if self._watch is not threading.current_thread():
                self._watch.join(timeout=5)
            self._watch = None

    def active_namespaces(self) -> list[int]:
        self._require_ready()
        raw = self._admin_read(self._command_sqe(spec.identify(Cns.ACTIVE_NAMESPACE_LIST)),
                               "Identify Active Namespace List", 4096)
        return spec.parse_active_namespaces(raw)

    def identify_namespace(self, nsid: int) -> Namespace:
        self._require_ready()
        if not 1 <= nsid <= 0xFFFFFFFE:
            raise Refused("namespace-inactive", f"namespace id {nsid} is not valid", nsid=nsid)
        raw = self._admin_read(self._command_sqe(spec.identify(Cns.NAMESPACE, nsid=nsid)),
                               "Identify Namespace", 4096)
        ident = spec.parse_identify_namespace(raw)
        if ident["nsze"] == 0:
            self.namespaces.pop(nsid, None)
            self._update_hot()
            raise Refused("namespace-inactive", f"namespace {nsid} is not active (NSZE=0)", nsid=nsid)
        idx = spec.flbas_index(ident["flbas"], ident["nlbaf"])
        lbaf = ident["lbafs"][idx]
        ns = Namespace(nsid, ident["nsze"], ident["ncap"], ident["nuse"], 1 << lbaf["ds"], lbaf["ms"], idx, ident)
        self.namespaces[nsid] = ns
        self._update_hot()
        return ns

    def get_log_page(self, lid: int, length: int, *, nsid: int = 0xFFFFFFFF, offset: int = 0) -> bytes:
        self._require_ready()
        if length <= 0 or length % 4 or length > 1 << 20:
            raise Refused("length-mismatch", f"log page length {length} must be a positive multiple of 4 up to 1 MiB",
                          length=length)
        e = self._command_sqe(spec.get_log_page(lid, length, nsid=nsid, offset=offset))
        return self._admin_read(e, f"Get Log Page {lid:#04x}", length)

    def passthru(self, qid: int, opcode: int, *, nsid: int = 0, cdws: dict[str, int] | None = None,
                 data: Any = None, data_len: int = 0, timeout_s: float | None = None,
                 name: str | None = None) -> tuple[int, bytes | None]:
        """Any command the broker does not own, on the admin queue (``qid`` 0) or an I/O queue: the
        caller gives CDW2/3/10..15 (``cdws``, by name), the bytes to send (``data``) or the length
        to receive (``data_len``), never an address; the broker copies through a buffer of its own
        and authors DPTR. Returns (DW0, the bytes received or None). No retries: the status is the
        device's. Refused before the device sees anything: commands whose addresses or state the
        broker owns (:data:`BROKER_OWNED_ADMIN`, Set Features :data:`BROKER_OWNED_FEATURES`),
        fused or SGL commands (CDW0 FUSE/PSDT), and data commands on a namespace whose metadata
        needs a metadata pointer; all with reason ``broker-owned-command``."""
        self._require_ready()
        qp = self.admin if qid == 0 else self._queue(qid)
        if qp is None:
            raise Refused("controller-not-enabled", "controller is not enabled")
        opcode = _whole(opcode, "the opcode")
        if not 0 <= opcode <= 0xFF:
            raise Refused("invalid-argument", f"opcode {opcode:#x} is not a byte", opcode=opcode)
        words = {k: _whole(v, k) for k, v in (cdws or {}).items()}
        for k, v in words.items():
            if k not in PASSTHRU_DWORDS:
                raise Refused("invalid-argument", f"{k}: passthrough takes {', '.join(PASSTHRU_DWORDS)} (the broker "
                              "authors CDW0, PRP1/PRP2 and the metadata pointer)", field=k)
            if not 0 <= v <= 0xFFFFFFFF:
                raise Refused("invalid-argument", f"{k}={v:#x} is not a 32-bit value", field=k)
        nsid = _whole(nsid, "the namespace id")
        if not 0 <= nsid <= 0xFFFFFFFF:
            raise Refused("invalid-argument", f"namespace id {nsid:#x} is not a 32-bit value", nsid=nsid)
        name = name or (f"Admin passthru {opcode:#04x}" if qid == 0 else f"I/O passthru {opcode:#04x}")
        owned = self._broker_owned(qid, opcode, words.get("cdw10", 0), nsid)
        if owned:
            raise Refused("broker-owned-command", f"{name}: {owned} is the broker's (it authors the addresses "
                          "and state the command carries); use the provider's verbs", opcode=opcode)
        if data is not None and data_len:
            raise Refused("invalid-argument", "give data (to send) or data_len (to receive), not both")
        payload = None if data is None else np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
        length = len(payload) if payload is not None else _whole(data_len, "data_len")
        limit = min(self.max_transfer or UNLIMITED_MDTS_CAP, PASSTHRU_MAX)
        if not 0 <= length <= limit:
            raise Refused("length-mismatch", f"{length} bytes: passthrough moves at most {limit} (MDTS)",
                          length=length, limit=limit)
        buf = self.ledger.alloc(align_up(max(length, 1), self.page_size), owner="broker:passthru") if length \
            else None
        try:
            if buf is not None:
                buf.array[:] = 0
                if payload is not None:
                    buf.array[:length] = payload
            e = self._sqe(opcode, nsid=nsid, **words)
            dw0 = self._exec(qp, e, name, buf, length, timeout_s=timeout_s, retry=False, opcode=opcode)
            return dw0, (bytes(buf.array[:length]) if buf is not None and payload is None else None)
        finally:
            if buf is not None and self.ledger.in_flight(buf) == 0:
                self.ledger.free(buf)  # scrubbed; one still in flight stays quarantined until close

    # ------------------------------------------------------------ the everyday admin and NVM commands
    # Each is a named passthrough: the broker's buffer and DPTR, its refusals, the device's status.
    def _passthru_command(self, qid: int, cmd: spec.Command, name: str, **kw: Any) -> tuple[int, bytes | None]:
        """:meth:`passthru` of a built command (its opcode, NSID and CDW10..15)."""
        return self.passthru(qid, cmd.opc, nsid=cmd.nsid, cdws=cmd.cdws, name=name, **kw)

    def set_features(self, fid: int, value: int = 0, *, cdw12: int = 0, save: bool = False, nsid: int = 0,
                     data: Any = None) -> int:
        """Set Features (admin 09h): ``value`` is CDW11, ``save`` sets CDW10.SV; returns DW0."""
        fid = _whole(fid, "the feature id")
        if not 0 < fid <= 0xFF:
            raise Refused("invalid-feature", f"feature id {fid:#x} out of range", fid=fid)
        return self._passthru_command(0, spec.set_features(fid, value, save=save, cdw12=cdw12, nsid=nsid),
                                      f"Set Features {fid:#04x}", data=data)[0]

    def format_nvm(self, nsid: int, lbaf: int, *, ses: int = 0, pi: int = 0, pil: int = 0, mset: int = 0,
                   timeout_s: float | None = None) -> dict[int, Namespace]:
        """Format NVM (admin 80h), then re-identify: a namespace whose geometry changed is refused
        for I/O (``namespace-changed``) until the device is reopened. Refused while I/O is in flight."""
        for name, v, hi in (("lbaf", lbaf, 63), ("ses", ses, 7), ("pi", pi, 7), ("pil", pil, 1), ("mset", mset, 1)):
            if not 0 <= _whole(v, name) <= hi:
                raise Refused("invalid-argument", f"{name}={v} outside 0..{hi}", field=name)
        for qp in self.io:
            if qp.in_flight:
                self._refuse_busy(qp)
        cmd = spec.format_nvm(nsid, lbaf, mset=mset, pi=pi, pil=pil, ses=ses)
        try:
            self._passthru_command(0, cmd, "Format NVM",
                                   timeout_s=timeout_s or max(self.command_timeout_s, FORMAT_TIMEOUT_S))
        finally:
            self._reidentify()
            self._update_hot()
        return self.namespaces

    def _reidentify(self, *, vanished_changed: bool = True) -> None:
        """Identify the namespaces again; one whose size or format changed is refused for I/O
        (``namespace-changed``) until the device is reopened. ``vanished_changed``: so is one
        that is no longer active (after a reset); otherwise (a namespace notice: detached or
        deleted) it is just inactive, and usable again when it comes back unchanged."""
        def geometry() -> dict[int, tuple[int, int, int]]:
            return {n: (ns.size_blocks, ns.block_size, ns.metadata_size) for n, ns in self.namespaces.items()}

        before = geometry()
        self.refresh_namespaces()
        after = geometry()
        self.changed_namespaces |= {n for n in before if before[n] != after.get(n)
                                    and (vanished_changed or n in after)}
        self._update_hot()

    def compare(self, nsid: int, slba: int, data: Any, qid: int = 1) -> None:
        """Compare (NVM 05h): the device checks the blocks against ``data``; a difference raises
        CommandError Compare Failure."""
        ns = self.namespace(nsid)
        payload = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
        if not len(payload) or len(payload) % ns.block_size:
            raise Refused("length-mismatch", f"{len(payload)} bytes: whole {ns.block_size}-byte blocks",
                          length=len(payload))
        slba, count = self.check_window(ns, slba, len(payload) // ns.block_size)
        if count > MAX_NLB:
            raise Refused("count-out-of-range", f"{count} blocks: Compare takes at most {MAX_NLB}", count=count)
        self._passthru_command(qid, spec.compare(nsid, slba, count), "Compare", data=payload)

    def verify(self, nsid: int, slba: int, count: int, qid: int = 1) -> None:
        """Verify (NVM 0Ch): the device reads and checks the blocks, transferring nothing."""
        slba, count = self.check_window(self.namespace(nsid), slba, count)
        if count > MAX_NLB:
            raise Refused("count-out-of-range", f"{count} blocks: Verify takes at most {MAX_NLB}", count=count)
        self._passthru_command(qid, spec.verify(nsid, slba, count), "Verify")

    def create_namespace(self, nsze: int, ncap: int, flbas: int = 0, *, dps: int = 0, nmic: int = 0) -> int:
        """Namespace Management, create (admin 0Dh, SEL 0); returns the new namespace id."""
        host = np.zeros(4096, dtype=np.uint8)
        host[0:8] = np.frombuffer(int(nsze).to_bytes(8, "little"), np.uint8)
        host[8:16] = np.frombuffer(int(ncap).to_bytes(8, "little"), np.uint8)
        host[26], host[29], host[30] = flbas, dps, nmic
        return self._passthru_command(0, spec.namespace_create(), "Namespace Management (create)", data=host)[0]

    def delete_namespace(self, nsid: int) -> None:
        self._passthru_command(0, spec.namespace_delete(nsid), "Namespace Management (delete)")
        self.refresh_namespaces()

    def attach_namespace(self, nsid: int, controllers: list[int], *, detach: bool = False) -> None:
        """Namespace Attachment (admin 15h): attach (SEL 0) or detach (SEL 1) to controller ids."""
        ids = [_whole(c, "a controller id") for c in controllers]
        if not 0 < len(ids) <= 2047 or not all(0 <= c <= 0xFFFF for c in ids):
            raise Refused("invalid-argument", f"controller list {ids}: 1..2047 ids of 16 bits")
        lst = np.zeros(4096 // 2, dtype="<u2")
        lst[0], lst[1 : 1 + len(ids)] = len(ids), ids
        self._passthru_command(0, spec.namespace_attachment(nsid, detach=detach),
                               f"Namespace Attachment ({'detach' if detach else 'attach'})", data=lst.view(np.uint8))
        self.refresh_namespaces()

    def sanitize(self, sanact: int, *, ause: bool = False, owpass: int = 0, oipbp: bool = False,
                 no_dealloc: bool = False, ovrpat: int = 0) -> None:
        """Sanitize (admin 84h): SANACT 1 exit failure, 2 block erase, 3 overwrite, 4 crypto erase."""
        if sanact not in (1, 2, 3, 4) or not 0 <= owpass <= 15:
            raise Refused("invalid-argument", f"sanact {sanact} (1..4) / owpass {owpass} (0..15) out of range")
        self._passthru_command(0, spec.sanitize(sanact, ause=ause, owpass=owpass, oipbp=oipbp, no_dealloc=no_dealloc,
                                                ovrpat=ovrpat), "Sanitize")

    def firmware_download(self, image: Any, *, offset: int = 0, xfer: int = 4096) -> int:
        """Firmware Image Download (admin 11h) in ``xfer``-byte pieces from byte ``offset``; returns
        the pieces sent."""
        data = np.frombuffer(memoryview(image).cast("B"), dtype=np.uint8)
        if not len(data) or len(data) % 4 or offset % 4 or xfer <= 0 or xfer % 4:
            raise Refused("length-mismatch", "firmware image, offset and transfer size must be whole dwords")
        pieces = 0
        for start in range(0, len(data), xfer):
            piece = data[start : start + xfer]
            self._passthru_command(0, spec.firmware_image_download(len(piece), offset + start),
                                   "Firmware Image Download", data=piece)
            pieces += 1
        return pieces

    def firmware_commit(self, slot: int, action: int, *, bpid: int = 0) -> int:
        """Firmware Commit (admin 10h); returns DW0."""
        if not 0 <= slot <= 7 or not 0 <= action <= 7 or bpid not in (0, 1):
            raise Refused("invalid-argument", f"slot {slot} (0..7) / action {action} (0..7) / bpid {bpid} (0..1)")
        return self._passthru_command(0, spec.firmware_commit(slot, action, bpid=bpid), "Firmware Commit")[0]

    def device_self_test(self, stc: int, *, nsid: int = 0xFFFFFFFF) -> None:
        """Device Self-test (admin 14h): STC 1 short, 2 extended, 0Eh vendor, 0Fh abort."""
        if stc not in (1, 2, 0xE, 0xF):
            raise Refused("invalid-argument", f"self-test code {stc:#x}: 1, 2, 0xe or 0xf")
        self._passthru_command(0, spec.device_self_test(stc, nsid=nsid), "Device Self-test")

    def _broker_owned(self, qid: int, opcode: int, cdw10: int, nsid: int) -> str:
        """Why a passthrough command is the broker's ('' when it is not)."""
        if qid == 0:
            if opcode in BROKER_OWNED_ADMIN:
                return BROKER_OWNED_ADMIN[opcode]
            if opcode == AdminOpcode.SET_FEATURES and cdw10 & 0xFF in BROKER_OWNED_FEATURES:
                return f"Set Features {BROKER_OWNED_FEATURES[cdw10 & 0xFF]}"
            return ""
        ns = self.namespaces.get(nsid)
        if ns is not None and ns.metadata_size and opcode & 3 and not ns.extended_lba:
            return f"a data command on namespace {nsid}, whose {ns.metadata_size}-byte metadata needs a metadata " \
                   "pointer"
        return ""

    def get_features(self, fid: int, *, sel: int = 0, nsid: int = 0, cdw11: int = 0) -> int:
        self._require_ready()
        if not 0 < fid <= 0xFF or sel not in (0, 1, 2, 3):
            raise Refused("invalid-feature", f"feature id {fid:#x} / select {sel} out of range", fid=fid, sel=sel)
        return self._admin_sync(self._command_sqe(spec.get_features(fid, sel=sel, cdw11=cdw11, nsid=nsid)),
                                f"Get Features {fid:#04x}")

    def create_io_queues(self, count: int = 1, depth: int = DEFAULT_IO_DEPTH, *, irq: bool = False,
                         shadow_doorbells: bool = True) -> int:
        """Set Features Number of Queues, Doorbell Buffer Config when the controller has it (OACS
        bit 8) and ``shadow_doorbells`` is on, then CREATE I/O CQ before SQ for each pair. Returns
        the depth used."""
        self._require_ready()
        if self.io:
            raise Refused("io-queues-exist", f"{len(self.io)} I/O queue pair(s) already created")
        if not 2 <= depth <= self.ctrl.mqes:
            raise Refused("count-out-of-range", f"queue depth {depth} outside 2..{self.ctrl.mqes} (CAP.MQES+1)",
                          depth=depth, mqes=self.ctrl.mqes)
        if count < 1:
            raise Refused("count-out-of-range", f"queue count {count} must be at least 1", count=count)
        if irq and self.irq is None:
            raise Refused("irq-unavailable", "MSI-X completions need a VFIO device (no interrupt source)")
        if self.id_ctrl is None:
            self.identify_controller()
        self._set_number_of_queues(count)
        if irq:
            assert self.irq is not None
            self.irq.vectors(count + 1)
            self.irq_mode = True
        self.shadow_doorbells = shadow_doorbells
        if shadow_doorbells and (self.id_ctrl or {}).get("oacs", 0) & OACS_DBBUF and self._dbbuf is None:
            self._configure_doorbell_buffer()
        per_cmd = prp.list_pages_needed(0, self.max_transfer, self.page_size) if self.max_transfer else 1
        for i in range(count):
            qid = i + 1
            vector = qid if irq else None
            qp = self._new_queue_pair(qid, depth, per_cmd, vector)
            qp.vector = vector
            try:
                self._create_queue_on_device(qp)
            except BaseException:
                for b in qp.buffers:
                    self.ledger.free(b)
                raise
            self.io.append(qp)
        self.refresh_namespaces()
        return depth

    def _set_number_of_queues(self, count: int) -> None:
        got = self._admin_sync(self._command_sqe(spec.set_number_of_queues(count, count)),
                               "Set Features Number of Queues")
        allowed = min(spec.split_number_of_queues(got))
        if allowed < count:
            raise Refused("count-out-of-range", f"controller allows {allowed} I/O queue pairs, {count} asked",
                          allowed=allowed)

    def _create_queue_on_device(self, qp: BrokerQueue) -> None:
        """CREATE I/O CQ, then CREATE I/O SQ, over the queue pair's broker-owned memory."""
        qid, depth = qp.qid, qp.ring.depth
        cq = spec.create_io_cq(qid, depth, contiguous=True, interrupts=qp.vector is not None, vector=qp.vector or 0)
        self._admin_sync(self._command_sqe(cq, prp1=self.ledger.iova(qp.buffers[1])), "Create I/O CQ")
        sq = spec.create_io_sq(qid, depth, qid, contiguous=True)
        self._admin_sync(self._command_sqe(sq, prp1=self.ledger.iova(qp.buffers[0])), "Create I/O SQ")

    def _doorbell_buffer_config(self, shadow: DmaBuffer, eventidx: DmaBuffer) -> None:
        self._admin_sync(self._command_sqe(spec.doorbell_buffer_config(), prp1=self.ledger.iova(shadow),
                                           prp2=self.ledger.iova(eventidx)), "Doorbell Buffer Config")

    def _configure_doorbell_buffer(self) -> None:
        """Doorbell Buffer Config (admin 7Ch, 5.8): a shadow doorbell page (PRP1) and an EventIdx page
        (PRP2), both broker-owned and zeroed. I/O queues created afterwards publish their SQ tail and
        CQ head there, and write the MMIO doorbell only when the EventIdx rule says the controller
        needs it. The admin queue keeps MMIO doorbells, as in Linux."""
        shadow = self.ledger.alloc(self.page_size, owner="broker:dbbuf-shadow")
        eventidx = self.ledger.alloc(self.page_size, owner="broker:dbbuf-eventidx")
        try:
            self._doorbell_buffer_config(shadow, eventidx)
        except BaseException:
            self.ledger.free(shadow)
            self.ledger.free(eventidx)
            raise
        self._dbbuf = (shadow, eventidx)

    @property
    def shadow_doorbells_active(self) -> bool:
        return self._dbbuf is not None

    # ============================================================ I/O validation
    def refresh_namespaces(self) -> dict[int, Namespace]:
        """Identify every active namespace (CNS 02h, then CNS 00h for each), so that I/O
        validation afterwards is a lookup that never touches the device."""
        self.namespaces = {}
        for nsid in self.active_namespaces():
            self.identify_namespace(nsid)
        self._update_hot()
        return self.namespaces

    def _update_hot(self) -> None:
        """The namespaces the synchronous hot path may use without further checks."""
        ready = (self.io and self.ctrl.state is State.READY and not self.gone and self.failed is None
                 and not self.ledger.bounce)  # no-IOMMU lane: every copy goes through the checked path
        self._hot = {n: ns for n, ns in self.namespaces.items()
                     if not ns.metadata_size and n not in self.changed_namespaces} if ready else {}

    def namespace(self, nsid: int) -> Namespace:
        """The identified namespace ``nsid``; a pure lookup (refresh_namespaces() fills the table)."""
        self._require_ready()
        nsid = _whole(nsid, "the namespace id")
        if nsid in self.changed_namespaces:
            raise Refused("namespace-changed", f"namespace {nsid} changed size or format (a controller reset or "
                          "Format NVM); I/O to it is refused until the device is reopened", nsid=nsid)
        ns = self.namespaces.get(nsid)
        if ns is None:
            raise Refused("namespace-inactive",
                          f"namespace {nsid} is not active on this controller (active: "
                          f"{sorted(self.namespaces) or 'none'})", nsid=nsid, active=sorted(self.namespaces))
        if ns.metadata_size:
            raise Refused("unsupported-lba-format",
                          f"namespace {nsid} uses LBA format {ns.lba_format} with {ns.metadata_size} bytes of "
                          "metadata per block; only formats without metadata are supported", nsid=nsid)
        return ns

    def check_window(self, ns: Namespace, slba: int, count: int) -> tuple[int, int]:
        """Refuse a window outside the namespace; returns (slba, count) as Python ints."""
        slba, count = _whole(slba, "the LBA"), _whole(count, "the block count")
        if count <= 0:
            raise Refused("count-out-of-range", f"block count {count} must be positive", count=count)
        if slba < 0 or slba + count > ns.size_blocks:
            raise Refused("window-past-namespace-end",
                          f"blocks {slba}..{slba + count - 1} are outside namespace {ns.nsid} "
                          f"(0..{ns.size_blocks - 1})", slba=slba, count=count, nsze=ns.size_blocks)
        return slba, count

    @property
    def max_pages(self) -> int:
        """Memory pages one command may touch: MDTS counts bytes, but a transfer at an
        in-page offset touches one page more; devices bound their scatter lists by
        pages (QEMU fails at 1025), so the page count is the limit that holds."""
        return max(1, self.max_transfer // self.page_size)

    def max_blocks(self, ns: Namespace, in_page_offset: int = 0) -> int:
        """Blocks per command for data starting at ``in_page_offset`` within a page."""
        limit = self.max_transfer - (self.page_size if in_page_offset % self.page_size else 0)
        return max(1, min(limit // ns.block_size, MAX_NLB))

    # ============================================================ I/O: batched submit / reap
    def _check_rw(self, ns: Namespace, base: int, size: int, slba: int, count: int,
                  offset: int) -> tuple[int, int, int]:
        """Every rule for one READ/WRITE, on Python ints: returns (iova, length, pages)."""
        limit = self.max_blocks(ns)
        if count < 1 or count > limit:
            raise Refused("count-out-of-range", f"block count {count}: must be 1..{limit} per command (MDTS)",
                          count=count, limit=limit)
        if slba < 0 or slba + count > ns.size_blocks:
            self.check_window(ns, slba, count)
        length = count * ns.block_size
        if offset < 0 or offset & 3 or offset + length > size:
            raise Refused("length-mismatch", f"{length} bytes at offset {offset} fall outside the {size}-byte "
                          "buffer or are not dword aligned", offset=offset, length=length, size=size)
        ps = self.page_size
        iova = base + offset
        pages = (iova % ps + length + ps - 1) // ps  # from the start of PRP1's page to the last byte
        if pages > self.max_pages:
            raise Refused("count-out-of-range", f"a command would touch {pages} memory pages, more than "
                          f"{self.max_pages} (MDTS); at an in-page offset it carries at most "
                          f"{self.max_blocks(ns, 4)} blocks", max_pages=self.max_pages)
        return iova, length, pages

    def submit_rw(self, opcode: int, nsid: int, slbas: Any, counts: Any, buf: DmaBuffer | RegisteredBuffer,
                  offsets: Any, *, qid: int = 1, doorbell: bool = True) -> np.ndarray:
        """Post a batch of READ or WRITE commands (see :meth:`_submit_rw`); one thread per queue."""
        with self._using(self._queue(qid)):
            return self._submit_rw(opcode, nsid, slbas, counts, buf, offsets, qid=qid, doorbell=doorbell)

    def _submit_rw(self, opcode: int, nsid: int, slbas: Any, counts: Any, buf: DmaBuffer | RegisteredBuffer,
                   offsets: Any, *, qid: int = 1, doorbell: bool = True) -> np.ndarray:
        """Post a batch of READ or WRITE commands into ``buf`` at ``offsets`` and ring the SQ tail
        doorbell once. Returns their tags.

        Every command is validated (window, MDTS, buffer bounds, handle) before any is posted; a
        refusal names the first command that breaks a rule. Small batches are packed entry by
        entry (cheaper than numpy's per-call overhead), larger ones authored vectorized; either
        way one C call copies them into the ring. With a registered buffer the offsets name its
        slots and the C path copies the slots' pre-authored PRPs.
        """
        qp = self._queue(qid)
        ns = self.namespace(nsid)
        if opcode not in (IoOpcode.READ, IoOpcode.WRITE):
            raise Refused("unsupported-command", f"opcode {opcode:#x} is not READ or WRITE", opcode=opcode)
        reg = buf if isinstance(buf, RegisteredBuffer) else None
        handle = self._registration(reg).buffer if reg is not None else cast(DmaBuffer, buf)
        base = self.ledger.iova(handle)  # a live handle (stale or foreign: refused) before anything else
        slbas, counts, offsets = (x if isinstance(x, (list, tuple)) else np.atleast_1d(x)
                                  for x in (slbas, counts, offsets))
        n = len(slbas)
        if not (len(counts) == len(offsets) == n):
            raise Refused("length-mismatch", "slbas, counts and offsets differ in length")
        if n == 0:
            return np.empty(0, dtype=np.int64)
        if reg is not None:
            return self._submit_registered(qp, ns, opcode, reg, _int_array(slbas, "LBAs"),
                                           _int_array(counts, "counts"), _int_array(offsets, "offsets"), doorbell)
        if n <= SCALAR_BATCH:
            return self._submit_small(qp, ns, opcode, base, handle, _ints(slbas, "LBAs"), _ints(counts, "counts"),
                                      _ints(offsets, "offsets"), doorbell)
        slbas = _int_array(slbas, "LBAs")
        counts = _int_array(counts, "counts")
        offsets = _int_array(offsets, "offsets")
        ps = self.page_size
        lengths = counts * ns.block_size
        iovas = base + offsets
        pages = (iovas % ps + lengths + ps - 1) // ps
        if (counts.min() < 1 or counts.max() > self.max_blocks(ns) or slbas.min() < 0
                or (slbas + counts).max() > ns.size_blocks or offsets.min() < 0 or (offsets & 3).any()
                or (offsets + lengths).max() > handle.size or pages.max() > self.max_pages):
            for s_, c_, o_ in zip(slbas.tolist(), counts.tolist(), offsets.tolist()):
                self._check_rw(ns, base, handle.size, s_, c_, o_)  # raises for the first bad command
        cids = qp.ring.take(n)
        try:
            entries = self._author_rw(qp, opcode, ns.nsid, slbas, counts, cids.astype(np.int64), iovas, lengths,
                                      pages)
            self._for_device(qp, entries)
            first = qp.ring.post(entries, n, handle.slot, handle.generation)
        except BaseException:
            qp.ring.untake(cids)
            raise
        return self._posted(qp, handle, first, n, doorbell, opcode, offsets, lengths)

    def submit_validated(self, qid: int, sqe: np.ndarray, pages: np.ndarray, *, doorbell: bool = True) -> int:
        """Post one entry the Model B validator accepted (nvmevfio/service/validator.py): ``sqe``
        is the validator's copy (its LBAs already moved into the window, PRP1 checked), ``pages``
        the checked data-page addresses after PRP1's. The broker authors PRP2 from them, the page
        itself or a list in this queue's own list pages, so the device never follows a list the
        client could rewrite. The caller keeps the client's buffers from being freed until the
        command completes. Returns its tag (one thread per queue)."""
        qp = self._queue(qid)
        with self._using(qp):
            e = np.array(sqe, dtype=SQE).reshape(1)
            cids = qp.ring.take(1)
            try:
                cid = int(cids[0])
                e["cid"] = cid
                if len(pages) <= 1:
                    e["prp2"] = int(pages[0]) if len(pages) else 0
                else:
                    lists = prp.list_pages(np.asarray(pages, dtype=np.uint64), self.page_size,
                                           qp.prp_list_iovas(cid))
                    qp.write_lists(cid, lists)
                    e["prp2"] = qp.prp_list_iovas(cid)[0]
                self._for_device(qp, e)
                first = qp.ring.post(e, 1)
            except BaseException:
                qp.ring.untake(cids)
                raise
            if doorbell:
                qp.ring.ring_sq()
            return first

    # ============================================================ the service's compiled data path
    def service_attach(self, qid: int, svc: Any) -> None:
        """Give a service session (``struct nv_svc``, cbits/service.c) what it needs of I/O queue
        ``qid``: the page size, MDTS, ONCS, and the queue's PRP-list pages with their device
        addresses, which C fills from the session's page tables (:meth:`service_buffer`) or, for
        a deallocate, with its one range."""
        qp = self._queue(qid)
        ps = self.page_size
        svc.page_size, svc.max_pages, svc.max_transfer = ps, self.max_pages, self.max_transfer
        svc.oncs = int((self.id_ctrl or {}).get("oncs", 0))  # which of Write Zeroes and DSM C may post
        svc.ncids = qp.ring.ncids
        svc.prp_pages = qp.prp_pages if qp.prp_array is not None else 0
        if qp.prp_array is not None:
            dev = qp.prp_base + ps * np.arange(qp.ring.ncids * qp.prp_pages, dtype=np.uint64)
            self.ledger.translate(dev)  # the no-IOMMU lane's physical addresses; else nothing
            qp.prp_dev = dev  # kept alive with the queue: C points into it
            svc.prp_area = ffi.cast("uint64_t *", qp.prp_array.ctypes.data)
            svc.prp_dev = ffi.cast("uint64_t *", dev.ctypes.data)

    def service_buffer(self, entry: Any, buf: DmaBuffer) -> None:
        """Describe a caller buffer to a service session's C path (``struct nv_svc_buffer``): the
        device address of each of its memory pages (authored here, translated in the no-IOMMU
        lane; kept by the broker until the buffer is freed), the caller's memory and, in the
        no-IOMMU lane, the device-visible shadow C copies through."""
        base = self.ledger.iova(buf)
        ps = self.page_size
        pages = base + ps * np.arange(-(-buf.size // ps), dtype=np.uint64)
        self.ledger.translate(pages)
        memory, shadow = self.ledger.bounce_arrays(buf)
        self._service_pages[(buf.slot, buf.generation)] = pages
        entry.generation, entry.size = buf.generation, buf.size
        entry.pages, entry.npages = ffi.cast("uint64_t *", pages.ctypes.data), len(pages)
        entry.user = ffi.cast("uint8_t *", memory.ctypes.data)
        entry.shadow = ffi.cast("uint8_t *", shadow.ctypes.data) if shadow is not None else ffi.NULL
        entry.ledger_slot, entry.ledger_gen = buf.slot, buf.generation

    def service_serve(self, sessions: list[tuple[int, Any]], watch: list[int], timeout_s: float,
                      idle_spin_s: float = 0.0) -> tuple[int, int]:
        """Run the service's steady state in C (``nv_svc_serve``) over ``sessions`` ((qid, struct
        nv_svc) pairs) until Python is needed: returns (event, session index), event one of
        ``lib.NV_SVC_*``. What only the broker can do is done here first: a late command is
        recovered (abort, reset), a reset by another thread waited for, and commands the broker
        ended are completed to their clients with their status; a completion for an id not in
        flight, or a gone device, raises. ``idle_spin_s``: on polled queues, how long the loop
        keeps spinning after its last work before it sleeps."""
        qps = [self._queue(qid) for qid, _ in sessions]
        n = len(sessions)
        svcs = ffi.new("struct nv_svc *[]", max(n, 1))
        rings = ffi.new("struct nv_qp *[]", max(n, 1))
        for i, ((_, svc), qp) in enumerate(zip(sessions, qps)):
            svcs[i], rings[i] = svc, qp.ring._qp
        fds = ffi.new("int[]", watch or [0])
        which = ffi.new("uint32_t *")
        before = sum(qp.ring._qp.completed for qp in qps)
        with contextlib.ExitStack() as held:
            for qp in qps:
                held.enter_context(self._using(qp))
            r = int(lib.nv_svc_serve(svcs, rings, n, fds, len(watch), int(self.command_timeout_s * 1e9),
                                     int(timeout_s * 1e9), int(idle_spin_s * 1e9), which))
            self.commands_completed += sum(qp.ring._qp.completed for qp in qps) - before
            i = int(which[0])
            if r == lib.NV_SVC_LATE:
                self._recover_timeout(qps[i])
            elif r == -errno.EAGAIN:
                self._park()  # another thread's reset requeued (or cancelled) ours
            elif r == -errno.ENODEV:
                self._gone_raise(DeviceGone(f"queue {qps[i].qid}: the device was taken away", qid=qps[i].qid))
            elif r == -errno.EPROTO:
                self._reap(qps[i], 0, 0.0)  # names the completion whose id is not in flight
            elif r < 0:
                raise ShimError("nv_svc_serve", f"queue {qps[i].qid}", -r)
            for (_, svc), qp in zip(sessions, qps):
                self._service_ended(qp, svc)
        return r, i

    def _service_ended(self, qp: BrokerQueue, svc: Any) -> None:
        """Commands of a service session the broker ended itself (after a reset): to the client."""
        for records in self._take_cancelled(qp):
            self._service_complete(svc, records)

    @staticmethod
    def _service_complete(svc: Any, records: np.ndarray) -> None:
        """COMPLETION records of a service session's commands into its client's ring."""
        if len(records):
            records = np.ascontiguousarray(records)
            lib.nv_svc_complete(svc, ffi.cast("struct nv_completion *", records.ctypes.data), len(records))

    def service_pump(self, qid: int, svc: Any) -> int:
        """Take, check and post what a service session's client published (``nv_svc_pump``)."""
        qp = self._queue(qid)
        with self._using(qp):
            return int(lib.nv_svc_pump(svc, qp.ring._qp))

    def service_drain(self, qid: int, svc: Any) -> None:
        """Reap a service session's commands until none is in flight on its queue, completing each
        to the client; late ones are recovered as every reap's are."""
        qp = self._queue(qid)
        with self._using(qp):
            while qp.in_flight or qp.cancelled:
                self._service_complete(svc, self._reap(qp, 1, None))

    def ring_doorbell(self, qid: int) -> None:
        """The SQ tail doorbell of I/O queue ``qid`` (entries posted with ``doorbell=False``)."""
        qp = self._queue(qid)
        with self._using(qp):
            qp.ring.ring_sq()

    def _posted(self, qp: BrokerQueue, buf: DmaBuffer, first_tag: int, n: int, doorbell: bool, opcode: int,
                offsets: Any, lengths: Any) -> np.ndarray:
        """Book-keeping after a batch was posted: the no-IOMMU lane's bounce copies (before the
        doorbell), pin its buffer, ring the SQ tail doorbell once."""
        if self.ledger.bounce:
            self._bounce_posted(qp, opcode, buf, first_tag, offsets, lengths)
        self.ledger.pin(buf, n)
        if doorbell:
            qp.ring.ring_sq()
        return np.arange(first_tag, first_tag + n, dtype=np.int64)

    def _submit_small(self, qp: BrokerQueue, ns: Namespace, opcode: int, base: int, buf: DmaBuffer,
                      slbas: list[int], counts: list[int], offsets: list[int], doorbell: bool) -> np.ndarray:
        """submit_rw for a few commands: validated and packed one by one, posted in one C call."""
        checked = [self._check_rw(ns, base, buf.size, s_, c_, o_) for s_, c_, o_ in zip(slbas, counts, offsets)]
        n = len(checked)
        cids = qp.ring.take(n)
        try:
            ps = self.page_size
            packed = qp.packed
            for i, (slba, count, (iova, length, pages)) in enumerate(zip(slbas, counts, checked)):
                cid = int(cids[i])
                if pages == 1:
                    prp2 = 0
                elif pages == 2:
                    prp2 = iova - iova % ps + ps
                else:
                    _, prp2 = qp.author_prps(cid, iova, length)
                # SQE_STRUCT order: opc, flags, cid, nsid, cdw2, cdw3, mptr, prp1, prp2, cdw10..cdw15
                SQE_STRUCT.pack_into(packed, i * 64, opcode, 0, cid, ns.nsid, 0, 0, 0, iova, prp2,
                                     *spec.rw_dwords(slba, count), 0, 0, 0)
            self._for_device(qp, np.frombuffer(packed, dtype=SQE, count=n))
            first = qp.ring.post(packed, n, buf.slot, buf.generation)
        except BaseException:
            qp.ring.untake(cids)
            raise
        return self._posted(qp, buf, first, n, doorbell, opcode, offsets, [length for _, length, _ in checked])

    def _submit_registered(self, qp: BrokerQueue, ns: Namespace, opcode: int, reg: RegisteredBuffer,
                           slbas: np.ndarray, counts: np.ndarray, offsets: np.ndarray, doorbell: bool) -> np.ndarray:
        """READ/WRITE into slots of a registered buffer: validated here, posted by C with the
        slots' pre-authored PRPs."""
        slots = offsets // reg.slot_size
        if (counts.min() < 1 or counts.max() > self.max_blocks(ns) or slbas.min() < 0
                or (slbas + counts).max() > ns.size_blocks):
            for s_, c_ in zip(slbas.tolist(), counts.tolist()):
                self._check_rw(ns, 0, counts.max() * ns.block_size, s_, c_, 0)  # raises for the first bad command
        if offsets.min() < 0 or (offsets % reg.slot_size).any() or slots.max() >= reg.slots:
            raise Refused("length-mismatch", f"offsets into a registered buffer name its slots: multiples of "
                          f"{reg.slot_size} below {reg.slots * reg.slot_size}", slot_size=reg.slot_size)
        if (counts * ns.block_size).max() > reg.slot_size:
            raise Refused("length-mismatch", f"a transfer of {int(counts.max()) * ns.block_size} bytes does not fit "
                          f"a {reg.slot_size}-byte slot", slot_size=reg.slot_size)
        self._require_room(qp, len(slbas))
        buf = reg.buffer
        first = qp.ring.post_slots(opcode, ns.nsid, slbas.astype(np.uint64), counts.astype(np.uint32),
                                   slots.astype(np.uint32), reg._prps, ns.block_size, self.page_size, buf.slot,
                                   buf.generation)
        return self._posted(qp, buf, first, len(slbas), doorbell, opcode, offsets, counts * ns.block_size)

    # ============================================================ registered buffers
    def register_buffer(self, buf: DmaBuffer, slot_size: int) -> RegisteredBuffer:
        """Cut ``buf`` into slots of ``slot_size`` bytes (a multiple of the memory page size, at most
        one PRP-list page of entries) and author every slot's PRP1, PRP2 and PRP-list page once."""
        self._require_ready()
        base = self.ledger.iova(buf)
        ps = self.page_size
        per = ps // 8
        limit = min(self.max_pages, per + 1) * ps
        if slot_size <= 0 or slot_size % ps or slot_size > limit or slot_size > buf.size:
            raise Refused("length-mismatch", f"slot size {slot_size}: a multiple of the {ps}-byte memory page, "
                          f"at most {limit} bytes (MDTS, one PRP-list page) and the buffer's {buf.size}",
                          slot_size=slot_size)
        if (buf.slot, buf.generation) in self._registered:
            raise Refused("buffer-registered", f"buffer slot {buf.slot} is already registered", slot=buf.slot)
        nslots = buf.size // slot_size
        pages = slot_size // ps
        starts = base + slot_size * np.arange(nslots, dtype=np.uint64)
        prps = np.zeros(nslots, dtype=PRP_SLOT)
        prps["prp1"] = starts
        prps["prp2_page"] = starts + ps if pages >= 2 else 0
        lists = None
        if pages > 2:
            # One PRP-list page per slot: the slot's pages after the first (4.1.1), zero beyond.
            lists = self.ledger.alloc(nslots * ps, owner="broker:prp-registered", device_writable=False)
            table = lists.array.view(np.uint64).reshape(nslots, per)
            table[:, : pages - 1] = starts[:, None] + ps * np.arange(1, pages, dtype=np.uint64)
            prps["prp2_list"] = self.ledger.iova(lists) + ps * np.arange(nslots, dtype=np.uint64)
            self.ledger.translate(table.reshape(-1))  # the no-IOMMU lane's physical addresses; else nothing
        for name in ("prp1", "prp2_page", "prp2_list"):
            self.ledger.translate(prps[name])
        prps.flags.writeable = False
        reg = RegisteredBuffer(buf, slot_size, nslots, prps, lists)
        self._registered[(buf.slot, buf.generation)] = reg
        return reg

    def _registration(self, reg: RegisteredBuffer) -> RegisteredBuffer:
        buf = reg.buffer
        if self._registered.get((buf.slot, buf.generation)) is not reg:
            self.ledger.iova(buf)  # stale-handle when the buffer itself was freed
            raise Refused("stale-handle", f"buffer slot {buf.slot} is no longer registered", slot=buf.slot)
        return reg

    def unregister_buffer(self, reg: RegisteredBuffer) -> None:
        """Drop a registration (its PRP-list pages are scrubbed and freed); refused while in flight."""
        self._registration(reg)
        buf = reg.buffer
        if self.ledger.in_flight(buf):
            raise Refused("buffer-in-flight", f"buffer slot {buf.slot} has commands in flight", slot=buf.slot)
        del self._registered[(buf.slot, buf.generation)]
        if reg._lists is not None and reg._lists.live:
            self.ledger.free(reg._lists)

    def free_buffer(self, buf: DmaBuffer) -> None:
        """Scrub, unmap and free a caller's buffer (and drop its registration, if any)."""
        if self.ledger.is_live(buf):
            # The C in-flight tables are the truth: a command interrupted between its C call and
            # the ledger's pin still holds the buffer.
            for qp in self._all_queues:
                busy = qp.ring.busy_cids()
                if ((qp.ring.buf_slot[busy] == buf.slot) & (qp.ring.buf_gen[busy] == buf.generation)).any():
                    raise Refused("buffer-in-flight", f"buffer slot {buf.slot} has commands in flight on queue "
                                  f"{qp.qid}", slot=buf.slot, qid=qp.qid)
        reg = self._registered.get((buf.slot, buf.generation))
        if reg is not None and self.ledger.is_live(buf):
            self.unregister_buffer(reg)
        self.ledger.free(buf)
        self._service_pages.pop((buf.slot, buf.generation), None)

    def _author_rw(self, qp: BrokerQueue, opcode: int, nsid: int, slbas: np.ndarray, counts: np.ndarray,
                   cids: np.ndarray, iovas: np.ndarray, lengths: np.ndarray, pages: np.ndarray) -> np.ndarray:
        """The SQEs of a READ/WRITE batch: fields vectorized, PRP lists only where needed."""
        n = len(cids)
        ps = self.page_size
        entries = np.zeros(n, dtype=SQE)
        entries["opc"] = opcode
        entries["cid"] = cids
        entries["nsid"] = nsid
        entries["cdw10"], entries["cdw11"], entries["cdw12"] = spec.rw_dword_arrays(slbas, counts)
        entries["prp1"] = iovas
        entries["prp2"] = np.where(pages == 2, iovas - iovas % ps + ps, 0)
        listed = np.flatnonzero(pages > 2)
        if len(listed):
            per = ps // 8
            one_page = listed[pages[listed] - 1 <= per]
            if len(one_page) and qp.prp_array is not None:
                # PRP lists that fit one list page, for the whole batch at once: row k of the
                # list area holds command k's data pages after the first (4.1.1), zero beyond.
                want = pages[one_page] - 1
                col = np.arange(1, int(want.max()) + 1)
                rows = (iovas[one_page] - iovas[one_page] % ps)[:, None] + ps * col
                area = qp.prp_array.reshape(qp.ring.ncids, qp.prp_pages * per)
                area[cids[one_page], : len(col)] = np.where(col <= want[:, None], rows, 0)
                entries["prp2"][one_page] = qp.prp_base + cids[one_page] * (qp.prp_pages * ps)
            for i in listed[pages[listed] - 1 > per].tolist():  # chained lists: one by one
                _, entries["prp2"][i] = qp.author_prps(int(cids[i]), int(iovas[i]), int(lengths[i]))
        return entries

    def _queue(self, qid: int) -> BrokerQueue:
        self._require_io()
        if not 1 <= qid <= len(self.io):
            raise Refused("io-queues-not-created", f"I/O queue {qid} does not exist ({len(self.io)} created)",
                          qid=qid)
        return self.io[qid - 1]

    def ring(self, qid: int = 1) -> None:
        self._queue(qid).ring.ring_sq()

    def reap(self, qid: int = 1, minimum: int = 1, timeout_s: float | None = None) -> np.ndarray:
        qp = self._queue(qid)
        with self._using(qp):
            return self._reap(qp, min(minimum, qp.in_flight + sum(len(c) for c in qp.cancelled)), timeout_s)

    def completion_fd(self, qid: int) -> int | None:
        qp = self._queue(qid)
        vector = qp.ring.vector
        return self.irq.fd(vector) if vector is not None and self.irq is not None else None

    def in_flight(self, qid: int = 1) -> int:
        return self._queue(qid).in_flight

    def capacity(self, qid: int = 1) -> int:
        return self._queue(qid).capacity

    def perf_loop(self, nsid: int, reg: RegisteredBuffer, *, io_size: int, lba_range: tuple[int, int],
                  random: bool, read_pct: int, depth: int, max_ios: int = 0, seed: int = 1,
                  qid: int = 1) -> PerfLoop:
        """Validate a workload once, then hand it to the C closed loop: LBAs ``lba_range`` (half
        open), ``io_size`` bytes per I/O, ``depth`` in flight, each in a slot of ``reg``."""
        qp = self._queue(qid)
        ns = self.namespace(nsid)
        self._registration(reg)
        self.ledger.iova(reg.buffer)
        bs = ns.block_size
        if io_size <= 0 or io_size % bs or io_size > reg.slot_size:
            raise Refused("length-mismatch", f"I/O size {io_size}: a positive multiple of the {bs}-byte block, "
                          f"at most the {reg.slot_size}-byte slot", io_size=io_size)
        nlb = io_size // bs
        if nlb > self.max_blocks(ns):
            raise Refused("count-out-of-range", f"I/O size {io_size} is more than one command carries "
                          f"({self.max_blocks(ns) * bs} bytes, MDTS)", io_size=io_size)
        lo, span = self.check_window(ns, lba_range[0], lba_range[1] - lba_range[0])
        hi = lo + span
        if hi - lo < nlb:
            raise Refused("window-past-namespace-end", f"range {lo}..{hi} holds no {io_size}-byte I/O")
        if not 1 <= depth <= min(qp.ring.ncids, reg.slots):
            raise Refused("count-out-of-range", f"queue depth {depth} outside 1..{min(qp.ring.ncids, reg.slots)} "
                          "(queue entries - 1, buffer slots)", depth=depth)
        if not 0 <= read_pct <= 100 or max_ios < 0:
            raise Refused("invalid-argument", f"read percentage {read_pct} / I/O count {max_ios} out of range")
        if qp.in_flight:
            self._refuse_busy(qp)
        # I/O-sized positions, random or sequential: offsets aligned to the I/O size, as fio's
        # blockalign default and spdk_nvme_perf do (an unaligned 4 KiB write costs the backing
        # store a read-modify-write of two pages, which measured the store, not the driver).
        positions = (hi - lo) // nlb
        # no-IOMMU lane: the loop writes the slots' bytes as the caller left them (its reads stay
        # in the bounce memory, like any benchmark's)
        self.ledger.sync_for_device(reg.buffer, 0, reg.buffer.size)
        return PerfLoop(qp.ring, reg._prps, reg.buffer.slot, reg.buffer.generation, nsid=nsid, nlb=nlb,
                        block_size=bs, page_size=self.page_size, lba_lo=lo, positions=positions, random=random,
                        read_pct=read_pct, depth=depth, max_ios=max_ios, seed=seed,
                        timeout_s=self.command_timeout_s, recover=lambda exc: self._loop_recover(qp, exc),
                        guard=lambda: self._using(qp))

    def _loop_recover(self, qp: BrokerQueue, exc: BaseException) -> list[np.ndarray]:
        """Recovery for the C perf loop: abort/reset for a late command, reset for CSTS.CFS; the
        records of commands it had to end go back to the loop."""
        if isinstance(exc, DeviceGone):
            self._gone_raise(exc)
        if isinstance(exc, QueuePaused):
            self._park()
        elif isinstance(exc, CommandTimeout):
            self._recover_timeout(qp)
        else:
            self._reset_controller("CSTS.CFS set")
        return self._take_cancelled(qp)

    # ============================================================ I/O: synchronous helpers
    def transfer(self, opcode: int, nsid: int, slba: int, count: int, buf: DmaBuffer | RegisteredBuffer,
                 offset: int = 0, qid: int = 1) -> None:
        """READ or WRITE ``count`` blocks between ``buf[offset:]`` and the namespace. One command is
        one C call (post, doorbell, wait, reap); a longer transfer is split by MDTS, keeping as many
        commands in flight as the queue allows."""
        # The hot path: an I/O-ready namespace, a plain DMA buffer, a window and a buffer range that
        # fit, one or two memory pages (no PRP list): one C call. Whatever fails these tests takes
        # the checked path below, which refuses with the named reason.
        ns = self._hot.get(nsid) if type(nsid) is int else None
        if (ns is not None and type(slba) is int and type(count) is int and type(offset) is int
                and type(buf) is DmaBuffer and 0 < count <= MAX_NLB and slba >= 0
                and slba + count <= ns.size_blocks and offset >= 0 and not offset & 3 and 0 < qid <= len(self.io)):
            length = count * ns.block_size
            iova = self.ledger.live_iova(buf)
            ps = self.page_size
            if iova is not None and offset + length <= buf.size and length <= 2 * ps - (iova + offset) % ps:
                qp = self.io[qid - 1]
                if qp.lock.acquire(False):
                    qp.owner = threading.get_ident()
                    try:
                        iova += offset
                        prp2 = iova - iova % ps + ps if length > ps - iova % ps else 0
                        ring = qp.ring
                        one = ring.one
                        r = ring.exec_rw_c(opcode, nsid, slba, count, iova, prp2, buf.slot, buf.generation,
                                           int(self.command_timeout_s * 1e9), one)
                        if r == 0 and not one.status and not ring.hooked:
                            self.commands_completed += 1
                            return
                        self._exec_rw(qp, opcode, nsid, slba, count, iova, prp2, buf, first=r)
                        return
                    finally:
                        qp.owner = None
                        qp.lock.release()
        qp = self._queue(qid)
        with self._using(qp):
            self._transfer(qp, opcode, nsid, slba, count, buf, offset)

    def _exec_rw(self, qp: BrokerQueue, opcode: int, nsid: int, slba: int, count: int, prp1: int, prp2: int,
                 buf: DmaBuffer, first: int | None = None) -> None:
        """One READ/WRITE without a PRP list (PRP1 and PRP2 authored by the caller), start to end in
        one C call; transient statuses retried, a timeout recovered (abort, reset, requeue).
        ``first``: what the hot path's own first attempt returned (its completion in ring.one)."""
        if self.ledger.pool is not None:  # the no-IOMMU lane: PRP1 and PRP2 to physical addresses
            prp1, prp2 = self.ledger.device_address(prp1), self.ledger.device_address(prp2)
        for attempt in range(MAX_RETRIES + 1):
            try:
                if first is not None:
                    r, first = first, None
                    c = qp.ring.exec_result(r)
                else:
                    c = qp.ring.exec_rw(opcode, nsid, slba, count, prp1, prp2, int(self.command_timeout_s * 1e9),
                                        buf.slot, buf.generation)
            except (ControllerFatal, DeviceGone, QueuePaused) as exc:
                c = self._wait_failed(qp, exc, buf)
            if c is not None and not c[0]:
                self.commands_completed += 1
                return
            status, result = self._settle(qp, c, buf)
            if not self._retry(status, attempt):
                break
        self._outcome(status, result, "Read" if opcode == IoOpcode.READ else "Write", nsid=nsid, slba=slba,
                      count=count)

    def _transfer(self, qp: BrokerQueue, opcode: int, nsid: int, slba: int, count: int,
                  buf: DmaBuffer | RegisteredBuffer, offset: int) -> None:
        ns = self.namespace(nsid)
        slba, count = self.check_window(ns, slba, count)
        reg = buf if isinstance(buf, RegisteredBuffer) else None
        handle = self._registration(reg).buffer if reg is not None else cast(DmaBuffer, buf)
        self.ledger.iova(handle)  # a live handle (refused otherwise) before its size is trusted
        offset = _whole(offset, "the buffer offset")
        length = count * ns.block_size
        if offset < 0 or offset + length > handle.size:
            raise Refused("length-mismatch", f"{count} blocks of {ns.block_size} bytes do not fit the "
                          f"{handle.size}-byte buffer at offset {offset}", count=count, size=handle.size)
        base = self.ledger.iova(handle)  # stale-handle check
        if qp.in_flight:
            self._refuse_busy(qp)
        name = "Read" if opcode == IoOpcode.READ else "Write"
        ps = self.page_size
        iova = base + offset
        pages = (iova % ps + length + ps - 1) // ps
        if pages <= 2 and count <= MAX_NLB and offset & 3 == 0:
            # The common case: one command without a PRP list, one C call.
            prp2 = iova - iova % ps + ps if pages == 2 else 0
            if opcode == IoOpcode.WRITE:
                self.ledger.sync_for_device(handle, offset, length)  # no-IOMMU lane's bounce; else nothing
            self._exec_rw(qp, opcode, nsid, slba, count, iova, prp2, handle)
            if opcode == IoOpcode.READ:
                self.ledger.sync_for_cpu(handle, offset, length)
            return
        self._transfer_split(qp, ns, opcode, slba, count, handle, reg, offset, iova, name)

    def _transfer_split(self, qp: BrokerQueue, ns: Namespace, opcode: int, slba: int, count: int,
                        handle: DmaBuffer, reg: RegisteredBuffer | None, offset: int, iova: int, name: str) -> None:
        """transfer() for a command with a PRP list, or several commands split by MDTS."""
        nsid, qid, length = ns.nsid, qp.qid, count * ns.block_size
        if reg is not None and offset % reg.slot_size == 0 and length <= reg.slot_size:
            self._sync_batch(qp, self.submit_rw(opcode, nsid, [slba], [count], reg, [offset], qid=qid), name,
                             nsid=nsid, slba=slba, count=count)
            return
        step = self.max_blocks(ns, iova)
        starts = np.arange(slba, slba + count, step, dtype=np.int64)
        counts = np.minimum(step, slba + count - starts)
        offs = offset + (starts - slba) * ns.block_size
        pos = 0
        outstanding = 0  # the queue was idle, so every completion on it is ours
        failed = None
        while pos < len(starts) or outstanding:
            room = qp.capacity
            if pos < len(starts) and room and failed is None:
                k = min(room, len(starts) - pos)
                outstanding += len(self.submit_rw(opcode, nsid, starts[pos : pos + k], counts[pos : pos + k],
                                                  handle, offs[pos : pos + k], qid=qid))
                pos += k
            done = self._reap(qp, 1, None)
            outstanding -= len(done)
            bad = np.flatnonzero(done["status"])
            if len(bad) and failed is None:
                failed = done[bad[0]]
        if failed is not None:
            self._raise_for(failed["status"], name, nsid=nsid, slba=slba, count=count)

    def _sync_batch(self, qp: BrokerQueue, tags: np.ndarray, name: str, **context: Any) -> None:
        """Reap a batch posted on an idle queue; raise for its first error."""
        left = len(tags)
        failed = None
        while left:
            done = self._reap(qp, left, None)
            left -= len(done)
            bad = np.flatnonzero(done["status"])
            if len(bad) and failed is None:
                failed = done[bad[0]]
        if failed is not None:
            self._raise_for(failed["status"], name, **context)

    def _staging_buf(self) -> DmaBuffer:
        if self._staging is None or not self._staging.live:
            self._staging = self.ledger.alloc(max(self.staging_bytes, self.max_transfer), owner="broker:staging")
        return self._staging

    def read(self, nsid: int, slba: int, count: int, qid: int = 1) -> np.ndarray:
        """Read ``count`` blocks into a new uint8 array (through the broker's staging buffer)."""
        self._queue(qid)
        ns = self.namespace(nsid)
        slba, count = self.check_window(ns, slba, count)
        out = np.empty(count * ns.block_size, dtype=np.uint8)
        stage = self._staging_buf()
        per = stage.size // ns.block_size
        arr = stage.array
        for start in range(0, count, per):
            k = min(per, count - start)
            self.transfer(IoOpcode.READ, nsid, slba + start, k, stage, 0, qid)
            out[start * ns.block_size : (start + k) * ns.block_size] = arr[: k * ns.block_size]
        return out

    def write(self, nsid: int, slba: int, data: Any, qid: int = 1) -> int:
        """Write whole blocks from a bytes-like or numpy object; returns the block count."""
        self._queue(qid)
        ns = self.namespace(nsid)
        try:
            src = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8) if not isinstance(data, np.ndarray) \
                else np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        except (TypeError, ValueError) as exc:
            raise Refused("invalid-argument", f"data must be a contiguous bytes-like object or a numpy array of "
                          f"plain numbers ({exc})", type=type(data).__name__) from exc
        if len(src) == 0 or len(src) % ns.block_size:
            raise Refused("length-mismatch", f"{len(src)} bytes is not a positive multiple of the "
                          f"{ns.block_size}-byte block size of namespace {nsid}", length=len(src),
                          block_size=ns.block_size)
        slba, count = self.check_window(ns, slba, len(src) // ns.block_size)
        stage = self._staging_buf()
        per = stage.size // ns.block_size
        arr = stage.array
        for start in range(0, count, per):
            k = min(per, count - start)
            arr[: k * ns.block_size] = src[start * ns.block_size : (start + k) * ns.block_size]
            self.transfer(IoOpcode.WRITE, nsid, slba + start, k, stage, 0, qid)
        return count

    def flush(self, nsid: int, qid: int = 1) -> None:
        qp = self._queue(qid)
        self.namespace(nsid)
        self._exec(qp, self._command_sqe(spec.flush(nsid)), "Flush", nsid=nsid)

    def _range_command(self, qid: int, nsid: int, slba: int, count: int, oncs_bit: int,
                       what: str) -> tuple[BrokerQueue, int, int]:
        """Checks shared by the range commands: queue, namespace, window, and ONCS support.
        Returns the queue and the window as Python ints."""
        qp = self._queue(qid)
        slba, count = self.check_window(self.namespace(nsid), slba, count)
        if not (self.id_ctrl or {}).get("oncs", 0) & oncs_bit:
            raise Refused("unsupported-command", f"the controller does not support {what} "
                          f"(ONCS bit {oncs_bit.bit_length() - 1})")
        return qp, slba, count

    def write_zeroes(self, nsid: int, slba: int, count: int, qid: int = 1, *, deallocate: bool = False) -> None:
        """Write Zeroes; ``deallocate`` sets CDW12.DEAC (bit 25, NVM Command Set 3.2.8): the
        controller may deallocate the blocks, and they still read as zeros."""
        qp, slba, count = self._range_command(qid, nsid, slba, count, ONCS_WRITE_ZEROES, "Write Zeroes")
        for start in range(slba, slba + count, MAX_NLB):
            k = min(MAX_NLB, slba + count - start)
            self._exec(qp, self._command_sqe(spec.write_zeroes(nsid, start, k, deac=deallocate)), "Write Zeroes",
                       nsid=nsid, slba=start, count=k)

    def deallocate(self, nsid: int, slba: int, count: int, qid: int = 1) -> None:
        """Dataset Management with the Deallocate attribute (ranges of up to 2^32-1 blocks)."""
        qp, slba, count = self._range_command(qid, nsid, slba, count, ONCS_DSM, "Dataset Management")
        per = 0xFFFFFFFF
        starts = list(range(slba, slba + count, per))
        rng = np.zeros(len(starts), dtype=[("cattr", "<u4"), ("nlb", "<u4"), ("slba", "<u8")])
        rng["slba"] = starts
        rng["nlb"] = [min(per, slba + count - s) for s in starts]
        if len(rng) > DSM_MAX_RANGES:
            raise Refused("count-out-of-range", "too many blocks for one Dataset Management command")
        buf = self._scratch_buf()
        arr = buf.array
        arr[:] = 0
        arr[: rng.nbytes] = rng.view(np.uint8)
        self._exec(qp, self._command_sqe(spec.dataset_management(nsid, len(rng), deallocate=True)),
                   "Dataset Management (Deallocate)", buf, rng.nbytes, nsid=nsid, slba=slba, count=count)

    def close(self) -> None:
        """Shut down if enabled (best effort), then release every broker buffer. When the shutdown
        fails (an interrupted caller, a late command), CC.EN=0 first, so that the controller stops
        touching memory before it is unmapped. A device that is gone is not touched."""
        self._stop_watch()
        try:
            if self.ctrl.state is State.READY and not self.gone and self.failed is None:
                self.shutdown()
        except BaseException:
            with contextlib.suppress(Exception):
                self.ctrl.disable()
            raise
        finally:
            self._drop_queues()
