"""Foundation in the guest: VFIO group/container/device, BAR0, DMA mapping in the
IOMMU's ranges, binding between nvme and vfio-pci, and the in-use refusal."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import kernel_blockdev

import nvmevfio
from nvmevfio import dma, pci, vfio
from nvmevfio.cli import main
from nvmevfio.errors import DeviceInUse, ShimError, VfioError
from nvmevfio.nvme import regs


def test_list_functions(data_ctrl, small_ctrl):
    fns = {f.address: f for f in pci.list_functions()}
    for c in (data_ctrl, small_ctrl):
        f = fns[c["address"]]
        assert f.vendor_id == 0x1B36 and f.device_id == 0x0010
        assert f.driver == "vfio-pci" and f.iommu_group is not None
        assert f.model == "QEMU NVM Express Controller" and f.vendor == "Red Hat, Inc."


def test_open_function_reads_cap_and_vs(data_ctrl, lane):
    with vfio.open_function(data_ctrl["address"]) as fn:
        assert fn.backend == lane  # the automatic choice: iommufd exactly when the kernel offers a cdev
        if lane == "type1":
            assert fn.group.viable
            assert fn.mapper.iommu_type == 3  # VFIO_TYPE1v2_IOMMU
        elif lane == "noiommu":
            assert fn.group.path.startswith("/dev/vfio/noiommu-") and fn.mapper.noiommu and fn.iommu.ranges == ()
        else:
            assert fn.group is None and isinstance(fn.mapper, vfio.Iommufd) and fn.mapper.ioas_id > 0
        assert fn.bar0.size >= 0x2000
        assert fn.pci_command & (vfio.PCI_COMMAND_MEMORY | vfio.PCI_COMMAND_MASTER) == 0x6
        assert fn.device.config_read(0, 2) == 0x1B36
        cap = fn.bar0.read32(regs.CAP) | fn.bar0.read32(regs.CAP + 4) << 32
        assert regs.get(cap, regs.CAP_.MQES) == 2047 and regs.get(cap, regs.CAP_.DSTRD) == 0
        assert regs.version_string(fn.bar0.read32(regs.VS)).startswith("1.4")
        assert fn.device.irq(vfio.const("VFIO_PCI_MSIX_IRQ_INDEX")).count >= 2


def test_dma_map_inside_reported_ranges(data_ctrl, lane):
    with vfio.open_function(data_ctrl["address"]) as fn:
        if lane == "noiommu":  # no IOMMU to map into: the kernel refuses, the ledger never asks
            with pytest.raises(ShimError):
                fn.mapper.map_dma(0x7F0000000000, 1 << 20, 4096)
            return
        ranges = fn.iommu.ranges
        assert ranges and fn.iommu.iova_pgsizes & 0x1000
        # the MSI window 0xfee00000..0xfeefffff is a reserved hole on x86
        assert not any(s <= 0xFEE00000 <= e for s, e in ranges)
        led = dma.DmaLedger(fn.mapper, list(ranges))
        bufs = [led.alloc(n) for n in (4096, 65536, 3 << 20)]
        for b in bufs:
            iova = led.iova(b)
            assert any(s <= iova and iova + b.size - 1 <= e for s, e in ranges)
        led.close()
        assert led.live_buffers() == 0
        # unmapped for real: mapping the same IOVA again succeeds only because it was freed
        b = led.alloc(4096)
        led.free(b)


LANE_LBA = 126_000  # test_windows, which runs last, takes in the whole namespace


def test_both_backends_or_a_named_refusal(data_ctrl, lane):
    """On a kernel with device cdevs both backends move data; on one without, forcing iommufd is
    refused with its reason before anything is opened."""
    addr = data_ctrl["address"]
    if lane in ("type1", "noiommu"):
        with pytest.raises(VfioError) as ei:
            vfio.open_function(addr, backend="iommufd")
        assert ei.value.reason == "no-iommufd" and "CONFIG_VFIO_DEVICE_CDEV" in str(ei.value)
        return
    pattern = np.arange(8 * 512, dtype=np.uint32).view(np.uint8)[: 8 * 512] ^ 0x5A
    for backend in ("type1", "iommufd"):
        with nvmevfio.open(addr, 1, backend=backend) as d:
            assert d.info.dma_lane == backend
            d.write_blocks(LANE_LBA, pattern)
            assert np.array_equal(d.read_blocks(LANE_LBA, 8), pattern)
    out = CliRunner().invoke(main, ["--backend", "type1", "show-regs", addr])
    assert out.exit_code == 0 and "iommu: type1, page sizes" in out.output, out.output
    out = CliRunner().invoke(main, ["show-regs", addr, "-o", "json"])  # exit 1 after the JSON, as nvme-cli 2.3
    assert out.exit_code == 1 and json.loads(out.output)["iommu_backend"] == "iommufd", out.output
    listed = json.loads(CliRunner().invoke(main, ["list", "-o", "json"]).output)["Functions"]
    assert {f["address"]: f["IommuBackend"] for f in listed}[addr] == "iommufd"


def _sh(cmd: str) -> str:
    return subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True).stdout


def test_bind_unbind_roundtrip_and_in_use_refusal(small_ctrl):
    addr = small_ctrl["address"]
    dev = kernel_blockdev(addr)
    assert pci.get_function(addr).driver == "nvme" and Path(dev).exists()
    fn = pci.bind(addr)
    assert fn.driver == "vfio-pci" and not Path(dev).exists()
    assert Path(vfio.iommu_group_of(addr)).exists()  # /dev/vfio/N, or noiommu-N without an IOMMU
    # mounted filesystem under the kernel driver: bind is refused, naming the mount
    dev = kernel_blockdev(addr)
    mnt = Path("/tmp/nvmevfio-mnt")
    mnt.mkdir(exist_ok=True)
    _sh(f"mkfs.ext4 -q -F {dev} && mount {dev} {mnt}")
    try:
        with pytest.raises(DeviceInUse) as ei:
            pci.bind(addr)
        assert str(mnt) in str(ei.value) and dev in str(ei.value)
        assert pci.get_function(addr).driver == "nvme"  # nothing moved
        listed = {f.address: f for f in pci.list_functions()}[addr]
        assert listed.namespaces[0].mounts == [str(mnt)]
        r = CliRunner().invoke(main, ["list"])
        assert f"{dev} nsid 1" in r.output and f"mounted on {mnt}" in r.output
        r = CliRunner().invoke(main, ["bind", addr])
        assert r.exit_code == 3 and "--force" in r.stderr and str(mnt) in r.stderr
    finally:
        _sh(f"umount {mnt}")
    fn = pci.bind(addr)
    assert fn.driver == "vfio-pci"
