"""The service's grants file (issue #9 point 1): who may use which namespace window, how.

A TOML file (read with the standard library's tomllib, or its backport tomli before Python
3.11), one ``[[grant]]`` table per grant::

    [[grant]]
    user = "alice"          # or uid = 1001; or group = "storage" / gid = 2000
    nsid = 1
    first_lba = 0           # the client's LBA 0
    blocks = 2097152        # the window's size in logical blocks
    access = "rw"           # or "ro"
    queue_depth = 64        # at most this many commands in flight
    dma_memory = "16M"      # at most this much DMA memory (K, M, G suffixes)
    lanes = ["default"]     # and/or "validated" (Model B: the client writes its own SQEs)
    sessions = 2            # at most this many sessions (client slots) at once
    connections = 8         # at most this many open connections to the socket at once
    controller = "00:04.0"  # only on this controller (a daemon serving several); absent: on every one

The limits belong to the grant, not to a session: a uid's sessions under one grant share its
queue depth and its DMA memory, and each uid of a group grant has its own share (a peer is
always one uid). ``sessions`` and ``connections`` count per uid too; the connection cap a peer
gets is the largest of its grants' (it names no namespace before its hello).

The peer is who the kernel says it is (SO_PEERCRED), never what it claims. A uid grant wins
over a group grant; no grant, no connection. Every mistake in the file is refused with the
grant's number and the field, before the service starts.
"""

from __future__ import annotations

import grp
import pwd
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvmevfio.errors import NvmeVfioError
from nvmevfio.service.validator import Grant as Window

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 only
    import tomli as tomllib

LANES = ("default", "validated")
_FIELDS = {"user", "uid", "group", "gid", "nsid", "first_lba", "blocks", "access", "queue_depth", "dma_memory",
           "lanes", "sessions", "connections", "controller"}
DEFAULT_SESSIONS = 2  # a uid's sessions under one grant at once: one user cannot take every client slot
DEFAULT_CONNECTIONS = 8  # a uid's open connections at once (each costs the daemon a file descriptor)


class GrantsError(NvmeVfioError):
    """The grants file is missing, is not TOML, or a grant in it is wrong."""

    reason = "grants-invalid"


@dataclass(frozen=True)
class ServiceGrant:
    """One grant: to a uid or to a gid (exactly one of them)."""

    uid: int | None
    gid: int | None
    nsid: int
    first_lba: int
    blocks: int
    writable: bool
    queue_depth: int
    dma_memory: int
    lanes: tuple[str, ...]
    sessions: int = DEFAULT_SESSIONS
    connections: int = DEFAULT_CONNECTIONS
    controller: str | None = None  # the PCI function it is for (normalized); None: every controller served

    def window(self, client: str) -> Window:
        """The validator's view of this grant for ``client``."""
        return Window(client, self.nsid, self.first_lba, self.blocks, self.writable)


def parse_size(text: Any, where: str) -> int:
    """``16M``, ``512K``, ``1G`` or a plain number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    m = re.fullmatch(r"(\d+)\s*([KMG]?)(?:i?B)?", str(text).strip(), re.I)
    if m is None or int(m.group(1)) == 0:
        raise GrantsError(f"{where}: {text!r} is not a size (e.g. 16M)")
    return int(m.group(1)) << (10 * " KMG".index((m.group(2) or " ").upper()))


def _whole(entry: dict[str, Any], name: str, where: str, default: int | None = None, minimum: int = 0) -> int:
    value = entry.get(name, default)
    if value is None:
        raise GrantsError(f"{where}: {name} is missing")
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise GrantsError(f"{where}: {name} must be a whole number of at least {minimum}, got {value!r}")
    return value


def _principal(entry: dict[str, Any], where: str) -> tuple[int | None, int | None]:
    given = [k for k in ("user", "uid", "group", "gid") if k in entry]
    if len(given) != 1:
        raise GrantsError(f"{where}: name exactly one of user, uid, group, gid (got {', '.join(given) or 'none'})")
    key = given[0]
    value = entry[key]
    try:
        if key == "user":
            return pwd.getpwnam(str(value)).pw_uid, None
        if key == "group":
            return None, grp.getgrnam(str(value)).gr_gid
    except KeyError:
        raise GrantsError(f"{where}: no {key} named {value!r} on this machine") from None
    return (_whole(entry, key, where), None) if key == "uid" else (None, _whole(entry, key, where))


def parse_grants(text: str, source: str = "grants") -> list[ServiceGrant]:
    """The grants in TOML ``text``; raises GrantsError naming the grant and field at fault."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise GrantsError(f"{source}: not valid TOML: {exc}") from None
    entries = doc.get("grant", [])
    if not isinstance(entries, list) or not entries:
        raise GrantsError(f"{source}: no [[grant]] tables")
    out = []
    for i, entry in enumerate(entries, 1):
        where = f"{source}: grant {i}"
        unknown = set(entry) - _FIELDS
        if unknown:
            raise GrantsError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        uid, gid = _principal(entry, where)
        access = entry.get("access", "ro")
        if access not in ("ro", "rw"):
            raise GrantsError(f"{where}: access must be \"ro\" or \"rw\", got {access!r}")
        controller = None
        if "controller" in entry:
            from nvmevfio.pci import normalize_address  # (pci imports pyudev: only when a grant names one)

            try:
                controller = normalize_address(str(entry["controller"]))
            except NvmeVfioError:
                raise GrantsError(f"{where}: controller {entry['controller']!r} is not a PCI address") from None
        lanes = entry.get("lanes", ["default"])
        if not isinstance(lanes, list) or not lanes or any(lane not in LANES for lane in lanes):
            raise GrantsError(f"{where}: lanes must be a list of {', '.join(LANES)}, got {lanes!r}")
        out.append(ServiceGrant(
            uid=uid, gid=gid, nsid=_whole(entry, "nsid", where, minimum=1),
            first_lba=_whole(entry, "first_lba", where, default=0), blocks=_whole(entry, "blocks", where, minimum=1),
            writable=access == "rw", queue_depth=_whole(entry, "queue_depth", where, default=32, minimum=1),
            dma_memory=parse_size(entry.get("dma_memory", "16M"), f"{where}: dma_memory"),
            lanes=tuple(lanes), sessions=_whole(entry, "sessions", where, default=DEFAULT_SESSIONS, minimum=1),
            connections=_whole(entry, "connections", where, default=DEFAULT_CONNECTIONS, minimum=1),
            controller=controller))
    return out


def for_controller(grants: Iterable[ServiceGrant], address: str, served: Iterable[str]) -> list[ServiceGrant]:
    """The grants that apply on the controller at ``address`` (normalized) of those a daemon
    serves (``served``): the ones naming it and the ones naming none. A grant naming a controller
    the daemon does not serve is refused (a typo must not leave a user without access silently)."""
    grants = list(grants)
    served = set(served)
    for i, g in enumerate(grants, 1):
        if g.controller is not None and g.controller not in served:
            raise GrantsError(f"grant {i}: controller {g.controller} is not one this daemon serves "
                              f"({', '.join(sorted(served))})")
    return [g for g in grants if g.controller in (None, address)]


def load_grants(path: str | Path) -> list[ServiceGrant]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise GrantsError(f"cannot read the grants file {path}: {exc.strerror}") from None
    return parse_grants(text, str(path))


def connection_cap(grants: Iterable[ServiceGrant], uid: int, gid: int, groups: Iterable[int] = ()) -> int:
    """How many connections at once a peer with these credentials may hold: the largest cap of
    the grants it could say hello with (any namespace); 0: it has none, close it at once."""
    member = {gid, *groups}
    caps = [g.connections for g in grants if (g.uid is not None and g.uid == uid)
            or (g.uid is None and g.gid in member)]
    return max(caps, default=0)


def grant_for(grants: Iterable[ServiceGrant], uid: int, gid: int, groups: Iterable[int] = ()) -> ServiceGrant | None:
    """The grant for a peer with these credentials (from SO_PEERCRED, plus its supplementary
    groups): its uid's grant first, then the first grant to one of its groups; None: refuse."""
    grants = list(grants)
    for g in grants:
        if g.uid is not None and g.uid == uid:
            return g
    member = {gid, *groups}
    for g in grants:
        if g.gid is not None and g.gid in member:
            return g
    return None
