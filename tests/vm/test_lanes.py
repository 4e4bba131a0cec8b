"""The DMA lane this guest runs (tests/test_guest_tier.py boots one guest per lane). Without an
IOMMU (VFIO no-IOMMU mode): opening needs the opt-in, the device is only ever given addresses
inside the broker's pinned pool (never a caller's own pages), and no physical address shows in
any output, refusal or log line."""

import logging
import os
import re

import numpy as np
import pytest
from click.testing import CliRunner

import nvmevfio
from nvmevfio import dma, noiommu_pool
from nvmevfio.cli import main
from nvmevfio.errors import NvmeVfioError, VfioError

PAGE = 4096

PAST_END_LBA = "99999999"  # an LBA past the namespace's end, for a refusal


def _physical_pages(array: np.ndarray) -> set[int]:
    """The physical address of every page of ``array`` (from /proc/self/pagemap; root)."""
    first = array.ctypes.data // PAGE
    last = (array.ctypes.data + array.size - 1) // PAGE
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        raw = f.read((last - first + 1) * 8)
    frames = noiommu_pool.frames_from_pagemap(np.frombuffer(raw, dtype="<u8"))
    assert frames.all(), "caller pages not present"
    return {int(x) * PAGE for x in frames}


def _at_physical(pool: noiommu_pool.PhysicalPool, address: int, size: int) -> np.ndarray:
    """The pool memory the device sees at physical ``address`` (inside one huge page)."""
    for index, frame in enumerate(pool.frames.tolist()):
        if frame <= address and address + size <= frame + dma.HUGE_PAGE:
            at = index * dma.HUGE_PAGE + address - frame
            return pool.array[at : at + size]
    raise AssertionError(f"{address:#x} is not in the pool")


def test_the_lane_is_the_one_booted(data_ctrl, lane):
    with nvmevfio.open(data_ctrl["address"], 1) as d:
        assert d.info.dma_lane == lane
        d.write_blocks(7, np.full(512, 0x3C, dtype=np.uint8))
        assert (d.read_blocks(7, 1) == 0x3C).all()


def test_noiommu_opt_in_and_what_the_device_is_given(data_ctrl, lane, monkeypatch):
    addr = data_ctrl["address"]
    if lane != "noiommu":  # an IOMMU is there: nothing to opt into, and the lane is not offered
        group = os.path.basename(os.readlink(f"/sys/bus/pci/devices/{addr}/iommu_group"))
        assert os.path.exists(f"/dev/vfio/{group}") and not os.path.exists(f"/dev/vfio/noiommu-{group}")
        return
    monkeypatch.delenv("NVMEVFIO_UNSAFE_NOIOMMU")
    with pytest.raises(VfioError) as ei:
        nvmevfio.open(addr, 1)
    assert ei.value.reason == "noiommu-not-allowed" and "--unsafe-noiommu" in str(ei.value)
    out = CliRunner().invoke(main, ["id-ctrl", addr])
    assert out.exit_code == 1 and "no-IOMMU" in out.output, out.output  # setup: opt in first (nvme-cli's 1)
    with nvmevfio.open(addr, 1, unsafe_noiommu=True) as d:
        broker = d.provider._broker
        pool = broker.ledger.pool
        runs = [(pa, length) for pa, _, length in pool.runs]
        buf = d.alloc_buffer(64 << 10)  # 16 pages: a PRP list
        data = np.random.default_rng(3).integers(0, 256, buf.size, dtype=np.uint8)
        buf.array[:] = data
        caller = _physical_pages(buf.array)
        d.write_from(20_000, 128, buf)
        d.submit_writes(np.arange(4) * 8 + 30_000, [8] * 4, buf, np.arange(4) * 4096)
        d.reap(4)
        buf.array[:] = 0
        d.read_into(20_000, 128, buf)
        assert np.array_equal(buf.array, data)  # bounced back into the caller's memory

        def owned(address: int) -> bool:
            return any(pa <= address < pa + length for pa, length in runs) and address // PAGE * PAGE not in caller

        sq = broker.io[0].ring.sq_ring
        used = sq[sq["opc"] != 0]
        assert len(used) >= 5
        listed = 0
        for e in used:
            assert owned(int(e["prp1"])), hex(int(e["prp1"]))
            if e["prp2"]:
                assert owned(int(e["prp2"]))
            if int(e["cdw12"] & 0xFFFF) + 1 > 16:  # more than two pages: PRP2 points at a PRP list
                entries = _at_physical(pool, int(e["prp2"]), PAGE).view("<u8")
                for entry in entries[entries != 0]:
                    assert owned(int(entry)), hex(int(entry))
                    listed += 1
        assert listed >= 14
    assert not caller & {pa for pa, _ in runs}


def test_no_physical_address_in_output_refusals_or_logs(data_ctrl, lane, monkeypatch, caplog):
    """Every pool a controller opens in this test is recorded; no number in the CLI's output
    (text and JSON), its errors, refusals or log lines falls inside one of them."""
    addr = data_ctrl["address"]
    pools: list[tuple[int, int]] = []
    made = noiommu_pool.PhysicalPool.pinned.__func__

    def recording(cls, size, **kw):
        pool = made(cls, size, **kw)
        pools.extend((pa, length) for pa, _, length in pool.runs)
        pools.append((noiommu_pool.POOL_BASE, pool.size))  # the ledger's pool addresses stay inside too
        return pool

    monkeypatch.setattr(noiommu_pool.PhysicalPool, "pinned", classmethod(recording))
    caplog.set_level(logging.DEBUG)
    texts = []
    runner = CliRunner()
    for args in (["list"], ["show-regs", addr], ["show-regs", addr, "-o", "json"], ["id-ctrl", addr, "-o", "json"],
                 ["read", addr, "-s", PAST_END_LBA], ["read", addr, "-s", "0", "--hexdump"],
                 ["write", addr, "-s", "0", "--data", "/nonexistent"],
                 ["perf", addr, "-w", "randread", "-q", "4", "-s", "4096", "-t", "1", "-o", "json"],
                 ["-v", "read", addr, "-s", "-1"]):
        res = runner.invoke(main, args)
        texts.append(res.output)
    with nvmevfio.open(addr, 1) as d:
        buf = d.alloc_buffer(8192)
        for call in (lambda: d.read_into(d.block_count, 1, buf), lambda: d.read_into(0, 1, buf, offset=2),
                     lambda: d.alloc_buffer(1 << 40)):
            with pytest.raises(NvmeVfioError) as ei:
                call()
            texts.append(f"{ei.value!r} {ei.value.__dict__}")
        texts.append(repr(buf) + str(d.info))
    texts.append(caplog.text)
    assert (lane == "noiommu") == bool(pools)
    for text in texts:
        # a byte count is a size, not an address, whatever range its value falls in ("0x3edb000
        # bytes free" once fell inside a pool's physical run): those named as sizes are left out
        text = re.sub(r"(0x[0-9a-fA-F]+|\d+) bytes|'(size|free|length|bytes)': (0x[0-9a-fA-F]+|\d+)", "", text)
        # the test's own LBA, echoed by the refusal, is no address (99999999 once fell inside a pool's run)
        text = re.sub(rf"\b{PAST_END_LBA}\b", "", text)
        for number in re.findall(r"0x[0-9a-fA-F]+|\b\d{7,}\b", text):
            value = int(number, 16) if number.startswith("0x") else int(number)
            if not number.startswith("0x") and value & (value - 1) == 0:
                continue  # a size (64 MiB, 2 MiB...) that happens to fall in a pool's range, not an address
            assert not any(pa <= value < pa + length for pa, length in pools), (number, text[:2000])


def test_no_physical_address_in_any_public_attribute_of_any_result(data_ctrl, lane, monkeypatch):
    """Every verb of the Provider and BlockDevice APIs, then the next session's bind() (which
    reads the queue bases the first one left in ASQ/ACQ): in the no-IOMMU lane no integer in
    what they return, walked down to each public attribute, dict entry and array element, names
    a page of any pool this test opened (physical addresses from /proc/self/pagemap). With an
    IOMMU, the registers keep their queue bases (IOVAs)."""
    from leakscan import LeakScan, api_results, pool_frames

    from nvmevfio.blockdev import BlockDevice
    from nvmevfio.provider import open_controller

    addr = data_ctrl["address"]
    pools: list[noiommu_pool.PhysicalPool] = []
    made = noiommu_pool.PhysicalPool.pinned.__func__

    def recording(cls, size, **kw):
        pools.append(made(cls, size, **kw))
        return pools[-1]

    monkeypatch.setattr(noiommu_pool.PhysicalPool, "pinned", classmethod(recording))
    session = open_controller(addr)
    results = {"bind": session.bind(), "enable": session.enable()}
    # the namespaces' sizes as the harness configured them (64, 32 and 8 MiB): a pool that lands at
    # physical 64 MiB holds that value without anything leaking (LeakScan's `sizes`)
    sizes = frozenset(ns["size"] for ns in data_ctrl["namespaces"])
    first = LeakScan(pool_frames(pools[0]), sizes) if pools else None
    with BlockDevice(session, 1, address=session.address) as dev:
        results.update(api_results(dev))
        if first is not None:  # while the buffers are live: their bytes are scanned too
            for name, value in results.items():
                first.scan(value, name)
            print(first.report(f"guest, first session while open, pool of {pools[0].size >> 20} MiB"))
            assert first.hits == []
            assert first.objects > 50 and first.fields > 100_000
    with open_controller(addr) as again:
        later = {"bind, next session": again.bind(), "registers, next session": again.registers()}
    assert (lane == "noiommu") == bool(pools)
    if lane != "noiommu":  # an IOMMU: the queue bases are IOVAs, shown as they are
        assert results["enable"].asq and results["enable"].acq and results["registers"].asq == results["enable"].asq
        assert later["bind, next session"].asq is not None
        return
    scan = LeakScan(np.concatenate([pool_frames(pool) for pool in pools]), sizes)  # the first session's pages too
    for name, value in {**results, **later}.items():
        scan.scan(value, name)
    print(scan.report(f"guest, both sessions after closing, {len(pools)} pools"))
    assert scan.hits == []
    assert all(r.asq is None and r.acq is None for r in {**results, **later}.values() if hasattr(r, "asq"))
