"""The Zoned Namespace verbs (ZNS Command Set 1.1): Report Zones (Zone Management Receive), the
zone actions (Zone Management Send: open, close, finish, reset, offline; one zone or all), Zone
Append (the broker authors it; the LBA the controller chose comes back from DW0/DW1), and the
zoned block API's write, refused before the device unless it starts at the zone's write pointer
and stays within the zone's capacity. Batched appends at depth go through ``Submit.submit_rw``
(``IoOpcode.ZONE_APPEND``, checked by ``Namespaces.check_append``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from nvmevfio.broker.common import Namespace, Zoned, whole
from nvmevfio.broker.core import Core
from nvmevfio.broker.execute import command_sqe
from nvmevfio.broker.namespaces import Namespaces
from nvmevfio.broker.passthrough import PASSTHRU_MAX, Passthrough
from nvmevfio.broker.syncio import SyncIO
from nvmevfio.errors import Refused
from nvmevfio.nvme import builders, zns
from nvmevfio.nvme.zns import Zone, ZoneReceiveAction, ZoneSendAction, ZoneState

ACTIONS = {"open": ZoneSendAction.OPEN, "close": ZoneSendAction.CLOSE, "finish": ZoneSendAction.FINISH,
           "reset": ZoneSendAction.RESET, "offline": ZoneSendAction.OFFLINE}
STATES = {name.lower(): state for state, name in zns.STATE_NAMES.items()}  # "empty", "imp_opened", ...


class ZoneVerbs:
    def __init__(self, core: Core, ns: Namespaces, pt: Passthrough, sio: SyncIO) -> None:
        self.core = core
        self.ns = ns
        self.pt = pt
        self.sio = sio

    def zone_report(self, nsid: int, slba: int = 0, *, state: str | None = None, count: int | None = None,
                    partial: bool = False, extended: bool = False, qid: int = 1) -> tuple[int, list[Zone]]:
        """Report Zones (Zone Management Receive) from the zone holding ``slba``: ``count``
        descriptors at most (all from there when None), only zones in ``state`` (nvme-cli's
        words, lower case: ``empty``, ``imp_opened``, ``exp_opened``, ``closed``, ``full``,
        ``readonly``, ``offline``) when given; ``partial`` asks the device to count only the
        descriptors it returns; ``extended`` adds each zone's descriptor extension. Returns (the
        Number of Zones of the first report's header, the zones)."""
        ns, zoned = self.ns.zoned_namespace(nsid)
        slba = whole(slba, "the LBA")
        if not 0 <= slba < ns.size_blocks:
            raise Refused("window-past-namespace-end", f"LBA {slba} is outside namespace {nsid}", slba=slba)
        if state is not None and state not in STATES:
            raise Refused("invalid-argument", f"zone state {state!r}: one of {', '.join(STATES)}", state=state)
        if extended and not zoned.extension_bytes:
            raise Refused("invalid-argument", f"namespace {nsid} has no zone descriptor extension (ZDES 0): "
                          "no extended report", nsid=nsid)
        ext = zoned.extension_bytes if extended else 0
        stride = zns.ZONE_DESCRIPTOR.itemsize + ext
        left = zoned.zones - slba // zoned.zone_size if count is None else whole(count, "the descriptor count")
        if left < 0:
            raise Refused("invalid-argument", f"descriptor count {left} is negative", count=left)
        per = (min(self.core.max_transfer or PASSTHRU_MAX, PASSTHRU_MAX) - zns.REPORT_HEADER_BYTES) // stride
        zra = ZoneReceiveAction.EXTENDED_REPORT_ZONES if extended else ZoneReceiveAction.REPORT_ZONES
        zrasf = zns.REPORT_FILTER[STATES[state]] if state else 0
        nr_zones, at = -1, slba
        zones: list[Zone] = []
        while True:  # nvme-cli's way: chunks, each from the zone after the last one reported
            want = max(1, min(left - len(zones), per))
            length = zns.REPORT_HEADER_BYTES + want * stride
            cmd = builders.zone_management_receive(nsid, at, length, zra=zra, zrasf=zrasf, partial=partial)
            raw = self.pt.command(qid, cmd, "Zone Management Receive", data_len=length)[1] or b""
            got_nr, got = zns.parse_report_zones(raw, ext)
            nr_zones = got_nr if nr_zones < 0 else nr_zones
            zones += got[: max(0, left - len(zones))]
            if len(zones) >= left or not got or got[-1].slba + zoned.zone_size >= ns.size_blocks:
                return nr_zones, zones
            at = got[-1].slba + zoned.zone_size

    def zones(self, nsid: int, qid: int = 1) -> list[Zone]:
        """Every zone of the namespace, in LBA order (its state, write pointer and capacity)."""
        return self.zone_report(nsid, qid=qid)[1]

    def zone_action(self, nsid: int, action: str, slba: int = 0, *, select_all: bool = False, qid: int = 1) -> int:
        """Zone Management Send: ``action`` (``open``, ``close``, ``finish``, ``reset``, ``offline``)
        on the zone starting at ``slba`` (``not-zone-start`` otherwise), or on every zone the
        action applies to with ``select_all``. The device's refusals come back named (Invalid Zone
        State Transition, Too Many Open Zones, Too Many Active Zones, ...). Returns DW0 (bit 0 after
        a reset: ZCAPC, the zone's capacity changed)."""
        ns, zoned = self.ns.zoned_namespace(nsid)
        if action not in ACTIONS:
            raise Refused("invalid-argument", f"zone action {action!r}: one of {', '.join(ACTIONS)}", action=action)
        slba = 0 if select_all else self.ns.check_zone_start(ns, zoned, slba)
        return self.pt.command(qid, builders.zone_management_send(nsid, slba, ACTIONS[action], select_all=select_all),
                               f"Zone Management Send ({action}{' all' if select_all else ''})")[0]

    def zone_append(self, nsid: int, zslba: int, data: Any, qid: int = 1) -> int:
        """Zone Append of whole blocks to the zone starting at ``zslba``; returns the LBA the
        controller wrote them at. Refused before the device: not a zone start
        (``not-zone-start``), more than ZASL allows (``append-too-large``), more than a zone."""
        ns, _ = self.ns.zoned_namespace(nsid)
        qp = self.core.queue(qid)
        payload = self._blocks(ns, data)
        count = len(payload) // ns.block_size
        self.ns.check_append(ns, [whole(zslba, "the zone's start LBA")], [count])
        ran, _ = self.pt.exchange(qp, command_sqe(builders.zone_append(nsid, zslba, count)), "Zone Append",
                                  payload, len(payload))
        return ran.dw0 | ran.dw1 << 32

    def zone_write(self, nsid: int, slba: int, data: Any, qid: int = 1) -> int:
        """The zoned block API's write: whole blocks at ``slba``, which must be the write pointer
        of a zone that can take writes (``not-write-pointer``, ``zone-not-writable``), all within
        the zone's capacity (``crosses-zone``); the zone's state is read first (one Report Zones).
        Returns the block count."""
        ns, zoned = self.ns.zoned_namespace(nsid)
        payload = self._blocks(ns, data)
        slba, count = self.ns.check_window(ns, slba, len(payload) // ns.block_size)
        zone = self._zone(ns, zoned, slba, qid)
        if zone.state not in zns.WRITABLE_STATES:
            raise Refused("zone-not-writable", f"the zone at LBA {zone.slba} is {zone.state_name}: it takes no "
                          "writes", zslba=zone.slba, state=zone.state_name)
        if slba != zone.wp:
            raise Refused("not-write-pointer", f"LBA {slba} is not the write pointer of its zone ({zone.wp}): a "
                          "zone is written sequentially", slba=slba, wp=zone.wp)
        if slba + count > zone.slba + zone.capacity:
            raise Refused("crosses-zone", f"blocks {slba}..{slba + count - 1} go past the zone's capacity (the "
                          f"zone at {zone.slba} holds {zone.capacity} blocks)", slba=slba, count=count,
                          capacity=zone.capacity)
        return self.sio.write(nsid, slba, payload, qid)

    def _zone(self, ns: Namespace, zoned: Zoned, lba: int, qid: int) -> Zone:
        _, got = self.zone_report(ns.nsid, zoned.zone_start(lba), count=1, partial=True, qid=qid)
        if not got:  # pragma: no cover - a device that reports no zone where its geometry says one is
            raise Refused("not-zoned", f"namespace {ns.nsid} reported no zone at LBA {lba}", lba=lba)
        return got[0]

    @staticmethod
    def _blocks(ns: Namespace, data: Any) -> np.ndarray:
        try:
            payload = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
        except (TypeError, ValueError) as exc:
            raise Refused("invalid-argument", f"data must be a contiguous bytes-like object ({exc})") from exc
        if not len(payload) or len(payload) % ns.block_size:
            raise Refused("length-mismatch", f"{len(payload)} bytes is not a positive multiple of the "
                          f"{ns.block_size}-byte block size", length=len(payload), block_size=ns.block_size)
        return payload


__all__ = ["ACTIONS", "STATES", "ZoneState", "ZoneVerbs"]
