"""SGLs on the simulator (NVMe 2.0 4.1.2): every READ/WRITE path of a queue set created with
``sgl=True`` carries SGL descriptors (PSDT 01b), the bytes land where they should, a sparse
read discards its holes with Bit Bucket descriptors, and what the controller does not offer is
refused before anything reaches it."""

import numpy as np
import pytest

from nvmevfio import perf
from nvmevfio.blockdev import BlockDevice
from nvmevfio.dma import HUGE_PAGE
from nvmevfio.errors import Refused
from nvmevfio.nvme.spec import IoOpcode
from nvmevfio.sim.controller import SimNamespace
from nvmevfio.sim.rig import Rig

RNG = np.random.default_rng(11)


def _last(rig, opc):
    return rig.sim.last_sqe[opc]


@pytest.fixture
def rig():
    return Rig([SimNamespace(8192)], mdts=5)


@pytest.fixture
def dev(rig):
    return BlockDevice(rig.p, 1, queue_depth=64, sgl=True)


def test_sync_paths_carry_one_data_block(rig, dev):
    ns = rig.sim.namespaces[0]
    assert dev.info.data_descriptors == "sgl"
    buf = dev.alloc_buffer(128 << 10)
    data = RNG.integers(0, 256, 128 << 10, dtype=np.uint8)
    buf.array[:] = data
    dev.write_from(10, 8, buf, 512)  # the hot path: one C call
    e = _last(rig, IoOpcode.WRITE)
    iova = rig.ledger.iova(buf)
    assert (int(e["flags"]), int(e["prp1"]), int(e["prp2"])) == (0x40, iova + 512, 4096)
    assert np.array_equal(ns.data[10 * 512 : 18 * 512], data[512 : 512 + 4096])
    dev.write_from(100, 256, buf)  # 128 KiB (MDTS 5): one command, one descriptor, no list
    e = _last(rig, IoOpcode.WRITE)
    assert (int(e["flags"]), int(e["prp1"]), int(e["prp2"])) == (0x40, iova, 128 << 10)
    out = dev.alloc_buffer(128 << 10)
    dev.read_into(100, 256, out)
    assert np.array_equal(out.array, data)
    e = _last(rig, IoOpcode.READ)
    assert (int(e["flags"]), int(e["prp2"])) == (0x40, 128 << 10)
    assert bytes(dev.read_blocks(10, 8)) == data[512 : 512 + 4096].tobytes()


def test_batches_small_and_vectorized(rig, dev):
    ns = rig.sim.namespaces[0]
    buf = dev.alloc_buffer(64 << 10)
    buf.array[:] = RNG.integers(0, 256, 64 << 10, dtype=np.uint8)
    p = dev.provider
    for n in (4, 16):  # packed one by one, then vectorized
        offs = np.arange(n) * 4096
        p.submit("write", 1, 1000 + np.arange(n) * 8, np.full(n, 8), buf, offs)
        done = p.reap(n)
        assert (done["status"] == 0).all()
        sq = rig.broker.io[0].ring.sq_ring
        assert set(sq["flags"][sq["opc"] == IoOpcode.WRITE].tolist()) == {0x40}
        assert np.array_equal(ns.data[1000 * 512 : (1000 + 8 * n) * 512], buf.array[: n * 4096])
    # one batch may choose PRPs for itself
    p.submit("read", 1, [1000], [8], buf, [0], sgl=False)
    p.reap(1)
    assert int(_last(rig, IoOpcode.READ)["flags"]) == 0


def test_registered_buffer_and_perf_loop(rig, dev):
    r = perf.run(dev, workload="randrw", queue_depth=8, count=400, io_size=16384, lba_range=(0, 4096))
    assert r.ios == 400 and r.errors == 0
    sq = rig.broker.io[0].ring.sq_ring
    used = sq[(sq["opc"] == IoOpcode.READ) | (sq["opc"] == IoOpcode.WRITE)]
    assert len(used) and set(used["flags"].tolist()) == {0x40} and set(used["prp2"].tolist()) == {16384}


def test_sparse_read_discards_holes_with_bit_buckets(rig, dev):
    ns = rig.sim.namespaces[0]
    ns.data[: 64 * 512] = RNG.integers(0, 256, 64 * 512, dtype=np.uint8)
    got = dev.read_sparse(0, 64, [(2, 3), (10, 1), (60, 4)])
    want = np.concatenate([ns.data[2 * 512 : 5 * 512], ns.data[10 * 512 : 11 * 512], ns.data[60 * 512 : 64 * 512]])
    assert np.array_equal(got, want)
    e = _last(rig, IoOpcode.READ)
    assert int(e["flags"]) == 0x40 and int(e["prp2"]) >> 56 == 0x30  # SGL1: a Last Segment
    assert int(e["prp2"]) & 0xFFFFFFFF == 6 * 16  # hole, data, hole, data, hole, data
    assert int(e["cdw12"]) == 63  # the whole window is one READ


@pytest.mark.parametrize("keep, why", [([], "empty"), ([(3, 2), (4, 1)], "overlap"), ([(5, 1), (1, 1)], "order"),
                                       ([(60, 8)], "past the window"), ([(0, 0)], "no blocks")])
def test_sparse_read_refusals(rig, dev, keep, why):
    mark = rig.mark()
    with pytest.raises(Refused) as ei:
        dev.read_sparse(0, 64, keep)
    assert ei.value.reason == "invalid-argument", why
    assert rig.unchanged_since(mark)


def test_sparse_read_is_one_command(rig, dev):
    with pytest.raises(Refused) as ei:
        dev.read_sparse(0, 257, [(0, 1)])  # MDTS 5: 256 blocks of 512 bytes
    assert ei.value.reason == "count-out-of-range"


def test_what_the_controller_does_not_offer_is_refused_first():
    rig = Rig([SimNamespace(1024)], sgls=0)
    with pytest.raises(Refused) as ei:
        BlockDevice(rig.p, 1, sgl=True)
    assert ei.value.reason == "sgl-unsupported" and "SGLS 0x0" in str(ei.value)
    # refused before any CREATE I/O CQ or SQ reached the controller
    assert not {opc for qid, opc, _ in rig.sim.commands if qid == 0} & {0x05, 0x01}
    rig = Rig([SimNamespace(1024)], sgls=0)
    dev = BlockDevice(rig.p, 1)
    buf = dev.alloc_buffer(4096)
    mark = rig.mark()
    with pytest.raises(Refused) as ei:
        dev.provider.submit("read", 1, [0], [1], buf, [0], sgl=True)  # one batch asking for SGLs
    assert ei.value.reason == "sgl-unsupported" and rig.unchanged_since(mark)
    rig = Rig([SimNamespace(1024)], sgls=1)  # SGLs, but no Bit Bucket
    dev = BlockDevice(rig.p, 1)
    mark = rig.mark()
    with pytest.raises(Refused) as ei:
        dev.read_sparse(0, 8, [(0, 1)])
    assert ei.value.reason == "bit-bucket-unsupported" and rig.unchanged_since(mark)


A = 0x1_4000_0000
X = 0x2_8000_0000


def test_noiommu_splits_a_transfer_across_physical_runs():
    # chunk 0 and 1 are not adjacent physically: a buffer across them is two Data Blocks
    rig = Rig([SimNamespace(8192)], physical=[A, X, A + HUGE_PAGE, A + 2 * HUGE_PAGE], mdts=0)
    dev = BlockDevice(rig.p, 1, queue_depth=16, sgl=True)
    ns = rig.sim.namespaces[0]
    pool = rig.ledger.pool
    assert pool is not None
    buf = dev.alloc_buffer(3 << 20)
    data = RNG.integers(0, 256, 3 << 20, dtype=np.uint8)
    buf.array[:] = data
    dev.write_from(0, 6144, buf)  # 3 MiB, one command: the shadow spans non-adjacent chunks
    assert np.array_equal(ns.data[: 3 << 20], data)
    ranges = rig.ledger.device_ranges(rig.ledger.iova(buf), 3 << 20)
    assert sum(n for _, n in ranges) == 3 << 20 and len(ranges) >= 2
    e = rig.sim.last_sqe[IoOpcode.WRITE]
    assert int(e["flags"]) == 0x40 and int(e["prp2"]) >> 56 == 0x30  # a Last Segment of Data Blocks
    assert int(e["prp2"]) & 0xFFFFFFFF == 16 * len(ranges)
    out = dev.alloc_buffer(3 << 20)
    dev.read_into(0, 6144, out)
    assert np.array_equal(out.array, data)
    assert rig.sim.dma.faults == []
