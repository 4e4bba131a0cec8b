"""A namespace as an NBD export, so that the kernel sees a block device (``/dev/nbdN``) on top of
nvmevfio: the logic the nbdkit plugin (``nvmevfio/nbd_plugin.py``) calls, and how ``nvmevfio nbd``
starts nbdkit with it.

Two ways to serve (``--plugin``): where the kernel has ublk, nbdkit's C ``file`` plugin on the
namespace's ublk device (``nvmevfio ublk``, started for the export or one already serving it): C
end to end; else nbdkit's Python plugin with this module's :class:`Export`. ``auto`` (the
default) takes the first where it can (:func:`choose_plugin`).

Threads: nbdkit runs the plugin in its parallel thread model. Every request takes a *lane* — an
I/O queue pair and a DMA buffer of its own — from a pool, so concurrent requests run on
different queues at once (the C waits release the GIL), and a queue is never shared by two
threads (the broker's rule). One copy per request: nbdkit hands the plugin its own buffer, which
the device cannot see, so data moves through the lane's DMA buffer.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import re
import shutil
import signal
import socket as socketmod
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nvmevfio.blockdev import BlockDevice
from nvmevfio.dma import DmaBuffer
from nvmevfio.errors import CommandError, NvmeVfioError, Refused

CHUNK_BYTES = 1 << 20  # the most one lane moves per command (less when MDTS is smaller)
DEFAULT_QUEUES = 4
RUN_DIR = Path("/run/nvmevfio")
PLUGIN = Path(__file__).with_name("nbd_plugin.py")

# NVMe status (SCT, SC) -> errno for the NBD client; everything else is EIO.
_STATUS_ERRNO = {
    (0, 0x02): errno.EINVAL,  # Invalid Field in Command
    (0, 0x80): errno.EINVAL,  # LBA Out of Range
    (0, 0x81): errno.ENOSPC,  # Capacity Exceeded
    (1, 0x80): errno.EINVAL,  # Conflicting Attributes
    (2, 0x82): errno.EROFS,  # Attempted Write to Read Only Range
}
_REFUSED_ERRNO = {"read-only": errno.EROFS, "window-past-namespace-end": errno.ENOSPC}


class ExportError(Exception):
    """A request that failed: ``errno`` goes to the NBD client, the message (with the NVMe status
    name and LBA when the device answered) to nbdkit's log."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


def errno_for(exc: BaseException) -> int:
    """The errno an NBD client gets for a failure: EIO for media errors and anything the device
    did, EINVAL/ENOSPC/EROFS where the NVMe status or the refusal says so."""
    if isinstance(exc, CommandError):
        return _STATUS_ERRNO.get((exc.sct, exc.sc), errno.EIO)
    if isinstance(exc, Refused):
        return _REFUSED_ERRNO.get(exc.reason, errno.EINVAL)
    return errno.EIO


@contextlib.contextmanager
def _errors(what: str, offset: int, length: int) -> Iterator[None]:
    try:
        yield
    except ExportError:
        raise
    except NvmeVfioError as exc:
        raise ExportError(errno_for(exc), f"{what} at byte {offset} (+{length}): {exc}") from exc


@dataclass
class _Lane:
    qid: int
    buf: DmaBuffer


class Export:
    """Namespace ``dev`` as NBD requests (byte offsets and lengths). Reads may be unaligned;
    writes, trims and zeroes take whole blocks (``nvmevfio nbd`` puts nbdkit's blocksize filter
    in front when the block is larger than the client's 512 bytes)."""

    def __init__(self, dev: BlockDevice, *, queues: int = 1, readonly: bool = False) -> None:
        self.dev = dev
        self.readonly = readonly
        self.block_size = dev.block_size
        self.size = dev.block_count * dev.block_size
        mdts = dev.info.max_transfer_bytes or CHUNK_BYTES
        self.chunk = max(self.block_size, min(CHUNK_BYTES, mdts) // self.block_size * self.block_size)
        self.max_transfer = dev.info.max_transfer_bytes
        self._lanes: queue.SimpleQueue[_Lane] = queue.SimpleQueue()
        self._all = [_Lane(q, dev.alloc_buffer(self.chunk)) for q in range(1, queues + 1)]
        for lane in self._all:
            self._lanes.put(lane)

    @contextlib.contextmanager
    def _lane(self) -> Iterator[_Lane]:
        lane = self._lanes.get()  # blocks while every queue is busy with another request
        try:
            yield lane
        finally:
            self._lanes.put(lane)

    def block_sizes(self) -> tuple[int, int, int]:
        """(minimum, preferred, maximum) request sizes for nbdkit's block_size callback: the
        logical block, a page (or the block), and the controller's max transfer (MDTS)."""
        return self.block_size, max(self.block_size, 4096), self.max_transfer or 0xFFFFFFFF

    def _blocks(self, what: str, offset: int, length: int) -> tuple[int, int]:
        bs = self.block_size
        if offset % bs or length % bs:
            raise ExportError(errno.EINVAL, f"{what} at byte {offset} (+{length}) is not in whole {bs}-byte "
                              f"blocks (attach with nbd-client -b {bs})")
        return offset // bs, length // bs

    def pread(self, out: Any, offset: int) -> None:
        """Fill ``out`` (a writable buffer) from byte ``offset``."""
        view = np.frombuffer(out, dtype=np.uint8)
        bs, n, done = self.block_size, len(view), 0
        with self._lane() as lane, _errors("read", offset, n):
            arr = lane.buf.array
            while done < n:
                pos = offset + done
                first, skip = divmod(pos, bs)
                take = min(n - done, self.chunk - skip)
                count = -(-(skip + take) // bs)
                self.dev.read_into(first, count, lane.buf, qid=lane.qid)
                view[done : done + take] = arr[skip : skip + take]
                done += take

    def pwrite(self, data: Any, offset: int) -> None:
        view = np.frombuffer(data, dtype=np.uint8)
        lba, _ = self._blocks("write", offset, len(view))
        bs = self.block_size
        with self._lane() as lane, _errors("write", offset, len(view)):
            arr = lane.buf.array
            for start in range(0, len(view), self.chunk):
                piece = view[start : start + self.chunk]
                arr[: len(piece)] = piece
                self.dev.write_from(lba + start // bs, len(piece) // bs, lane.buf, qid=lane.qid)

    def flush(self) -> None:
        """NVMe Flush: the namespace's volatile write cache, whatever queue wrote (so multi-conn holds)."""
        with self._lane() as lane, _errors("flush", 0, 0):
            self.dev.flush(qid=lane.qid)

    def trim(self, offset: int, length: int) -> None:
        """Dataset Management / Deallocate of the whole blocks inside the range (trim is advisory)."""
        bs = self.block_size
        first, end = -(-offset // bs), (offset + length) // bs
        if end <= first:
            return
        with self._lane() as lane, _errors("trim", offset, length):
            self.dev.deallocate(first, end - first, qid=lane.qid)

    def zero(self, offset: int, length: int, may_trim: bool) -> None:
        """Write Zeroes; with ``may_trim``, DEAC lets the controller deallocate (still reads zeros)."""
        lba, count = self._blocks("zero", offset, length)
        with self._lane() as lane, _errors("zero", offset, length):
            self.dev.write_zeroes(lba, count, deallocate=may_trim, qid=lane.qid)

    def close(self) -> None:
        self.dev.close()


def open_export(address: str, nsid: int = 1, *, queues: int = DEFAULT_QUEUES, readonly: bool = False,
                queue_depth: int | None = None, irq: bool = True) -> Export:
    """Open the namespace directly (nvmevfio.open) with ``queues`` I/O queue pairs, one per lane.
    ``irq``: completions by MSI-X (the default: a server shares the CPUs with its clients, and a
    polling lane would spin one of them); False polls."""
    import nvmevfio

    dev = nvmevfio.open(address, nsid, queues=queues, queue_depth=queue_depth, irq=irq)
    try:
        return Export(dev, queues=queues, readonly=readonly)
    except BaseException:
        dev.close()
        raise


# ------------------------------------------------------------------ starting nbdkit
def default_socket(address: str, nsid: int) -> Path:
    return RUN_DIR / f"nbd-{address}-n{nsid}.sock"


def default_pidfile(address: str, nsid: int, socket: Path | None = None) -> Path:
    """nbdkit's pid file: next to ``socket`` when one is given (so that an export on a socket
    path of the caller's needs nothing of /run), else under RUN_DIR."""
    if socket is not None:
        return socket.with_name(socket.name + ".pid")
    return RUN_DIR / f"nbd-{address}-n{nsid}.pid"


def prepare_run_dirs(*paths: Path | None) -> None:
    """The directories of the files an export uses (its socket, its pid file), created when
    missing, and only those: nothing under RUN_DIR unless a path is there. Raises NvmeVfioError
    (``run-dir``) with one line, e.g. where /run is not writable for this user."""
    for path in paths:
        if path is None:
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise NvmeVfioError(f"cannot create {path.parent} for {path.name}: {exc.strerror}; give --socket and "
                                "--pidfile paths in a directory you can write", reason="run-dir",
                                path=str(path)) from None


def nbdkit_python_version() -> tuple[int, int]:
    """The Python version nbdkit's python plugin embeds (it must match this interpreter's: the
    plugin imports nvmevfio, numpy and cffi from this environment)."""
    exe = shutil.which("nbdkit")
    if exe is None:
        raise NvmeVfioError("nbdkit is not installed (Debian: apt install nbdkit nbdkit-plugin-python)",
                            reason="nbdkit-missing")
    res = subprocess.run([exe, "python", "--dump-plugin"], capture_output=True, text=True)
    m = re.search(r"^python_version=(\d+)\.(\d+)", res.stdout, re.M)
    if res.returncode or m is None:
        raise NvmeVfioError("nbdkit has no python plugin (Debian: apt install nbdkit-plugin-python): "
                            f"{res.stderr.strip()}", reason="nbdkit-missing")
    return int(m.group(1)), int(m.group(2))


def _nbdkit_front(*, socket: Path | None, port: int | None, readonly: bool, threads: int, pidfile: Path | None,
                  verbose: bool, foreground: bool) -> list[str]:
    """nbdkit's own options, whichever plugin follows."""
    cmd = ["nbdkit", "--foreground" if foreground else "--log=stderr", "--threads", str(threads)]
    if socket is not None:
        cmd += ["--unix", str(socket)]
    else:
        cmd += ["--ipaddr", "127.0.0.1", "--port", str(port)]
    if readonly:
        cmd.append("--readonly")
    if pidfile is not None:
        cmd += ["--pidfile", str(pidfile)]
    if verbose:
        cmd.append("--verbose")
    return cmd


def nbdkit_command(address: str, nsid: int, *, socket: Path | None, port: int | None, readonly: bool,
                   queues: int, block_size: int, pidfile: Path | None = None,
                   ready: Path | None = None, verbose: bool = False, foreground: bool = True,
                   mode: str = "irq") -> list[str]:
    """The nbdkit command line: the python plugin with nvmevfio's plugin script, a Unix socket
    (or loopback TCP), the blocksize filter when blocks are larger than 512 bytes; in the
    foreground, or forking into the background itself (its log still to stderr)."""
    cmd = _nbdkit_front(socket=socket, port=port, readonly=readonly, threads=max(queues, 1) * 2, pidfile=pidfile,
                        verbose=verbose, foreground=foreground)
    if block_size > 512:  # NBD clients speak 512-byte sectors unless told: read-modify-write for them
        cmd += ["--filter=blocksize"]
    cmd += ["python", str(PLUGIN), f"address={address}", f"nsid={nsid}", f"queues={queues}", f"mode={mode}"]
    if ready is not None:
        cmd.append(f"ready={ready}")
    if block_size > 512:
        cmd.append(f"minblock={block_size}")
    return cmd


def nbdkit_file_command(device: str, *, socket: Path | None, port: int | None, readonly: bool, queues: int,
                        pidfile: Path | None = None, verbose: bool = False, foreground: bool = True) -> list[str]:
    """The nbdkit command line for the C path: nbdkit's ``file`` plugin on ``device`` (the
    namespace's /dev/ublkbN; any block size, the kernel's block layer aligns for it)."""
    cmd = _nbdkit_front(socket=socket, port=port, readonly=readonly, threads=max(queues, 1) * 2, pidfile=pidfile,
                        verbose=verbose, foreground=foreground)
    return [*cmd, "file", f"file={device}"]


# ------------------------------------------------------------------ which plugin: C over ublk, or Python
PLUGINS = ("auto", "file", "python")


def choose_plugin(requested: str, ublk_present: bool) -> tuple[str, str]:
    """The plugin an export runs, ``file`` (nbdkit's C plugin on the namespace's ublk device) or
    ``python`` (nvmevfio's), and why, for ``--plugin requested``: ``auto`` takes ``file`` where
    the kernel has ublk. Raises NvmeVfioError (``ublk-missing``) for ``file`` without ublk."""
    if requested not in PLUGINS:
        raise NvmeVfioError(f"--plugin {requested}: one of {', '.join(PLUGINS)}", reason="invalid-argument")
    if requested == "python":
        return "python", "--plugin python"
    if not ublk_present:
        if requested == "file":
            raise NvmeVfioError("--plugin file serves the namespace's ublk device, and this kernel has no ublk "
                                "(CONFIG_BLK_DEV_UBLK): use --plugin python", reason="ublk-missing")
        return "python", "this kernel has no ublk"
    return "file", "--plugin file" if requested == "file" else "ublk is available"


def ublk_present() -> bool:
    """Whether the kernel has ublk (the module loaded if it can be)."""
    from nvmevfio import ublk_devices

    try:
        ublk_devices.require_ublk()
    except ublk_devices.UblkError:
        return False
    return True


def ublk_claim_path(pidfile: Path) -> Path:
    """Where an export records the ublk device it started (``--stop`` takes down that one only)."""
    return pidfile.with_suffix(".ublk")


def serving_ublk(address: str, nsid: int, claim: Path) -> tuple[dict[str, Any], bool] | None:
    """The ublk device serving the namespace now, as ``{"device", "dev_id", "pid"}``, and whether
    this export started it (its ``claim`` names that device and server); None when there is none.
    A device waiting for --recover is refused (UblkError, ``namespace-served``)."""
    from nvmevfio import ublk_devices

    for d in ublk_devices.list_devices():
        if d.address == address and d.nsid == nsid and d.server_alive:
            ours = read_claim(claim)
            started = ours is not None and (ours["dev_id"], ours["pid"]) == (d.dev_id, d.server_pid)
            return {"device": f"/dev/ublkb{d.dev_id}", "dev_id": d.dev_id, "pid": d.server_pid}, started
    ublk_devices.check_not_served(address, nsid)
    return None


def read_claim(claim: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        d = json.loads(claim.read_text())
        return {"device": str(d["device"]), "dev_id": int(d["dev_id"]), "pid": int(d["pid"])}
    return None


def write_claim(claim: Path, ublk_info: dict[str, Any]) -> None:
    claim.write_text(json.dumps({k: ublk_info[k] for k in ("device", "dev_id", "pid")}))


def release_ublk(claim: Path) -> str | None:
    """Stop the ublk device ``claim`` records, if it is still the one this export started (same
    number, same server): the device's name, or None when there was nothing of ours to stop."""
    from nvmevfio import ublk_devices

    ours = read_claim(claim)
    claim.unlink(missing_ok=True)
    if ours is None:
        return None
    try:
        d = ublk_devices.device_info(ours["dev_id"])
    except ublk_devices.UblkError:
        return None  # gone already
    if d.server_pid != ours["pid"]:
        return None  # the number went to another device since
    ublk_devices.stop_device(d.dev_id)
    return str(ours["device"])


def block_device_geometry(device: str) -> tuple[int, int]:
    """(size in bytes, logical block size) of a block device, from sysfs."""
    name = Path(device).name
    try:
        sectors = int(Path(f"/sys/block/{name}/size").read_text())
        block_size = int(Path(f"/sys/block/{name}/queue/logical_block_size").read_text())
    except (OSError, ValueError) as exc:
        raise NvmeVfioError(f"{device}: cannot read its size from sysfs: {exc}", reason="ublk",
                            device=device) from exc
    return sectors * 512, block_size


def wait_forked(proc: subprocess.Popen[bytes], pidfile: Path, log: Path, timeout_s: float) -> int:
    """nbdkit with a C plugin: it writes its pid file once it serves; its pid. Fails (with the
    log's tail) when it exits first."""
    deadline = time.monotonic() + timeout_s

    def failed(what: str) -> NvmeVfioError:
        tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
        return NvmeVfioError(f"nbdkit {what} before serving:\n{tail}", reason="nbdkit-failed")

    while time.monotonic() < deadline:
        code = proc.poll()
        if code:  # the command itself failed (before forking into the background)
            raise failed(f"exited ({code})")
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            if _alive(pid):
                return pid
            if code == 0:  # forked, and the server it left is gone
                raise failed("exited")
        time.sleep(0.05)
    raise NvmeVfioError(f"nbdkit did not start serving within {timeout_s:g} s (log: {log})",
                        reason="nbdkit-failed")


def nbdkit_env() -> dict[str, str]:
    """nbdkit's embedded Python finds nvmevfio and its dependencies where this interpreter does
    (nvmevfio's own folder first: an editable install is found through a .pth import hook, which
    PYTHONPATH entries do not run)."""
    env = dict(os.environ)
    paths = [str(Path(__file__).resolve().parent.parent), *(p for p in sys.path if p and Path(p).exists())]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_ready(proc: subprocess.Popen[bytes], pidfile: Path, ready: Path, log: Path,
               timeout_s: float) -> dict[str, Any]:
    """Wait until the plugin has the device open (it writes ``ready``), or nbdkit gives up: the
    command fails before forking, or the forked server exits (its log says why)."""
    deadline = time.monotonic() + timeout_s

    def failed(what: str) -> NvmeVfioError:
        tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
        return NvmeVfioError(f"nbdkit {what} before the export was ready:\n{tail}", reason="nbdkit-failed")

    while time.monotonic() < deadline:
        if ready.exists():
            with contextlib.suppress(ValueError):
                return dict(json.loads(ready.read_text()))
        code = proc.poll()
        if code:  # the command itself failed (before forking into the background)
            raise failed(f"exited ({code})")
        if code == 0:  # forked: watch the server it left behind
            with contextlib.suppress(OSError, ValueError):
                if not _alive(int(pidfile.read_text().strip())):
                    raise failed("exited")
        time.sleep(0.05)
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
    raise NvmeVfioError(f"nbdkit did not get the export ready within {timeout_s:g} s (log: {log})",
                        reason="nbdkit-failed")


def clear_stale_socket(path: Path) -> None:
    """Remove a Unix socket a stopped server left behind; refuse one that a server still answers on."""
    if not path.exists():
        return
    probe = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise NvmeVfioError(f"{path}: a server is already listening there (stop it first)", reason="export-running")


def stop_export(pidfile: Path, timeout_s: float = 30.0) -> tuple[int | None, str | None]:
    """``--stop``: the export's nbdkit (:func:`stop`), then the ublk device the export started,
    if it did (nothing else: a ublk device it found serving stays). (nbdkit's pid or None when
    none ran, the ublk device stopped or None); refused when there was neither."""
    claim = ublk_claim_path(pidfile)
    try:
        pid: int | None = stop(pidfile, timeout_s)
    except NvmeVfioError as exc:
        if exc.reason != "not-running" or read_claim(claim) is None:
            raise
        pid = None  # nbdkit died (killed): the ublk device it left is still ours to stop
    return pid, release_ublk(claim)


def stop(pidfile: Path, timeout_s: float = 30.0) -> int:
    """SIGTERM the nbdkit of ``pidfile`` (it closes the device: CC.SHN) and wait for it; its pid."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError) as exc:
        raise NvmeVfioError(f"no running export: {pidfile}: {exc}", reason="not-running") from exc
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            pidfile.unlink(missing_ok=True)
            return pid
        time.sleep(0.05)
    raise NvmeVfioError(f"nbdkit {pid} did not exit within {timeout_s:g} s", reason="nbdkit-failed")
