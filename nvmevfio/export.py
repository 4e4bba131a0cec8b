"""A namespace over NVMe/TCP through Linux's NVMe target (nvmet), configured through configfs
(``/sys/kernel/config/nvmet``): the block device nvmet exports is the namespace's ublk device
(``nvmevfio ublk``), so the kernel's trusted target speaks the protocol and nvmevfio serves the
blocks.

What is written to configfs is planned first as a list of operations with exact paths and values
(``plan_export``, ``plan_teardown``: pure functions of what is asked and what configfs already
holds, ``survey``), then applied as a transaction (``apply``): on any error every operation
already done is undone in reverse, so nothing is left behind. The order makes the subsystem
reachable last (the port's link to it comes after its namespace and its allowed hosts), and
takes it down first. What an export created is recorded in ``/run/nvmevfio/export-*.json``, which
``--stop`` and ``--list`` read.

nvmet's own rules met here: a subsystem's allowed hosts are links to ``hosts/<NQN>`` folders
(shared by every subsystem); a port is a numbered folder with its address attributes, and
several subsystems may share it (a port that already listens where asked is reused, and removed
only by the export that created it once no subsystem is linked to it); ``attr_allow_any_host``
is 1 only when asked for; a namespace is enabled after its ``device_path`` is set, and disabled
before it is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import subprocess
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Protocol

from nvmevfio.errors import NvmeVfioError

CONFIGFS = Path("/sys/kernel/config")
NVMET_DIR = "nvmet"
RUN_DIR = Path("/run/nvmevfio")
NQN_MAX_BYTES = 223  # NVMe Base Specification 2.0, 4.5 (NVMe Qualified Names)
NQN_PREFIX = "nqn.2014-08.org.nvmexpress:nvmevfio"
TARGET_NSID = 1  # each export is a subsystem of its own with one namespace
DEFAULT_TRSVCID = 4420  # the NVMe/TCP port IANA assigned
# nqn.yyyy-mm.reverse-domain[:anything]: what nvme-cli and nvmet accept; '/' cannot be a configfs name
_NQN_RE = re.compile(r"nqn\.[0-9]{4}-(0[1-9]|1[0-2])\.[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[^/\s]+)?")


class ExportError(NvmeVfioError):
    """What an export needs is missing, what was asked is invalid, or nvmet refused a write."""

    reason = "export"


# ------------------------------------------------------------------ names and addresses
def check_nqn(nqn: str, what: str = "subsystem NQN") -> str:
    """``nqn`` when it is a valid NQN (nqn.yyyy-mm.domain:..., at most 223 bytes in UTF-8, no '/',
    no whitespace), else ExportError naming the rule broken."""
    size = len(nqn.encode())
    if size > NQN_MAX_BYTES:
        raise ExportError(f"{what} {nqn[:40]!r}... is {size} bytes; an NQN has at most {NQN_MAX_BYTES}",
                          reason="bad-nqn", nqn=nqn)
    if not _NQN_RE.fullmatch(nqn):
        raise ExportError(f"{what} {nqn!r} is not an NQN: nqn.YYYY-MM.reverse.domain[:name] without '/' or "
                          "spaces", reason="bad-nqn", nqn=nqn)
    return nqn


def derive_nqn(serial: str, nsid: int) -> str:
    """The subsystem NQN of a namespace's export: the controller's serial number (characters other
    than letters, digits, '.', '_' and '-' become '-') and the namespace id."""
    clean = re.sub(r"[^A-Za-z0-9._-]", "-", serial.strip()) or "unknown"
    return check_nqn(f"{NQN_PREFIX}:{clean}:ns{nsid}")


def check_hosts(hosts: Iterable[str], any_host: bool) -> None:
    """Who may connect: host NQNs (each valid), or any host, one or the other."""
    hosts = list(hosts)
    for h in hosts:
        check_nqn(h, "host NQN")
    if any_host and hosts:
        raise ExportError("--any-host and --allow-host exclude each other", reason="bad-hosts")
    if not any_host and not hosts:
        raise ExportError("no host may connect: name each with --allow-host HOSTNQN (or --any-host)",
                          reason="bad-hosts")


@dataclass(frozen=True)
class TcpAddress:
    adrfam: Literal["ipv4", "ipv6"]
    traddr: str
    trsvcid: str

    def __str__(self) -> str:
        return f"[{self.traddr}]:{self.trsvcid}" if self.adrfam == "ipv6" else f"{self.traddr}:{self.trsvcid}"


def parse_tcp(text: str) -> TcpAddress:
    """``HOST:PORT`` (``[V6]:PORT``; the port defaults to 4420): HOST an IP address (nvmet listens
    on an address, 0.0.0.0 or :: for all)."""
    host, port = text, str(DEFAULT_TRSVCID)
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", text)
    if m:
        host, port = m.group(1), m.group(2) or port
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ExportError(f"--tcp {text!r}: the host must be an IP address (0.0.0.0 listens on all)",
                          reason="bad-tcp-address", tcp=text) from None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ExportError(f"--tcp {text!r}: the port must be 1-65535", reason="bad-tcp-address", tcp=text)
    return TcpAddress("ipv6" if ip.version == 6 else "ipv4", str(ip), str(int(port)))


# ------------------------------------------------------------------ configfs access
class Configfs(Protocol):
    """The operations an export does under nvmet's configfs folder (paths relative to it)."""

    def mkdir(self, path: PurePosixPath) -> None: ...
    def rmdir(self, path: PurePosixPath) -> None: ...
    def write(self, path: PurePosixPath, value: str) -> None: ...
    def read(self, path: PurePosixPath) -> str: ...
    def symlink(self, path: PurePosixPath, target: PurePosixPath) -> None: ...
    def unlink(self, path: PurePosixPath) -> None: ...
    def listdir(self, path: PurePosixPath) -> list[str]: ...
    def exists(self, path: PurePosixPath) -> bool: ...


class OsConfigfs:
    """configfs itself (or a folder standing in for it): ``root`` is nvmet's folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _p(self, path: PurePosixPath) -> Path:
        return self.root / path

    def mkdir(self, path: PurePosixPath) -> None:
        self._p(path).mkdir()

    def rmdir(self, path: PurePosixPath) -> None:
        self._p(path).rmdir()

    def write(self, path: PurePosixPath, value: str) -> None:
        fd = os.open(self._p(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, value.encode())  # one write: configfs takes an attribute's value per write
        finally:
            os.close(fd)

    def read(self, path: PurePosixPath) -> str:
        return self._p(path).read_text().strip()

    def symlink(self, path: PurePosixPath, target: PurePosixPath) -> None:
        self._p(path).symlink_to(self._p(target))

    def unlink(self, path: PurePosixPath) -> None:
        self._p(path).unlink()

    def listdir(self, path: PurePosixPath) -> list[str]:
        p = self._p(path)
        return sorted(os.listdir(p)) if p.is_dir() else []

    def exists(self, path: PurePosixPath) -> bool:
        return os.path.lexists(self._p(path))


# ------------------------------------------------------------------ what configfs holds
@dataclass
class Survey:
    """What nvmet's configfs holds now, as far as an export cares."""

    subsystems: set[str] = field(default_factory=set)
    hosts: set[str] = field(default_factory=set)
    ports: dict[int, dict[str, str]] = field(default_factory=dict)  # id: addr_* attributes
    port_links: dict[int, set[str]] = field(default_factory=dict)  # id: subsystems linked
    allowed: dict[str, set[str]] = field(default_factory=dict)  # subsystem: allowed hosts

    def port_at(self, addr: TcpAddress) -> int | None:
        for pid, attrs in sorted(self.ports.items()):
            if (attrs.get("addr_trtype"), attrs.get("addr_adrfam"), attrs.get("addr_traddr"),
                    attrs.get("addr_trsvcid")) == ("tcp", addr.adrfam, addr.traddr, addr.trsvcid):
                return pid
        return None

    def free_port_id(self) -> int:
        return next(i for i in range(1, 1 << 16) if i not in self.ports)


P = PurePosixPath
PORT_ATTRS = ("addr_trtype", "addr_adrfam", "addr_traddr", "addr_trsvcid")


def survey(fs: Configfs) -> Survey:
    s = Survey()
    s.subsystems = set(fs.listdir(P("subsystems")))
    s.hosts = set(fs.listdir(P("hosts")))
    for name in fs.listdir(P("ports")):
        if not name.isdigit():
            continue
        port = P("ports") / name
        attrs = {}
        for a in PORT_ATTRS:
            with contextlib.suppress(OSError):
                attrs[a] = fs.read(port / a)
        s.ports[int(name)] = attrs
        s.port_links[int(name)] = set(fs.listdir(port / "subsystems"))
    for sub in s.subsystems:
        s.allowed[sub] = set(fs.listdir(P("subsystems") / sub / "allowed_hosts"))
    return s


# ------------------------------------------------------------------ plans
OpKind = Literal["mkdir", "write", "symlink", "rmdir", "unlink"]


@dataclass(frozen=True)
class Op:
    """One configfs operation: ``path`` relative to nvmet's folder; ``value`` is what a write
    writes, or a symlink's target (relative to nvmet's folder too)."""

    kind: OpKind
    path: str
    value: str = ""

    def __str__(self) -> str:
        return {"mkdir": f"mkdir {self.path}", "rmdir": f"rmdir {self.path}", "unlink": f"rm {self.path}",
                "write": f"echo {self.value} > {self.path}",
                "symlink": f"ln -s {self.value} {self.path}"}[self.kind]


@dataclass(frozen=True)
class ExportSpec:
    """What an export asks of nvmet."""

    nqn: str
    device: str  # the block device nvmet exports (/dev/ublkbN)
    tcp: TcpAddress
    hosts: tuple[str, ...] = ()
    any_host: bool = False
    serial: str = ""  # the subsystem's serial number (the controller's), when given


def plan_export(spec: ExportSpec, now: Survey) -> list[Op]:
    """The operations that export ``spec``, in order: the port (a new one unless one already listens
    at the address), the subsystem and its attributes, the allowed hosts (a host folder only where
    none exists), the namespace (device path, then enable), and last the port's link to the
    subsystem, which makes it reachable."""
    check_nqn(spec.nqn)
    if spec.nqn in now.subsystems:
        raise ExportError(f"subsystem {spec.nqn} already exists in nvmet (see nvmevfio export --list; "
                          "nvmevfio export --stop takes it down)", reason="already-exported", nqn=spec.nqn)
    check_hosts(spec.hosts, spec.any_host)
    ops: list[Op] = []
    port_id = now.port_at(spec.tcp)
    if port_id is None:
        port_id = now.free_port_id()
        port = f"ports/{port_id}"
        ops += [Op("mkdir", port), Op("write", f"{port}/addr_trtype", "tcp"),
                Op("write", f"{port}/addr_adrfam", spec.tcp.adrfam),
                Op("write", f"{port}/addr_traddr", spec.tcp.traddr),
                Op("write", f"{port}/addr_trsvcid", spec.tcp.trsvcid)]
    sub = f"subsystems/{spec.nqn}"
    ops += [Op("mkdir", sub), Op("write", f"{sub}/attr_allow_any_host", "1" if spec.any_host else "0")]
    if spec.serial:
        ops.append(Op("write", f"{sub}/attr_serial", spec.serial[:20]))
    for h in dict.fromkeys(spec.hosts):
        if h not in now.hosts:
            ops.append(Op("mkdir", f"hosts/{h}"))
        ops.append(Op("symlink", f"{sub}/allowed_hosts/{h}", f"hosts/{h}"))
    ns = f"{sub}/namespaces/{TARGET_NSID}"
    ops += [Op("mkdir", ns), Op("write", f"{ns}/device_path", spec.device), Op("write", f"{ns}/enable", "1"),
            Op("symlink", f"ports/{port_id}/subsystems/{spec.nqn}", sub)]
    return ops


def undo_of(op: Op) -> Op | None:
    """What takes ``op`` back: a folder removed, a link removed, a namespace disabled; attribute
    writes go with their folder."""
    if op.kind == "mkdir":
        return Op("rmdir", op.path)
    if op.kind == "symlink":
        return Op("unlink", op.path)
    if op.kind == "write" and op.path.endswith("/enable") and op.value == "1":
        return Op("write", op.path, "0")
    return None


def plan_teardown(done: list[Op], now: Survey) -> list[Op]:
    """The operations that take down an export whose applied operations were ``done``: each one's
    undo in reverse order (the port's link first, then the namespace disabled and removed, the
    allowed hosts' links, the host folders, the subsystem, the port), without a host folder or a
    port another subsystem now uses."""
    nqn = next((op.path.split("/")[1] for op in done if op.kind == "mkdir" and op.path.startswith("subsystems/")
                and op.path.count("/") == 1), "")
    out: list[Op] = []
    for op in reversed(done):
        u = undo_of(op)
        if u is None:
            continue
        parts = u.path.split("/")
        if u.kind == "rmdir" and parts[0] == "hosts" and \
                any(parts[1] in allowed for sub, allowed in now.allowed.items() if sub != nqn):
            continue  # another subsystem allows this host
        if u.kind == "rmdir" and parts[0] == "ports" and len(parts) == 2 and \
                now.port_links.get(int(parts[1]), set()) - {nqn}:
            continue  # another subsystem listens on this port
        out.append(u)
    return out


# ------------------------------------------------------------------ applying
def _do(fs: Configfs, op: Op) -> None:
    path = P(op.path)
    if op.kind == "mkdir":
        fs.mkdir(path)
    elif op.kind == "rmdir":
        fs.rmdir(path)
    elif op.kind == "write":
        fs.write(path, op.value)
    elif op.kind == "symlink":
        fs.symlink(path, P(op.value))
    else:
        fs.unlink(path)


def _refusal(op: Op, exc: OSError) -> ExportError:
    hint = " (the kernel log, dmesg, says why)" if op.kind in ("write", "symlink") else ""
    return ExportError(f"nvmet refused `{op}`: {exc.strerror or exc}{hint}", reason="nvmet-refused",
                       op=str(op), errno=exc.errno)


def apply(fs: Configfs, ops: list[Op]) -> None:
    """Every operation of ``ops`` in order, or none: on an error the ones done are undone in
    reverse, then ExportError names the operation nvmet refused (and any undo that failed)."""
    done: list[Op] = []
    for op in ops:
        try:
            _do(fs, op)
        except OSError as exc:
            err = _refusal(op, exc)
            left = unwind(fs, done)
            if left:
                err = ExportError(f"{err.args[0]}; undoing it failed too: {'; '.join(left)}", reason="unwind-failed",
                                  op=str(op))
            raise err from exc
        done.append(op)


def unwind(fs: Configfs, done: list[Op]) -> list[str]:
    """Undo ``done`` in reverse; what could not be undone, as text (empty when all was)."""
    return run_teardown(fs, [u for u in (undo_of(op) for op in reversed(done)) if u is not None])


def run_teardown(fs: Configfs, ops: Iterable[Op]) -> list[str]:
    """Each operation, carrying on past failures (a teardown takes down all it can); an rmdir or
    unlink of what is already gone counts as done. Returns the failures as text."""
    failed = []
    for op in ops:
        if not fs.exists(P(op.path)):
            continue  # gone already (a folder above it was removed, or nvmet was unloaded)
        try:
            _do(fs, op)
        except OSError as exc:
            failed.append(f"`{op}`: {exc.strerror or exc}")
    return failed


# ------------------------------------------------------------------ the record of an export
@dataclass
class Record:
    """What one export made: kept in RUN_DIR while it exists."""

    nqn: str
    address: str
    nsid: int
    device: str
    dev_id: int
    tcp: str
    hosts: list[str]
    any_host: bool
    read_only: bool
    ublk_started: bool  # the export started the ublk server (--stop stops it)
    ops: list[dict[str, str]]  # the configfs operations applied

    def applied(self) -> list[Op]:
        return [Op(o["kind"], o["path"], o.get("value", "")) for o in self.ops]  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def record_path(nqn: str, run_dir: Path = RUN_DIR) -> Path:
    return run_dir / f"export-{hashlib.sha256(nqn.encode()).hexdigest()[:16]}.json"


def save_record(rec: Record, run_dir: Path = RUN_DIR) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = record_path(rec.nqn, run_dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec.to_dict(), indent=1))
    tmp.rename(path)
    return path


def load_records(run_dir: Path = RUN_DIR) -> list[Record]:
    out = []
    for path in sorted(run_dir.glob("export-*.json")):
        with contextlib.suppress(OSError, ValueError, TypeError):
            out.append(Record(**json.loads(path.read_text())))
    return out


def ops_to_dicts(ops: list[Op]) -> list[dict[str, str]]:
    return [asdict(op) for op in ops]


# ------------------------------------------------------------------ the kernel's part
def _modprobe(name: str) -> None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["modprobe", "-q", name], capture_output=True, timeout=30)


def require_nvmet(configfs: Path = CONFIGFS, modules: Path = Path("/sys/module")) -> OsConfigfs:
    """nvmet's configfs folder with TCP: loads nvmet and nvmet-tcp and mounts configfs where they
    are missing; one-line ExportError naming what to load where that cannot be done."""
    root = configfs / NVMET_DIR
    if not root.is_dir():
        _modprobe("nvmet")
        if configfs.is_dir() and not os.path.ismount(configfs) and not root.is_dir():
            subprocess.run(["mount", "-t", "configfs", "configfs", str(configfs)], capture_output=True, timeout=30)
    if not root.is_dir():
        if not configfs.is_dir():
            raise ExportError(f"configfs is not available ({configfs} is missing): this kernel needs "
                              "CONFIG_CONFIGFS_FS (modprobe configfs; mount -t configfs none /sys/kernel/config)",
                              reason="nvmet-missing")
        raise ExportError(f"the kernel NVMe target is not loaded ({root} is missing): modprobe nvmet "
                          "(CONFIG_NVME_TARGET)", reason="nvmet-missing")
    if not (modules / "nvmet_tcp").is_dir():
        _modprobe("nvmet-tcp")
    if not (modules / "nvmet_tcp").is_dir():
        raise ExportError("the NVMe target's TCP transport is not loaded: modprobe nvmet-tcp "
                          "(CONFIG_NVME_TARGET_TCP)", reason="nvmet-tcp-missing")
    return OsConfigfs(root)
