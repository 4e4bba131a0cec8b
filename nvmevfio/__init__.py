"""nvmevfio: a userspace NVMe driver in Python over VFIO."""

from nvmevfio._version import __version__

__all__ = ["__version__"]
