"""Choosing the IOMMU backend (nvmevfio.vfio.choose_backend) from what the kernel offers."""

import pytest

from nvmevfio import vfio
from nvmevfio.errors import VfioError

ADDR = "0000:00:10.0"


@pytest.fixture
def fake_kernel(tmp_path, monkeypatch):
    """A sysfs tree and /dev/vfio/devices in tmp_path, standing in for the kernel's."""
    sysfs = tmp_path / "sys"
    (sysfs / ADDR).mkdir(parents=True)
    devices = tmp_path / "devices"
    devices.mkdir()
    monkeypatch.setattr(vfio, "SYSFS_PCI", sysfs)
    monkeypatch.setattr(vfio, "DEV_VFIO_DEVICES", devices)
    monkeypatch.setattr(vfio, "IOMMUFD_PATH", str(tmp_path / "iommu"))
    monkeypatch.delenv("NVMEVFIO_BACKEND", raising=False)
    return tmp_path


def _offer_cdev(root):
    (root / "sys" / ADDR / "vfio-dev" / "vfio3").mkdir(parents=True)
    (root / "devices" / "vfio3").touch()
    (root / "iommu").touch()


def test_auto_is_type1_without_a_device_cdev(fake_kernel):
    assert vfio.device_cdev_of(ADDR) is None
    assert vfio.choose_backend(ADDR) == vfio.choose_backend(ADDR, "auto") == "type1"


def test_auto_is_iommufd_with_a_cdev_and_dev_iommu(fake_kernel):
    _offer_cdev(fake_kernel)
    assert vfio.device_cdev_of(ADDR) == str(fake_kernel / "devices" / "vfio3")
    assert vfio.choose_backend(ADDR) == "iommufd"
    assert vfio.choose_backend(ADDR, "type1") == "type1"  # forcing wins
    (fake_kernel / "iommu").unlink()  # no /dev/iommu (CONFIG_IOMMUFD off): type1
    assert vfio.choose_backend(ADDR) == "type1"


def test_environment_and_bad_names(fake_kernel, monkeypatch):
    _offer_cdev(fake_kernel)
    monkeypatch.setenv("NVMEVFIO_BACKEND", "type1")
    assert vfio.choose_backend(ADDR) == "type1"
    assert vfio.choose_backend(ADDR, "iommufd") == "iommufd"  # the argument over the environment
    with pytest.raises(VfioError) as ei:
        vfio.choose_backend(ADDR, "vfio-noiommu")
    assert ei.value.reason == "invalid-argument" and "type1, iommufd" in str(ei.value)


def test_forcing_iommufd_without_a_cdev_is_refused_by_name(fake_kernel):
    with pytest.raises(VfioError) as ei:
        vfio.open_function(ADDR, backend="iommufd")
    assert ei.value.reason == "no-iommufd" and ADDR in str(ei.value)
