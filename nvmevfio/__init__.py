"""nvmevfio: a userspace NVMe driver in Python over VFIO.

    import nvmevfio
    with nvmevfio.open("0000:00:04.0", nsid=1) as dev:
        dev.write_blocks(0, b"\\x00" * dev.block_size)
        data = dev.read_blocks(0, 1)
"""

from nvmevfio._version import __version__
from nvmevfio.errors import (
    CommandError,
    CommandTimeout,
    ControllerFatal,
    ControllerTimeout,
    DeviceInUse,
    NvmeVfioError,
    Refused,
    StaleHandle,
)
from nvmevfio.service import DEFAULT_SOCKET


def open(address: str, nsid: int = 1, **kwargs):  # type: ignore[no-untyped-def]
    """Open a namespace for block access; see :func:`nvmevfio.blockdev.open`."""
    from nvmevfio.blockdev import open as _open

    return _open(address, nsid, **kwargs)


def connect(socket_path: str = DEFAULT_SOCKET, nsid: int = 1, **kwargs):  # type: ignore[no-untyped-def]
    """Block access through ``nvmevfio serve`` (no root needed); see :func:`nvmevfio.service.client.connect`."""
    from nvmevfio.service.client import connect as _connect

    return _connect(socket_path, nsid, **kwargs)


def workload(dev, **kwargs):  # type: ignore[no-untyped-def]
    """A mixed workload with verification on an open device; see :func:`nvmevfio.workload_engine.workload`."""
    from nvmevfio.workload_engine import workload as _workload

    return _workload(dev, **kwargs)
def wait_for_device(address: str, timeout: float = 30.0, **kwargs):  # type: ignore[no-untyped-def]
    """After a surprise removal: wait for the function to come back, bind it to vfio-pci; see
    :func:`nvmevfio.replug.wait_for_device`. Reopen it then."""
    from nvmevfio.replug import wait_for_device as _wait

    return _wait(address, timeout, **kwargs)


__all__ = [
    "CommandError",
    "CommandTimeout",
    "ControllerFatal",
    "ControllerTimeout",
    "DeviceInUse",
    "NvmeVfioError",
    "Refused",
    "StaleHandle",
    "__version__",
    "connect",
    "open",
    "wait_for_device",
    "workload",
]
