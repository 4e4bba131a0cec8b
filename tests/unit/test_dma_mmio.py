"""IOVA allocator, DMA ledger (generations, scrub-before-free, in-flight), C MMIO accessors."""

import numpy as np
import pytest

from nvmevfio.dma import DmaLedger, IovaAllocator
from nvmevfio.errors import Refused, StaleHandle
from nvmevfio.mmio import BarMmio
from nvmevfio.sim.controller import SimDma

MiB = 1 << 20


def test_allocator_respects_reserved_hole_and_floor():
    # Two usable ranges around an MSI-style hole at 0xfee00000.
    a = IovaAllocator([(0, 0xFEDFFFFF), (0xFEF00000, 0xFFFFFFFF)], floor=0x1000)
    x = a.alloc(0x1000)
    assert x == 0x1000  # page 0 never handed out
    big = a.alloc(0xFEE00000 - 0x2000)  # fills the rest of the low range exactly
    assert big == 0x2000
    nxt = a.alloc(0x1000)
    assert nxt == 0xFEF00000  # skips the hole


def test_allocator_exhaustion_and_fragmentation():
    a = IovaAllocator([(0x100000, 0x100000 + 8 * 0x1000 - 1)], floor=0)
    blocks = [a.alloc(0x1000) for _ in range(8)]
    assert blocks == [0x100000 + i * 0x1000 for i in range(8)]
    with pytest.raises(Refused) as ei:
        a.alloc(0x1000)
    assert ei.value.reason == "iova-exhausted"
    for b in blocks[::2]:  # free every other page: 4 pages free, none adjacent
        a.free(b, 0x1000)
    assert a.free_bytes == 4 * 0x1000
    with pytest.raises(Refused):
        a.alloc(0x2000)  # fragmented: no two adjacent pages
    a.free(blocks[1], 0x1000)  # coalesces pages 0..2
    assert a.alloc(0x3000) == 0x100000
    with pytest.raises(ValueError, match="already free"):
        a.free(blocks[4], 0x1000)


def test_allocator_alignment():
    a = IovaAllocator([(0x1000, 0xFFFFFF)], floor=0)
    assert a.alloc(0x1000) == 0x1000
    assert a.alloc(0x1000, alignment=0x10000) == 0x10000
    assert (0x2000, 0x10000) in a.free_extents


def _ledger():
    sim = SimDma()
    return DmaLedger(sim, [(0, (1 << 40) - 1)]), sim


def test_ledger_maps_inside_ranges_and_generations():
    led = DmaLedger(SimDma(), [(0x10_0000, 0x1F_FFFF), (0x40_0000, 0x4F_FFFF)])
    bufs = [led.alloc(0x40000) for _ in range(6)]
    for b in bufs:
        iova = led.iova(b)
        assert 0x10_0000 <= iova <= 0x1F_FFFF - 0x40000 + 1 or 0x40_0000 <= iova <= 0x4F_FFFF - 0x40000 + 1
    led.free(bufs[0])
    again = led.alloc(0x1000)
    assert again.slot == bufs[0].slot and again.generation == bufs[0].generation + 1
    with pytest.raises(StaleHandle) as ei:
        _ = bufs[0].array
    assert ei.value.reason == "stale-handle"
    with pytest.raises(StaleHandle):
        led.iova(bufs[0])
    with pytest.raises(StaleHandle):
        led.free(bufs[0])


def test_scrub_before_unmap():
    led, sim = _ledger()
    b = led.alloc(8192)
    b.array[:] = 0xAB
    view = b.array  # a caller keeps a view past free
    seen = {}

    def spy(iova, size):
        seen["bytes"] = bytes(view[:16])  # what memory held when it was unmapped
        SimDma.unmap_dma(sim, iova, size)

    sim.unmap_dma = spy
    led.free(b)
    assert seen["bytes"] == b"\0" * 16
    assert not view.any()  # the stale view reads zeros, never old data, and does not crash
    assert sim.maps == {}


def test_in_flight_buffer_refused():
    led, _ = _ledger()
    b = led.alloc(4096)
    led.pin(b, 2)
    with pytest.raises(Refused) as ei:
        led.free(b)
    assert ei.value.reason == "buffer-in-flight"
    led.unpin(b.slot, b.generation, 1)
    with pytest.raises(Refused):
        led.free(b)  # one command still in flight
    led.unpin(b.slot, b.generation + 1, 1)  # a stale generation changes nothing
    with pytest.raises(Refused):
        led.free(b)
    led.unpin(b.slot, b.generation, 1)
    led.free(b)
    assert led.live_buffers() == 0


def test_ledger_close_frees_everything():
    led, sim = _ledger()
    for _ in range(5):
        led.alloc(12345)
    assert len(sim.maps) == 5
    led.close()
    assert sim.maps == {} and led.live_buffers() == 0 and led.iovas.free_bytes == led.iovas.total


def test_c_mmio_accessors_on_numpy_buffer():
    mem = np.zeros(64, dtype=np.uint8)
    bar = BarMmio(mem.ctypes.data, len(mem))
    bar.write32(8, 0xDEADBEEF)
    assert mem[8:12].tobytes() == bytes.fromhex("efbeadde")
    bar.write64(16, 0x0123456789ABCDEF)
    assert mem[16:24].view("<u8")[0] == 0x0123456789ABCDEF
    mem[32:36].view("<u4")[0] = 0xCAFEF00D
    assert bar.read32(32) == 0xCAFEF00D
    assert bar.read64(16) == 0x0123456789ABCDEF
    bar.doorbell(40, 7)
    assert mem[40:44].view("<u4")[0] == 7
    assert mem[:8].sum() == 0 and mem[12:16].sum() == 0  # exact width: neighbours untouched
    bar.wmb()
    bar.rmb()
    with pytest.raises(ValueError):
        bar.read32(62)
    with pytest.raises(ValueError):
        bar.write32(6, 1)


def test_ffi_version_and_errors():
    from nvmevfio import _ffi
    from nvmevfio._version import __version__
    from nvmevfio.errors import ShimError

    assert _ffi.ffi.string(_ffi.lib.nv_version()).decode() == __version__
    with pytest.raises(ShimError) as ei:
        _ffi.check(_ffi.lib.nv_open_rw(b"/nonexistent/vfio/42"), "open VFIO group", "/nonexistent/vfio/42")
    assert ei.value.errno == 2 and "ENOENT" in str(ei.value) and "/nonexistent/vfio/42" in str(ei.value)
    assert _ffi.const("VFIO_TYPE1v2_IOMMU") == 3


def test_private_memory_comes_from_the_shim():
    led, sim = _ledger()
    b = led.alloc(10000, owner="broker:sq")
    a = b.array
    assert len(a) == 10000 and a.ctypes.data % 4096 == 0
    a[:] = 5
    iova = led.iova(b)
    vaddr, size, _ = sim.maps[iova]
    assert vaddr == a.ctypes.data and size == 12288
    led.free(b)
    assert sim.maps == {}
