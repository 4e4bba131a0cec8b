"""Passthrough: any command the broker does not own, on the admin queue or an I/O queue, with the
caller's CDW2/3/10..15 and bytes, never an address; the broker copies through a buffer of its own
and authors DPTR. Every ``broker-owned-command`` refusal is here."""

from __future__ import annotations

from typing import Any

import numpy as np

from nvmevfio.broker.commands import AdminCommands
from nvmevfio.broker.common import UNLIMITED_MDTS_CAP, BrokerQueue, byte_view, whole
from nvmevfio.broker.core import Core
from nvmevfio.broker.execute import Executor, Ran, sqe
from nvmevfio.dma import align_up
from nvmevfio.errors import Refused
from nvmevfio.nvme import builders
from nvmevfio.nvme.spec import AdminOpcode

# Passthrough: the dwords a caller may set, and the commands the broker owns (it authors the
# addresses they carry, or its ledger and queues depend on them); refused `broker-owned-command`.
PASSTHRU_DWORDS = ("cdw2", "cdw3", "cdw10", "cdw11", "cdw12", "cdw13", "cdw14", "cdw15")
PASSTHRU_MAX = 2 << 20  # one PRP-list page per admin command
BROKER_OWNED_ADMIN = {
    0x00: "Delete I/O Submission Queue", 0x01: "Create I/O Submission Queue",
    0x04: "Delete I/O Completion Queue", 0x05: "Create I/O Completion Queue", 0x08: "Abort",
    0x0C: "Asynchronous Event Request", 0x7C: "Doorbell Buffer Config",
}
BROKER_OWNED_FEATURES = {0x07: "Number of Queues", 0x0D: "Host Memory Buffer"}


class Passthrough:
    def __init__(self, core: Core, ex: Executor, admin: AdminCommands) -> None:
        self.core = core
        self.ex = ex
        self.admin = admin

    def passthru(self, qid: int, opcode: int, *, nsid: int = 0, cdws: dict[str, int] | None = None,
                 data: Any = None, data_len: int = 0, timeout_s: float | None = None,
                 name: str | None = None, metadata: Any = None) -> tuple[int, bytes | None]:
        """Any command the broker does not own, on the admin queue (``qid`` 0) or an I/O queue: the
        caller gives CDW2/3/10..15 (``cdws``, by name), the bytes to send (``data``) or the length
        to receive (``data_len``), never an address; the broker copies through a buffer of its own
        and authors DPTR. Returns (DW0, the bytes received or None). No retries: the status is the
        device's. Refused before the device sees anything: commands whose addresses or state the
        broker owns (:data:`BROKER_OWNED_ADMIN`, Set Features :data:`BROKER_OWNED_FEATURES`),
        fused or SGL commands (CDW0 FUSE/PSDT); all with reason ``broker-owned-command``.

        ``metadata`` (an I/O command): a buffer whose length is the metadata's; the broker copies
        it through a contiguous buffer of its own and authors MPTR (NVMe Base 2.0, 4.1.1): sent
        with ``data``, filled in (it must be writable) when receiving. A data command on a
        namespace whose format has separate metadata without it: ``metadata-required``."""
        core = self.core
        core.require_ready()
        qp = core.admin if qid == 0 else core.queue(qid)
        if qp is None:
            raise Refused("controller-not-enabled", "controller is not enabled")
        opcode = whole(opcode, "the opcode")
        if not 0 <= opcode <= 0xFF:
            raise Refused("invalid-argument", f"opcode {opcode:#x} is not a byte", opcode=opcode)
        words = {k: whole(v, k) for k, v in (cdws or {}).items()}
        for k, v in words.items():
            if k not in PASSTHRU_DWORDS:
                raise Refused("invalid-argument", f"{k}: passthrough takes {', '.join(PASSTHRU_DWORDS)} (the broker "
                              "authors CDW0, PRP1/PRP2 and the metadata pointer)", field=k)
            if not 0 <= v <= 0xFFFFFFFF:
                raise Refused("invalid-argument", f"{k}={v:#x} is not a 32-bit value", field=k)
        nsid = whole(nsid, "the namespace id")
        if not 0 <= nsid <= 0xFFFFFFFF:
            raise Refused("invalid-argument", f"namespace id {nsid:#x} is not a 32-bit value", nsid=nsid)
        name = name or (f"Admin passthru {opcode:#04x}" if qid == 0 else f"I/O passthru {opcode:#04x}")
        owned = self.broker_owned(qid, opcode, words.get("cdw10", 0), nsid)
        if owned:
            raise Refused("broker-owned-command", f"{name}: {owned} is the broker's (it authors the addresses "
                          "and state the command carries); use the provider's verbs", opcode=opcode)
        if data is not None and data_len:
            raise Refused("invalid-argument", "give data (to send) or data_len (to receive), not both")
        payload = None if data is None else np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
        length = len(payload) if payload is not None else whole(data_len, "data_len")
        limit = min(core.max_transfer or UNLIMITED_MDTS_CAP, PASSTHRU_MAX)
        if not 0 <= length <= limit:
            raise Refused("length-mismatch", f"{length} bytes: passthrough moves at most {limit} (MDTS)",
                          length=length, limit=limit)
        md = self._metadata(qid, metadata, payload is None, limit)
        ns = core.namespaces.get(nsid) if qid else None
        if md is None and ns is not None and ns.metadata_size and opcode & 3 and not ns.extended_lba:
            raise Refused("metadata-required", f"{name}: namespace {nsid}'s format has {ns.metadata_size} bytes of "
                          "separate metadata per block: give metadata=... (the broker authors MPTR)", nsid=nsid)
        ran, got = self.exchange(qp, sqe(opcode, nsid=nsid, **words), name, payload, length, timeout_s, md)
        return self.admin.settled(ran), got

    def exchange(self, qp: BrokerQueue, e: np.ndarray, name: str, payload: np.ndarray | None, length: int,
                 timeout_s: float | None = None, md: np.ndarray | None = None) -> tuple[Ran, bytes | None]:
        """One checked command through a buffer of the broker's own: ``payload`` sent, or ``length``
        bytes received (returned); ``md``: metadata sent, or filled, through a contiguous buffer of
        the broker's whose address it authors as MPTR. No retries. Returns its :class:`Ran` (DW0, DW1) too."""
        core = self.core
        ledger = core.ledger
        buf = ledger.alloc(align_up(max(length, 1), core.page_size), owner="broker:passthru") if length else None
        mbuf = None
        try:
            if md is not None:
                mbuf = ledger.alloc(align_up(len(md), core.page_size), owner="broker:passthru-metadata",
                                    contiguous=True)
                mbuf.array[:] = 0
                mbuf.array[: len(md)] = md
                e["mptr"] = ledger.device_address(ledger.iova(mbuf))  # the no-IOMMU lane: physical
            if buf is not None:
                buf.array[:] = 0
                if payload is not None:
                    buf.array[:length] = payload
            ran = self.ex.exec(qp, e, name, buf, length, timeout_s=timeout_s, retry=False, opcode=int(e["opc"][0]))
            if md is not None and mbuf is not None and payload is None:
                md[:] = mbuf.array[: len(md)]
            return ran, (bytes(buf.array[:length]) if buf is not None and payload is None else None)
        finally:
            for b in (buf, mbuf):
                if b is not None and ledger.in_flight(b) == 0:
                    ledger.free(b)  # scrubbed; one still in flight stays quarantined until close

    @staticmethod
    def _metadata(qid: int, metadata: Any, receiving: bool, limit: int) -> np.ndarray | None:
        """The caller's metadata buffer as uint8 (writable when it is to be filled), or None."""
        if metadata is None:
            return None
        if qid == 0:
            raise Refused("invalid-argument", "admin commands carry no metadata pointer")
        md = byte_view(metadata, "metadata")
        if not 0 < len(md) <= limit:
            raise Refused("length-mismatch", f"{len(md)} bytes of metadata: 1..{limit}", length=len(md))
        if receiving and not md.flags.writeable:
            raise Refused("invalid-argument", "metadata to be received needs a writable buffer (a bytearray or "
                          "numpy array)", type=type(metadata).__name__)
        return md

    def command(self, qid: int, cmd: builders.Command, name: str, **kw: Any) -> tuple[int, bytes | None]:
        """:meth:`passthru` of a built command (its opcode, NSID and CDW10..15)."""
        return self.passthru(qid, cmd.opc, nsid=cmd.nsid, cdws=cmd.cdws, name=name, **kw)

    def broker_owned(self, qid: int, opcode: int, cdw10: int, nsid: int) -> str:
        """Why a passthrough command is the broker's ('' when it is not)."""
        if qid == 0:
            if opcode in BROKER_OWNED_ADMIN:
                return BROKER_OWNED_ADMIN[opcode]
            if opcode == AdminOpcode.SET_FEATURES and cdw10 & 0xFF in BROKER_OWNED_FEATURES:
                return f"Set Features {BROKER_OWNED_FEATURES[cdw10 & 0xFF]}"
        return ""
