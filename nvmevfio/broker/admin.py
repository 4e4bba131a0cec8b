"""The named admin and NVM verbs: Get/Set Features, Get Log Page, Format NVM, namespace management
and attachment, Sanitize, firmware download and commit, Device Self-test, Compare and Verify.
Each is a named passthrough (the broker's buffer and DPTR, its refusals, the device's status)
or, for reads, an admin command into the broker's scratch buffer."""

from __future__ import annotations

from typing import Any

import numpy as np

from nvmevfio.broker.commands import AdminCommands
from nvmevfio.broker.common import FORMAT_TIMEOUT_S, MAX_NLB, Namespace, whole
from nvmevfio.broker.core import Core
from nvmevfio.broker.execute import command_sqe, refuse_busy
from nvmevfio.broker.namespaces import Namespaces
from nvmevfio.broker.passthrough import Passthrough
from nvmevfio.errors import Refused
from nvmevfio.nvme import builders


class AdminVerbs:
    def __init__(self, core: Core, admin: AdminCommands, ns: Namespaces, pt: Passthrough) -> None:
        self.core = core
        self.admin = admin
        self.ns = ns
        self.pt = pt

    def get_log_page(self, lid: int, length: int, *, nsid: int = 0xFFFFFFFF, offset: int = 0) -> bytes:
        self.core.require_ready()
        if length <= 0 or length % 4 or length > 1 << 20:
            raise Refused("length-mismatch", f"log page length {length} must be a positive multiple of 4 up to 1 MiB",
                          length=length)
        e = command_sqe(builders.get_log_page(lid, length, nsid=nsid, offset=offset))
        return self.admin.read(e, f"Get Log Page {lid:#04x}", length)

    def get_features(self, fid: int, *, sel: int = 0, nsid: int = 0, cdw11: int = 0) -> int:
        """Get Features ``fid`` (SEL ``sel``: current, default, saved, supported capabilities); returns DW0."""
        self.core.require_ready()
        if not 0 < fid <= 0xFF or sel not in (0, 1, 2, 3):
            raise Refused("invalid-feature", f"feature id {fid:#x} / select {sel} out of range", fid=fid, sel=sel)
        return self.admin.sync(command_sqe(builders.get_features(fid, sel=sel, cdw11=cdw11, nsid=nsid)),
                               f"Get Features {fid:#04x}")

    def set_features(self, fid: int, value: int = 0, *, cdw12: int = 0, save: bool = False, nsid: int = 0,
                     data: Any = None) -> int:
        """Set Features (admin 09h): ``value`` is CDW11, ``save`` sets CDW10.SV; returns DW0."""
        fid = whole(fid, "the feature id")
        if not 0 < fid <= 0xFF:
            raise Refused("invalid-feature", f"feature id {fid:#x} out of range", fid=fid)
        return self.pt.command(0, builders.set_features(fid, value, save=save, cdw12=cdw12, nsid=nsid),
                               f"Set Features {fid:#04x}", data=data)[0]

    def format_nvm(self, nsid: int, lbaf: int, *, ses: int = 0, pi: int = 0, pil: int = 0, mset: int = 0,
                   timeout_s: float | None = None) -> dict[int, Namespace]:
        """Format NVM (admin 80h), then re-identify: a namespace whose geometry changed is refused
        for I/O (``namespace-changed``) until the device is reopened. Refused while I/O is in flight."""
        for name, v, hi in (("lbaf", lbaf, 63), ("ses", ses, 7), ("pi", pi, 7), ("pil", pil, 1), ("mset", mset, 1)):
            if not 0 <= whole(v, name) <= hi:
                raise Refused("invalid-argument", f"{name}={v} outside 0..{hi}", field=name)
        for qp in self.core.io:
            if qp.in_flight:
                refuse_busy(qp)
        cmd = builders.format_nvm(nsid, lbaf, mset=mset, pi=pi, pil=pil, ses=ses)
        try:
            self.pt.command(0, cmd, "Format NVM",
                            timeout_s=timeout_s or max(self.core.command_timeout_s, FORMAT_TIMEOUT_S))
        finally:
            self.ns.reidentify()
            self.ns.update_hot()
        return self.core.namespaces

    def compare(self, nsid: int, slba: int, data: Any, qid: int = 1) -> None:
        """Compare (NVM 05h): the device checks the blocks against ``data``; a difference raises
        CommandError Compare Failure."""
        ns = self.ns.namespace(nsid)
        payload = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
        if not len(payload) or len(payload) % ns.block_size:
            raise Refused("length-mismatch", f"{len(payload)} bytes: whole {ns.block_size}-byte blocks",
                          length=len(payload))
        slba, count = self.ns.check_window(ns, slba, len(payload) // ns.block_size)
        if count > MAX_NLB:
            raise Refused("count-out-of-range", f"{count} blocks: Compare takes at most {MAX_NLB}", count=count)
        self.pt.command(qid, builders.compare(nsid, slba, count), "Compare", data=payload)

    def verify(self, nsid: int, slba: int, count: int, qid: int = 1) -> None:
        """Verify (NVM 0Ch): the device reads and checks the blocks, transferring nothing."""
        slba, count = self.ns.check_window(self.ns.namespace(nsid), slba, count)
        if count > MAX_NLB:
            raise Refused("count-out-of-range", f"{count} blocks: Verify takes at most {MAX_NLB}", count=count)
        self.pt.command(qid, builders.verify(nsid, slba, count), "Verify")

    def create_namespace(self, nsze: int, ncap: int, flbas: int = 0, *, dps: int = 0, nmic: int = 0) -> int:
        """Namespace Management, create (admin 0Dh, SEL 0); returns the new namespace id."""
        host = np.zeros(4096, dtype=np.uint8)
        host[0:8] = np.frombuffer(int(nsze).to_bytes(8, "little"), np.uint8)
        host[8:16] = np.frombuffer(int(ncap).to_bytes(8, "little"), np.uint8)
        host[26], host[29], host[30] = flbas, dps, nmic
        return self.pt.command(0, builders.namespace_create(), "Namespace Management (create)", data=host)[0]

    def delete_namespace(self, nsid: int) -> None:
        """Namespace Management, delete ``nsid`` (its data is gone); the table re-identified."""
        self.pt.command(0, builders.namespace_delete(nsid), "Namespace Management (delete)")
        self.ns.refresh_namespaces()

    def attach_namespace(self, nsid: int, controllers: list[int], *, detach: bool = False) -> None:
        """Namespace Attachment (admin 15h): attach (SEL 0) or detach (SEL 1) to controller ids."""
        ids = [whole(c, "a controller id") for c in controllers]
        if not 0 < len(ids) <= 2047 or not all(0 <= c <= 0xFFFF for c in ids):
            raise Refused("invalid-argument", f"controller list {ids}: 1..2047 ids of 16 bits")
        lst = np.zeros(4096 // 2, dtype="<u2")
        lst[0], lst[1 : 1 + len(ids)] = len(ids), ids
        self.pt.command(0, builders.namespace_attachment(nsid, detach=detach),
                        f"Namespace Attachment ({'detach' if detach else 'attach'})", data=lst.view(np.uint8))
        self.ns.refresh_namespaces()

    def sanitize(self, sanact: int, *, ause: bool = False, owpass: int = 0, oipbp: bool = False,
                 no_dealloc: bool = False, ovrpat: int = 0) -> None:
        """Sanitize (admin 84h): SANACT 1 exit failure, 2 block erase, 3 overwrite, 4 crypto erase."""
        if sanact not in (1, 2, 3, 4) or not 0 <= owpass <= 15:
            raise Refused("invalid-argument", f"sanact {sanact} (1..4) / owpass {owpass} (0..15) out of range")
        self.pt.command(0, builders.sanitize(sanact, ause=ause, owpass=owpass, oipbp=oipbp, no_dealloc=no_dealloc,
                                         ovrpat=ovrpat), "Sanitize")

    def firmware_download(self, image: Any, *, offset: int = 0, xfer: int = 4096) -> int:
        """Firmware Image Download (admin 11h) in ``xfer``-byte pieces from byte ``offset``; returns
        the pieces sent."""
        data = np.frombuffer(memoryview(image).cast("B"), dtype=np.uint8)
        if not len(data) or len(data) % 4 or offset % 4 or xfer <= 0 or xfer % 4:
            raise Refused("length-mismatch", "firmware image, offset and transfer size must be whole dwords")
        pieces = 0
        for start in range(0, len(data), xfer):
            piece = data[start : start + xfer]
            self.pt.command(0, builders.firmware_image_download(len(piece), offset + start), "Firmware Image Download",
                            data=piece)
            pieces += 1
        return pieces

    def firmware_commit(self, slot: int, action: int, *, bpid: int = 0) -> int:
        """Firmware Commit (admin 10h); returns DW0."""
        if not 0 <= slot <= 7 or not 0 <= action <= 7 or bpid not in (0, 1):
            raise Refused("invalid-argument", f"slot {slot} (0..7) / action {action} (0..7) / bpid {bpid} (0..1)")
        return self.pt.command(0, builders.firmware_commit(slot, action, bpid=bpid), "Firmware Commit")[0]

    def device_self_test(self, stc: int, *, nsid: int = 0xFFFFFFFF) -> None:
        """Device Self-test (admin 14h): STC 1 short, 2 extended, 0Eh vendor, 0Fh abort."""
        if stc not in (1, 2, 0xE, 0xF):
            raise Refused("invalid-argument", f"self-test code {stc:#x}: 1, 2, 0xe or 0xf")
        self.pt.command(0, builders.device_self_test(stc, nsid=nsid), "Device Self-test")
