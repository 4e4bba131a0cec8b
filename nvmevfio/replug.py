"""After a surprise removal: wait for the function to come back, then hand it to vfio-pci.

A removed controller (hot-unplug, ``echo 1 > remove``) leaves its open handles failing with
``device-gone`` for good (broker state GONE). When the device comes back (re-plugged, a PCI
rescan), the kernel announces the function with a udev ``add`` event and binds its own nvme
driver; :func:`wait_for_device` waits for that (a kernel uevent monitor through pyudev, with the
sysfs entry checked as well, so a device already back or an event missed does not wait), binds
the function to vfio-pci as ``nvmevfio bind`` does, and returns it. Reopen it then
(``nvmevfio.open``): a new broker, queues and ledger; what was flushed before the removal is on
the medium.
"""

from __future__ import annotations

import time

import pyudev

from nvmevfio import pci
from nvmevfio.errors import PciError


def wait_for_device(address: str, timeout: float = 30.0, *, bind: bool = True,
                    force: bool = False) -> pci.NvmeFunction:
    """Wait up to ``timeout`` seconds for the PCI function at ``address`` to exist (again), then
    (``bind``) move it to vfio-pci. Raises ``PciError`` (reason ``device-absent``) when it did not
    come back in time; a function in use by the kernel's driver (mounted) is refused as ``bind``
    refuses it, unless ``force``."""
    address = pci.normalize_address(address)
    sysfs = pci.SYSFS / "bus/pci/devices" / address
    monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")  # no udevd needed
    monitor.filter_by("pci")
    monitor.start()
    deadline = time.monotonic() + timeout
    while not sysfs.exists():  # (the monitor's socket closes with the object)
        left = deadline - time.monotonic()
        if left <= 0:
            raise PciError(f"{address} did not come back within {timeout:g} s", reason="device-absent",
                           address=address)
        dev = monitor.poll(timeout=min(left, 0.5))
        if dev is not None and dev.action == "add" and dev.sys_name == address:
            break
    # the add event comes before the kernel's driver probed the function: bind() unbinds it first
    return _bind_when_ready(address, deadline, force) if bind else pci.get_function(address)


def _bind_when_ready(address: str, deadline: float, force: bool) -> pci.NvmeFunction:
    """``pci.bind``, retried while the function's sysfs files are still being made (its class or
    driver link not there yet, or the kernel's driver still probing)."""
    while True:
        try:
            return pci.bind(address, force=force)
        except PciError as exc:
            if exc.reason not in ("no-such-function", "not-nvme", "bind-failed", "sysfs-write") or \
                    time.monotonic() > deadline:
                raise
            time.sleep(0.1)
