"""The broker's core: the controller, the ledger, the queue pairs and the broker's buffers, the
lifecycle's checks every verb makes first, and bring-up that needs no command: enable (AQA/ASQ/ACQ,
CC.EN=1 through :class:`~nvmevfio.nvme.controller.Controller`), reset (CC.EN=0), the queue pairs'
memory and doorbells. Commands are :mod:`.execute`'s; everything else builds on this."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import numpy as np

from nvmevfio.broker.common import (
    ADMIN_DEPTH,
    COMMAND_TIMEOUT_S,
    DEFAULT_STAGING,
    BrokerQueue,
    FunctionReset,
    IrqWaiter,
    Namespace,
    RegisteredBuffer,
)
from nvmevfio.broker.state import BrokerState, EventState, Lifecycle, RecoveryState
from nvmevfio.dma import DmaBuffer, DmaLedger, align_up
from nvmevfio.errors import ControllerTimeout, Refused
from nvmevfio.mmio import Mmio
from nvmevfio.nvme import regs
from nvmevfio.nvme import sgl as nvme_sgl
from nvmevfio.nvme.controller import Controller, Registers, State
from nvmevfio.nvme.queue import QueuePair
from nvmevfio.nvme.spec import CQE, SQE


class Core:
    def __init__(self, mmio: Mmio, ledger: DmaLedger, *, irq: IrqWaiter | None = None,
                 page_size: int | None = None, staging_bytes: int = DEFAULT_STAGING,
                 command_timeout_s: float = COMMAND_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic,
                 bar_map: Callable[[int], tuple[np.ndarray, int]] | None = None,
                 function_reset: FunctionReset | None = None) -> None:
        self.mmio = mmio
        self.ledger = ledger
        # Another BAR of the function mapped (its memory, and its PCI bus address): the Controller
        # Memory Buffer's (8.2). None: the controller's other BARs are out of reach (the simulator).
        self.bar_map = bar_map
        self.function_reset = function_reset  # FLR and hot reset of the PCI function (None: the simulator)
        self.irq = irq
        self.host_page_size = page_size or ledger.page_size
        self.ctrl = Controller(mmio)
        self.staging_bytes = staging_bytes
        self.command_timeout_s = command_timeout_s
        self.clock = clock
        self.sleep: Callable[[float], None] = time.sleep
        self.admin: BrokerQueue | None = None
        self.io: list[BrokerQueue] = []
        self.page_size = 4096  # controller memory page size (CC.MPS), set at enable
        self.id_ctrl: dict[str, Any] | None = None
        self.max_transfer = 0
        self.staging: DmaBuffer | None = None
        self.scratch: DmaBuffer | None = None
        self.irq_mode = False
        self.commands_completed = 0
        self.service_pages: dict[tuple[int, int], np.ndarray] = {}  # service sessions' page tables
        # Shadow doorbells (Doorbell Buffer Config, 5.8): broker-owned pages, used when the
        # controller offers them (OACS bit 8) and ``shadow_doorbells`` is on.
        self.shadow_doorbells = True
        self.dbbuf: tuple[DmaBuffer, DmaBuffer] | None = None
        # The I/O queues' data pointer (4.1): PRPs, or SGLs (4.1.2) when chosen at create_io_queues;
        # a READ/WRITE may choose for itself (``sgl=`` of the batch and sparse verbs)
        self.sgl = False
        self.registered: dict[tuple[int, int], RegisteredBuffer] = {}
        self.cc = 0
        # The namespace table (namespaces.py keeps it): identified namespaces, those whose
        # geometry changed, and those ready for I/O (the synchronous hot path's lookup).
        self.namespaces: dict[int, Namespace] = {}
        self.changed_namespaces: set[int] = set()
        self.hot: dict[int, Namespace] = {}
        # No-IOMMU lane (ledger.bounce): READ ranges posted, by queue and tag, until reaped; the
        # hot path (zero copy) is off there (update_hot leaves it no namespace).
        self.bounce_reads: dict[int, dict[int, tuple[DmaBuffer, int, int]]] = {}
        self.life = Lifecycle()
        self.recovery = RecoveryState()
        self.events = EventState()

    # ============================================================ controller state
    def bind(self) -> Registers:
        """Read CAP, VS, CC, CSTS; writes nothing. In the no-IOMMU lane a snapshot's ``asq`` and
        ``acq`` are None (withheld: they are physical addresses), here and in :meth:`registers`
        and :meth:`enable`.
        """
        return self.shown(self.ctrl.bind())

    def registers(self, every: bool = False) -> Registers:
        """Read CAP, VS, CC, CSTS (and AQA, ASQ, ACQ) now; writes nothing. ASQ and ACQ are None in the no-IOMMU lane.
        ``every``: also the other registers nvme-cli's show-regs reads, in ``others`` (BPMBL None in the no-IOMMU
        lane)."""
        return self.shown(self.ctrl.registers(every))

    def shown(self, snap: Registers) -> Registers:
        """A register snapshot as a caller gets it: in the no-IOMMU lane ASQ and ACQ hold physical
        addresses (this session's admin queues, or whatever the last one left), so they are
        withheld (None); with an IOMMU they are IOVAs and shown."""
        return snap.withheld() if self.ledger.bounce else snap

    @property
    def all_queues(self) -> list[BrokerQueue]:
        """The I/O queue pairs, then the admin queue pair (when there is one)."""
        return [*self.io, *([self.admin] if self.admin else [])]

    @property
    def gone(self) -> bool:
        return self.life.state is BrokerState.GONE

    @property
    def failed(self) -> str | None:
        return self.life.failed_why

    def refuse_gone(self) -> None:
        if self.life.state is BrokerState.GONE:
            why = self.life.gone_why
            raise Refused("device-gone", f"the device is gone ({why}); close it", state="gone", why=why)

    def refuse_failed(self) -> None:
        if self.life.failed_why is not None:
            raise Refused("controller-failed", f"the controller was declared failed ({self.life.failed_why}); "
                          "reopen it", why=self.life.failed_why)

    def require_ready(self) -> None:
        self.refuse_gone()
        self.refuse_failed()
        if (self.ctrl.state is not State.READY or self.admin is None) \
                and self.life.state is BrokerState.RESETTING and self.recovery.resetter != threading.get_ident():
            self.park()  # another thread's controller reset has it disabled for now: wait for it
        if self.ctrl.state is State.FATAL:
            raise Refused("controller-fatal", "controller is in fatal state (CSTS.CFS was set); reset it")
        if self.ctrl.state is not State.READY or self.admin is None:
            raise Refused("controller-not-enabled",
                          f"controller is {self.ctrl.state.value}: enable it first", state=self.ctrl.state.value)

    def write_interrupt_mask(self, offset: int, value: int) -> None:
        """Write INTMS or INTMC (NVMe base spec 3.1.4.3-4: set or clear pin/MSI interrupt mask
        bits; with MSI-X they are unused), the only registers a caller may write; refused like
        any other verb unless the controller is ready."""
        if offset not in (regs.INTMS, regs.INTMC):
            raise Refused("register-write-unclaimed", f"register at {offset:#x} is the broker's", offset=offset)
        self.require_ready()
        self.mmio.write32(offset, value & 0xFFFFFFFF)

    def require_io(self) -> BrokerQueue:
        self.require_ready()
        if not self.io:
            raise Refused("io-queues-not-created", "no I/O queues: call create_io_queues() first")
        return self.io[0]

    def queue(self, qid: int) -> BrokerQueue:
        self.require_io()
        if not 1 <= qid <= len(self.io):
            raise Refused("io-queues-not-created", f"I/O queue {qid} does not exist ({len(self.io)} created)",
                          qid=qid)
        return self.io[qid - 1]

    @property
    def sgls(self) -> int:
        """Identify Controller SGLS (0 before the controller is identified)."""
        return int((self.id_ctrl or {}).get("sgls", 0))

    def use_sgl(self, sgl: bool | None) -> bool:
        """A command's data pointer: ``None`` follows the queues' choice; SGLs are refused
        (``sgl-unsupported``) unless Identify Controller SGLS offers them to the NVM command set."""
        if sgl is None:
            return self.sgl
        if sgl and not nvme_sgl.supported(self.sgls):
            raise Refused("sgl-unsupported", f"the controller does not take SGLs (Identify Controller SGLS "
                          f"{self.sgls:#x}, bits 1:0 = 0)", sgls=self.sgls)
        return bool(sgl)

    def park_limit_s(self) -> float:
        """How long a thread waits for another's reset: its abort, CAP.TO twice, re-creating queues."""
        return 2 * self.command_timeout_s + 2 * self.ctrl.timeout_s + 10

    def park(self) -> None:
        """Another thread is resetting the controller: touch no queue until it is done (it requeues
        or cancels this thread's commands in flight, whatever queue they are on), then carry on."""
        me = threading.get_ident()
        rs = self.recovery
        with rs.parking:
            rs.parked.add(me)
            rs.parking.notify_all()
            try:
                done = rs.parking.wait_for(lambda: self.life.state is not BrokerState.RESETTING,
                                           timeout=self.park_limit_s())
            finally:
                rs.parked.discard(me)
        self.refuse_gone()
        self.refuse_failed()
        if not done:
            raise ControllerTimeout(f"a controller reset by another thread did not finish within "
                                    f"{self.park_limit_s():g} s")

    # ============================================================ bring-up and teardown
    def reset(self) -> None:
        """CC.EN=0 and wait CSTS.RDY=0; every queue and broker buffer is released, the CMB disabled."""
        if self.ctrl.state is State.UNBOUND:
            self.ctrl.bind()
        self.ctrl.disable()
        self.disable_cmb()
        self.drop_queues()

    def drop_queues(self) -> None:
        self.hot = {}
        self.events.disarm()
        for qp in self.all_queues:
            busy = qp.ring.busy_cids()
            for slot, gen in zip(qp.ring.buf_slot[busy].tolist(), qp.ring.buf_gen[busy].tolist()):
                if slot >= 0:
                    self.ledger.unpin(slot, gen, 1)
            for buf in qp.buffers:
                if buf.live:
                    self.ledger.free(buf)
        self.io = []
        self.admin = None
        for owned in (self.staging, self.scratch, self.events.buf):
            if owned is not None and owned.live:
                self.ledger.free(owned)
        self.staging = self.scratch = self.events.buf = None
        for b in self.dbbuf or ():
            if b.live:
                self.ledger.free(b)
        self.dbbuf = None
        if self.irq is not None and self.irq_mode:
            self.irq.close()
        self.irq_mode = False
        # A failed or gone broker stays so (only enable() starts a failed one again).
        self.life.to_if((BrokerState.ADMIN_READY, BrokerState.IO_READY), BrokerState.DISABLED)

    def new_queue_pair(self, qid: int, depth: int, prp_pages_per_cmd: int, vector: int | None,
                       sq_place: tuple[np.ndarray, int] | None = None) -> BrokerQueue:
        """A queue pair's memory from the ledger: SQ, CQ, PRP-list pages. ``sq_place``: the SQ
        lives there instead (memory in the Controller Memory Buffer, and its controller address)."""
        cq_buf = self.ledger.alloc(depth * CQE.itemsize, owner="broker:cq", contiguous=True)
        if sq_place is None:
            sq_buf = self.ledger.alloc(depth * SQE.itemsize, owner="broker:sq", contiguous=True)
            bufs = [sq_buf, cq_buf]
            sq_memory, sq_address = sq_buf.array, self.ledger.iova(sq_buf)
        else:
            bufs = [cq_buf]
            sq_memory, sq_address = sq_place[0][: depth * SQE.itemsize], sq_place[1]
            sq_memory[:] = 0
        prp_array = None
        prp_base = 0
        if prp_pages_per_cmd:
            prp_buf = self.ledger.alloc((depth - 1) * prp_pages_per_cmd * self.page_size, owner="broker:prp",
                                        device_writable=False)
            bufs.append(prp_buf)
            prp_base = self.ledger.iova(prp_buf)
            prp_array = prp_buf.array.view(np.uint64)
        ring = QueuePair(qid, sq_memory.view(SQE), cq_buf.array.view(CQE), self.mmio,
                         self.ctrl.doorbell(qid, False), self.ctrl.doorbell(qid, True))
        if vector is not None and self.irq is not None:
            ring.set_irq(self.irq.fd(vector), vector)
        csts = getattr(self.mmio, "register_address", None)
        if csts is not None:
            ring.watch_csts(csts(regs.CSTS))
        ring.watch_stop(self.recovery.stop)
        if qid and self.dbbuf is not None:
            shadow, eventidx = (b.array.view(np.uint32) for b in self.dbbuf)
            stride = 1 << regs.get(self.ctrl.cap, regs.CAP_.DSTRD)  # in dwords, as the doorbell registers
            ring.set_shadow(shadow, eventidx, 2 * qid * stride, (2 * qid + 1) * stride)
        qp = BrokerQueue(qid, ring, bufs, prp_base, prp_pages_per_cmd, prp_array, self.page_size)
        qp.rings = (sq_memory, cq_buf.array)
        qp.sq_address, qp.cq_address = sq_address, self.ledger.iova(cq_buf)
        qp.sq_in_cmb = sq_place is not None
        return qp

    def disable_cmb(self) -> None:
        """CMBMSC to 0 where CAP.CMBS is set: the controller stops taking addresses in a Controller
        Memory Buffer's range for its own. A CMB left enabled (by a previous owner, at a controller
        address of its choosing) would capture DMA addresses this ledger hands out."""
        if regs.get(self.ctrl.cap, regs.CAP_.CMBS):
            self.mmio.write32(regs.CMBMSC, 0)  # the low dword first: CMSE and CRE off
            self.mmio.write32(regs.CMBMSC + 4, 0)

    def enable(self, *, admin_depth: int = ADMIN_DEPTH) -> Registers:
        """Disable, author the admin queues from the ledger, pick CC, enable, wait RDY (CAP.TO)."""
        if self.ctrl.state is State.UNBOUND:
            self.ctrl.bind()
        if self.ctrl.state is State.READY:
            raise Refused("controller-already-enabled", "controller is already enabled; reset() first")
        self.ctrl.disable()
        self.disable_cmb()
        self.drop_queues()
        admin_depth = min(admin_depth, self.ctrl.mqes, 4096)
        cc = self.ctrl.choose_cc(self.host_page_size)
        self.page_size = 1 << (12 + regs.get(cc, regs.CC_.MPS))
        self.cc = cc
        self.life.to_if((BrokerState.FAILED,), BrokerState.DISABLED)  # a failed controller starts again
        self.recovery.reset_times, self.changed_namespaces = [], set()
        self.admin = self.new_queue_pair(0, admin_depth, 1, None)
        self.arm_admin_queues(self.admin)
        self.ctrl.enable(cc)
        self.life.to_if((BrokerState.DISABLED,), BrokerState.ADMIN_READY)  # a gone device stays gone
        return self.registers()

    def arm_admin_queues(self, admin: BrokerQueue) -> None:
        """AQA, ASQ and ACQ from the admin queue pair's ledger memory."""
        asq, acq = (self.ledger.device_address(a) for a in (admin.sq_address, admin.cq_address))
        self.ctrl.arm_admin_queues(asq, acq, admin.ring.depth, admin.ring.depth)

    def scratch_buf(self, length: int = 4096) -> DmaBuffer:
        """The broker's scratch buffer for admin data and DSM ranges, grown to ``length``."""
        if self.scratch is None or not self.scratch.live:
            self.scratch = self.ledger.alloc(4096, owner="broker:scratch")
        buf = self.scratch
        if length > buf.size:
            self.ledger.free(buf)
            self.scratch = buf = self.ledger.alloc(align_up(length, 4096), owner="broker:scratch")
        return buf
