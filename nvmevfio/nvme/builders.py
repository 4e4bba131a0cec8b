"""NVMe command builders: one pure function per command the broker sends, typed fields in, the
command's opcode, NSID and CDW10..15 out (:class:`Command`).

CDW0's command id, FUSE and PSDT, the metadata pointer and the data pointer (PRP1/PRP2, queue
bases) are the broker's to author, never a builder's. A value that does not fit its field is
refused (:class:`FieldOutOfRange`), never truncated. Sections: NVMe Base Specification 2.0
(admin commands in 5, Flush in 7.1) and NVM Command Set 1.0 (3.2).
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from nvmevfio.errors import Refused
from nvmevfio.nvme.spec import AdminOpcode, Feature, IoOpcode


class FieldOutOfRange(Refused, ValueError):
    """A command field's value does not fit the field; ``field`` names it (reason ``invalid-argument``)."""

    def __init__(self, command: str, field: str, value: Any, allowed: str) -> None:
        super().__init__("invalid-argument", f"{command}: {field}={value!r:.40} does not fit ({allowed})",
                         command=command, field=field, value=value, allowed=allowed)
        self.field = field


@dataclass(frozen=True)
class Command:
    """A built command: the opcode, NSID and command dwords 10..15."""

    opc: int
    nsid: int = 0
    cdw10: int = 0
    cdw11: int = 0
    cdw12: int = 0
    cdw13: int = 0
    cdw14: int = 0
    cdw15: int = 0

    @property
    def cdws(self) -> dict[str, int]:
        """CDW10..15 by name, as the SQE dtype's fields and :meth:`Broker.passthru` take them."""
        return {"cdw10": self.cdw10, "cdw11": self.cdw11, "cdw12": self.cdw12, "cdw13": self.cdw13,
                "cdw14": self.cdw14, "cdw15": self.cdw15}


def _int(value: Any) -> int | None:
    """``value`` as an int when it is a whole number (an int or numpy integer, not a bool), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _fit(command: str, field: str, value: Any, bits: int, lo: int = 0) -> int:
    """``value`` in lo..2^bits-1 (a field of ``bits`` bits), else FieldOutOfRange naming the field.
    Bools are refused: a flag is a bool parameter of its own."""
    v = _int(value)
    if v is None or not lo <= v < 1 << bits:
        raise FieldOutOfRange(command, field, value, f"a whole number in {lo}..{(1 << bits) - 1}")
    return v


def _zeros_based(command: str, field: str, count: Any, bits: int, lo: int = 1, hi: int | None = None) -> int:
    """A count as the spec's 0's based field of ``bits`` bits: count - 1, the count in lo..hi
    (hi 2^bits unless the spec reserves the all-ones value)."""
    hi = 1 << bits if hi is None else hi
    v = _int(count)
    if v is None or not lo <= v <= hi:
        raise FieldOutOfRange(command, field, count, f"a count in {lo}..{hi}")
    return v - 1


def _dwords(command: str, field: str, nbytes: Any, lo: int, hi: int) -> int:
    """A byte length or offset as whole dwords, lo..hi of them."""
    v = _int(nbytes)
    if v is None or v % 4 or not lo <= v // 4 <= hi:
        raise FieldOutOfRange(command, field, nbytes, f"whole dwords, {4 * lo}..{4 * hi} bytes")
    return v // 4


def _flag(value: Any) -> int:
    """A one-bit flag: 1 when ``value`` is true (never a wider value shifted into the next field)."""
    return 1 if value else 0


_Q = TypeVar("_Q", int, np.ndarray)


def split_qword(value: _Q) -> tuple[_Q, _Q]:
    """A 64-bit value (or an array of them) as its low and high dwords."""
    return value & 0xFFFFFFFF, value >> 32


def _nsid(command: str, nsid: Any) -> int:
    return _fit(command, "NSID", nsid, 32)


# ---------------------------------------------------------------- admin commands (NVMe Base 2.0, 5)
def abort(sqid: int, cid: int) -> Command:
    """Abort (5.1): CDW10 SQID 15:0, CID 31:16."""
    return Command(AdminOpcode.ABORT, cdw10=_fit("Abort", "SQID", sqid, 16) | (_fit("Abort", "CID", cid, 16) << 16))


def async_event_request() -> Command:
    """Asynchronous Event Request (5.2): no command dwords."""
    return Command(AdminOpcode.ASYNC_EVENT_REQUEST)


def _queue_dw10(command: str, qid: int, size: int) -> int:
    """CDW10 of Create I/O CQ/SQ: QID 15:0 (not 0: the admin queue's), QSIZE 31:16, 0's based
    (2..65536 entries)."""
    return _fit(command, "QID", qid, 16, lo=1) | (_zeros_based(command, "QSIZE", size, 16, lo=2) << 16)


def create_io_cq(qid: int, size: int, *, contiguous: bool = True, interrupts: bool = False,
                 vector: int = 0) -> Command:
    """Create I/O Completion Queue (5.4, Figures 155-156): CDW10 QID, QSIZE; CDW11 PC bit 0,
    IEN bit 1, IV 31:16. The queue's base (PRP1) is the broker's."""
    name = "Create I/O CQ"
    return Command(AdminOpcode.CREATE_IO_CQ, cdw10=_queue_dw10(name, qid, size),
                   cdw11=_flag(contiguous) | (_flag(interrupts) << 1) | (_fit(name, "IV", vector, 16) << 16))


def create_io_sq(qid: int, size: int, cqid: int, *, contiguous: bool = True, qprio: int = 0) -> Command:
    """Create I/O Submission Queue (5.5, Figures 159-160): CDW10 QID, QSIZE; CDW11 PC bit 0,
    QPRIO 2:1, CQID 31:16. The queue's base (PRP1) is the broker's."""
    name = "Create I/O SQ"
    return Command(AdminOpcode.CREATE_IO_SQ, cdw10=_queue_dw10(name, qid, size),
                   cdw11=_flag(contiguous) | (_fit(name, "QPRIO", qprio, 2) << 1)
                   | (_fit(name, "CQID", cqid, 16, lo=1) << 16))


def delete_io_cq(qid: int) -> Command:
    """Delete I/O Completion Queue (5.6): CDW10 QID 15:0."""
    return Command(AdminOpcode.DELETE_IO_CQ, cdw10=_fit("Delete I/O CQ", "QID", qid, 16, lo=1))


def delete_io_sq(qid: int) -> Command:
    """Delete I/O Submission Queue (5.7): CDW10 QID 15:0."""
    return Command(AdminOpcode.DELETE_IO_SQ, cdw10=_fit("Delete I/O SQ", "QID", qid, 16, lo=1))


def device_self_test(stc: int, *, nsid: int = 0xFFFFFFFF) -> Command:
    """Device Self-test (5.8): CDW10 STC 3:0 (1 short, 2 extended, Eh vendor specific, Fh abort)."""
    name = "Device Self-test"
    return Command(AdminOpcode.DEVICE_SELF_TEST, nsid=_nsid(name, nsid), cdw10=_fit(name, "STC", stc, 4))


def doorbell_buffer_config() -> Command:
    """Doorbell Buffer Config (5.11): no command dwords; the shadow doorbell page (PRP1) and the
    EventIdx page (PRP2) are the broker's."""
    return Command(AdminOpcode.DOORBELL_BUFFER_CONFIG)


def firmware_commit(slot: int, action: int, *, bpid: int = 0) -> Command:
    """Firmware Commit (5.12): CDW10 FS 2:0, CA 5:3, BPID bit 31."""
    name = "Firmware Commit"
    return Command(AdminOpcode.FIRMWARE_COMMIT, cdw10=_fit(name, "FS", slot, 3) | (_fit(name, "CA", action, 3) << 3)
                   | (_fit(name, "BPID", bpid, 1) << 31))


def firmware_image_download(length: int, offset: int) -> Command:
    """Firmware Image Download (5.13): CDW10 NUMD, the 0's based dword count of ``length`` bytes;
    CDW11 OFST, the byte ``offset`` in dwords."""
    name = "Firmware Image Download"
    return Command(AdminOpcode.FIRMWARE_IMAGE_DOWNLOAD, cdw10=_dwords(name, "length", length, 1, 1 << 32) - 1,
                   cdw11=_dwords(name, "offset", offset, 0, (1 << 32) - 1))


def format_nvm(nsid: int, lbaf: int, *, mset: int = 0, pi: int = 0, pil: int = 0, ses: int = 0) -> Command:
    """Format NVM (5.14): CDW10 LBAF 3:0, MSET 4, PI 7:5, PIL 8, SES 11:9, LBAFU 13:12 (bits 5:4
    of the LBA format index)."""
    name = "Format NVM"
    lbaf = _fit(name, "LBAF", lbaf, 6)
    return Command(AdminOpcode.FORMAT_NVM, nsid=_nsid(name, nsid),
                   cdw10=(lbaf & 0xF) | (_fit(name, "MSET", mset, 1) << 4) | (_fit(name, "PI", pi, 3) << 5)
                   | (_fit(name, "PIL", pil, 1) << 8) | (_fit(name, "SES", ses, 3) << 9) | ((lbaf >> 4) << 12))


def get_features(fid: int, *, sel: int = 0, cdw11: int = 0, nsid: int = 0) -> Command:
    """Get Features (5.15): CDW10 FID 7:0, SEL 10:8 (0 current, 1 default, 2 saved, 3 supported
    capabilities); CDW11 feature specific."""
    name = "Get Features"
    return Command(AdminOpcode.GET_FEATURES, nsid=_nsid(name, nsid),
                   cdw10=_fit(name, "FID", fid, 8) | (_fit(name, "SEL", sel, 3) << 8),
                   cdw11=_fit(name, "CDW11", cdw11, 32))


def get_log_page(lid: int, length: int, *, nsid: int = 0xFFFFFFFF, offset: int = 0, lsp: int = 0,
                 rae: bool = False) -> Command:
    """Get Log Page (5.16): CDW10 LID 7:0, LSP 14:8, RAE bit 15, NUMDL 31:16; CDW11 NUMDU 15:0
    (NUMD: the 0's based dword count of ``length`` bytes); CDW12/13 LPOL/LPOU, the byte offset."""
    name = "Get Log Page"
    numd = _dwords(name, "length", length, 1, 1 << 32) - 1
    lpol, lpou = split_qword(_fit(name, "offset", offset, 64))
    return Command(AdminOpcode.GET_LOG_PAGE, nsid=_nsid(name, nsid),
                   cdw10=_fit(name, "LID", lid, 8) | (_fit(name, "LSP", lsp, 7) << 8) | (_flag(rae) << 15)
                   | ((numd & 0xFFFF) << 16), cdw11=numd >> 16, cdw12=lpol, cdw13=lpou)


def identify(cns: int, *, nsid: int = 0, cntid: int = 0, csi: int = 0) -> Command:
    """Identify (5.17): CDW10 CNS 7:0, CNTID 31:16; CDW11 CSI 31:24."""
    name = "Identify"
    return Command(AdminOpcode.IDENTIFY, nsid=_nsid(name, nsid),
                   cdw10=_fit(name, "CNS", cns, 8) | (_fit(name, "CNTID", cntid, 16) << 16),
                   cdw11=_fit(name, "CSI", csi, 8) << 24)


def namespace_attachment(nsid: int, *, detach: bool = False) -> Command:
    """Namespace Attachment (5.20): CDW10 SEL 3:0, 0 attach, 1 detach; the controller list is data."""
    return Command(AdminOpcode.NAMESPACE_ATTACHMENT, nsid=_nsid("Namespace Attachment", nsid), cdw10=_flag(detach))


def namespace_create() -> Command:
    """Namespace Management, create (5.21): CDW10 SEL 3:0 = 0, NSID 0; the namespace's fields are data."""
    return Command(AdminOpcode.NAMESPACE_MANAGEMENT, cdw10=0)


def namespace_delete(nsid: int) -> Command:
    """Namespace Management, delete (5.21): CDW10 SEL 3:0 = 1."""
    return Command(AdminOpcode.NAMESPACE_MANAGEMENT, nsid=_nsid("Namespace Management", nsid), cdw10=1)


def sanitize(sanact: int, *, ause: bool = False, owpass: int = 0, oipbp: bool = False, no_dealloc: bool = False,
             ovrpat: int = 0) -> Command:
    """Sanitize (5.24): CDW10 SANACT 2:0, AUSE 3, OWPASS 7:4, OIPBP 8, NDAS 9; CDW11 OVRPAT."""
    name = "Sanitize"
    return Command(AdminOpcode.SANITIZE,
                   cdw10=_fit(name, "SANACT", sanact, 3) | (_flag(ause) << 3) | (_fit(name, "OWPASS", owpass, 4) << 4)
                   | (_flag(oipbp) << 8) | (_flag(no_dealloc) << 9), cdw11=_fit(name, "OVRPAT", ovrpat, 32))


def set_features(fid: int, value: int = 0, *, save: bool = False, cdw12: int = 0, nsid: int = 0) -> Command:
    """Set Features (5.27): CDW10 FID 7:0, SV bit 31; CDW11 (``value``) and CDW12 feature specific."""
    name = "Set Features"
    return Command(AdminOpcode.SET_FEATURES, nsid=_nsid(name, nsid),
                   cdw10=_fit(name, "FID", fid, 8) | (_flag(save) << 31),
                   cdw11=_fit(name, "CDW11", value, 32), cdw12=_fit(name, "CDW12", cdw12, 32))


def set_number_of_queues(sq_count: int, cq_count: int) -> Command:
    """Set Features Number of Queues (5.27.1, FID 07h): CDW11 NSQR 15:0, NCQR 31:16, 0's based
    (FFFFh is invalid: 1..65535 queues)."""
    name = "Set Features (Number of Queues)"
    return set_features(Feature.NUMBER_OF_QUEUES, _zeros_based(name, "NSQR", sq_count, 16, hi=0xFFFF)
                        | (_zeros_based(name, "NCQR", cq_count, 16, hi=0xFFFF) << 16))


def split_number_of_queues(dw0: int) -> tuple[int, int]:
    """(I/O SQs, I/O CQs) allocated, from Number of Queues' completion DW0: NSQA 15:0, NCQA 31:16,
    0's based."""
    return (dw0 & 0xFFFF) + 1, (dw0 >> 16) + 1


def set_async_event_configuration(aec: int) -> Command:
    """Set Features Asynchronous Event Configuration (5.27.1, FID 0Bh): CDW11 the events to report
    (SMART/health critical warnings 7:0, notices 31:8)."""
    return set_features(Feature.ASYNC_EVENT_CONFIGURATION, aec)


# ----------------------------------------------------------- NVM commands (NVM Command Set 1.0, 3.2)
_FUA, _LR = 1 << 30, 1 << 31  # CDW12 of Read, Write, Compare, Verify, Write Zeroes


def rw_dwords(slba: int, nlb: int, *, fua: bool = False, lr: bool = False,
              command: str = "Read/Write") -> tuple[int, int, int]:
    """CDW10, CDW11, CDW12 of a command on a range of blocks: SLBA's low and high dwords; NLB
    15:0, 0's based (1..65536 blocks), FUA bit 30, LR bit 31."""
    if not (type(slba) is int and type(nlb) is int and 0 <= slba < 1 << 64 and 0 < nlb <= 1 << 16):  # cheap when fine
        slba, nlb = _fit(command, "SLBA", slba, 64), _zeros_based(command, "NLB", nlb, 16) + 1
    low, high = split_qword(slba)
    return low, high, (nlb - 1) | (_FUA if fua else 0) | (_LR if lr else 0)


def rw_dword_arrays(slbas: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`rw_dwords` for a batch (no FUA, no LR): arrays of CDW10, CDW11 and CDW12."""
    bad = (counts < 1) | (counts > 1 << 16)
    if bad.any():
        raise FieldOutOfRange("Read/Write", "NLB", int(counts[bad][0]), f"a count in 1..{1 << 16}")
    if (slbas < 0).any():
        raise FieldOutOfRange("Read/Write", "SLBA", int(slbas[slbas < 0][0]), f"a whole number in 0..{(1 << 64) - 1}")
    low, high = split_qword(slbas)
    return low, high, counts - 1


def _blocks(opc: int, name: str, nsid: int, slba: int, nlb: int, *, fua: bool = False, lr: bool = False,
            cdw12: int = 0) -> Command:
    """A command on blocks SLBA..SLBA+NLB-1 of a namespace (CDW10..12 as :func:`rw_dwords`)."""
    cdw10, cdw11, dw12 = rw_dwords(slba, nlb, fua=fua, lr=lr, command=name)
    return Command(opc, nsid=_nsid(name, nsid), cdw10=cdw10, cdw11=cdw11, cdw12=dw12 | cdw12)


def _protected(opc: int, name: str, nsid: int, slba: int, nlb: int, fua: bool, lr: bool, pract: bool, prchk: int,
               reftag: int, apptag: int, appmask: int) -> Command:
    """Read or Write with end-to-end protection fields (NVM Command Set 1.0, 3.2.4/3.2.6 and 5.2):
    CDW12 PRINFO (PRACT bit 29, PRCHK 28:26), CDW14 EILBRT (the expected or initial reference
    tag), CDW15 LBATM 31:16 (the application tag mask) and LBAT 15:0 (the application tag)."""
    cmd = _blocks(opc, name, nsid, slba, nlb, fua=fua, lr=lr,
                  cdw12=(_flag(pract) << 29) | (_fit(name, "PRCHK", prchk, 3) << 26))
    if not (reftag or apptag or appmask):
        return cmd
    return dataclasses.replace(cmd, cdw14=_fit(name, "EILBRT", reftag, 32),
                               cdw15=(_fit(name, "LBATM", appmask, 16) << 16) | _fit(name, "LBAT", apptag, 16))


def read(nsid: int, slba: int, nlb: int, *, fua: bool = False, lr: bool = False, pract: bool = False,
         prchk: int = 0, reftag: int = 0, apptag: int = 0, appmask: int = 0) -> Command:
    """Read (NVM 3.2.4): SLBA, NLB 0's based, FUA, LR; the protection fields as
    :func:`_protected`. The PRPs and the metadata pointer are the broker's."""
    return _protected(IoOpcode.READ, "Read", nsid, slba, nlb, fua, lr, pract, prchk, reftag, apptag, appmask)


def write(nsid: int, slba: int, nlb: int, *, fua: bool = False, lr: bool = False, pract: bool = False,
          prchk: int = 0, reftag: int = 0, apptag: int = 0, appmask: int = 0) -> Command:
    """Write (NVM 3.2.6): SLBA, NLB 0's based, FUA, LR; the protection fields as
    :func:`_protected`. The PRPs and the metadata pointer are the broker's."""
    return _protected(IoOpcode.WRITE, "Write", nsid, slba, nlb, fua, lr, pract, prchk, reftag, apptag, appmask)


def compare(nsid: int, slba: int, nlb: int) -> Command:
    """Compare (NVM 3.2.1): SLBA, NLB 0's based; the data to compare is the broker's buffer."""
    return _blocks(IoOpcode.COMPARE, "Compare", nsid, slba, nlb)


def verify(nsid: int, slba: int, nlb: int) -> Command:
    """Verify (NVM 3.2.5): SLBA, NLB 0's based; nothing is transferred."""
    return _blocks(IoOpcode.VERIFY, "Verify", nsid, slba, nlb)


def write_zeroes(nsid: int, slba: int, nlb: int, *, deac: bool = False) -> Command:
    """Write Zeroes (NVM 3.2.8): SLBA, NLB 0's based; CDW12 DEAC bit 25 (the controller may
    deallocate the blocks; they still read as zeros)."""
    return _blocks(IoOpcode.WRITE_ZEROES, "Write Zeroes", nsid, slba, nlb, cdw12=_flag(deac) << 25)


_STC = 1 << 24  # CDW12 Storage Tag Check (NVM Command Set 1.0, 3.2.4)


def nvm_io(opc: int, nsid: int, slba: int, nlb: int, *, lr: bool = False, fua: bool = False, prinfo: int = 0,
           stc: bool = False, dtype: int = 0, dspec: int = 0, dsm: int = 0, reftag: int = 0, apptag: int = 0,
           appmask: int = 0, cdw12: int = 0, command: str = "") -> Command:
    """Read, Write, Compare, Verify or Write Zeroes with every field nvme-cli's submit_io, verify and
    write-zeroes set (NVM Command Set 1.0, 3.2; libnvme's nvme_io): CDW10/11 SLBA; CDW12 NLB 15:0
    (``nlb`` blocks, 1..65536), LR bit 31, FUA 30, PRINFO 29:26 (PRACT 29, PRCHK 28:26), STC 24,
    DTYPE 23:20, and ``cdw12``'s own bits (Write Zeroes' DEAC 25); CDW13 DSPEC 31:16 and DSM 7:0
    (the dataset management hints); CDW14 EILBRT; CDW15 LBATM 31:16, LBAT 15:0. The data pointer and
    the metadata pointer are the broker's."""
    name = command or f"NVM command {opc:#04x}"
    cmd = _blocks(opc, name, nsid, slba, nlb, fua=fua, lr=lr,
                  cdw12=(_fit(name, "PRINFO", prinfo, 4) << 26) | (_flag(stc) * _STC)
                  | (_fit(name, "DTYPE", dtype, 4) << 20) | cdw12)
    return dataclasses.replace(cmd, cdw13=(_fit(name, "DSPEC", dspec, 16) << 16) | _fit(name, "DSM", dsm, 8),
                               cdw14=_fit(name, "EILBRT", reftag, 32),
                               cdw15=(_fit(name, "LBATM", appmask, 16) << 16) | _fit(name, "LBAT", apptag, 16))


def dataset_management(nsid: int, ranges: int, *, deallocate: bool = False) -> Command:
    """Dataset Management (NVM 3.2.3): CDW10 NR 7:0, 0's based (1..256 ranges); CDW11 AD bit 2
    (deallocate). The range list is data."""
    name = "Dataset Management"
    return Command(IoOpcode.DATASET_MANAGEMENT, nsid=_nsid(name, nsid), cdw10=_zeros_based(name, "NR", ranges, 8),
                   cdw11=_flag(deallocate) << 2)


def flush(nsid: int) -> Command:
    """Flush (NVMe Base 2.0, 7.1): no command dwords."""
    return Command(IoOpcode.FLUSH, nsid=_nsid("Flush", nsid))


# --------------------------------------------- Zoned Namespace commands (ZNS Command Set 1.1, 3.4)
def zone_management_send(nsid: int, slba: int, zsa: int, *, select_all: bool = False,
                         zsaso: bool = False) -> Command:
    """Zone Management Send (ZNS 3.4.3): CDW10/11 SLBA (the zone's first LBA; ignored with Select
    All); CDW13 ZSA 7:0, Select All bit 8, ZSASO bit 9."""
    name = "Zone Management Send"
    low, high = split_qword(_fit(name, "SLBA", slba, 64))
    return Command(IoOpcode.ZONE_MANAGEMENT_SEND, nsid=_nsid(name, nsid), cdw10=low, cdw11=high,
                   cdw13=_fit(name, "ZSA", zsa, 8) | (_flag(select_all) << 8) | (_flag(zsaso) << 9))


def zone_management_receive(nsid: int, slba: int, length: int, *, zra: int = 0, zrasf: int = 0,
                            partial: bool = False) -> Command:
    """Zone Management Receive (ZNS 3.4.2): CDW10/11 SLBA; CDW12 NUMD, 0's based dwords of data;
    CDW13 ZRA 7:0 (report / extended report), ZRASF 15:8 (the state filter), Partial Report bit 16."""
    name = "Zone Management Receive"
    low, high = split_qword(_fit(name, "SLBA", slba, 64))
    return Command(IoOpcode.ZONE_MANAGEMENT_RECEIVE, nsid=_nsid(name, nsid), cdw10=low, cdw11=high,
                   cdw12=_dwords(name, "NUMD", length, 1, 1 << 32) - 1,
                   cdw13=_fit(name, "ZRA", zra, 8) | (_fit(name, "ZRASF", zrasf, 8) << 8) | (_flag(partial) << 16))


def zone_append(nsid: int, zslba: int, nlb: int, *, fua: bool = False, lr: bool = False) -> Command:
    """Zone Append (ZNS 3.4.1): CDW10/11 ZSLBA (the zone's first LBA), CDW12 NLB 0's based, FUA,
    LR; the LBA the controller wrote comes back in DW0/DW1 of the completion."""
    return _blocks(IoOpcode.ZONE_APPEND, "Zone Append", nsid, zslba, nlb, fua=fua, lr=lr)
