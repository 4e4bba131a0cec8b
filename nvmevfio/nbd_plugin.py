"""The nbdkit plugin: one NVMe namespace through nvmevfio as an NBD export.

    nbdkit python /path/to/nvmevfio/nbd_plugin.py address=0000:01:00.0 [nsid=1] [queues=4] [mode=irq|poll]
        [queue_depth=N] [ready=PATH]

``nvmevfio nbd`` writes this command line (and sets PYTHONPATH so that nbdkit's embedded
Python finds nvmevfio). The device is opened after nbdkit forks (``after_fork``): DMA memory
mapped before a fork would be copied-on-write away from what the IOMMU maps. Requests run in
nbdkit's parallel thread model, each on a queue pair of its own (see ``nvmevfio.nbd``).
Errors reach the client as errno (EIO for media errors) and nbdkit's log with the NVMe status.
"""

import contextlib
import errno
import json
import os
import sys
from pathlib import Path
from typing import Any

import nbdkit  # provided by nbdkit's python plugin

from nvmevfio.nbd import DEFAULT_QUEUES, Export, ExportError, open_export

API_VERSION = 2
Handle = dict[str, bool]  # per connection: whether it is read-only

_config = {"nsid": "1", "queues": str(DEFAULT_QUEUES), "mode": "irq"}
_KEYS = {"address", "nsid", "queues", "ready", "queue_depth", "mode"}
_export: Export | None = None


def config(key: str, value: str) -> None:
    if key not in _KEYS:
        raise ValueError(f"unknown parameter {key!r} (known: {', '.join(sorted(_KEYS))})")
    _config[key] = value


def config_complete() -> None:
    if "address" not in _config:
        raise ValueError("address=DOMAIN:BUS:DEVICE.FUNCTION is required")
    if _config["mode"] not in ("irq", "poll"):
        raise ValueError(f"mode={_config['mode']}: irq or poll")


def thread_model() -> int:
    return nbdkit.THREAD_MODEL_PARALLEL


def after_fork() -> None:
    global _export
    depth = int(_config["queue_depth"]) if "queue_depth" in _config else None
    _export = open_export(_config["address"], int(_config["nsid"]), queues=int(_config["queues"]),
                          queue_depth=depth, irq=_config["mode"] == "irq")
    if "ready" in _config:  # for `nvmevfio nbd --background`: the export is up
        tmp = Path(_config["ready"] + ".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "address": _config["address"], "nsid": int(_config["nsid"]),
                                   "size": _export.size, "block_size": _export.block_size}))
        tmp.rename(_config["ready"])


def cleanup() -> None:
    if _export is not None:
        _export.close()
    if "ready" in _config:
        with contextlib.suppress(OSError):
            os.unlink(_config["ready"])


def _run(fn: Any, *args: Any) -> Any:
    """Call into the export; a failure sets the client's errno and logs the NVMe detail."""
    try:
        return fn(*args)
    except ExportError as exc:
        print(f"nvmevfio: {exc}", file=sys.stderr, flush=True)
        nbdkit.set_error(exc.errno)
        raise
    except Exception as exc:
        print(f"nvmevfio: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        nbdkit.set_error(errno.EIO)
        raise


def _ex() -> Export:
    if _export is None:
        raise ExportError(errno.ENODEV, "the device is not open (after_fork did not run)")
    return _export


def open(readonly: bool) -> dict[str, bool]:  # nbdkit calls it by this name
    return {"readonly": readonly}


def get_size(h: Handle) -> int:
    return _ex().size


def block_size(h: Handle) -> tuple[int, int, int]:
    return _ex().block_sizes()


def is_rotational(h: Handle) -> bool:
    return False


def can_multi_conn(h: Handle) -> bool:
    return True  # NVMe Flush covers the namespace, whichever queue (connection) wrote


def can_write(h: Handle) -> bool:
    return not h["readonly"]


def can_flush(h: Handle) -> bool:
    return True


def can_trim(h: Handle) -> bool:
    return True


def can_zero(h: Handle) -> bool:
    return True


def can_fua(h: Handle) -> int:
    return nbdkit.FUA_EMULATE  # write, then NVMe Flush


def pread(h: Handle, buf: Any, offset: int, flags: int) -> None:
    _run(_ex().pread, buf, offset)


def pwrite(h: Handle, buf: Any, offset: int, flags: int) -> None:
    _run(_ex().pwrite, buf, offset)


def flush(h: Handle, flags: int) -> None:
    _run(_ex().flush)


def trim(h: Handle, count: int, offset: int, flags: int) -> None:
    _run(_ex().trim, offset, count)


def zero(h: Handle, count: int, offset: int, flags: int) -> None:
    _run(_ex().zero, offset, count, bool(flags & nbdkit.FLAG_MAY_TRIM))
