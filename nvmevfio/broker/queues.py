"""The I/O queue pairs on the device: Set Features Number of Queues, Doorbell Buffer Config
(the shadow doorbell pages, 5.8), CREATE I/O CQ before SQ over broker-owned memory, and the
orderly end: delete them, then CC.SHN normal shutdown."""

from __future__ import annotations

from nvmevfio.broker.cmb import ControllerMemory
from nvmevfio.broker.commands import AdminCommands
from nvmevfio.broker.common import DEFAULT_IO_DEPTH, OACS_DBBUF, BrokerQueue
from nvmevfio.broker.core import Core
from nvmevfio.broker.execute import command_sqe
from nvmevfio.broker.namespaces import Namespaces
from nvmevfio.broker.state import BrokerState
from nvmevfio.dma import DmaBuffer
from nvmevfio.errors import Refused
from nvmevfio.nvme import builders, prp
from nvmevfio.nvme.structures import shadow_doorbells_pay


class Queues:
    def __init__(self, core: Core, admin: AdminCommands, ns: Namespaces, cmb: ControllerMemory) -> None:
        self.core = core
        self.admin = admin
        self.ns = ns
        self.cmb = cmb

    def create_io_queues(self, count: int = 1, depth: int = DEFAULT_IO_DEPTH, *, irq: bool = False,
                         shadow_doorbells: bool | None = None, sgl: bool = False, sq_in_cmb: bool = False) -> int:
        """Set Features Number of Queues, Doorbell Buffer Config when the controller has it (OACS
        bit 8) and ``shadow_doorbells`` is on (None: where they pay, shadow_doorbells_pay: not on
        QEMU's model), then CREATE I/O CQ before SQ for each pair. Returns
        the depth used. ``sgl``: the queues' READ and WRITE commands carry SGLs (4.1.2) instead of
        PRPs; refused (``sgl-unsupported``) where Identify Controller SGLS does not offer them.
        ``sq_in_cmb``: the submission queues live in the Controller Memory Buffer (8.2; the broker
        enables it and authors its controller address as each queue's base); refused
        (``cmb-unavailable``) where there is none, or it may not hold SQs (CMBSZ.SQS)."""
        core = self.core
        core.require_ready()
        if core.io:
            raise Refused("io-queues-exist", f"{len(core.io)} I/O queue pair(s) already created")
        if not 2 <= depth <= core.ctrl.mqes:
            raise Refused("count-out-of-range", f"queue depth {depth} outside 2..{core.ctrl.mqes} (CAP.MQES+1)",
                          depth=depth, mqes=core.ctrl.mqes)
        if count < 1:
            raise Refused("count-out-of-range", f"queue count {count} must be at least 1", count=count)
        if irq and core.irq is None:
            raise Refused("irq-unavailable", "MSI-X completions need a VFIO device (no interrupt source)")
        if core.id_ctrl is None:
            self.ns.identify_controller()
        core.sgl = core.use_sgl(bool(sgl))  # refused before any queue exists
        places = self.cmb.place_sqs(count, depth) if sq_in_cmb else [None] * count  # the same
        self.set_number_of_queues(count)
        if irq:
            assert core.irq is not None
            core.irq.vectors(count + 1)
            core.irq_mode = True
        if shadow_doorbells is None:
            shadow_doorbells = shadow_doorbells_pay(core.id_ctrl or {})
        core.shadow_doorbells = shadow_doorbells
        if shadow_doorbells and (core.id_ctrl or {}).get("oacs", 0) & OACS_DBBUF and core.dbbuf is None:
            self.configure_doorbell_buffer()
        per_cmd = prp.list_pages_needed(0, core.max_transfer, core.page_size) if core.max_transfer else 1
        for i in range(count):
            qid = i + 1
            vector = qid if irq else None
            qp = core.new_queue_pair(qid, depth, per_cmd, vector, places[i])
            qp.vector = vector
            try:
                self.create_queue_on_device(qp)
            except BaseException:
                for b in qp.buffers:
                    core.ledger.free(b)
                raise
            core.io.append(qp)
            core.life.to_if((BrokerState.ADMIN_READY,), BrokerState.IO_READY)
        self.ns.refresh_namespaces()
        return depth

    def set_number_of_queues(self, count: int) -> None:
        got = self.admin.sync(command_sqe(builders.set_number_of_queues(count, count)), "Set Features Number of Queues")
        allowed = min(builders.split_number_of_queues(got))
        if allowed < count:
            raise Refused("count-out-of-range", f"controller allows {allowed} I/O queue pairs, {count} asked",
                          allowed=allowed)

    def create_queue_on_device(self, qp: BrokerQueue) -> None:
        """CREATE I/O CQ, then CREATE I/O SQ, over the queue pair's broker-owned memory (the SQ's
        perhaps in the Controller Memory Buffer, whose CMBMSC a controller reset may have cleared)."""
        qid, depth = qp.qid, qp.ring.depth
        cq = builders.create_io_cq(qid, depth, contiguous=True, interrupts=qp.vector is not None, vector=qp.vector or 0)
        self.admin.sync(command_sqe(cq, prp1=qp.cq_address), "Create I/O CQ")
        if qp.sq_in_cmb:
            self.cmb.program()
        sq = builders.create_io_sq(qid, depth, qid, contiguous=True)
        self.admin.sync(command_sqe(sq, prp1=qp.sq_address), "Create I/O SQ")

    # ============================================================ shadow doorbells (5.8)
    def doorbell_buffer_config(self, shadow: DmaBuffer, eventidx: DmaBuffer) -> None:
        iova = self.core.ledger.iova
        self.admin.sync(command_sqe(builders.doorbell_buffer_config(), prp1=iova(shadow), prp2=iova(eventidx)),
                        "Doorbell Buffer Config")

    def configure_doorbell_buffer(self) -> None:
        """Doorbell Buffer Config (admin 7Ch, 5.8): a shadow doorbell page (PRP1) and an EventIdx page
        (PRP2), both broker-owned and zeroed. I/O queues created afterwards publish their SQ tail and
        CQ head there, and write the MMIO doorbell only when the EventIdx rule says the controller
        needs it. The admin queue keeps MMIO doorbells, as in Linux."""
        ledger = self.core.ledger
        shadow = ledger.alloc(self.core.page_size, owner="broker:dbbuf-shadow")
        eventidx = ledger.alloc(self.core.page_size, owner="broker:dbbuf-eventidx")
        try:
            self.doorbell_buffer_config(shadow, eventidx)
        except BaseException:
            ledger.free(shadow)
            ledger.free(eventidx)
            raise
        self.core.dbbuf = (shadow, eventidx)

    # ============================================================ the orderly end
    def shutdown(self) -> None:
        """Delete I/O queues, then CC.SHN normal shutdown and wait CSTS.SHST complete."""
        core = self.core
        core.require_ready()
        for qp in reversed(core.io):
            self.admin.sync(command_sqe(builders.delete_io_sq(qp.qid)), "Delete I/O SQ")
            self.admin.sync(command_sqe(builders.delete_io_cq(qp.qid)), "Delete I/O CQ")
        rtd3e = (core.id_ctrl or {}).get("rtd3e", 0)
        core.ctrl.shutdown(rtd3e)
        core.disable_cmb()  # the next owner's DMA addresses are not this session's CMB
        core.drop_queues()
