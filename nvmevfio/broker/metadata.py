"""Read and Write with metadata and end-to-end protection (NVM Command Set 1.0, 5.2 and 5.3):
the data and the metadata through buffers of the broker's own, the metadata pointer (MPTR)
authored from its ledger for a separate-metadata format, each block's data and metadata
interleaved for an extended-LBA format, and PRINFO, EILBRT, LBAT and LBATM per command. The
refusals a caller's numbers earn come before the device: the metadata's length, metadata needed
and not given (``metadata-required``), protection asked of a namespace without it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from nvmevfio.broker.common import MAX_NLB, Namespace, byte_view, whole
from nvmevfio.broker.core import Core
from nvmevfio.broker.execute import Executor, command_sqe
from nvmevfio.broker.namespaces import Namespaces
from nvmevfio.dma import DmaBuffer, align_up
from nvmevfio.errors import Refused
from nvmevfio.nvme import builders
from nvmevfio.nvme.pi import PRCHK_ALL, PRCHK_REFTAG


@dataclass(frozen=True)
class Fields:
    """A caller's protection fields for one Read or Write of a namespace with metadata."""

    pract: bool = False  # the controller inserts (write) or strips (read) the protection information
    prchk: int = 0  # PRCHK: 4 guard, 2 application tag, 1 reference tag (nvme-cli's --prinfo bits 2:0)
    reftag: int | None = None  # EILBRT of the first block; None: the low 32 bits of the LBA
    apptag: int = 0  # LBAT
    appmask: int = 0  # LBATM

    def checked(self, ns: Namespace) -> Fields:
        """Refuse what does not fit before anything is sent."""
        prchk, apptag, appmask = (whole(v, what) for v, what in
                                  ((self.prchk, "prchk"), (self.apptag, "apptag"), (self.appmask, "appmask")))
        if (self.pract or prchk) and ns.protection is None:
            raise Refused("invalid-argument", f"namespace {ns.nsid} has no protection information (Identify "
                          "Namespace DPS type 0): PRACT and PRCHK do not apply", nsid=ns.nsid)
        if not 0 <= prchk <= PRCHK_ALL or not 0 <= apptag <= 0xFFFF or not 0 <= appmask <= 0xFFFF:
            raise Refused("invalid-argument", f"prchk {prchk} (0..7), apptag {apptag:#x} and appmask {appmask:#x} "
                          "(16 bits) do not fit", prchk=prchk, apptag=apptag, appmask=appmask)
        if prchk & PRCHK_REFTAG and ns.protection is not None and ns.protection.pi_type == 3:
            raise Refused("invalid-argument", f"namespace {ns.nsid} has type 3 protection, whose reference tag is "
                          "not checked (NVM Command Set 1.0, 5.2): PRCHK bit 0 is refused", nsid=ns.nsid)
        reftag = None if self.reftag is None else whole(self.reftag, "reftag")
        if reftag is not None and not 0 <= reftag <= 0xFFFFFFFF:
            raise Refused("invalid-argument", f"reftag {reftag:#x} is not a 32-bit value", reftag=reftag)
        return Fields(bool(self.pract), prchk, reftag, apptag, appmask)


class MetadataIO:
    def __init__(self, core: Core, ex: Executor, ns: Namespaces) -> None:
        self.core = core
        self.ex = ex
        self.ns = ns

    @staticmethod
    def stripped(ns: Namespace, f: Fields) -> bool:
        """PRACT on a format whose metadata is the tuple alone: no metadata crosses the bus (NVM
        Command Set 1.0, 5.2)."""
        return f.pract and ns.protection is not None and ns.metadata_size == ns.protection.tuple_bytes

    def _geometry(self, ns: Namespace, f: Fields) -> tuple[int, int, int]:
        """(bytes per block on the data pointer, metadata bytes per block on MPTR, blocks per command)."""
        ms = 0 if self.stripped(ns, f) else ns.metadata_size
        per_block = ns.block_size + (ms if ns.extended_lba else 0)
        separate = 0 if ns.extended_lba else ms
        per = max(1, min(self.core.max_transfer // per_block, MAX_NLB))
        return per_block, separate, per

    def _buffers(self, per_block: int, separate: int, per: int) -> tuple[DmaBuffer, DmaBuffer | None]:
        """The data buffer and (separate metadata) the metadata buffer, contiguous: MPTR names one
        piece of memory, not pages (NVMe Base 2.0, 4.1.1, PRP mode)."""
        ledger, ps = self.core.ledger, self.core.page_size
        data = ledger.alloc(align_up(per * per_block, ps), owner="broker:metadata-data")
        try:
            meta = ledger.alloc(align_up(per * separate, ps), owner="broker:metadata", contiguous=True) \
                if separate else None
        except BaseException:
            ledger.free(data)
            raise
        return data, meta

    def _free(self, *bufs: DmaBuffer | None) -> None:
        ledger = self.core.ledger
        for b in bufs:
            if b is not None and ledger.in_flight(b) == 0:
                ledger.free(b)  # scrubbed; one still in flight stays quarantined until close

    def _command(self, read: bool, ns: Namespace, slba: int, start: int, k: int, f: Fields, data: DmaBuffer,
                 meta: DmaBuffer | None, per_block: int, qid: int) -> None:
        """One Read or Write of ``k`` blocks at ``start``: PRINFO and the tags, MPTR, the PRPs."""
        pi = ns.protection
        ref = start if f.reftag is None else f.reftag + (start - slba if pi is not None and pi.pi_type != 3 else 0)
        build = builders.read if read else builders.write
        cmd = build(ns.nsid, start, k, pract=f.pract, prchk=f.prchk, reftag=ref & 0xFFFFFFFF, apptag=f.apptag,
                    appmask=f.appmask)
        ledger = self.core.ledger
        # MPTR: the broker's metadata buffer, as the device must see it (the no-IOMMU lane: physical)
        mptr = ledger.device_address(ledger.iova(meta)) if meta is not None else 0
        self.ex.exec(self.core.queue(qid), command_sqe(cmd, mptr=mptr), "Read" if read else "Write", data,
                     k * per_block, nsid=ns.nsid, slba=start, count=k)

    def read(self, ns: Namespace, slba: int, count: int, qid: int, metadata: bool, f: Fields) -> Any:
        """``count`` blocks: their data (and, ``metadata``, their metadata: count x ms bytes)."""
        f = f.checked(ns)
        if metadata and self.stripped(ns, f):
            raise Refused("invalid-argument", f"with PRACT the controller strips namespace {ns.nsid}'s protection "
                          "information, its whole metadata: there is no metadata to return", nsid=ns.nsid)
        bs, ms = ns.block_size, ns.metadata_size
        per_block, separate, per = self._geometry(ns, f)
        out = np.empty(count * bs, dtype=np.uint8)
        md = np.zeros(count * ms, dtype=np.uint8)
        dbuf, mbuf = self._buffers(per_block, separate, min(per, count))
        try:
            for start in range(slba, slba + count, per):
                k = min(per, slba + count - start)
                self._command(True, ns, slba, start, k, f, dbuf, mbuf, per_block, qid)
                i = start - slba
                rows = dbuf.array[: k * per_block].reshape(k, per_block)
                out[i * bs : (i + k) * bs] = rows[:, :bs].reshape(-1)
                if per_block > bs:
                    md[i * ms : (i + k) * ms] = rows[:, bs:].reshape(-1)
                elif mbuf is not None:
                    md[i * ms : (i + k) * ms] = mbuf.array[: k * ms]
        finally:
            self._free(dbuf, mbuf)
        return (out, md) if metadata else out

    def write(self, ns: Namespace, slba: int, src: np.ndarray, qid: int, metadata: Any, f: Fields) -> int:
        """Write ``src``'s whole blocks with their ``metadata`` (count x ms bytes; may be None when
        the controller inserts the protection information itself, PRACT on a format whose
        metadata is the tuple alone)."""
        f = f.checked(ns)
        bs, ms = ns.block_size, ns.metadata_size
        count = len(src) // bs
        md = None
        if metadata is not None:
            if self.stripped(ns, f):
                raise Refused("invalid-argument", f"with PRACT the controller inserts namespace {ns.nsid}'s "
                              "protection information, its whole metadata: give no metadata", nsid=ns.nsid)
            md = byte_view(metadata, "metadata")
            if len(md) != count * ms:
                raise Refused("length-mismatch", f"{len(md)} bytes of metadata for {count} blocks of namespace "
                              f"{ns.nsid}: {count} x {ms} = {count * ms} expected", length=len(md),
                              expected=count * ms)
        elif not self.stripped(ns, f):
            raise Refused("metadata-required", f"namespace {ns.nsid} carries {ms} bytes of metadata per block: give "
                          "metadata=... (count x ms bytes)" + (", or pract=True for the controller to insert the "
                                                               "protection information" if ns.protection else ""),
                          nsid=ns.nsid, metadata_size=ms)
        per_block, separate, per = self._geometry(ns, f)
        dbuf, mbuf = self._buffers(per_block, separate, min(per, count))
        try:
            for start in range(slba, slba + count, per):
                k = min(per, slba + count - start)
                i = start - slba
                rows = dbuf.array[: k * per_block].reshape(k, per_block)
                rows[:, :bs] = src[i * bs : (i + k) * bs].reshape(k, bs)
                if md is not None and per_block > bs:
                    rows[:, bs:] = md[i * ms : (i + k) * ms].reshape(k, ms)
                elif md is not None and mbuf is not None:
                    mbuf.array[: k * ms] = md[i * ms : (i + k) * ms]
                self._command(False, ns, slba, start, k, f, dbuf, mbuf, per_block, qid)
        finally:
            self._free(dbuf, mbuf)
        return count
