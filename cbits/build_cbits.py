"""cffi build script (API mode, out of line): compiles cbits/ into nvmevfio._cbits.

Used by setup.py's ``cffi_modules``; the package version is stamped into the
module (``nv_version()``) and checked by ``nvmevfio._ffi`` at import.
"""

from __future__ import annotations

import pathlib
import re

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


def _version() -> str:
    text = (ROOT / "nvmevfio" / "_version.py").read_text()
    match = re.search(r'__version__\s*=\s*"([^"]+)"', text)
    if match is None:
        raise RuntimeError("nvmevfio/_version.py has no __version__")
    return match.group(1)


ffibuilder = FFI()
# The simulator's doorbell (nv_doorbell_fn): a Python callback, declared for cffi only.
ffibuilder.cdef((HERE / "shim.h").read_text() + '\nextern "Python" void nv_py_doorbell(void *, uint64_t, uint32_t);\n')
ffibuilder.set_source(
    "nvmevfio._cbits",
    "#include <stdint.h>\n#include <stddef.h>\n#include \"shim.h\"\n",
    sources=[str((HERE / name).relative_to(ROOT))
             for name in ("shim.c", "iommufd.c", "qpair.c", "perf.c", "workload.c", "service.c", "svc_client.c",
                          "ublk.c")],
    # the C files' private headers (barriers, NVMe names, inline queue-pair and perf steps): a
    # change to one rebuilds the module
    depends=[str(path.relative_to(ROOT)) for path in sorted(HERE.glob("*.h"))],
    include_dirs=[str(HERE.relative_to(ROOT))],
    define_macros=[("NVMEVFIO_VERSION", '"' + _version() + '"')],
    libraries=["uring"],  # liburing (Debian: liburing-dev to build, liburing2 to run): the ublk server
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
