"""The kernel's side of ublk devices, without serving one: whether ublk exists, a device's record
(GET_DEV_INFO, the function and namespace nvmevfio stamps into ublksrv_flags, its server's pid and
whether it lives, the last stats the server wrote), listing, stopping a device (its server's SIGTERM,
or STOP_DEV and DEL_DEV for a stale one), and the checks before a namespace is served or a device
recovered. The server itself is ublk.py."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvmevfio._ffi import ffi, lib
from nvmevfio.errors import NvmeVfioError, ShimError

UBLK_CONTROL = Path("/dev/ublk-control")
UBLK_CHAR_CLASS = Path("/sys/class/ublk-char")
RUN_DIR = Path("/run/nvmevfio")
# include/uapi/linux/ublk_cmd.h
UBLK_F_USER_RECOVERY = 1 << 3
UBLK_F_USER_RECOVERY_REISSUE = 1 << 4
UBLK_F_CMD_IOCTL_ENCODE = 1 << 6
UBLK_S_DEV_DEAD, UBLK_S_DEV_LIVE, UBLK_S_DEV_QUIESCED = 0, 1, 2
STATE_NAMES = {UBLK_S_DEV_DEAD: "dead", UBLK_S_DEV_LIVE: "live", UBLK_S_DEV_QUIESCED: "quiesced"}
NEW_DEV_ID = 0xFFFFFFFF  # ADD_DEV: the kernel picks the id
SERVER_FLAGS_MARK = 1 << 63  # ublksrv_flags: set when nvmevfio's server added the device


class UblkError(NvmeVfioError):
    """ublk is missing, a device is not what the request needs, or a control command failed."""

    reason = "ublk"


def control_available() -> bool:
    return UBLK_CONTROL.exists()


def require_ublk() -> None:
    """One line when the kernel has no ublk (Debian 12's 6.1 kernel is built without it)."""
    if not control_available():
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["modprobe", "-q", "ublk_drv"], capture_output=True, timeout=30)
    if not control_available():
        raise UblkError(f"ublk is not available: this kernel has no ublk_drv ({UBLK_CONTROL} is missing, "
                        "CONFIG_BLK_DEV_UBLK); use nvmevfio nbd ADDRESS to use the namespace as a disk instead",
                        reason="ublk-missing")


def control_checked(r: int, what: str, dev_id: int | None = None) -> int:
    """``r`` from a ublk control command, or ShimError naming the command and the device."""
    if r < 0:
        target = f"ublk device {dev_id}" if dev_id is not None and dev_id != NEW_DEV_ID else str(UBLK_CONTROL)
        raise ShimError(what, target, -r)
    return r


# ------------------------------------------------------------------ the device's identity
def encode_owner(address: str, nsid: int) -> int:
    """The PCI function and namespace a device serves, kept by the kernel in ublksrv_flags: bit 63
    marks nvmevfio's, the function (domain up to 7FFFh) in bits 32-62, the namespace in 0-31."""
    dom, bus, devfn = address.split(":")
    dev, fn = devfn.split(".")
    if int(dom, 16) > 0x7FFF:
        raise UblkError(f"PCI domain {dom} is past what the device's record holds (7fff)", reason="bad-address")
    bdf = (int(dom, 16) << 16) | (int(bus, 16) << 8) | (int(dev, 16) << 3) | int(fn, 16)
    return SERVER_FLAGS_MARK | (bdf << 32) | (nsid & 0xFFFFFFFF)


def decode_owner(flags: int) -> tuple[str, int] | None:
    if not flags & SERVER_FLAGS_MARK:
        return None
    bdf = (flags >> 32) & 0x7FFFFFFF
    address = f"{bdf >> 16:04x}:{(bdf >> 8) & 0xFF:02x}:{(bdf >> 3) & 0x1F:02x}.{bdf & 7}"
    return address, flags & 0xFFFFFFFF


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (killed, not yet reaped) serves nothing
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def stats_path(dev_id: int) -> Path:
    return RUN_DIR / f"ublk{dev_id}.json"


@dataclass
class DeviceInfo:
    dev_id: int
    state: str
    server_pid: int
    server_alive: bool
    queues: int
    depth: int
    max_io_bytes: int
    recoverable: bool
    address: str | None
    nsid: int | None
    block_device: str | None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def stale(self) -> bool:
        """Left by a server that is gone: removable with ``--stop``."""
        return not self.server_alive

    @property
    def waiting_for_recovery(self) -> bool:
        return self.recoverable and not self.server_alive and self.state in ("quiesced", "live")

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("dev_id", "state", "server_pid", "server_alive", "queues", "depth",
                                           "max_io_bytes", "recoverable", "address", "nsid", "block_device",
                                           "stats")}
        d["stale"] = self.stale
        d["waiting_for_recovery"] = self.waiting_for_recovery
        return d


def device_info(dev_id: int) -> DeviceInfo:
    info = ffi.new("struct nv_ublk_info *")
    r = lib.nv_ublk_get_dev_info(dev_id, info)
    if r == -errno.ENODEV or r == -errno.ENOENT:
        raise UblkError(f"there is no ublk device {dev_id} (see nvmevfio ublk --list)", reason="unknown-device",
                        dev_id=dev_id)
    control_checked(r, "GET_DEV_INFO", dev_id)
    owner = decode_owner(int(info.ublksrv_flags))
    blk = Path(f"/dev/ublkb{dev_id}")
    stats: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        stats = json.loads(stats_path(dev_id).read_text())
    pid = int(info.ublksrv_pid)
    return DeviceInfo(dev_id=dev_id, state=STATE_NAMES.get(int(info.state), str(int(info.state))), server_pid=pid,
                      server_alive=_alive(pid), queues=int(info.nr_hw_queues), depth=int(info.queue_depth),
                      max_io_bytes=int(info.max_io_buf_bytes),
                      recoverable=bool(int(info.flags) & UBLK_F_USER_RECOVERY),
                      address=owner[0] if owner else None, nsid=owner[1] if owner else None,
                      block_device=str(blk) if blk.exists() else None, stats=stats)


def list_devices() -> list[DeviceInfo]:
    require_ublk()
    ids = sorted(int(p.name[len("ublkc"):]) for p in UBLK_CHAR_CLASS.glob("ublkc*")) \
        if UBLK_CHAR_CLASS.exists() else []
    out = []
    for dev_id in ids:
        with contextlib.suppress(UblkError):  # removed meanwhile
            out.append(device_info(dev_id))
    return out


def _wait_gone(dev_id: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not (UBLK_CHAR_CLASS / f"ublkc{dev_id}").exists():
            return True  # deleted (a mounted filesystem may still hold its number)
        try:
            device_info(dev_id)
        except UblkError:
            return True
        time.sleep(0.1)
    return False


def _wait_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def stop_device(dev_id: int, timeout_s: float = 120.0) -> DeviceInfo:
    """Stop ublk device ``dev_id``: its running server gets SIGTERM (it drains and deletes the
    device); a device whose server is gone is stopped and deleted here."""
    require_ublk()
    info = device_info(dev_id)
    if info.server_alive:
        os.kill(info.server_pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        # The device goes before the server has shut the controller down: wait for the process
        # too, so that the controller is free for its next user once --stop returns.
        if not _wait_gone(dev_id, timeout_s) or not _wait_exit(info.server_pid, deadline - time.monotonic()):
            raise UblkError(f"ublk device {dev_id}: its server (pid {info.server_pid}) did not stop within "
                            f"{timeout_s:g} s", reason="stop-timeout", dev_id=dev_id)
        return info
    control_checked(lib.nv_ublk_stop_dev(dev_id), "STOP_DEV", dev_id)
    control_checked(lib.nv_ublk_del_dev(dev_id, 0), "DEL_DEV", dev_id)
    stats_path(dev_id).unlink(missing_ok=True)
    return info


def check_not_served(address: str, nsid: int) -> None:
    """Refuse a namespace another ublk device serves (its server running, or waiting for --recover)."""
    for d in list_devices():
        if d.address != address or d.nsid != nsid:
            continue
        if d.server_alive:
            raise UblkError(f"{address} nsid {nsid} is already served by /dev/ublkb{d.dev_id} (server pid "
                            f"{d.server_pid}); stop it first: nvmevfio ublk --stop {d.dev_id}",
                            reason="namespace-served", dev_id=d.dev_id)
        if d.waiting_for_recovery:
            raise UblkError(f"{address} nsid {nsid} belongs to /dev/ublkb{d.dev_id}, which waits for its server: "
                            f"nvmevfio ublk --recover {d.dev_id}, or remove it: nvmevfio ublk --stop {d.dev_id}",
                            reason="namespace-served", dev_id=d.dev_id)


def recovery_target(dev_id: int, timeout_s: float = 15.0) -> DeviceInfo:
    """The device --recover takes over: recoverable, its server dead, quiesced by the kernel."""
    require_ublk()
    deadline = time.monotonic() + timeout_s
    while True:
        d = device_info(dev_id)
        if not d.recoverable or d.server_alive or d.state == "dead" or d.address is None or d.nsid is None:
            why = ("it was not started with --recoverable" if not d.recoverable
                   else f"its server (pid {d.server_pid}) is running" if d.server_alive
                   else "it was not added by nvmevfio" if d.address is None
                   else f"its state is {d.state}")
            raise UblkError(f"/dev/ublkb{dev_id} is not waiting for recovery: {why}", reason="not-recovering",
                            dev_id=dev_id, state=d.state)
        if d.state == "quiesced":
            return d
        if time.monotonic() > deadline:  # the kernel quiesces a device once its dead server's files are closed
            raise UblkError(f"/dev/ublkb{dev_id} is not waiting for recovery: still {d.state} {timeout_s:g} s "
                            "after its server died", reason="not-recovering", dev_id=dev_id, state=d.state)
        time.sleep(0.1)
