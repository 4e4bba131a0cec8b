"""The broker as its callers see it: :class:`Broker` composes the components (one per job, see
docs/architecture.md) and hands each verb to the one that does it; its data attributes are the
components' state, read (and where callers set them, written) through properties."""

from __future__ import annotations

import contextlib
import time
from collections import deque
from typing import Any, Callable

import numpy as np

from nvmevfio import events as decode
from nvmevfio.broker.admin import AdminVerbs
from nvmevfio.broker.cmb import ControllerMemory
from nvmevfio.broker.commands import AdminCommands
from nvmevfio.broker.common import (
    COMMAND_TIMEOUT_S,
    DEFAULT_STAGING,
    BrokerQueue,
    FunctionReset,
    IrqWaiter,
    Namespace,
)
from nvmevfio.broker.core import Core
from nvmevfio.broker.events import Events
from nvmevfio.broker.execute import Executor
from nvmevfio.broker.metadata import MetadataIO
from nvmevfio.broker.namespaces import Namespaces
from nvmevfio.broker.passthrough import Passthrough
from nvmevfio.broker.queues import Queues
from nvmevfio.broker.recovery import Recovery
from nvmevfio.broker.service import ServicePath
from nvmevfio.broker.state import BrokerState
from nvmevfio.broker.submit import Submit
from nvmevfio.broker.syncio import SyncIO
from nvmevfio.broker.zones import ZoneVerbs
from nvmevfio.dma import DmaBuffer, DmaLedger
from nvmevfio.mmio import Mmio
from nvmevfio.nvme.controller import Controller, State


class Broker:
    """The manager: owns the controller, the DMA ledger and every queue; authors every address
    the device sees and refuses, by name, whatever breaks a rule before the device sees it."""

    def __init__(self, mmio: Mmio, ledger: DmaLedger, *, irq: IrqWaiter | None = None,
                 page_size: int | None = None, staging_bytes: int = DEFAULT_STAGING,
                 command_timeout_s: float = COMMAND_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic,
                 bar_map: Callable[[int], tuple[np.ndarray, int]] | None = None,
                 function_reset: FunctionReset | None = None) -> None:
        # The components, bottom up; each is given the ones below it, never this facade.
        core = self._core = Core(mmio, ledger, irq=irq, page_size=page_size, staging_bytes=staging_bytes,
                                 command_timeout_s=command_timeout_s, clock=clock, bar_map=bar_map,
                                 function_reset=function_reset)
        ex = self._ex = Executor(core)
        cmds = AdminCommands(core, ex)
        ns = self._ns = Namespaces(core, cmds)
        self._cmb = cmb = ControllerMemory(core)
        queues = self._queues = Queues(core, cmds, ns, cmb)
        ev = self._events = Events(core, ex, ns)
        rec = self._recovery = Recovery(core, ex, cmds, queues, ns, ev)
        pt = Passthrough(core, ex, cmds)
        verbs = AdminVerbs(core, cmds, ns, pt)
        sub = Submit(core, ex, ns)
        svc = ServicePath(core, ex, ns)
        sio = SyncIO(core, ex, ns, sub, MetadataIO(core, ex, ns))
        zones = ZoneVerbs(core, ns, pt, sio)
        # The hooks that keep the imports acyclic: execution reaches recovery, admin commands
        # service pending events, Identify Controller arms the events.
        ex.attach_recovery(rec)
        cmds.service_events = ev.service_quietly
        ns.identified = ev.arm_if_wanted

        # controller state and bring-up (core.py, queues.py)
        self.bind = core.bind
        self.registers = core.registers
        self.reset = core.reset
        self.enable = core.enable
        self.create_io_queues = queues.create_io_queues
        self.shutdown = queues.shutdown
        self._require_ready = core.require_ready
        self.write_interrupt_mask = core.write_interrupt_mask
        self._queue = core.queue
        # identify and the namespace table (namespaces.py)
        self.identify_controller = ns.identify_controller
        self.active_namespaces = ns.active_namespaces
        self.identify_namespace = ns.identify_namespace
        self.refresh_namespaces = ns.refresh_namespaces
        self.namespace = ns.namespace
        self.check_window = ns.check_window
        self.max_blocks = ns.max_blocks
        # asynchronous events (events.py), recovery (recovery.py)
        self.poll_events = ev.poll_events
        self.on_event = ev.on_event
        self.device_removed = rec.device_removed
        self.reset_controller = rec.reset
        self.check_reset_kind = rec.check_reset_kind
        # passthrough and the named admin verbs (passthrough.py, admin.py)
        self.passthru = pt.passthru
        self.get_log_page = verbs.get_log_page
        self.get_features = verbs.get_features
        self.set_features = verbs.set_features
        self.format_nvm = verbs.format_nvm
        self.compare = verbs.compare
        self.verify = verbs.verify
        self.create_namespace = verbs.create_namespace
        self.delete_namespace = verbs.delete_namespace
        self.attach_namespace = verbs.attach_namespace
        self.sanitize = verbs.sanitize
        self.firmware_download = verbs.firmware_download
        self.firmware_commit = verbs.firmware_commit
        self.device_self_test = verbs.device_self_test
        # batched I/O, registered buffers, the perf loop (submit.py)
        self.submit_rw = sub.submit_rw
        self.ring = sub.ring
        self.ring_doorbell = sub.ring_doorbell
        self.reap = sub.reap
        self.completion_fd = sub.completion_fd
        self.in_flight = sub.in_flight
        self.capacity = sub.capacity
        self.register_buffer = sub.register_buffer
        self.unregister_buffer = sub.unregister_buffer
        self.free_buffer = sub.free_buffer
        self.perf_loop = sub.perf_loop
        # the service's compiled path (service.py)
        self.service_attach = svc.service_attach
        self.service_buffer = svc.service_buffer
        self.service_serve = svc.service_serve
        self.service_pump = svc.service_pump
        self.service_drain = svc.service_drain
        self.submit_validated = svc.submit_validated
        # synchronous I/O (syncio.py)
        self.transfer = sio.transfer
        self.read = sio.read
        self.read_sparse = sio.read_sparse
        self.write = sio.write
        self.flush = sio.flush
        self.write_zeroes = sio.write_zeroes
        self.deallocate = sio.deallocate
        # zoned namespaces (zones.py)
        self.zone_report = zones.zone_report
        self.zones = zones.zones
        self.zone_action = zones.zone_action
        self.zone_append = zones.zone_append
        self.zone_write = zones.zone_write

    def close(self) -> None:
        """Shut down if enabled (best effort), then release every broker buffer. When the shutdown
        fails (an interrupted caller, a late command), CC.EN=0 first, so that the controller stops
        touching memory before it is unmapped. A device that is gone is not touched."""
        core = self._core
        self._events.stop_watch()
        try:
            if core.ctrl.state is State.READY and not core.gone and core.failed is None:
                self.shutdown()
        except BaseException:
            with contextlib.suppress(Exception):
                core.ctrl.disable()
            raise
        finally:
            core.drop_queues()

    # ============================================================ state, as properties
    @property
    def state(self) -> State:
        """The controller's register state (CC/CSTS)."""
        return self._core.ctrl.state

    @property
    def lifecycle(self) -> BrokerState:
        """The broker's own state (see :mod:`nvmevfio.broker.state`)."""
        return self._core.life.state

    @property
    def failed(self) -> str | None:
        """Why the controller was declared failed (every call refused), or None."""
        return self._core.failed

    @property
    def gone(self) -> bool:
        """BAR0 read all ones, or the device was handed back: the device is gone."""
        return self._core.gone

    @property
    def gone_why(self) -> str:
        return self._core.life.gone_why

    @property
    def mmio(self) -> Mmio:
        return self._core.mmio

    @property
    def ledger(self) -> DmaLedger:
        return self._core.ledger

    @property
    def irq(self) -> IrqWaiter | None:
        return self._core.irq

    @property
    def ctrl(self) -> Controller:
        return self._core.ctrl

    @property
    def admin(self) -> BrokerQueue | None:
        return self._core.admin

    @property
    def io(self) -> list[BrokerQueue]:
        return self._core.io

    @property
    def page_size(self) -> int:
        return self._core.page_size

    @property
    def host_page_size(self) -> int:
        return self._core.host_page_size

    @property
    def id_ctrl(self) -> dict[str, Any] | None:
        return self._core.id_ctrl

    @property
    def namespaces(self) -> dict[int, Namespace]:
        return self._core.namespaces

    @property
    def changed_namespaces(self) -> set[int]:
        return self._core.changed_namespaces

    @property
    def max_transfer(self) -> int:
        return self._core.max_transfer

    @property
    def max_pages(self) -> int:
        return self._ns.max_pages

    @property
    def command_timeout_s(self) -> float:
        return self._core.command_timeout_s

    @command_timeout_s.setter
    def command_timeout_s(self, value: float) -> None:
        self._core.command_timeout_s = value

    @property
    def sleep(self) -> Callable[[float], None]:
        return self._core.sleep

    @sleep.setter
    def sleep(self, value: Callable[[float], None]) -> None:
        self._core.sleep = value

    @property
    def staging_bytes(self) -> int:
        return self._core.staging_bytes

    @property
    def commands_completed(self) -> int:
        return self._core.commands_completed

    @property
    def irq_mode(self) -> bool:
        return self._core.irq_mode

    @property
    def shadow_doorbells(self) -> bool:
        return self._core.shadow_doorbells

    @property
    def shadow_doorbells_active(self) -> bool:
        return self._core.dbbuf is not None

    @property
    def resets(self) -> int:
        return self._core.recovery.resets

    @property
    def aborts(self) -> int:
        return self._core.recovery.aborts

    @property
    def retries(self) -> int:
        return self._core.recovery.retries

    @property
    def async_events(self) -> bool:
        return self._core.events.enabled

    @async_events.setter
    def async_events(self, value: bool) -> None:
        self._core.events.enabled = value

    @property
    def aec(self) -> int | None:
        return self._core.events.aec

    @property
    def events_off(self) -> str | None:
        return self._core.events.off

    @property
    def events(self) -> deque[decode.AsyncEvent]:
        return self._core.events.backlog

    @property
    def events_seen(self) -> int:
        return self._core.events.seen

    # the private names tests and tools look at
    @property
    def _hot(self) -> dict[int, Namespace]:
        return self._core.hot

    @property
    def _bounce_reads(self) -> dict[int, dict[int, tuple[DmaBuffer, int, int]]]:
        return self._core.bounce_reads

    @property
    def _dbbuf(self) -> tuple[DmaBuffer, DmaBuffer] | None:
        return self._core.dbbuf

    @property
    def _event_callbacks(self) -> list[Callable[[decode.AsyncEvent], None]]:
        return self._core.events.callbacks

    @property
    def _watch(self) -> Any:
        return self._core.events.watch
