"""wait_for_device's refusal: a function that does not come back within the time is a PciError
with reason device-absent, after that time and not much later (the udev monitor polled in steps)."""

import time

import pytest

from nvmevfio import pci
from nvmevfio.errors import PciError
from nvmevfio.replug import wait_for_device


def test_a_function_that_does_not_come_back(tmp_path, monkeypatch):
    monkeypatch.setattr(pci, "SYSFS", tmp_path)  # an empty sysfs: no function there
    t0 = time.monotonic()
    with pytest.raises(PciError) as ei:
        wait_for_device("00:1f.7", 0.3)
    took = time.monotonic() - t0
    assert ei.value.reason == "device-absent" and "0000:00:1f.7 did not come back within 0.3 s" in str(ei.value)
    assert 0.3 <= took < 2.0
    with pytest.raises(PciError) as ei:
        wait_for_device("not-an-address", 1)
    assert ei.value.reason == "bad-address"
