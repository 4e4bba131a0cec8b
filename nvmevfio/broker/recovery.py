"""Recovery (Linux's nvme driver keeps to the same shape: timeout -> abort -> reset -> requeue):
Abort of a late command, a controller reset with every other thread parked, requeue or cancel of
what was in flight, declaring the controller failed, and the device gone. Execution reaches it
through its :class:`~nvmevfio.broker.execute.RecoveryHook`; the state is
:class:`~nvmevfio.broker.state.RecoveryState` and the lifecycle."""

from __future__ import annotations

import threading
import time
from typing import NoReturn

import numpy as np

from nvmevfio.broker.commands import AdminCommands
from nvmevfio.broker.common import (
    ABORT_TIMEOUT_S,
    CANCELLED_STATUS,
    MAX_RETRIES,
    RESET_LIMIT,
    RESET_WINDOW_S,
    BrokerQueue,
)
from nvmevfio.broker.core import Core
from nvmevfio.broker.events import Events
from nvmevfio.broker.execute import Executor, command_sqe
from nvmevfio.broker.namespaces import Namespaces
from nvmevfio.broker.queues import Queues
from nvmevfio.broker.state import BrokerState
from nvmevfio.errors import (
    CommandError,
    CommandTimeout,
    ControllerFailed,
    ControllerFatal,
    DeviceGone,
    QueuePaused,
    Refused,
    ShimError,
    VfioError,
)
from nvmevfio.nvme import builders, regs

# The resets a caller may ask for (Recovery.reset): controller (CC.EN), NVM subsystem (NSSR),
# PCI function level reset and PCI hot reset (both through VFIO)
RESET_KINDS = ("controller", "subsystem", "flr", "hot")
NSSR_RESET = 0x4E564D65  # "NVMe": the value NSSR takes to start an NVM Subsystem Reset (3.1.4.6)


class Recovery:
    def __init__(self, core: Core, ex: Executor, admin: AdminCommands, queues: Queues, ns: Namespaces,
                 events: Events) -> None:
        self.core = core
        self.ex = ex
        self.admin = admin
        self.queues = queues
        self.ns = ns
        self.events = events
        self.state = core.recovery

    def recover_timeout(self, qp: BrokerQueue) -> None:
        """A command is late: Abort (admin 08h) the oldest one of an I/O queue; when the controller
        does not honour it (QEMU never does) or the abort itself is late, reset the controller.
        An honoured abort ends the command with Command Abort Requested (DNR=0): the synchronous
        path retries it, a batch reports it."""
        core, rs = self.core, self.state
        csts = core.ctrl.csts()
        if csts == 0xFFFFFFFF:
            self.gone()
            raise DeviceGone(f"queue {qp.qid}: CSTS reads all ones: the device is gone", qid=qp.qid)
        resets = rs.resets
        busy = qp.ring.busy_cids()
        if qp.qid and len(busy) and not regs.get(csts, regs.CSTS_.CFS):
            oldest = int(busy[np.argmin(qp.ring.submit_ns[busy])])
            rs.aborts += 1
            try:
                dw0 = self.admin.sync(command_sqe(builders.abort(qp.qid, oldest)), "Abort",
                                      timeout_s=min(core.command_timeout_s, ABORT_TIMEOUT_S))
                honoured = not dw0 & 1  # DW0 bit 0: 1 = the command was not aborted
            except (CommandTimeout, CommandError):
                honoured = False
            if rs.resets != resets:
                return  # another thread reset the controller meanwhile: the late command was requeued
            try:
                if honoured and qp.ring.wait_s(core.command_timeout_s):
                    return
            except QueuePaused:
                core.park()
                return
        self.reset_controller(f"no completion on queue {qp.qid} within {core.command_timeout_s:g} s")

    def reset(self, kind: str = "controller") -> None:
        """Reset the controller while keeping everything: queues come back with the same memory and
        ids, commands in flight on any thread are requeued (or, past their retries, end with a
        named status), other threads park meanwhile. ``kind``: ``controller`` (CC.EN=0, NVMe 3.7.2),
        ``subsystem`` (NVM Subsystem Reset: NSSR written "NVMe", 3.7.1; where CAP.NSSRS is 1),
        ``flr`` (PCI function level reset through VFIO_DEVICE_RESET) or ``hot`` (PCI hot reset: a
        secondary bus reset through VFIO). Refused before anything is touched: an unknown kind
        (``invalid-argument``), a kind this controller or function does not offer
        (``reset-kind-unavailable``), a controller not enabled."""
        self.check_reset_kind(kind)
        self.core.require_ready()
        self.reset_controller(f"{kind} reset requested", kind, requested=True)

    def check_reset_kind(self, kind: str) -> None:
        """Refuse (``invalid-argument``, ``reset-kind-unavailable``) a reset kind this controller or
        function does not offer, reading only CAP and asking VFIO; see :meth:`reset`."""
        core = self.core
        if kind not in RESET_KINDS:
            raise Refused("invalid-argument", f"reset kind {kind!r}: one of {', '.join(RESET_KINDS)}", kind=kind)
        if kind == "subsystem" and not regs.get(core.ctrl.cap, regs.CAP_.NSSRS):
            raise Refused("reset-kind-unavailable", "NVM Subsystem Reset is not supported (CAP.NSSRS is 0)",
                          kind=kind)
        if kind in ("flr", "hot"):
            unavailable = "this controller is not a PCI function opened through VFIO (the simulator)" \
                if core.function_reset is None else core.function_reset.reset_unavailable(kind)
            if unavailable:
                raise Refused("reset-kind-unavailable", f"no {kind} reset: {unavailable}", kind=kind)

    def reset_controller(self, why: str, kind: str = "controller", *, requested: bool = False) -> None:
        """Reset the controller (see :meth:`_reset_paused`) with every other thread out of the way:
        their waits are ended (the stop flag's pause), and each queue is either taken or held by a
        parked thread. A thread that finds a reset already running parks instead: that reset
        requeues its commands too."""
        core, rs, life = self.core, self.state, self.core.life
        me = threading.get_ident()
        if not rs.reset_lock.acquire(blocking=False):
            core.park()
            return
        held: list[BrokerQueue] = []
        try:
            if life.state is BrokerState.GONE:
                raise DeviceGone(f"the device is gone ({life.gone_why}); no reset ({why})", why=life.gone_why)
            if life.state is BrokerState.FAILED:
                raise ControllerFailed(f"controller declared failed: {life.failed_why}; no reset ({why})",
                                       why=life.failed_why)
            back = life.to(BrokerState.RESETTING)
            rs.resetter = me
            rs.stop.pause()  # every C wait of another thread ends; that thread parks
            deadline = time.monotonic() + core.park_limit_s()
            for q in core.all_queues:
                while not q.lock.acquire(timeout=0.002):
                    with rs.parking:
                        if q.owner in rs.parked:
                            break  # its thread is parked: it touches nothing until the reset is done
                    if time.monotonic() > deadline:
                        self.fail(f"queue {q.qid} stayed busy in its thread during a controller reset")
                else:
                    held.append(q)
            # Every queue is this thread's or a parked thread's: the reset's own admin commands
            # must wait normally, so the pause ends here (the others stay parked on RESETTING).
            rs.stop.resume()
            self._reset_paused(why, kind, requested)
        finally:
            with rs.parking:
                rs.stop.resume()
                if rs.resetter == me:
                    # back where the reset began, unless it failed or found the device gone meanwhile
                    life.to_if((BrokerState.RESETTING,), back)
                    rs.resetter = None
                rs.parking.notify_all()
            for q in held:
                q.lock.release()
            rs.reset_lock.release()

    def _quiesce(self, kind: str) -> str | None:
        """The reset itself, by kind; each leaves the controller disabled: CC.EN=0 and CSTS.RDY=0
        waited for (CAP.TO), so it no longer touches host memory. A PCI reset VFIO fails (after
        its probe said yes) becomes a controller reset, so the queues still come back; returns why."""
        core = self.core
        failed = None
        if kind == "subsystem":
            core.mmio.write32(regs.NSSR, NSSR_RESET)  # "NVMe": the whole NVM subsystem resets (3.7.1)
        elif kind in ("flr", "hot"):
            assert core.function_reset is not None
            try:
                core.function_reset.function_reset(kind)  # the function comes back with CC.EN=0
            except (VfioError, ShimError) as exc:
                failed = str(exc.args[0])
        core.ctrl.disable()
        return failed

    def _reset_paused(self, why: str, kind: str = "controller", requested: bool = False) -> None:
        """Controller reset with everything in flight kept: the reset ``kind`` asks for (CC.EN=0 and
        wait CSTS.RDY=0 for a controller reset; see :meth:`_quiesce`), after which the device no
        longer touches host memory; scrub the rings, re-enable with the same broker-owned queue
        memory, restore shadow doorbells and the I/O queues, re-identify namespaces, then requeue
        every in-flight command (same id and tag) or, past MAX_RETRIES or on a namespace whose
        geometry changed, cancel it. At most RESET_LIMIT resets for errors within RESET_WINDOW_S
        (a caller's ``requested`` reset is not an error: it does not count)."""
        core, rs = self.core, self.state
        now = core.clock()
        rs.reset_times = [t for t in rs.reset_times if now - t < RESET_WINDOW_S]
        if not requested:
            if len(rs.reset_times) >= RESET_LIMIT:
                self.fail(f"{RESET_LIMIT} controller resets within {RESET_WINDOW_S:g} s; last: {why}")
            rs.reset_times.append(now)
        rs.resets += 1
        core.hot = {}
        admin = core.admin
        if admin is None:
            raise Refused("controller-not-enabled", "controller is not enabled")
        try:
            failed = self._quiesce(kind)
        except ControllerFatal as exc:
            if core.ctrl.csts() == 0xFFFFFFFF:
                self.gone()
                raise DeviceGone("CSTS reads all ones during a controller reset: the device is gone") from exc
            raise
        # CSTS.RDY=0: the controller no longer reads or writes host memory.
        for cid in admin.ring.busy_cids().tolist():  # admin commands are not replayed
            admin.cancelled.append(self._cancel(admin, cid))
        admin.ring.drop_standing()  # the controller forgot its Asynchronous Event Requests
        for qp in [admin, *core.io]:
            for ring in qp.rings:
                ring[:] = 0  # SQ and CQ memory scrubbed before the controller sees it again
            qp.ring.reset_rings()
        for b in core.dbbuf or ():
            b.array[:] = 0
        core.arm_admin_queues(admin)
        core.ctrl.enable(core.cc)
        if core.io:
            self.queues.set_number_of_queues(len(core.io))
            if core.dbbuf is not None:
                self.queues.doorbell_buffer_config(*core.dbbuf)
            for qp in core.io:
                self.queues.create_queue_on_device(qp)
            self.ns.reidentify()
        for qp in core.io:
            busy = qp.ring.busy_cids()
            stale = busy[np.isin(qp.ring.saved["nsid"][busy], list(core.changed_namespaces))]
            for cid in stale.tolist():
                qp.cancelled.append(self._cancel(qp, cid))
            _, over = qp.ring.repost(MAX_RETRIES)
            for cid in over:
                qp.cancelled.append(self._cancel(qp, cid))
            qp.ring.ring_sq()
        self.ns.update_hot()
        if core.events.armed:
            self.events.arm()  # Asynchronous Event Configuration and AERs again
        if failed:
            raise Refused("reset-kind-failed", f"the {kind} reset failed ({failed}); the controller was reset "
                          "through CC.EN instead and everything in flight kept", kind=kind)

    def _cancel(self, qp: BrokerQueue, cid: int) -> np.ndarray:
        """End an in-flight command the device will never complete (the controller is disabled):
        its buffer leaves quarantine, the caller gets CANCELLED_STATUS."""
        record, (slot, gen) = qp.ring.cancel(cid, CANCELLED_STATUS)
        if slot >= 0:
            self.core.ledger.unpin(slot, gen, 1)
        return record

    def fail(self, why: str) -> NoReturn:
        """Give up: disable the controller if it answers, end everything in flight, refuse every call."""
        core = self.core
        core.life.to_if((BrokerState.RESETTING,), BrokerState.FAILED, why=why)  # a device gone meanwhile stays gone
        core.hot = {}
        try:
            core.ctrl.disable()
            disabled = True
        except Exception:
            disabled = False  # a live controller may still DMA: leave its buffers pinned (quarantined)
        self.end_all(release=disabled)
        raise ControllerFailed(f"controller declared failed: {why}; reopen the device", why=why)

    def gone_raise(self, exc: DeviceGone) -> NoReturn:
        """A C wait saw the device gone: end everything, and say why (all ones, or the device was
        taken away while this thread waited)."""
        released = self.core.gone  # device_removed() came first: the wait ended on the stop flag
        self.gone()
        if released:
            why = self.core.life.gone_why
            raise DeviceGone(f"the device is gone ({why})", why=why, **exc.context) from exc
        raise exc

    def gone(self, wait_s: float = 0.0, *, drop_irq: bool = False) -> list[int]:
        """The device is gone: no register access can help. Refuse every later call, end every C
        wait (the stop flag), and end what is in flight (its memory is unmapped from the IOMMU when
        the device is closed) on each queue this thread can take within ``wait_s`` (re-entrant: its
        own queue too); a thread that keeps its queue ends its own when its wait returns.
        ``drop_irq``: the eventfds are about to be closed. Returns the queues not taken."""
        core = self.core
        core.life.to_if(set(BrokerState) - {BrokerState.GONE}, BrokerState.GONE)
        core.hot = {}
        self.state.stop.set()
        deadline = time.monotonic() + wait_s
        stuck = []
        for qp in core.all_queues:
            if not qp.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                stuck.append(qp.qid)
                continue
            try:
                self.end_queue(qp, release=True)  # no device left to DMA into their buffers
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
        self.core.life.gone_why = why
        return self.gone(timeout_s, drop_irq=True)

    def end_all(self, *, release: bool) -> None:
        """Cancel every command in flight on every queue; ``release`` unpins their buffers (only when
        the device can no longer DMA into them)."""
        for qp in self.core.all_queues:
            self.end_queue(qp, release=release)

    def end_queue(self, qp: BrokerQueue, *, release: bool) -> None:
        for cid in qp.ring.busy_cids().tolist():
            _, (slot, gen) = qp.ring.cancel(cid, CANCELLED_STATUS)
            if release and slot >= 0:
                self.core.ledger.unpin(slot, gen, 1)
