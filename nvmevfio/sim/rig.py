"""A simulated controller wired to a broker and a provider, ready for tests: the simulator's
MMIO and DMA seams, a ledger over them (the IOMMU lanes' IOVA space, or the no-IOMMU lane's
pool at made-up physical addresses) and the provider a caller gets. Used by the project's
simulator tests and by anyone who wants to try a verb without a device."""

from __future__ import annotations

from typing import Any

from nvmevfio.broker import Broker
from nvmevfio.dma import DmaLedger
from nvmevfio.provider import Provider
from nvmevfio.sim.controller import SimController, SimNamespace


class Rig:
    def __init__(self, namespaces: list[SimNamespace] | None = None, physical: list[int] | None = None,
                 **kw: Any) -> None:
        """``physical``: the no-IOMMU lane, over a pool whose 2 MiB chunks the device sees at
        these made-up physical addresses (and nothing else). ``kw`` go to SimController."""
        self.sim = SimController(namespaces if namespaces is not None else
                                 [SimNamespace(4096), SimNamespace(1024, 4096)], **kw)
        if physical is None:
            self.ledger = DmaLedger(self.sim.dma, [(0, (1 << 40) - 1)])
        else:
            self.ledger = DmaLedger(self.sim.dma, [], pool=self.sim.dma.physical_pool(physical))
        self.broker = Broker(self.sim.mmio, self.ledger, command_timeout_s=0.5)
        self.p = Provider(self.broker)

    def ready(self, depth: int = 16) -> Provider:
        """Bound, enabled, identified, with one I/O queue pair of ``depth`` entries."""
        self.p.bind()
        self.p.enable()
        self.p.identify_controller()
        self.p.create_io_queues(1, depth)
        return self.p

    def mark(self) -> tuple[int, int]:
        """How many MMIO writes and commands the simulated device has seen so far."""
        return (len(self.sim.mmio.writes), len(self.sim.commands))

    def unchanged_since(self, mark: tuple[int, int]) -> bool:
        """True when the device saw no MMIO write and no command since ``mark``: a refusal
        happened before anything touched it."""
        return (len(self.sim.mmio.writes), len(self.sim.commands)) == mark
