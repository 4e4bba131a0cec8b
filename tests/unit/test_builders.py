"""The command builders (nvme/builders.py) with hand-computed dwords: every builder, its field
boundaries, and the refusals of a value that does not fit (never truncated). Sections: NVMe Base
2.0 and NVM Command Set 1.0."""

import numpy as np
import pytest

from nvmevfio.broker.execute import command_sqe
from nvmevfio.errors import Refused
from nvmevfio.nvme import builders, spec, structures
from nvmevfio.nvme.builders import Command, FieldOutOfRange
from nvmevfio.nvme.spec import Cns

U64_MAX = (1 << 64) - 1


def dwords(c: Command) -> tuple[int, int, int, int, int, int, int, int]:
    return (c.opc, c.nsid, c.cdw10, c.cdw11, c.cdw12, c.cdw13, c.cdw14, c.cdw15)


def refused(field: str, build, *args, **kw) -> FieldOutOfRange:
    with pytest.raises(FieldOutOfRange) as ei:
        build(*args, **kw)
    assert ei.value.field == field and ei.value.reason == "invalid-argument"
    assert f"{field}=" in str(ei.value)
    return ei.value


# ---------------------------------------------------------------- helpers
def test_split_qword():
    assert builders.split_qword(0x1234_5678_9ABC_DEF0) == (0x9ABC_DEF0, 0x1234_5678)
    assert builders.split_qword(U64_MAX) == (0xFFFF_FFFF, 0xFFFF_FFFF)
    assert builders.split_qword(0) == (0, 0)
    lo, hi = builders.split_qword(np.array([0x1_0000_0002, 0xFFFF_FFFF], dtype=np.int64))
    assert lo.tolist() == [2, 0xFFFF_FFFF] and hi.tolist() == [1, 0]


def test_field_out_of_range_is_a_value_error_and_a_refusal():
    e = refused("QID", builders.delete_io_sq, 0x1_0000)
    assert isinstance(e, ValueError) and isinstance(e, Refused)
    assert e.context["command"] == "Delete I/O SQ" and e.context["allowed"] == "a whole number in 1..65535"


@pytest.mark.parametrize("bad", [True, np.bool_(False), 1.0, "1", None])
def test_numeric_fields_take_whole_numbers_only(bad):
    refused("CID", builders.abort, 1, bad)


def test_numpy_integers_are_whole_numbers():
    assert builders.abort(np.uint16(1), np.int64(2)).cdw10 == 0x0002_0001


def test_cdws_by_name():
    c = Command(0x42, nsid=9, cdw10=1, cdw11=2, cdw12=3, cdw13=4, cdw14=5, cdw15=6)
    assert c.cdws == {"cdw10": 1, "cdw11": 2, "cdw12": 3, "cdw13": 4, "cdw14": 5, "cdw15": 6}


def test_command_sqe_places_every_field():
    e = command_sqe(Command(0x42, nsid=9, cdw10=1, cdw11=2, cdw12=3, cdw13=4, cdw14=5, cdw15=6),
                    prp1=0x1000, prp2=0x2000)
    assert e.dtype == spec.SQE and len(e) == 1
    got = {k: int(e[k][0]) for k in spec.SQE.names}
    assert got == {"opc": 0x42, "flags": 0, "cid": 0, "nsid": 9, "cdw2": 0, "cdw3": 0, "mptr": 0, "prp1": 0x1000,
                   "prp2": 0x2000, "cdw10": 1, "cdw11": 2, "cdw12": 3, "cdw13": 4, "cdw14": 5, "cdw15": 6}


# ---------------------------------------------------------------- queues (5.4-5.7), Abort (5.1)
def test_create_io_cq():
    c = builders.create_io_cq(3, 256, contiguous=True, interrupts=True, vector=2)
    assert dwords(c) == (0x05, 0, 0x00FF_0003, 0x0002_0003, 0, 0, 0, 0)
    assert dwords(builders.create_io_cq(1, 2)) == (0x05, 0, 0x0001_0001, 0x0000_0001, 0, 0, 0, 0)  # polled
    c = builders.create_io_cq(0xFFFF, 65536, contiguous=False, interrupts=True, vector=0xFFFF)
    assert (c.cdw10, c.cdw11) == (0xFFFF_FFFF, 0xFFFF_0002)


def test_create_io_cq_refusals():
    refused("QID", builders.create_io_cq, 0, 64)  # the admin queue's
    refused("QID", builders.create_io_cq, 0x1_0000, 64)
    refused("QSIZE", builders.create_io_cq, 1, 1)  # a queue holds at least two entries
    refused("QSIZE", builders.create_io_cq, 1, 65537)
    refused("IV", builders.create_io_cq, 1, 64, interrupts=True, vector=0x1_0000)
    refused("IV", builders.create_io_cq, 1, 64, interrupts=True, vector=-1)


def test_create_io_sq():
    assert dwords(builders.create_io_sq(3, 256, 3)) == (0x01, 0, 0x00FF_0003, 0x0003_0001, 0, 0, 0, 0)
    c = builders.create_io_sq(0xFFFF, 65536, 0xFFFF, contiguous=False, qprio=3)
    assert (c.cdw10, c.cdw11) == (0xFFFF_FFFF, 0xFFFF_0006)
    refused("CQID", builders.create_io_sq, 1, 64, 0)
    refused("QPRIO", builders.create_io_sq, 1, 64, 1, qprio=4)
    refused("QSIZE", builders.create_io_sq, 1, 0, 1)


def test_delete_io_queues():
    assert dwords(builders.delete_io_sq(7)) == (0x00, 0, 7, 0, 0, 0, 0, 0)
    assert dwords(builders.delete_io_cq(0xFFFF)) == (0x04, 0, 0xFFFF, 0, 0, 0, 0, 0)
    refused("QID", builders.delete_io_cq, 0)
    refused("QID", builders.delete_io_sq, 0x1_0000)


def test_abort():
    assert dwords(builders.abort(2, 0x1234)) == (0x08, 0, 0x1234_0002, 0, 0, 0, 0, 0)
    assert builders.abort(0, 0xFFFF).cdw10 == 0xFFFF_0000  # an admin command (SQID 0)
    refused("CID", builders.abort, 1, 0x1_0000)
    refused("SQID", builders.abort, -1, 0)


# ---------------------------------------------------------------- Identify (5.17), Set/Get Features (5.15, 5.27)
def test_identify():
    assert dwords(builders.identify(Cns.CONTROLLER)) == (0x06, 0, 0x01, 0, 0, 0, 0, 0)
    assert dwords(builders.identify(Cns.NAMESPACE, nsid=5)) == (0x06, 5, 0x00, 0, 0, 0, 0, 0)
    assert dwords(builders.identify(Cns.ACTIVE_NAMESPACE_LIST)) == (0x06, 0, 0x02, 0, 0, 0, 0, 0)
    c = builders.identify(0x06, cntid=0x1234, csi=2, nsid=0xFFFF_FFFF)
    assert (c.nsid, c.cdw10, c.cdw11) == (0xFFFF_FFFF, 0x1234_0006, 0x0200_0000)
    refused("CNS", builders.identify, 0x100)
    refused("CSI", builders.identify, 0x05, csi=0x100)
    refused("CNTID", builders.identify, 0x13, cntid=0x1_0000)
    refused("NSID", builders.identify, 0, nsid=1 << 32)


def test_set_features():
    assert dwords(builders.set_features(0x06, 1)) == (0x09, 0, 0x06, 1, 0, 0, 0, 0)
    c = builders.set_features(0xFF, 0xFFFF_FFFF, save=True, cdw12=0xFFFF_FFFF, nsid=1)
    assert dwords(c) == (0x09, 1, 0x8000_00FF, 0xFFFF_FFFF, 0xFFFF_FFFF, 0, 0, 0)
    refused("FID", builders.set_features, 0x100)
    refused("CDW11", builders.set_features, 0x06, 1 << 32)
    refused("CDW11", builders.set_features, 0x06, -1)
    refused("CDW11", builders.set_features, 0x06, True)
    refused("CDW12", builders.set_features, 0x06, 0, cdw12=1 << 32)


def test_get_features():
    assert dwords(builders.get_features(0x07)) == (0x0A, 0, 0x07, 0, 0, 0, 0, 0)
    assert dwords(builders.get_features(0x03, sel=3, cdw11=5, nsid=1)) == (0x0A, 1, 0x0303, 5, 0, 0, 0, 0)
    refused("SEL", builders.get_features, 0x07, sel=8)
    refused("FID", builders.get_features, -1)
    refused("CDW11", builders.get_features, 0x07, cdw11=1 << 32)


def test_number_of_queues():
    assert dwords(builders.set_number_of_queues(4, 4)) == (0x09, 0, 0x07, 0x0003_0003, 0, 0, 0, 0)
    assert builders.set_number_of_queues(1, 1).cdw11 == 0
    assert builders.set_number_of_queues(2, 0xFFFF).cdw11 == 0xFFFE_0001  # FFFFh (65536 queues) is invalid
    refused("NSQR", builders.set_number_of_queues, 0x1_0000, 1)
    refused("NCQR", builders.set_number_of_queues, 1, 0)
    assert builders.split_number_of_queues(0x0003_0007) == (8, 4)
    assert builders.split_number_of_queues(0xFFFF_FFFF) == (65536, 65536)


def test_async_event_configuration():
    aec = structures.AEC_SMART_WARNINGS | structures.AEC_NOTICES_FROM_OAES
    assert dwords(builders.set_async_event_configuration(aec)) == (0x09, 0, 0x0B, 0x7F1F, 0, 0, 0, 0)


def test_async_event_request_and_doorbell_buffer_config_carry_no_dwords():
    assert dwords(builders.async_event_request()) == (0x0C, 0, 0, 0, 0, 0, 0, 0)
    assert dwords(builders.doorbell_buffer_config()) == (0x7C, 0, 0, 0, 0, 0, 0, 0)


# ---------------------------------------------------------------- Get Log Page (5.16)
def test_get_log_page():
    assert dwords(builders.get_log_page(0x02, 512)) == (0x02, 0xFFFF_FFFF, 0x007F_0002, 0, 0, 0, 0, 0)
    assert dwords(builders.get_log_page(0x01, 4, nsid=0)) == (0x02, 0, 0x0000_0001, 0, 0, 0, 0, 0)  # NUMD 0: one dword
    c = builders.get_log_page(0x0D, 1 << 20, offset=0x1_0000_0004, lsp=0x7F, rae=True)
    # NUMD 3FFFFh: NUMDL FFFFh, NUMDU 3; LSP 7Fh at 14:8, RAE bit 15
    assert dwords(c) == (0x02, 0xFFFF_FFFF, 0xFFFF_FF0D, 0x0000_0003, 0x0000_0004, 0x0000_0001, 0, 0)
    c = builders.get_log_page(0xFF, 1 << 34, offset=U64_MAX)  # the largest NUMD and offset
    assert (c.cdw10, c.cdw11, c.cdw12, c.cdw13) == (0xFFFF_00FF, 0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFFF)


def test_get_log_page_refusals():
    refused("length", builders.get_log_page, 0x02, 0)
    refused("length", builders.get_log_page, 0x02, 6)  # not whole dwords
    refused("length", builders.get_log_page, 0x02, (1 << 34) + 4)
    refused("LID", builders.get_log_page, 0x100, 512)
    refused("LSP", builders.get_log_page, 0x02, 512, lsp=0x80)
    refused("offset", builders.get_log_page, 0x02, 512, offset=1 << 64)
    refused("offset", builders.get_log_page, 0x02, 512, offset=-4)


# ---------------------------------------------------------------- Format, Sanitize, firmware, self-test, namespaces
def test_format_nvm():
    assert dwords(builders.format_nvm(1, 0)) == (0x80, 1, 0, 0, 0, 0, 0, 0)
    # LBAF 37 = 25h: bits 3:0 = 5, LBAFU (13:12) = 2; MSET 4, PI 7:5, PIL 8, SES 11:9
    assert builders.format_nvm(0xFFFF_FFFF, 37, mset=1, pi=7, pil=1, ses=7).cdw10 == 0x2FF5
    assert builders.format_nvm(1, 63).cdw10 == 0x300F
    refused("LBAF", builders.format_nvm, 1, 64)
    refused("PI", builders.format_nvm, 1, 0, pi=8)
    refused("SES", builders.format_nvm, 1, 0, ses=8)
    refused("MSET", builders.format_nvm, 1, 0, mset=2)


def test_sanitize():
    c = builders.sanitize(2, ause=True, owpass=15, oipbp=True, no_dealloc=True, ovrpat=0xDEAD_BEEF)
    assert dwords(c) == (0x84, 0, 0x3FA, 0xDEAD_BEEF, 0, 0, 0, 0)
    assert dwords(builders.sanitize(4)) == (0x84, 0, 0x004, 0, 0, 0, 0, 0)
    refused("SANACT", builders.sanitize, 8)
    refused("OWPASS", builders.sanitize, 3, owpass=16)
    refused("OVRPAT", builders.sanitize, 3, ovrpat=1 << 32)


def test_flags_are_one_bit():
    """A truthy non-bool flag sets its bit only, never the fields above it."""
    assert builders.sanitize(1, ause=8).cdw10 == 0x009  # type: ignore[arg-type]
    assert builders.create_io_cq(1, 2, interrupts=4).cdw11 == 0x3  # type: ignore[arg-type]


def test_firmware():
    assert dwords(builders.firmware_image_download(4096, 8192)) == (0x11, 0, 0x3FF, 0x800, 0, 0, 0, 0)
    assert dwords(builders.firmware_image_download(4, 0)) == (0x11, 0, 0, 0, 0, 0, 0, 0)
    refused("length", builders.firmware_image_download, 6, 0)
    refused("length", builders.firmware_image_download, 0, 0)
    refused("offset", builders.firmware_image_download, 4, 2)
    refused("offset", builders.firmware_image_download, 4, 1 << 34)
    assert dwords(builders.firmware_commit(7, 7, bpid=1)) == (0x10, 0, 0x8000_003F, 0, 0, 0, 0, 0)
    assert builders.firmware_commit(1, 1).cdw10 == 0x09
    refused("FS", builders.firmware_commit, 8, 0)
    refused("CA", builders.firmware_commit, 0, 8)
    refused("BPID", builders.firmware_commit, 0, 0, bpid=2)


def test_device_self_test():
    assert dwords(builders.device_self_test(1)) == (0x14, 0xFFFF_FFFF, 1, 0, 0, 0, 0, 0)
    assert dwords(builders.device_self_test(0xF, nsid=0)) == (0x14, 0, 0xF, 0, 0, 0, 0, 0)
    refused("STC", builders.device_self_test, 0x10)


def test_namespace_management_and_attachment():
    assert dwords(builders.namespace_create()) == (0x0D, 0, 0, 0, 0, 0, 0, 0)
    assert dwords(builders.namespace_delete(4)) == (0x0D, 4, 1, 0, 0, 0, 0, 0)
    assert dwords(builders.namespace_attachment(3)) == (0x15, 3, 0, 0, 0, 0, 0, 0)
    assert dwords(builders.namespace_attachment(3, detach=True)) == (0x15, 3, 1, 0, 0, 0, 0, 0)
    refused("NSID", builders.namespace_delete, 1 << 32)


# ---------------------------------------------------------------- NVM commands (NVM Command Set 1.0, 3.2)
def test_read_write():
    c = builders.read(1, 0x1_2345_6789, 8, fua=True, lr=True)
    assert dwords(c) == (0x02, 1, 0x2345_6789, 0x0000_0001, 0xC000_0007, 0, 0, 0)
    assert dwords(builders.write(2, 0, 1)) == (0x01, 2, 0, 0, 0, 0, 0, 0)
    c = builders.write(1, U64_MAX, 65536, fua=True)
    assert (c.cdw10, c.cdw11, c.cdw12) == (0xFFFF_FFFF, 0xFFFF_FFFF, 0x4000_FFFF)
    refused("NLB", builders.read, 1, 0, 0)
    refused("NLB", builders.read, 1, 0, 65537)
    refused("SLBA", builders.write, 1, 1 << 64, 1)
    refused("SLBA", builders.write, 1, -1, 1)
    refused("NSID", builders.read, 1 << 32, 0, 1)


def test_read_write_protection_fields():
    """CDW12 PRACT bit 29 and PRCHK 28:26; CDW14 EILBRT; CDW15 LBATM 31:16, LBAT 15:0 (NVM 3.2.4, 5.2)."""
    c = builders.write(1, 0x10, 2, pract=True, prchk=0b101, reftag=0x1234_5678, apptag=0xBEEF, appmask=0xFF00)
    assert dwords(c) == (0x01, 1, 0x10, 0, 0x2000_0000 | (5 << 26) | 1, 0, 0x1234_5678, 0xFF00_BEEF)
    c = builders.read(1, 0, 1, prchk=4)
    assert dwords(c) == (0x02, 1, 0, 0, 0x1000_0000, 0, 0, 0)
    refused("PRCHK", builders.read, 1, 0, 1, prchk=8)
    refused("EILBRT", builders.read, 1, 0, 1, reftag=1 << 32)
    refused("LBAT", builders.write, 1, 0, 1, apptag=1 << 16)
    refused("LBATM", builders.write, 1, 0, 1, appmask=-1)


def test_rw_dwords():
    assert builders.rw_dwords(0x1_0000_0002, 16) == (2, 1, 15)
    assert builders.rw_dwords(5, 1, lr=True) == (5, 0, 0x8000_0000)
    e = refused("NLB", builders.rw_dwords, 0, 0, command="Compare")
    assert e.context["command"] == "Compare"


def test_rw_dword_arrays():
    lo, hi, dw12 = builders.rw_dword_arrays(np.array([0, 0x1_0000_0002, 7], dtype=np.int64),
                                        np.array([1, 65536, 8], dtype=np.int64))
    assert (lo.tolist(), hi.tolist(), dw12.tolist()) == ([0, 2, 7], [0, 1, 0], [0, 65535, 7])
    empty = np.array([], dtype=np.int64)
    assert [len(a) for a in builders.rw_dword_arrays(empty, empty)] == [0, 0, 0]
    one = np.array([0], dtype=np.int64)
    e = refused("NLB", builders.rw_dword_arrays, np.array([0, 1], dtype=np.int64), np.array([1, 65537], dtype=np.int64))
    assert e.context["value"] == 65537
    refused("NLB", builders.rw_dword_arrays, one, one)
    refused("SLBA", builders.rw_dword_arrays, one - 1, one + 1)


def test_compare_verify_flush():
    assert dwords(builders.compare(2, 10, 1)) == (0x05, 2, 10, 0, 0, 0, 0, 0)
    assert dwords(builders.verify(1, 0x2_0000_0000, 65536)) == (0x0C, 1, 0, 2, 0xFFFF, 0, 0, 0)
    assert dwords(builders.flush(0xFFFF_FFFF)) == (0x00, 0xFFFF_FFFF, 0, 0, 0, 0, 0, 0)
    refused("NLB", builders.verify, 1, 0, 65537)
    refused("NSID", builders.flush, -1)


def test_write_zeroes():
    c = builders.write_zeroes(1, 0x1_0000_0000, 16, deac=True)
    assert dwords(c) == (0x08, 1, 0, 1, 0x0200_000F, 0, 0, 0)
    assert builders.write_zeroes(1, 0, 65536).cdw12 == 0xFFFF
    refused("NLB", builders.write_zeroes, 1, 0, 65537)


def test_dataset_management():
    assert dwords(builders.dataset_management(1, 1, deallocate=True)) == (0x09, 1, 0, 4, 0, 0, 0, 0)
    assert dwords(builders.dataset_management(1, 256)) == (0x09, 1, 0xFF, 0, 0, 0, 0, 0)
    refused("NR", builders.dataset_management, 1, 257)
    refused("NR", builders.dataset_management, 1, 0)


# ---------------------------------------------------------------- the dwords the broker sent before the builders
@pytest.mark.parametrize("qid,depth,vector", [(1, 2, None), (1, 1024, 0), (3, 256, 2), (0xFFFF, 65536, 2047)])
def test_queue_creation_matches_the_old_arithmetic(qid, depth, vector):
    cq = builders.create_io_cq(qid, depth, contiguous=True, interrupts=vector is not None, vector=vector or 0)
    assert cq.cdw10 == qid | ((depth - 1) << 16)
    assert cq.cdw11 == 1 | ((1 << 1) | (vector << 16) if vector is not None else 0)
    sq = builders.create_io_sq(qid, depth, qid, contiguous=True)
    assert (sq.cdw10, sq.cdw11) == (qid | ((depth - 1) << 16), 1 | (qid << 16))


@pytest.mark.parametrize("lid,length", [(0x01, 64), (0x01, 4096), (0x02, 512), (0x81, 512), (0x04, 4096)])
def test_event_log_read_matches_the_old_arithmetic(lid, length):
    c = builders.get_log_page(lid, length)
    assert (c.nsid, c.cdw10, c.cdw11) == (0xFFFF_FFFF, lid | ((length // 4 - 1) << 16), 0)
