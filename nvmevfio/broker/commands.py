"""Admin commands as the layers above execution issue them: run on the admin queue (into the
broker's scratch buffer for data read), then, when the run left asynchronous events pending,
those serviced through the hook the broker wires to :mod:`.events` (which sits above)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from nvmevfio.broker.common import nothing
from nvmevfio.broker.core import Core
from nvmevfio.broker.execute import Executor, Ran
from nvmevfio.dma import DmaBuffer


class AdminCommands:
    def __init__(self, core: Core, ex: Executor) -> None:
        self.core = core
        self.ex = ex
        self.service_events: Callable[[], None] = nothing  # the events' servicing, logged not raised

    def settled(self, ran: Ran) -> int:
        """A command's DW0, after servicing the events it left pending."""
        if ran.events_pending:
            self.service_events()
        return ran.dw0

    def sync(self, e: np.ndarray, name: str, buf: DmaBuffer | None = None, length: int = 0,
             timeout_s: float | None = None) -> int:
        return self.settled(self.ex.admin_sync(e, name, buf, length, timeout_s))

    def read(self, e: np.ndarray, name: str, length: int) -> bytes:
        """An admin command reading ``length`` bytes into the scratch buffer; the bytes are copied
        out before events are serviced (their commands may use the scratch buffer)."""
        buf = self.core.scratch_buf(length)
        arr = buf.array
        arr[:length] = 0
        self.ex.admin_sync(e, name, buf, length)
        data = bytes(arr[:length])
        if self.core.admin is not None and self.core.admin.ring.nevents:
            self.service_events()
        return data
