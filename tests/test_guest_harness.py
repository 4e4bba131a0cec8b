"""tools/guest.py: argument parsing, module ordering, and that a guest which never reaches
its payload is retried once and then fails loudly (CI must fail, never skip)."""

import guest
import pytest


def test_parse_size_and_controllers():
    assert guest.parse_size("64M") == 64 << 20 and guest.parse_size("1G") == 1 << 30 and guest.parse_size("512") == 512
    with pytest.raises(ValueError):
        guest.parse_size("lots")
    c = guest.Controller.parse("ns=64M,ns=32M:4096,ns=8M:512:8@/var/tmp/x.img;mdts=0,max_ioqpairs=4")
    assert [(n.size, n.block_size, n.metadata, n.image) for n in c.namespaces] == [
        (64 << 20, 512, 0, None), (32 << 20, 4096, 0, None), (8 << 20, 512, 8, "/var/tmp/x.img")]
    assert c.options == {"mdts": "0", "max_ioqpairs": "4"}
    assert len(guest.Controller.parse("mdts=5").namespaces) == 1  # a default namespace
    n = guest.Namespace.parse("8M:512:8+pi=1+mset=1@/var/tmp/p.img")  # nvme-ns properties beyond ms=
    assert (n.size, n.block_size, n.metadata, n.image, n.options) == (8 << 20, 512, 8, "/var/tmp/p.img",
                                                                      {"pi": "1", "mset": "1"})
    assert guest.Namespace.parse("8M").options == {}
    # nvme-ns properties after the geometry, each after a '+', before an image
    z = guest.Controller.parse("ns=64M:4096+zoned=true+zoned.zone_size=4M@/var/tmp/z.img,ns=8M;zoned.zasl=5")
    assert [(n.size, n.block_size, n.metadata, n.image, n.options) for n in z.namespaces] == [
        (64 << 20, 4096, 0, "/var/tmp/z.img", {"zoned": "true", "zoned.zone_size": "4M"}), (8 << 20, 512, 0, None, {})]
    assert z.options == {"zoned.zasl": "5"}


def test_null_co_backing_and_drive_sources(tmp_path):
    """A namespace backed by QEMU's null-co driver (no image: the device model without a block
    backend), the image file's options, blkdebug's, and the extra QEMU arguments a run passes."""
    n = guest.Controller.parse("ns=1G@null-co,ns=8M@./null-co").namespaces
    assert (n[0].size, n[0].image, n[0].null_backed, n[1].null_backed) == (1 << 30, "null-co", True, False)
    assert n[0].drive_source(tmp_path / "x.img") == "driver=null-co,size=1073741824,read-zeroes=on"
    assert guest.Namespace().drive_source(tmp_path / "x.img") == f"file={tmp_path}/x.img,file.locking=off,format=raw"
    assert guest.Namespace(blkdebug="/c.cfg").drive_source(tmp_path / "x.img") == \
        f"file=blkdebug:/c.cfg:{tmp_path}/x.img,format=raw"


def test_module_closure_orders_dependencies_first():
    _, moddir, _ = guest.kernel_paths()
    order = guest.module_closure(moddir, ["vfio-pci"])
    names = [p.rsplit("/", 1)[-1].split(".ko")[0].replace("-", "_") for p in order]
    assert names[-1] == "vfio_pci" and names.index("vfio") < names.index("vfio_pci_core") < names.index("vfio_pci")
    with pytest.raises(guest.GuestError):
        guest.module_closure(moddir, ["no_such_module"])


def test_guest_that_never_reaches_the_payload_raises(tmp_path):
    # rdinit=/nonexistent: the kernel panics before our init runs; panic=-1 powers off. The custom
    # kernel: it gets there in half the time of Debian's (the retry logic is the same for both).
    with pytest.raises(guest.GuestError, match="never reached the payload in 2 attempts"):
        guest.run(["true"], io_dir=tmp_path, append="rdinit=/nonexistent", boot_timeout=60, timeout=120,
                  kernel="custom")
    assert (tmp_path / "console.log").exists()


def test_payload_exit_status_and_output(tmp_path):
    res = guest.run(["sh", "-c", "echo hello from the guest; ls /dev/vfio; exit 7"], io_dir=tmp_path)
    assert res.returncode == 7 and "hello from the guest" in res.output and res.attempts == 1
    assert "vfio" in res.output  # the controller was bound to vfio-pci before the payload


def test_kernel_driver_mode(tmp_path):
    res = guest.run(["sh", "-c", "readlink /sys/bus/pci/devices/0000:00:10.0/driver; ls /dev/nvme0n1"],
                    io_dir=tmp_path, kernel_driver=True, nvme_params="poll_queues=1")
    assert res.returncode == 0, res.output
    assert res.output.split() == ["../../../bus/pci/drivers/nvme", "/dev/nvme0n1"]


def test_custom_kernel_has_the_lanes_options_and_builtins_need_no_loading():
    kernel, moddir, version = guest.kernel_paths("custom")
    assert version.endswith("-nvmevfio") and kernel.exists()
    config = (kernel.parent / f"config-{version}").read_text().splitlines()
    for option in ("CONFIG_VFIO_NOIOMMU=y", "CONFIG_IOMMUFD=y", "CONFIG_VFIO_DEVICE_CDEV=y", "CONFIG_INTEL_IOMMU=y",
                   "CONFIG_BLK_DEV_NVME=m", "CONFIG_BLK_DEV_NBD=y", "CONFIG_HUGETLBFS=y"):
        assert option in config
    # vfio-pci and 9p are built in: nothing to insmod; nvme is a module with its dependency first
    assert guest.module_closure(moddir, ["vfio-pci", "9p", "nbd"]) == []
    names = [p.rsplit("/", 1)[-1].split(".ko")[0] for p in guest.module_closure(moddir, ["nvme"])]
    assert names == ["nvme-core", "nvme"]


def test_custom_kernel_guest_offers_iommufd_and_device_cdevs(tmp_path):
    res = guest.run(["sh", "-c", "uname -r; ls /dev/iommu /dev/vfio/devices; "
                                 "ls /sys/bus/pci/devices/0000:00:10.0/vfio-dev"],
                    io_dir=tmp_path, kernel="custom")
    assert res.returncode == 0, res.output
    release, iommu, _, cdev, vfio_dev = res.output.split()
    assert release.endswith("-nvmevfio") and iommu == "/dev/iommu" and cdev == vfio_dev == "vfio0"


def test_noiommu_lane_guest_has_a_noiommu_group_and_huge_pages(tmp_path):
    opts = guest.lane_options("noiommu")
    assert opts["env"]["NVMEVFIO_VM_LANE"] == "noiommu" and opts["iommu"] is False
    res = guest.run(["sh", "-c", "ls /dev/vfio; cat /proc/sys/vm/nr_hugepages; echo $NVMEVFIO_UNSAFE_NOIOMMU"],
                    io_dir=tmp_path, **opts)
    assert res.returncode == 0, res.output
    assert res.output.split() == ["noiommu-0", "vfio", "768", "1"]
    with pytest.raises(guest.GuestError, match="unknown DMA lane"):
        guest.lane_options("sva")
