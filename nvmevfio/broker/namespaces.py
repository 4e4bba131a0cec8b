"""Identify and the namespace table: Identify Controller (and MDTS, the per-command transfer
cap), the active namespaces and each one's geometry, kept so that I/O validation is a lookup that
never touches the device; the window, MDTS and namespace refusals every I/O verb makes. Sits
below the admin verbs and the events (which re-identify after a namespace notice)."""

from __future__ import annotations

from typing import Any, Callable

from nvmevfio.broker.commands import AdminCommands
from nvmevfio.broker.common import MAX_NLB, UNLIMITED_MDTS_CAP, Namespace, Zoned, nothing, whole
from nvmevfio.broker.core import Core
from nvmevfio.broker.execute import command_sqe
from nvmevfio.broker.state import BrokerState
from nvmevfio.errors import CommandError, Refused
from nvmevfio.nvme import builders, regs, structures, zns
from nvmevfio.nvme.controller import State
from nvmevfio.nvme.spec import Cns, Csi


class Namespaces:
    def __init__(self, core: Core, admin: AdminCommands) -> None:
        self.core = core
        self.admin = admin
        self.identified: Callable[[], None] = nothing  # after Identify Controller: the events arm

    def identify_controller(self) -> dict[str, Any]:
        """Identify Controller (CNS 01h), parsed (nvme-cli's field names); kept as ``id_ctrl``."""
        core = self.core
        core.require_ready()
        raw = self.admin.read(command_sqe(builders.identify(Cns.CONTROLLER)), "Identify Controller", 4096)
        core.id_ctrl = structures.parse_identify_controller(raw)
        mdts = core.id_ctrl["mdts"]
        mpsmin = 1 << (12 + regs.get(core.ctrl.cap, regs.CAP_.MPSMIN))
        core.max_transfer = UNLIMITED_MDTS_CAP if mdts == 0 else min((1 << mdts) * mpsmin, UNLIMITED_MDTS_CAP)
        self.identified()
        return core.id_ctrl

    def active_namespaces(self) -> list[int]:
        """The active namespace IDs (Identify CNS 02h), ascending."""
        self.core.require_ready()
        raw = self.admin.read(command_sqe(builders.identify(Cns.ACTIVE_NAMESPACE_LIST)),
                              "Identify Active Namespace List", 4096)
        return structures.parse_active_namespaces(raw)

    def identify_namespace(self, nsid: int) -> Namespace:
        """Identify Namespace (CNS 00h) of ``nsid``: its geometry (block size, size, formats)."""
        core = self.core
        core.require_ready()
        if not 1 <= nsid <= 0xFFFFFFFE:
            raise Refused("namespace-inactive", f"namespace id {nsid} is not valid", nsid=nsid)
        raw = self.admin.read(command_sqe(builders.identify(Cns.NAMESPACE, nsid=nsid)), "Identify Namespace", 4096)
        ident = structures.parse_identify_namespace(raw)
        if ident["nsze"] == 0:
            core.namespaces.pop(nsid, None)
            self.update_hot()
            raise Refused("namespace-inactive", f"namespace {nsid} is not active (NSZE=0)", nsid=nsid)
        idx = structures.flbas_index(ident["flbas"], ident["nlbaf"])
        lbaf = ident["lbafs"][idx]
        ns = Namespace(nsid, ident["nsze"], ident["ncap"], ident["nuse"], 1 << lbaf["ds"], lbaf["ms"], idx, ident,
                       self._guard_format(nsid, idx) if ident["dps"] & 7 else 0, self.zoned(nsid, ident, idx))
        core.namespaces[nsid] = ns
        self.update_hot()
        return ns

    def _guard_format(self, nsid: int, lba_format: int) -> int:
        """The Protection Information Format of a namespace with protection (NVM Command Set
        Identify Namespace, CNS 05h CSI 00h); 0 (the 16-bit guard) where the controller lacks it."""
        try:
            raw = self.admin.read(command_sqe(builders.identify(Cns.CSI_NAMESPACE, nsid=nsid, csi=0)),
                                  "Identify Namespace (NVM Command Set)", 4096)
        except CommandError:
            return 0
        return structures.elbaf_pif(raw, lba_format)

    def zoned(self, nsid: int, ident: dict[str, Any], lbaf: int) -> Zoned | None:
        """A Zoned Namespace's geometry (ZNS 1.1, 5.1): when the controller runs every I/O command
        set (CC.CSS 110b) and the namespace's descriptor list (CNS 03h) names CSI 02h, the ZNS
        Identify Namespace (CNS 05h) and Controller (CNS 06h, ZASL); None for any other namespace."""
        core = self.core
        if regs.get(core.ctrl.mmio.read32(regs.CC), regs.CC_.CSS) != regs.CSS_ALL_IO:
            return None
        raw = self.admin.read(command_sqe(builders.identify(Cns.NAMESPACE_DESCRIPTORS, nsid=nsid)),
                              "Identify Namespace Identification Descriptors", 4096)
        if zns.namespace_csi(raw) != Csi.ZONED:
            return None
        zid = zns.parse_zns_identify_namespace(
            self.admin.read(command_sqe(builders.identify(Cns.NAMESPACE_CSI, nsid=nsid, csi=Csi.ZONED)),
                            "Identify Namespace (Zoned)", 4096), ident["nlbaf"])
        zasl = zns.parse_zns_identify_controller(
            self.admin.read(command_sqe(builders.identify(Cns.CONTROLLER_CSI, csi=Csi.ZONED)),
                            "Identify Controller (Zoned)", 4096))["zasl"]
        mpsmin = 1 << (12 + regs.get(core.ctrl.cap, regs.CAP_.MPSMIN))
        mdts = core.max_transfer or UNLIMITED_MDTS_CAP
        size = zid["lbafe"][lbaf]["zsze"]
        return Zoned(size, ident["nsze"] // size if size else 0, zns.limit(zid["mar"]), zns.limit(zid["mor"]),
                     min((1 << zasl) * mpsmin, mdts) if zasl else mdts,
                     zid["lbafe"][lbaf]["zdes"] * 64, zid)

    def refresh_namespaces(self) -> dict[int, Namespace]:
        """Identify every active namespace (CNS 02h, then CNS 00h for each), so that I/O
        validation afterwards is a lookup that never touches the device. The table is never
        emptied on the way: each namespace's entry is replaced as it is identified and the ones no
        longer active are dropped at the end, so that another thread's lookup meanwhile (a reset's
        re-identify while a workload's thread validates its next request) finds the namespace,
        not a transient "no namespace" (``namespace-inactive``)."""
        core = self.core
        active = self.active_namespaces()
        for nsid in active:
            self.identify_namespace(nsid)
        core.namespaces = {n: ns for n, ns in core.namespaces.items() if n in active}
        self.update_hot()
        return core.namespaces

    def reidentify(self, *, vanished_changed: bool = True) -> None:
        """Identify the namespaces again; one whose size or format changed is refused for I/O
        (``namespace-changed``) until the device is reopened. ``vanished_changed``: so is one
        that is no longer active (after a reset); otherwise (a namespace notice: detached or
        deleted) it is just inactive, and usable again when it comes back unchanged."""
        core = self.core

        def geometry() -> dict[int, tuple[int, int, int]]:
            return {n: (ns.size_blocks, ns.block_size, ns.metadata_size) for n, ns in core.namespaces.items()}

        before = geometry()
        self.refresh_namespaces()
        after = geometry()
        core.changed_namespaces |= {n for n in before if before[n] != after.get(n)
                                    and (vanished_changed or n in after)}
        self.update_hot()

    def update_hot(self) -> None:
        """The namespaces the synchronous hot path may use without further checks."""
        core = self.core
        ready = (core.io and core.ctrl.state is State.READY
                 and core.life.state is not BrokerState.GONE and core.failed is None
                 and not core.ledger.bounce)  # no-IOMMU lane: every copy goes through the checked path
        core.hot = {n: ns for n, ns in core.namespaces.items()
                    if not ns.metadata_size and n not in core.changed_namespaces} if ready else {}

    # ============================================================ the I/O verbs' refusals
    def namespace(self, nsid: int, metadata: bool = False) -> Namespace:
        """The identified namespace ``nsid``; a pure lookup (refresh_namespaces() fills the table).
        One whose format carries metadata is refused (``unsupported-lba-format``) unless
        ``metadata``: the verbs that move metadata (read/write) or none (flush) take it."""
        core = self.core
        core.require_ready()
        nsid = whole(nsid, "the namespace id")
        if nsid in core.changed_namespaces:
            raise Refused("namespace-changed", f"namespace {nsid} changed size or format (a controller reset or "
                          "Format NVM); I/O to it is refused until the device is reopened", nsid=nsid)
        ns = core.namespaces.get(nsid)
        if ns is None:
            raise Refused("namespace-inactive",
                          f"namespace {nsid} is not active on this controller (active: "
                          f"{sorted(core.namespaces) or 'none'})", nsid=nsid, active=sorted(core.namespaces))
        if ns.metadata_size and not metadata:
            raise Refused("unsupported-lba-format",
                          f"namespace {nsid} uses LBA format {ns.lba_format} with {ns.metadata_size} bytes of "
                          "metadata per block; this verb moves data alone: use read/write (metadata=...)", nsid=nsid)
        return ns

    @staticmethod
    def check_window(ns: Namespace, slba: int, count: int) -> tuple[int, int]:
        """Refuse a window outside the namespace; returns (slba, count) as Python ints."""
        slba, count = whole(slba, "the LBA"), whole(count, "the block count")
        if count <= 0:
            raise Refused("count-out-of-range", f"block count {count} must be positive", count=count)
        if slba < 0 or slba + count > ns.size_blocks:
            raise Refused("window-past-namespace-end",
                          f"blocks {slba}..{slba + count - 1} are outside namespace {ns.nsid} "
                          f"(0..{ns.size_blocks - 1})", slba=slba, count=count, nsze=ns.size_blocks)
        return slba, count

    def zoned_namespace(self, nsid: int) -> tuple[Namespace, Zoned]:
        """The identified namespace ``nsid`` and its zone geometry; ``not-zoned`` for a namespace of
        another command set (or a controller not running every I/O command set)."""
        ns = self.namespace(nsid)
        if ns.zoned is None:
            raise Refused("not-zoned", f"namespace {nsid} is not a zoned namespace (Identify: CSI is not 02h, or "
                          "the controller does not offer every I/O command set, CAP.CSS bit 6)", nsid=nsid)
        return ns, ns.zoned

    def check_zone_start(self, ns: Namespace, zoned: Zoned, zslba: int) -> int:
        """``zslba`` must be the first LBA of a zone of ``ns`` (``not-zone-start``)."""
        zslba = whole(zslba, "the zone's start LBA")
        if not 0 <= zslba < ns.size_blocks or zslba % zoned.zone_size:
            raise Refused("not-zone-start", f"LBA {zslba} is not the start of a zone of namespace {ns.nsid} "
                          f"(zones of {zoned.zone_size} blocks, {zoned.zones} of them)", slba=zslba,
                          zone_size=zoned.zone_size)
        return zslba

    def check_append(self, ns: Namespace, zslbas: list[int], counts: list[int]) -> None:
        """Zone Append's rules before the device: each ZSLBA a zone start, each count 1..ZASL's
        blocks (``append-too-large``) and within a zone (``crosses-zone``)."""
        zoned = self.zoned_namespace(ns.nsid)[1]
        limit = zoned.append_limit // ns.block_size
        for zslba, count in zip(zslbas, counts):
            self.check_zone_start(ns, zoned, zslba)
            if count > limit:
                raise Refused("append-too-large", f"a Zone Append of {count} blocks: ZASL allows {limit} "
                              f"({zoned.append_limit} bytes)", count=count, limit=limit)
            if not 0 < count <= zoned.zone_size:
                raise Refused("crosses-zone", f"{count} blocks do not fit a zone of {zoned.zone_size}",
                              count=count, zone_size=zoned.zone_size)

    @property
    def max_pages(self) -> int:
        """Memory pages one command may touch: MDTS counts bytes, but a transfer at an
        in-page offset touches one page more; devices bound their scatter lists by
        pages (QEMU fails at 1025), so the page count is the limit that holds."""
        return max(1, self.core.max_transfer // self.core.page_size)

    def max_blocks(self, ns: Namespace, in_page_offset: int = 0) -> int:
        """Blocks per command for data starting at ``in_page_offset`` within a page."""
        ps = self.core.page_size
        limit = self.core.max_transfer - (ps if in_page_offset % ps else 0)
        return max(1, min(limit // ns.block_size, MAX_NLB))

    def check_rw(self, ns: Namespace, base: int, size: int, slba: int, count: int,
                 offset: int) -> tuple[int, int, int]:
        """Every rule for one READ/WRITE, on Python ints: returns (iova, length, pages)."""
        limit = self.max_blocks(ns)
        if count < 1 or count > limit:
            raise Refused("count-out-of-range", f"block count {count}: must be 1..{limit} per command (MDTS)",
                          count=count, limit=limit)
        if slba < 0 or slba + count > ns.size_blocks:
            self.check_window(ns, slba, count)
        length = count * ns.block_size
        if offset < 0 or offset & 3 or offset + length > size:
            raise Refused("length-mismatch", f"{length} bytes at offset {offset} fall outside the {size}-byte "
                          "buffer or are not dword aligned", offset=offset, length=length, size=size)
        ps = self.core.page_size
        iova = base + offset
        pages = (iova % ps + length + ps - 1) // ps  # from the start of PRP1's page to the last byte
        if pages > self.max_pages:
            raise Refused("count-out-of-range", f"a command would touch {pages} memory pages, more than "
                          f"{self.max_pages} (MDTS); at an in-page offset it carries at most "
                          f"{self.max_blocks(ns, 4)} blocks", max_pages=self.max_pages)
        return iova, length, pages
