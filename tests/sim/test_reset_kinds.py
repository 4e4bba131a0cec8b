"""Resets asked for by kind (Recovery.reset) on the simulator: a controller reset and an NVM
Subsystem Reset with commands in flight keep them (requeued, completed once, bytes right); a kind
the controller or the function does not offer is refused by name before anything is written."""

import numpy as np
import pytest

from nvmevfio.blockdev import BlockDevice
from nvmevfio.errors import Refused
from nvmevfio.sim.controller import SimNamespace
from nvmevfio.sim.rig import Rig


@pytest.mark.parametrize("kind", ["controller", "subsystem"])
def test_reset_with_commands_in_flight_keeps_them(kind):
    rig = Rig([SimNamespace(4096)], nssrs=True)
    dev = BlockDevice(rig.p, 1, queue_depth=64)
    buf = dev.alloc_buffer(16 * 4096)
    data = np.random.default_rng(3).integers(0, 256, buf.size, dtype=np.uint8)
    buf.array[:] = data
    tags = dev.submit_writes(np.arange(16) * 8, np.full(16, 8), buf, np.arange(16) * 4096)
    resets = rig.sim.resets
    dev.reset_controller(kind)
    done = dev.reap(16)
    assert sorted(done["tag"].tolist()) == sorted(tags.tolist()) and not done["status"].any()
    assert rig.sim.resets == resets + 1 and dev.provider._broker.resets == 1
    assert rig.sim.subsystem_resets == (kind == "subsystem")
    assert np.array_equal(rig.sim.namespaces[0].data[: 16 * 4096], data)
    assert np.array_equal(dev.read_blocks(0, 128), data)  # and the queues work after it


def test_kinds_not_offered_are_refused_before_anything():
    rig = Rig([SimNamespace(1024)])  # CAP.NSSRS 0, and no PCI function behind it
    dev = BlockDevice(rig.p, 1)
    for kind, reason, words in [("subsystem", "reset-kind-unavailable", "CAP.NSSRS is 0"),
                                ("flr", "reset-kind-unavailable", "simulator"),
                                ("hot", "reset-kind-unavailable", "simulator"),
                                ("warm", "invalid-argument", "one of controller, subsystem, flr, hot")]:
        mark = rig.mark()
        with pytest.raises(Refused) as ei:
            dev.reset_controller(kind)
        assert ei.value.reason == reason and words in str(ei.value), (kind, str(ei.value))
        assert rig.unchanged_since(mark)
    assert dev.provider._broker.resets == 0
