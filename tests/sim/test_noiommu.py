"""The no-IOMMU lane on the simulator: the device sees only the broker's pool (at made-up
physical addresses), caller buffers are bounced through it on every data path, bounce memory
is scrubbed, and no physical address shows in any refusal."""

import re

import numpy as np
import pytest

from nvmevfio import perf
from nvmevfio.blockdev import BlockDevice
from nvmevfio.broker import Broker
from nvmevfio.dma import HUGE_PAGE
from nvmevfio.errors import NvmeVfioError, Refused, StaleHandle
from nvmevfio.nvme import regs
from nvmevfio.provider import Provider
from nvmevfio.sim.controller import SimNamespace
from nvmevfio.sim.rig import Rig

A = 0x1_4000_0000
X = 0x2_8000_0000
# 12 chunks (24 MiB): a run of 6, a lone chunk elsewhere, then a run that starts where the
# first one ends (the allocator must never join them), then 4 more.
PHYSICAL = [A + i * HUGE_PAGE for i in range(6)] + [X] + [A + (6 + i) * HUGE_PAGE for i in range(5)]


@pytest.fixture
def rig():
    return Rig([SimNamespace(8192), SimNamespace(1024, 4096)], physical=PHYSICAL, mdts=5)


@pytest.fixture
def dev(rig):
    return BlockDevice(rig.p, 1, queue_depth=64)


def _in_pool(rig, address):
    return any(pa <= address < pa + length for pa, _, length in rig.ledger.pool.runs)


def _check_device_saw_only_the_pool(rig):
    assert rig.sim.dma.faults == []  # the device touched nothing outside the pool
    sq = rig.broker.io[0].ring.sq_ring
    used = sq[sq["opc"] != 0]
    assert len(used) and all(_in_pool(rig, int(a)) for a in used["prp1"])
    assert all(_in_pool(rig, int(a)) for a in used["prp2"] if a)


def test_every_data_path_bounces_and_the_device_sees_only_the_pool(rig, dev):
    assert rig.ledger.bounce and rig.broker._hot == {}
    ns = rig.sim.namespaces[0]
    rng = np.random.default_rng(7)
    buf = dev.alloc_buffer(64 << 10)  # 16 pages: PRP lists
    data = rng.integers(0, 256, 64 << 10, dtype=np.uint8)
    buf.array[:] = data
    # one command (no PRP list), then one split by MDTS
    dev.write_from(10, 8, buf)
    assert np.array_equal(ns.data[10 * 512 : 18 * 512], data[: 8 * 512])
    dev.write_from(100, 128, buf)
    assert np.array_equal(ns.data[100 * 512 : 228 * 512], data)
    # the caller's memory is its own: scribbling on it after a write changes nothing on the device
    buf.array[:] = 0
    assert np.array_equal(ns.data[100 * 512 : 228 * 512], data)
    dev.read_into(100, 128, buf)
    assert np.array_equal(buf.array, data)
    buf.array[:] = 0
    dev.read_into(10, 8, buf, offset=4096)
    assert np.array_equal(buf.array[4096 : 4096 + 8 * 512], data[: 8 * 512]) and not buf.array[:4096].any()
    # batches: small (packed one by one) and vectorized; reads land in the caller's memory when reaped
    for n in (3, 40):
        lbas = np.arange(n, dtype=np.int64) * 16 + 2000
        wbuf = dev.alloc_buffer(n * 1024)
        wbuf.array[:] = rng.integers(0, 256, n * 1024, dtype=np.uint8)
        dev.submit_writes(lbas, np.full(n, 2), wbuf, np.arange(n) * 1024)
        assert len(dev.reap(n)) == n
        rbuf = dev.alloc_buffer(n * 1024)
        tags = dev.submit_reads(lbas, np.full(n, 2), rbuf, np.arange(n) * 1024)
        assert not rbuf.array.any()  # not before the completions are reaped
        done = dev.reap(n)
        assert sorted(done["tag"].tolist()) == sorted(tags.tolist()) and not done["status"].any()
        assert np.array_equal(rbuf.array, wbuf.array)
    assert rig.broker._bounce_reads[1] == {}
    # a registered buffer's slots
    reg_buf = dev.alloc_buffer(4 * 8192)
    reg = dev.register_buffer(reg_buf, 8192)
    reg_buf.array[:8192] = 0xA5
    dev.submit_writes([3000], [16], reg, [0])
    dev.reap(1)
    assert (ns.data[3000 * 512 : 3016 * 512] == 0xA5).all()
    dev.submit_reads([100], [16], reg, [8192])
    dev.reap(1)
    assert np.array_equal(reg_buf.array[8192 : 16384], data[:8192])
    # the synchronous staging path
    dev.write_blocks(5000, data[:4096])
    assert np.array_equal(dev.read_blocks(5000, 8), data[:4096])
    _check_device_saw_only_the_pool(rig)


def test_perf_loop_and_verify_through_the_bounce_lane(rig, dev):
    r = perf.run(dev, workload="randwrite", queue_depth=8, count=200, io_size=4096, lba_range=(0, 4096))
    assert r.ios == 200 and r.errors == 0
    r = perf.run(dev, workload="randrw", queue_depth=8, count=300, io_size=4096, lba_range=(0, 4096), verify=True)
    assert r.errors == 0 and r.verified_blocks > 0
    _check_device_saw_only_the_pool(rig)


def test_bounce_memory_is_scrubbed_before_reuse(rig, dev):
    buf = dev.alloc_buffer(8192)
    buf.array[:] = 0x5A
    dev.write_from(0, 16, buf)
    shadow = rig.ledger._slots[buf.slot].shadow.array  # the device-visible copy
    assert (shadow == 0x5A).all()
    dev.free_buffer(buf)
    assert not shadow.any()
    with pytest.raises(StaleHandle):
        dev.read_into(0, 16, buf)


def test_no_physical_address_in_any_refusal(rig, dev):
    buf = dev.alloc_buffer(8192)
    texts = []
    for call in (lambda: dev.read_into(8190, 16, buf),           # past the namespace end
                 lambda: dev.read_into(0, 32, buf),              # past the buffer's end
                 lambda: dev.read_into(0, 1, buf, offset=2),     # PRP1 not dword aligned
                 lambda: dev.alloc_buffer(64 << 20),             # more than the pool holds
                 lambda: dev.submit_reads([0], [1], buf, [8190])):
        with pytest.raises(NvmeVfioError) as ei:
            call()
        texts.append(f"{ei.value} {ei.value.__dict__}")
    dev.free_buffer(buf)
    with pytest.raises(Refused) as ei:
        dev.read_into(0, 1, buf)
    texts.append(f"{ei.value} {ei.value.__dict__}")
    texts.append(str(dev.info))
    for text in texts:
        for number in re.findall(r"0x[0-9a-fA-F]+|\b\d{6,}\b", text):
            assert not _in_pool(rig, int(number, 0)), (number, text)


def _device_addresses(rig, qp):
    """Every device address the queue's SQEs carry, list entries and chain pointers included."""
    sq = qp.ring.sq_ring
    used = sq[sq["opc"] != 0]
    out = [int(a) for a in used["prp1"]] + [int(a) for a in used["prp2"] if a]
    if qp.prp_array is not None:
        out += [int(a) for a in qp.prp_array if a]
    return out


def test_a_scattered_pool_serves_big_buffers_page_by_page():
    """No two huge pages physically adjacent, and in falling order: a buffer of 8 MiB still
    works, because every PRP entry names one memory page by its own physical address."""
    scattered = [A + 2 * (11 - i) * HUGE_PAGE for i in range(12)]
    rig = Rig([SimNamespace(32768)], physical=scattered, mdts=0)  # no MDTS: 4 MiB commands
    dev = BlockDevice(rig.p, 1, queue_depth=16)
    assert dev.info.max_transfer_bytes == 4 << 20  # not capped at a huge page
    data = np.random.default_rng(5).integers(0, 256, 8 << 20, dtype=np.uint8)
    buf = dev.alloc_buffer(8 << 20)
    buf.array[:] = data
    dev.write_from(0, (8 << 20) // 512, buf)
    assert np.array_equal(rig.sim.namespaces[0].data[: 8 << 20], data)
    buf.array[:] = 0
    dev.read_into(0, (8 << 20) // 512, buf)
    assert np.array_equal(buf.array, data)
    # the whole 8 MiB through the staging buffer too
    assert np.array_equal(dev.read_blocks(0, (8 << 20) // 512), data)
    assert rig.sim.dma.faults == []
    addresses = _device_addresses(rig, rig.broker.io[0])
    assert addresses and all(_in_pool(rig, a) for a in addresses)


def test_queues_never_span_huge_pages_that_are_not_adjacent():
    scattered = [A + 2 * i * HUGE_PAGE for i in range(12)]
    rig = Rig([SimNamespace(8192)], physical=scattered, mdts=5)
    dev = BlockDevice(rig.p, 1, queue_depth=16)
    ledger = rig.ledger
    for _ in range(40):  # 64 KiB queues, placed among other allocations: each inside one huge page
        ledger.alloc(12288, owner="caller")
        q = ledger.alloc(64 << 10, owner="broker:sq", contiguous=True)
        assert ledger.pool.contiguous(ledger.iova(q), 64 << 10)
    with pytest.raises(Refused) as ei:  # a queue over 2 MiB needs adjacent huge pages: there are none
        ledger.alloc(4 << 20, owner="broker:sq", contiguous=True)
    assert ei.value.reason == "noiommu-contiguity"
    adjacent = Rig([SimNamespace(8192)], physical=PHYSICAL, mdts=5)  # a run of 6 at the start
    q = adjacent.ledger.alloc(4 << 20, owner="broker:sq", contiguous=True)
    assert adjacent.ledger.pool.contiguous(adjacent.ledger.iova(q), 4 << 20)
    dev.write_blocks(0, np.ones(4096, dtype=np.uint8))  # and the device still works
    assert rig.sim.dma.faults == []


def test_no_physical_address_in_any_public_attribute_of_any_result():
    """Every verb of the Provider and BlockDevice APIs in the no-IOMMU lane, then a second
    session's bind() (which reads what the first one left in ASQ/ACQ): no integer anywhere in
    what they return, walked down to each public attribute, dict entry and array element, names
    a page of the pool by its physical address. The registers' queue bases are withheld."""
    from leakscan import LeakScan, api_results, pool_frames

    rig = Rig([SimNamespace(8192), SimNamespace(1024, 4096)], physical=PHYSICAL, mdts=5)
    frames = pool_frames(rig.ledger.pool)
    results = {"bind": rig.p.bind(), "enable": rig.p.enable()}
    dev = BlockDevice(rig.p, 1, queue_depth=64)
    results.update(api_results(dev))
    # the device was given physical addresses: the test scans for the right thing
    asq = rig.sim.mmio.read64(regs.ASQ)
    assert asq == rig.ledger.device_address(rig.ledger.iova(rig.broker.admin.buffers[0]))
    assert asq >> 12 in frames and _in_pool(rig, asq)
    # the next session over the same controller: bind() reads the queue bases the first one left
    results["bind, next session"] = Provider(Broker(rig.sim.mmio, rig.ledger)).bind()
    scan = LeakScan(frames)
    for name, value in results.items():
        scan.scan(value, name)
    print(scan.report("simulator, no-IOMMU lane"))
    assert scan.hits == []
    assert scan.objects > 50 and scan.fields > 100_000
    for name in ("bind", "enable", "registers", "bind, next session"):
        assert results[name].asq is None and results[name].acq is None, name
    assert results["registers"].aqa == rig.sim.mmio.read32(regs.AQA) != 0  # queue sizes, not addresses: shown
    assert not hasattr(results["register_buffer"], "prps")
    assert rig.sim.dma.faults == []


def test_with_an_iommu_the_registers_show_the_admin_queue_bases():
    """The other lanes keep ASQ/ACQ: IOVAs, which name no host memory."""
    rig = Rig()
    assert rig.p.bind().asq == 0  # a fresh controller
    snap = rig.p.enable()
    sq, cq = (rig.ledger.iova(b) for b in rig.broker.admin.buffers[:2])
    assert (snap.asq, snap.acq) == (sq, cq) == (rig.sim.mmio.read64(regs.ASQ), rig.sim.mmio.read64(regs.ACQ))
    assert rig.p.registers() == snap
    assert Provider(Broker(rig.sim.mmio, rig.ledger)).bind().asq == sq  # what this session left


def test_workload_engine_through_the_bounce_lane(rig, dev, tmp_path):
    """The engine's C loop stamps and checks the slots' bounce pages (the device's view) and points
    Dataset Management at its range there; its map then checks out from the device's data."""
    from nvmevfio import workload_engine as wl
    from nvmevfio.workload_map import verify_only

    path = str(tmp_path / "bounce.map")
    r = wl.workload(dev, mix="read:40,write:40,trim:10,flush:5,wz:5", bs="4k:50,16k:50", queue_depth=8, count=600,
                    lba_range=(0, 4096), verify=True, verify_map=path)
    assert r.errors == 0 and r.mismatch_count == 0 and r.verified_blocks > 0 and r.ops["trim"]["ios"] > 0
    assert verify_only(dev, path)["mismatch_count"] == 0
    assert rig.sim.dma.faults == []  # the device touched nothing outside the pool
    sq = rig.broker.io[0].ring.sq_ring
    data = sq[(sq["opc"] == 0x01) | (sq["opc"] == 0x02) | (sq["opc"] == 0x09)]  # write, read, Dataset Management
    assert len(data) and all(_in_pool(rig, int(a)) for a in data["prp1"])
