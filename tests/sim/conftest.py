import pytest

from nvmevfio.broker import Broker
from nvmevfio.dma import DmaLedger
from nvmevfio.provider import Provider
from nvmevfio.sim.controller import SimController, SimNamespace


class Rig:
    def __init__(self, namespaces=None, physical=None, **kw):
        """``physical``: the no-IOMMU lane, over a pool whose 2 MiB chunks the device sees at
        these made-up physical addresses (and nothing else)."""
        self.sim = SimController(namespaces if namespaces is not None else
                                 [SimNamespace(4096), SimNamespace(1024, 4096)], **kw)
        if physical is None:
            self.ledger = DmaLedger(self.sim.dma, [(0, (1 << 40) - 1)])
        else:
            self.ledger = DmaLedger(self.sim.dma, [], pool=self.sim.dma.physical_pool(physical))
        self.broker = Broker(self.sim.mmio, self.ledger, command_timeout_s=0.5)
        self.p = Provider(self.broker)

    def ready(self, depth=16):
        self.p.bind()
        self.p.enable()
        self.p.identify_controller()
        self.p.create_io_queues(1, depth)
        return self.p

    def mark(self):
        return (len(self.sim.mmio.writes), len(self.sim.commands))

    def unchanged_since(self, mark):
        return (len(self.sim.mmio.writes), len(self.sim.commands)) == mark


@pytest.fixture
def rig():
    return Rig()
