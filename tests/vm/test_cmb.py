"""The Controller Memory Buffer against QEMU's NVMe model (cmb_size_mb=4) through real VFIO:
the registers decoded, the CMB enabled at a controller address the broker chose, the I/O
submission queues placed in it and the data path byte-exact through them, across a controller
reset; a controller without one refuses by name before any queue exists."""

import numpy as np
import pytest

import nvmevfio
from nvmevfio import perf
from nvmevfio.errors import Refused
from nvmevfio.nvme import cmb
from nvmevfio.nvme.spec import SQE

RNG = np.random.default_rng(808)


@pytest.fixture(params=["poll", "irq"])
def cdev(request, cmb_ctrl):
    with nvmevfio.open(cmb_ctrl["address"], 1, irq=request.param == "irq", queue_depth=64, sq_in_cmb=True) as d:
        yield d


def test_registers_and_placement(cdev):
    broker = cdev.provider._broker
    regs = cdev.provider.registers(every=True)
    assert regs.cap >> 57 & 1  # CAP.CMBS
    lay = cmb.layout(regs.others["cmbloc"], regs.others["cmbsz"])
    # QEMU: BAR2, offset 0, 4 MiB in 1 MiB units; SQS among what it may hold
    assert (lay.bir, lay.offset, lay.size) == (2, 0, 4 << 20) and lay.sqs, lay
    msc = regs.others["cmbmsc"]
    assert msc & 3 == 3 and regs.others["cmbsts"] & 1 == 0  # CRE, CMSE; CBAI clear: the address was taken
    assert cdev.info.sq_in_cmb
    qp = broker.io[0]
    assert qp.sq_in_cmb and qp.sq_address == msc & ~0xFFF  # the SQ base: the CMB's controller address
    # the CMB's address is reserved IOVA space: no DMA buffer of the broker's can ever have it
    for iova, size, _owner, _gen in cdev.provider.device_regions():
        assert not (msc & ~0xFFF) <= iova < (msc & ~0xFFF) + (4 << 20), (hex(iova), size)


def test_data_through_sqs_in_the_cmb(cdev):
    data = RNG.integers(0, 256, 1 << 20, dtype=np.uint8)
    buf = cdev.alloc_buffer(1 << 20)
    buf.array[:] = data
    cdev.write_from(100, 2048, buf)
    assert np.array_equal(cdev.read_blocks(100, 2048), data)
    n = 32
    cdev.submit_writes(5000 + np.arange(n) * 8, np.full(n, 8), buf, np.arange(n) * 4096)
    assert (cdev.reap(n)["status"] == 0).all()
    assert np.array_equal(cdev.read_blocks(5000, n * 8), data[: n * 4096])
    # the last entries the controller fetched are in the CMB's memory, not in host memory
    sq = cdev.provider._broker.io[0].rings[0].view(SQE)
    assert (sq["opc"] == 0x01).any() and (sq["opc"] == 0x02).any()


def test_perf_and_a_controller_reset(cdev):
    r = perf.run(cdev, workload="randrw", queue_depth=32, count=3000, io_size=4096, lba_range=(0, 16384))
    assert r.ios == 3000 and r.errors == 0 and r.sq_in_cmb
    cdev.provider._broker._recovery.reset_controller("test: the CMB's queues come back")
    regs = cdev.provider.registers(every=True)
    assert regs.others["cmbmsc"] & 3 == 3  # programmed again
    data = RNG.integers(0, 256, 64 << 10, dtype=np.uint8)
    cdev.write_blocks(9000, data)
    assert np.array_equal(cdev.read_blocks(9000, 128), data)


def test_no_cmb_is_refused_before_any_queue(data_ctrl):
    with nvmevfio.open(data_ctrl["address"], 1) as d:
        pass  # the data controller works as ever
    with pytest.raises(Refused) as ei:
        nvmevfio.open(data_ctrl["address"], 1, sq_in_cmb=True)
    assert ei.value.reason == "cmb-unavailable" and "CAP.CMBS 0" in str(ei.value)
    assert d.info.sq_in_cmb is False


def test_the_next_owner_is_not_captured_by_a_cmb_left_enabled(cmb_ctrl):
    """A session's CMB sits at IOVA space it reserved; the next session (another ledger) may hand
    that very range to a buffer. The broker disables CMBMSC at enable and at shutdown, so a CMB
    left enabled never takes the new owner's DMA for its own."""
    with nvmevfio.open(cmb_ctrl["address"], 1, sq_in_cmb=True) as d:
        cba = d.provider.registers(every=True).others["cmbmsc"] & ~0xFFF
        assert cba
    with nvmevfio.open(cmb_ctrl["address"], 1) as d:
        assert d.provider.registers(every=True).others["cmbmsc"] == 0
        big = d.alloc_buffer(8 << 20)  # the IOVA space past the queues, where the old CBA was
        big.array[:] = RNG.integers(0, 256, big.size, dtype=np.uint8)
        for off in (0, 4 << 20):
            d.write_from(0, 8192, big, off)
            assert np.array_equal(d.read_blocks(0, 8192), big.array[off : off + (4 << 20)])
