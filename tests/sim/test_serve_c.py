"""What the perf loop hands a C server of its own (the ublk server, nvmevfio/ublk.py): its
slots' memory where the device reads and writes them, and a run of a C shim function on the
queue pair under the broker's guard (the queue pair itself never reaches Python)."""

import numpy as np
import pytest

from nvmevfio.blockdev import BlockDevice
from nvmevfio.errors import StaleHandle
from nvmevfio.sim.controller import SimNamespace
from nvmevfio.sim.rig import Rig

SLOT = 4096


def loop_of(rig):
    dev = BlockDevice(rig.p, 1, queue_depth=64)
    buf = dev.alloc_buffer(8 * SLOT)
    reg = dev.provider.register_buffer(buf, SLOT)
    return buf, dev.perf_loop(reg, io_size=SLOT, lba_range=(0, 1024), random=False, read_pct=100, depth=8)


def test_slot_memory_is_the_buffer_with_an_iommu(rig):
    buf, loop = loop_of(rig)
    buf.array[:] = 7
    assert loop.slot_memory.size == buf.size and (loop.slot_memory == 7).all()


def test_slot_memory_is_the_bounce_pool_without_one():
    rig = Rig([SimNamespace(8192)], physical=[0x1_4000_0000 + i * (2 << 20) for i in range(4)])
    buf, loop = loop_of(rig)
    assert rig.ledger.bounce
    loop.slot_memory[:] = 5  # what a C server writes for the device: the device reads it, not the buffer
    assert (loop.slot_memory == 5).all() and not np.shares_memory(loop.slot_memory, buf.array)


def test_slot_memory_of_a_closed_session_is_refused_not_a_view_of_unmapped_memory():
    """The no-IOMMU lane's bounce pages go with the session: asking after is stale-handle (reading
    a view of them segfaulted the guest's leak scan)."""
    rig = Rig([SimNamespace(8192)], physical=[0x1_4000_0000 + i * (2 << 20) for i in range(4)])
    _, loop = loop_of(rig)
    rig.p.close()
    rig.ledger.close()  # what a session's close does after the broker's (frees the buffers, unmaps the pool)
    with pytest.raises(StaleHandle) as ei:
        _ = loop.slot_memory
    assert ei.value.reason == "stale-handle"


def test_serve_c_runs_only_functions_of_the_c_shim(rig):
    _, loop = loop_of(rig)

    def nv_ublk_queue_run(*args):  # a Python function of the same name: it would get the queue pair
        raise AssertionError("called")

    for fn in (nv_ublk_queue_run, print, lambda *a: 0):
        with pytest.raises(TypeError, match="functions of the C shim"):
            loop.serve_c(fn, ended=lambda records: None)
