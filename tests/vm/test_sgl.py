"""SGLs against QEMU's NVMe model through real VFIO (NVMe 2.0 4.1.2): the same bytes written
and read back with SGL descriptors as with PRPs, on every data path (the synchronous hot path,
an unaligned offset, one 4 MiB command, batches packed and vectorized, a registered buffer's
C perf loop); a sparse read (Bit Bucket descriptors) is refused where SGLS does not offer them."""

import numpy as np
import pytest

import nvmevfio
from nvmevfio import perf
from nvmevfio.errors import Refused
from nvmevfio.nvme import sgl

RNG = np.random.default_rng(2412)
# iommufd maps DMA exactly as type1 does, so SGLs gain nothing there; the no-IOMMU lane authors a
# transfer across huge pages that are not physically adjacent as a Last Segment of Data Blocks
pytestmark = pytest.mark.lanes("type1", "noiommu", why="SGL authoring differs only where the device sees "
                               "physical addresses (no-IOMMU: one Data Block per physically contiguous run)")


@pytest.fixture(params=["poll", "irq"])
def pair(request, data_ctrl):
    """The data namespace opened once with SGLs; PRP reads of the same blocks go through a
    batch that asks for PRPs (``sgl=False``) on the same queues."""
    with nvmevfio.open(data_ctrl["address"], 1, irq=request.param == "irq", queue_depth=64, sgl=True) as d:
        yield d


def test_qemu_offers_sgls(pair):
    sgls = int(pair.provider.id_ctrl["sgls"])
    assert sgl.supported(sgls), hex(sgls)
    assert pair.info.data_descriptors == "sgl"


def _prp_read(dev, lba, blocks):
    out = dev.alloc_buffer(blocks * 512)
    dev.provider.submit("read", 1, [lba], [blocks], out, [0], sgl=False)
    assert dev.reap(1)["status"].tolist() == [0]
    data = out.array.copy()
    dev.free_buffer(out)
    return data


def _sgl_write_prp_read(dev, lba, data, offset=0):
    buf = dev.alloc_buffer(len(data) + offset + 4096)
    buf.array[offset : offset + len(data)] = data
    dev.write_from(lba, len(data) // 512, buf, offset)
    dev.free_buffer(buf)
    assert np.array_equal(_prp_read(dev, lba, len(data) // 512), data)


@pytest.mark.parametrize("size, offset", [(4096, 0), (512, 0x204), (8192, 0x600), (128 << 10, 0), (4 << 20, 0)])
def test_sgl_written_reads_back_identically_through_prps(pair, size, offset):
    _sgl_write_prp_read(pair, 4096, RNG.integers(0, 256, size, dtype=np.uint8), offset)


def test_prp_written_reads_back_identically_through_sgls(pair):
    data = RNG.integers(0, 256, 1 << 20, dtype=np.uint8)
    buf = pair.alloc_buffer(1 << 20)
    buf.array[:] = data
    pair.provider.submit("write", 1, [20000], [2048], buf, [0], sgl=False)
    assert pair.reap(1)["status"].tolist() == [0]
    out = pair.alloc_buffer(1 << 20)
    pair.read_into(20000, 2048, out)  # SGL
    assert np.array_equal(out.array, data)
    assert bytes(pair.read_blocks(20000 + 7, 3)) == data[7 * 512 : 10 * 512].tobytes()


@pytest.mark.parametrize("n", [4, 32])
def test_batches_with_sgls(pair, n):
    buf = pair.alloc_buffer(n * 8192)
    buf.array[:] = RNG.integers(0, 256, buf.size, dtype=np.uint8)
    lbas = 40000 + np.arange(n) * 16
    pair.submit_writes(lbas, np.full(n, 16), buf, np.arange(n) * 8192)
    done = pair.reap(n)
    assert len(done) == n and (done["status"] == 0).all()
    for i in (0, n - 1):
        assert np.array_equal(_prp_read(pair, int(lbas[i]), 16), buf.array[i * 8192 : (i + 1) * 8192])


def test_perf_loop_with_sgl_slots_writes_what_its_slots_hold(pair):
    r = perf.run(pair, workload="randwrite", queue_depth=16, count=2000, io_size=16384, lba_range=(60000, 62048))
    assert r.ios == 2000 and r.errors == 0
    r = perf.run(pair, workload="randread", queue_depth=32, count=2000, io_size=4096, lba_range=(60000, 62048))
    assert r.ios == 2000 and r.errors == 0


def test_sparse_read_where_bit_buckets_are_offered(pair):
    """QEMU 7.2 reports SGLS 0x1 (SGLs, no Bit Bucket descriptors): the sparse read is refused by
    name before the device sees anything. Where SGLS bit 16 is set, the kept blocks come back."""
    data = RNG.integers(0, 256, 256 * 512, dtype=np.uint8)
    _sgl_write_prp_read(pair, 70000, data)
    keep = [(0, 1), (5, 3), (100, 50), (255, 1)]
    if not sgl.bit_bucket_supported(int(pair.provider.id_ctrl["sgls"])):
        before = pair.provider.doorbell_counters()
        with pytest.raises(Refused) as ei:
            pair.read_sparse(70000, 256, keep)
        assert ei.value.reason == "bit-bucket-unsupported" and "bit 16" in str(ei.value)
        assert pair.provider.doorbell_counters() == before  # nothing reached the queue
        return
    got = pair.read_sparse(70000, 256, keep)
    assert np.array_equal(got, np.concatenate([data[a * 512 : (a + n) * 512] for a, n in keep]))
    with pytest.raises(Refused) as ei:
        pair.read_sparse(0, 8193, [(0, 1)])
    assert ei.value.reason == "count-out-of-range"
