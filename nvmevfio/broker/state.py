"""The broker's own state, each part an object: its lifecycle (one enum, one transition
function), recovery's counters and the gate other threads park at during a reset, and the
asynchronous events' bookkeeping. No register access here."""

from __future__ import annotations

import enum
import threading
from collections import deque
from collections.abc import Collection
from typing import Callable

from nvmevfio import events
from nvmevfio.dma import DmaBuffer
from nvmevfio.errors import IllegalTransition
from nvmevfio.nvme.queue import StopFlag

# Asynchronous Event Requests kept outstanding (at most AERL+1), events kept for poll_events()
# (the oldest are dropped past it; callbacks see every one), how often a watcher looks.
MAX_AERS = 4
EVENT_BACKLOG = 256
EVENT_POLL_S = 0.02


class BrokerState(enum.Enum):
    """The broker's lifecycle. The controller's own register states (CC/CSTS) are
    :class:`nvmevfio.nvme.controller.State`; these say what the broker may do with it."""

    DISABLED = "disabled"        # no admin queue pair: before enable(), after reset(), shutdown(), close()
    ADMIN_READY = "admin-ready"  # enabled (CSTS.RDY=1 seen) with the broker's admin queue pair
    IO_READY = "io-ready"        # I/O queue pairs created
    RESETTING = "resetting"      # one thread resets the controller; every other thread parks
    FAILED = "failed"            # recovery gave up: every call refused until enable() again
    GONE = "gone"                # the device is gone or was taken away: every call refused, for good


_S = BrokerState
# Every transition the broker makes; anything else is refused by name (IllegalTransition).
TRANSITIONS: dict[BrokerState, frozenset[BrokerState]] = {
    _S.DISABLED: frozenset({_S.ADMIN_READY, _S.RESETTING, _S.GONE}),
    _S.ADMIN_READY: frozenset({_S.IO_READY, _S.DISABLED, _S.RESETTING, _S.GONE}),
    _S.IO_READY: frozenset({_S.DISABLED, _S.RESETTING, _S.GONE}),
    # A reset ends where it began (DISABLED only when asked with no admin queue: it is refused),
    # or gives up (FAILED), or finds the device gone.
    _S.RESETTING: frozenset({_S.DISABLED, _S.ADMIN_READY, _S.IO_READY, _S.FAILED, _S.GONE}),
    _S.FAILED: frozenset({_S.DISABLED, _S.GONE}),  # enable() starts again
    _S.GONE: frozenset(),
}


class Lifecycle:
    """The broker's state and the one function that changes it (:meth:`to`)."""

    def __init__(self) -> None:
        self.state = BrokerState.DISABLED
        self.failed_why: str | None = None  # why the controller was declared failed (kept until enable())
        self.gone_why = "BAR0 reads all ones"
        self._lock = threading.RLock()

    def to(self, new: BrokerState, *, why: str | None = None) -> BrokerState:
        """Go to ``new`` (``why``: the reason, for FAILED); returns the state left. A transition
        :data:`TRANSITIONS` does not list raises IllegalTransition naming both states."""
        with self._lock:
            old = self.state
            if new not in TRANSITIONS[old]:
                raise IllegalTransition("broker", old.value, new.value)
            self.state = new
            if new is BrokerState.FAILED:
                self.failed_why = why
            elif old is BrokerState.FAILED and new is BrokerState.DISABLED:
                self.failed_why = None
            return old

    def to_if(self, expected: Collection[BrokerState], new: BrokerState, *, why: str | None = None) -> bool:
        """:meth:`to` when the state is one of ``expected`` (another thread may have moved it:
        a device taken away during a reset stays gone); False when it was not."""
        with self._lock:
            if self.state not in expected:
                return False
            self.to(new, why=why)
            return True


class RecoveryState:
    """Recovery's counters, the reset window, and the gate of a controller reset with several
    threads: the resetting thread pauses every queue (their C waits end with -EAGAIN, or at once
    for good with the stop flag set when the device is taken away), each other thread parks
    (touches no queue) until it is done."""

    def __init__(self) -> None:
        self.resets = 0
        self.aborts = 0
        self.retries = 0
        self.reset_times: list[float] = []
        self.stop = StopFlag()  # set when the device is taken away: ends every C wait at once
        self.reset_lock = threading.Lock()
        self.parking = threading.Condition()
        self.parked: set[int] = set()  # threads parked for a reset
        self.resetter: int | None = None  # the thread resetting the controller


class EventState:
    """Asynchronous events (5.2): Asynchronous Event Requests stay outstanding on the admin
    queue (standing commands in C, never late); each event's log page is read (clearing it) and
    the event delivered to poll_events() and the callbacks."""

    def __init__(self) -> None:
        self.enabled = True  # arm them after the first Identify Controller
        self.aec: int | None = None  # the Asynchronous Event Configuration set (None: not set)
        self.off: str | None = None  # why no more AERs are posted (the controller refused one)
        self.aer_limit = MAX_AERS
        self.armed = False
        self.servicing = False
        self.buf: DmaBuffer | None = None
        self.backlog: deque[events.AsyncEvent] = deque(maxlen=EVENT_BACKLOG)
        self.seen = 0
        self.cond = threading.Condition()
        self.callbacks: list[Callable[[events.AsyncEvent], None]] = []
        self.watch: threading.Thread | None = None
        self.watch_stop = threading.Event()

    def disarm(self) -> None:
        """The queues are dropped: nothing armed, the controller's defaults again."""
        self.armed, self.aec, self.off, self.aer_limit = False, None, None, MAX_AERS
