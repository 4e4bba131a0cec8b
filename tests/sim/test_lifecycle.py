"""The broker's lifecycle (nvmevfio/broker/state.py) as the simulated controller walks it:
disabled -> admin-ready -> io-ready, a reset and back, failed after the reset budget, enable
again, gone for good; reset() and close() back to disabled."""

import pytest

from nvmevfio.broker import BrokerState as S
from nvmevfio.errors import ControllerFailed, Refused


def test_bring_up_reset_and_close(rig):
    b = rig.broker
    assert b.lifecycle is S.DISABLED
    p = rig.p
    p.enable()
    assert b.lifecycle is S.ADMIN_READY
    p.create_io_queues(1, 16)
    assert b.lifecycle is S.IO_READY
    p.reset()
    assert b.lifecycle is S.DISABLED and b.admin is None
    p.enable()
    assert b.lifecycle is S.ADMIN_READY
    b.close()
    assert b.lifecycle is S.DISABLED


def test_a_reset_returns_to_io_ready(rig):
    rig.broker.command_timeout_s = 0.2
    p = rig.ready(depth=16)
    rig.sim.drop_next = 1  # the device loses this read's completion: abort, then a controller reset
    p.read(1, 0, 8)
    assert rig.broker.resets == 1 and rig.broker.lifecycle is S.IO_READY and rig.broker.failed is None


def test_failed_after_the_reset_budget_then_enable_starts_again(rig):
    rig.broker.command_timeout_s = 0.2
    p = rig.ready(depth=16)
    rig.sim.drop_next = 100
    with pytest.raises(ControllerFailed):
        p.read(1, 0, 8)
    b = rig.broker
    assert b.lifecycle is S.FAILED and b.failed and "controller resets within" in b.failed
    b.close()
    assert b.lifecycle is S.FAILED  # close() does not forgive it: every call is still refused
    with pytest.raises(Refused) as ei:
        p.identify_controller()
    assert ei.value.reason == "controller-failed"
    rig.sim.drop_next = 0
    p.enable()
    assert b.lifecycle is S.ADMIN_READY and b.failed is None


def test_gone_is_for_good(rig):
    p = rig.ready(depth=16)
    rig.broker.device_removed("test")
    assert rig.broker.lifecycle is S.GONE and rig.broker.gone
    rig.broker.close()
    assert rig.broker.lifecycle is S.GONE
    with pytest.raises(Refused) as ei:
        p.read(1, 0, 1)
    assert ei.value.reason == "device-gone"


def test_queues_up_to_takes_what_the_controller_grants():
    """A default queue count (`nvmevfio ublk` without --queues: one per CPU) is a wish: where Set
    Features Number of Queues grants fewer, the device opens with the grant; a count the caller
    gave is refused by name instead (count-out-of-range, the grant in its context)."""
    from nvmevfio.blockdev import BlockDevice
    from nvmevfio.errors import Refused
    from nvmevfio.sim.rig import Rig

    rig = Rig(max_queues=2)  # Number of Queues grants 2 I/O queue pairs
    dev = BlockDevice(rig.p, 1, queues=4, queues_up_to=True)
    assert dev.info.io_queues == 2 and len(rig.broker.io) == 2
    assert dev.read_blocks(0, 1).size == dev.block_size  # usable on the granted queues
    dev.close()
    rig = Rig(max_queues=2)
    with pytest.raises(Refused) as ei:
        BlockDevice(rig.p, 1, queues=4)
    assert ei.value.reason == "count-out-of-range" and ei.value.context["allowed"] == 2
