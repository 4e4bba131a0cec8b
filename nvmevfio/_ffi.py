"""The only importer of the compiled shim (``nvmevfio._cbits``).

Checks at import that the shim was built for this package version, and turns the
shim's ``-errno`` results into :class:`~nvmevfio.errors.ShimError`.
"""

from __future__ import annotations

import functools

from nvmevfio._version import __version__
from nvmevfio.errors import NvmeVfioError, ShimError

try:
    from nvmevfio._cbits import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on the install
    raise NvmeVfioError(
        "the nvmevfio C shim (nvmevfio._cbits) is not built: run `pip install .` "
        f"(or `pip install -e .`) in the project checkout ({exc})",
        reason="shim-missing",
    ) from exc

_built_for = ffi.string(lib.nv_version()).decode()
if _built_for != __version__:  # pragma: no cover - depends on the install
    raise NvmeVfioError(
        f"the C shim was built for nvmevfio {_built_for} but this is {__version__}: reinstall the package",
        reason="shim-version-mismatch",
    )


def check(rc: int, op: str, target: str, hint: str = "") -> int:
    """Return ``rc`` when it is >= 0, else raise ShimError for ``-rc``."""
    if rc < 0:
        raise ShimError(op, target, -rc, hint)
    return rc


@functools.cache
def const(name: str) -> int:
    """A VFIO UAPI constant, as compiled into the shim from <linux/vfio.h>."""
    out = ffi.new("uint64_t *")
    check(lib.nv_const(name.encode(), out), "nv_const", name)
    return int(out[0])


__all__ = ["check", "const", "ffi", "lib"]
