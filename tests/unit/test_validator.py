"""The Model B validator (nvmevfio.service.validator) on hand-built entries: what it accepts
(exact copies, LBAs moved into the window, the data pages its PRPs name) and each refusal
label, with nothing read from memory that is not the client's."""

import re

import numpy as np
import pytest

from nvmevfio.nvme.spec import SQE, IoOpcode
from nvmevfio.service import validator as v

PS = 4096
BASE = 0x100000  # the simulated client memory covers IOVAs BASE .. BASE + 8 MiB
A = 0x100000  # alice's data buffer, 64 KiB
LISTS = 0x200000  # alice's PRP-list pages, 8 KiB
BOB = 0x300000
FREED = 0x400000
BROKER = 0x500000
ODD = 0x600000  # alice's 6000-byte buffer (its second page is only partly hers)
GRANT = v.Grant("alice", nsid=1, first_lba=1000, blocks=4096, writable=True)
DEVICE = v.Device(block_size=512, page_size=PS, max_transfer=128 << 10, iova_ranges=((BASE, (1 << 39) - 1),))
REGIONS = v.RegionMap([
    v.Region(A, 64 << 10, "alice", 1), v.Region(LISTS, 8192, "alice", 1), v.Region(BOB, 64 << 10, "bob", 1),
    v.Region(FREED, 8192, "alice", 3, live=False), v.Region(BROKER, 8192, "broker", 1),
    v.Region(ODD, 6000, "alice", 1),
])


class Memory:
    """Client memory by IOVA; records every read so a test can see what the validator looked at."""

    def __init__(self) -> None:
        self.bytes = np.zeros(8 << 20, dtype=np.uint8)
        self.reads: list[tuple[int, int]] = []

    def put_u64(self, iova: int, values: list[int]) -> None:
        self.bytes[iova - BASE : iova - BASE + 8 * len(values)] = np.array(values, dtype="<u8").view(np.uint8)

    def read(self, iova: int, n: int) -> np.ndarray:
        self.reads.append((iova, n))
        return self.bytes[iova - BASE : iova - BASE + n]


def sqe(opc=IoOpcode.READ, nsid=1, slba=0, nlb=1, prp1=A, prp2=0, **fields) -> bytes:
    e = np.zeros(1, dtype=SQE)
    e["opc"], e["nsid"], e["prp1"], e["prp2"] = opc, nsid, prp1, prp2
    e["cdw10"], e["cdw11"], e["cdw12"] = slba & 0xFFFFFFFF, slba >> 32, nlb - 1
    for k, val in fields.items():
        e[k] = val
    return e.tobytes()


def check(raw: bytes, mem: Memory | None = None, grant: v.Grant = GRANT) -> v.Accepted | v.Rejected:
    return v.validate(raw, grant, REGIONS, DEVICE, (mem or Memory()).read)


def test_one_and_two_page_reads_move_into_the_window():
    got = check(sqe(slba=10, nlb=8))
    assert isinstance(got, v.Accepted) and got.pages.tolist() == []
    assert int(got.sqe["cdw10"][0]) == 1010 and int(got.sqe["prp1"][0]) == A
    got = check(sqe(slba=4095, nlb=1))  # the grant's last block
    assert isinstance(got, v.Accepted) and int(got.sqe["cdw10"][0]) == 5095 and int(got.sqe["cdw11"][0]) == 0
    got = check(sqe(nlb=8, prp1=A + 512, prp2=A + PS))  # 4 KiB from an offset: two pages, PRP2 the second
    assert isinstance(got, v.Accepted) and got.pages.tolist() == [A + PS]
    got = check(sqe(nlb=1, prp1=A + PS - 512))  # 512 bytes that end exactly at the page's end
    assert isinstance(got, v.Accepted) and got.pages.tolist() == []


def test_prp_list_and_chain_are_copied_once():
    mem = Memory()
    pages = [A + PS * i for i in range(1, 8)]
    mem.put_u64(LISTS, pages)
    got = check(sqe(nlb=64, prp2=LISTS), mem)  # 32 KiB: PRP1 and a list of 7
    assert isinstance(got, v.Accepted) and got.pages.tolist() == pages
    assert mem.reads == [(LISTS, 56)]
    mem.put_u64(LISTS, [BOB] * 7)  # the client rewrites its list after the check: the copy stands
    assert got.pages.tolist() == pages
    # a list that starts 16 bytes before the end of its page: one entry, then a chain pointer
    mem = Memory()
    mem.put_u64(LISTS + PS - 16, [pages[0], LISTS + PS])
    mem.put_u64(LISTS + PS, pages[1:])
    got = check(sqe(nlb=64, prp2=LISTS + PS - 16), mem)
    assert isinstance(got, v.Accepted) and got.pages.tolist() == pages
    assert mem.reads == [(LISTS + PS - 16, 16), (LISTS + PS, 48)]


@pytest.mark.parametrize("raw, label", ids=lambda x: x if isinstance(x, str) else "", argvalues=[
    (sqe(slba=4090, nlb=8), v.OUT_OF_WINDOW),
    (sqe(prp1=0x1000), v.HOST_PHYSICAL),
    (sqe(prp1=1 << 40), v.HOST_PHYSICAL),
    (sqe(prp1=BOB), v.CROSS_OWNER_ALIAS),
    (sqe(prp1=BROKER), v.CROSS_OWNER_ALIAS),
    (sqe(nlb=16, prp1=A, prp2=BOB), v.CROSS_OWNER_ALIAS),
    (sqe(nlb=16, prp1=ODD, prp2=ODD + PS), v.REGION_OVERRUN),
    (sqe(nlb=1, prp1=ODD + 6000 - 256), v.REGION_OVERRUN),
    (sqe(prp1=A + 2), v.UNALIGNED),
    (sqe(nlb=16, prp2=A + PS + 8), v.UNALIGNED),
    (sqe(nlb=64, prp2=LISTS + 4), v.UNALIGNED),
    (sqe(nlb=512), v.DEEP_PRP_CHAIN),
    (sqe(prp1=FREED), v.STALE_GENERATION),
    (sqe(prp1=0x180000), v.INVALID_REGION),
    (sqe(opc=IoOpcode.COMPARE), v.DISALLOWED_OPCODE),
    (sqe(opc=0x7F), v.DISALLOWED_OPCODE),
    (sqe(flags=0x40), v.DISALLOWED_OPCODE),
    (sqe(mptr=A), v.DISALLOWED_OPCODE),
    (sqe(nsid=2), v.DISALLOWED_NAMESPACE),
    (sqe(nsid=0xFFFFFFFF), v.DISALLOWED_NAMESPACE),
])
def test_each_refusal_label(raw: bytes, label: str) -> None:
    mem = Memory()
    got = check(raw, mem)
    assert isinstance(got, v.Rejected) and got.label == label, got
    # a reason, and no address in it (opcodes and flags may show)
    assert got.reason and all(int(h, 16) < 0x1000 for h in re.findall(r"0x([0-9a-f]+)", got.reason)), got.reason
    assert mem.reads == []  # nothing of the client's memory was even read


def test_list_entries_are_checked_like_prp1():
    for bad, label in ((BOB, v.CROSS_OWNER_ALIAS), (A + PS + 8, v.UNALIGNED), (FREED, v.STALE_GENERATION),
                       (0x1000, v.HOST_PHYSICAL)):
        mem = Memory()
        mem.put_u64(LISTS, [A + PS, A + 2 * PS, bad] + [A + PS * i for i in range(4, 8)])
        got = check(sqe(nlb=64, prp2=LISTS), mem)
        assert isinstance(got, v.Rejected) and got.label == label and "data page 4" in got.reason
    mem = Memory()
    mem.put_u64(LISTS + PS - 16, [A + PS, LISTS + PS + 8])  # a chain pointer not page aligned
    got = check(sqe(nlb=64, prp2=LISTS + PS - 16), mem)
    assert isinstance(got, v.Rejected) and got.label == v.UNALIGNED and "chain pointer" in got.reason


def test_writes_need_a_writable_grant_and_flush_zeroes_dsm():
    read_only = v.Grant("alice", 1, 1000, 4096, writable=False)
    assert check(sqe(opc=IoOpcode.READ), grant=read_only).__class__ is v.Accepted
    for opc in (IoOpcode.WRITE, IoOpcode.WRITE_ZEROES, IoOpcode.DATASET_MANAGEMENT):
        got = check(sqe(opc=opc), grant=read_only)
        assert isinstance(got, v.Rejected) and got.label == v.DISALLOWED_OPCODE and "read-only" in got.reason
    got = check(sqe(opc=IoOpcode.FLUSH, prp1=0))
    assert isinstance(got, v.Accepted) and got.pages.size == 0
    got = check(sqe(opc=IoOpcode.WRITE_ZEROES, slba=7, nlb=100, prp1=0))
    assert isinstance(got, v.Accepted) and int(got.sqe["cdw10"][0]) == 1007
    assert isinstance(check(sqe(opc=IoOpcode.WRITE_ZEROES, slba=4000, nlb=100)), v.Rejected)


def test_dsm_ranges_are_copied_checked_and_moved():
    mem = Memory()
    ranges = np.zeros(2, dtype=v.DSM_RANGE)
    ranges["slba"], ranges["nlb"] = [5, 4000], [10, 96]
    mem.bytes[A - BASE : A - BASE + 32] = ranges.view(np.uint8)
    got = check(sqe(opc=IoOpcode.DATASET_MANAGEMENT, cdw10=1, cdw11=1 << 2), mem)
    assert isinstance(got, v.Accepted) and got.ranges["slba"].tolist() == [1005, 5000]
    mem.bytes[A - BASE : A - BASE + 32] = 0  # rewritten after the check: the copy stands
    assert got.ranges["nlb"].tolist() == [10, 96]
    ranges["nlb"][1] = 97  # 4000 + 97 > 4096
    mem.bytes[A - BASE : A - BASE + 32] = ranges.view(np.uint8)
    got = check(sqe(opc=IoOpcode.DATASET_MANAGEMENT, cdw10=1, cdw11=1 << 2), mem)
    assert isinstance(got, v.Rejected) and got.label == v.OUT_OF_WINDOW


def test_region_map_refuses_overlaps_and_finds_edges():
    with pytest.raises(ValueError):
        v.RegionMap([v.Region(0, 8192, "a", 1), v.Region(4096, 8192, "b", 1)])
    assert REGIONS.find(A + (64 << 10) - 1).owner == "alice" and REGIONS.find(A + (64 << 10)) is None
    assert REGIONS.find(A - 1) is None and set(v.LABELS) >= {v.OUT_OF_WINDOW, v.STALE_GENERATION}
