"""Ring arithmetic, register fields, doorbell offsets, CC selection: exact values."""

import numpy as np
import pytest

from nvmevfio.errors import Refused
from nvmevfio.mmio import ArrayMmio
from nvmevfio.nvme import regs
from nvmevfio.nvme.queue import CompletionQueue, SubmissionQueue, ring_free, ring_slots, ring_used
from nvmevfio.nvme.spec import CQE, SQE


def test_ring_arithmetic():
    assert ring_used(0, 0, 16) == 0 and ring_free(0, 0, 16) == 15
    assert ring_used(14, 2, 16) == 4 and ring_free(14, 2, 16) == 11
    assert ring_free(3, 2, 16) == 0  # full: one slot kept empty
    assert ring_slots(14, 4, 16).tolist() == [14, 15, 0, 1]


def test_sq_post_wraps_and_refuses_when_full():
    mmio = ArrayMmio(0x2000)
    sq = SubmissionQueue(1, np.zeros(4, dtype=SQE), mmio, 0x1008)
    e = np.zeros(3, dtype=SQE)
    e["cid"] = [1, 2, 3]
    assert sq.post(e).tolist() == [0, 1, 2]
    with pytest.raises(Refused) as ei:
        sq.post(np.zeros(1, dtype=SQE))
    assert ei.value.reason == "queue-full"
    assert mmio.writes == []  # posting never touches a register
    sq.ring_doorbell()
    assert mmio.writes == [(0x1008, 4, 3)]
    sq.ring_doorbell()  # nothing new: no second write
    assert len(mmio.writes) == 1
    sq.update_head(3)
    assert sq.post(e[:2]).tolist() == [3, 0]
    assert sq.ring["cid"].tolist() == [2, 2, 3, 1]


def _cqe(cq_ring, slot, cid, phase, sqhd=0):
    cq_ring[slot]["cid"] = cid
    cq_ring[slot]["sqhd"] = sqhd
    cq_ring[slot]["status"] = phase


def test_cq_reap_by_phase_with_wrap():
    mmio = ArrayMmio(0x2000)
    ring = np.zeros(4, dtype=CQE)
    cq = CompletionQueue(1, ring, mmio, 0x100C)
    assert not cq.pending() and len(cq.reap()) == 0
    for s, cid in enumerate([10, 11, 12]):
        _cqe(ring, s, cid, 1)
    got = cq.reap()
    assert got["cid"].tolist() == [10, 11, 12] and cq.head == 3 and cq.phase == 1
    _cqe(ring, 3, 13, 1)
    _cqe(ring, 0, 14, 0)  # second pass carries phase 0
    _cqe(ring, 1, 15, 0)
    got = cq.reap()
    assert got["cid"].tolist() == [13, 14, 15] and cq.head == 2 and cq.phase == 0
    assert mmio.writes == []
    cq.ring_head()
    assert mmio.writes == [(0x100C, 4, 2)]


def test_cq_reap_limit():
    ring = np.zeros(8, dtype=CQE)
    cq = CompletionQueue(1, ring, ArrayMmio(0x2000), 0x100C)
    for s in range(5):
        _cqe(ring, s, s, 1)
    assert cq.reap(limit=2)["cid"].tolist() == [0, 1]
    assert cq.reap()["cid"].tolist() == [2, 3, 4]


def test_cq_full_ring_reap_flips_phase_once():
    ring = np.zeros(4, dtype=CQE)
    cq = CompletionQueue(1, ring, ArrayMmio(0x2000), 0x100C)
    for s in range(4):
        _cqe(ring, s, s, 1)
    assert len(cq.reap()) == 4 and cq.head == 0 and cq.phase == 0


def test_fields_and_packing():
    cap = 0x0040_3C03_2000_07FF  # a typical CAP
    d = regs.decode_cap(cap)
    assert d["MQES"] == 0x7FF and d["TO"] == 0x20 and d["DSTRD"] == 3 and d["MPSMIN"] == 0 and d["MPSMAX"] == 4
    assert d["CSS"] == 0b1_1110_0000 >> 5 or d["CSS"] == regs.get(cap, regs.CAP_.CSS)
    cc = regs.pack({regs.CC_.EN: 1, regs.CC_.IOSQES: 6, regs.CC_.IOCQES: 4, regs.CC_.MPS: 0})
    assert cc == 0x00460001
    assert regs.put(cc, regs.CC_.SHN, regs.SHN_NORMAL) == 0x00464001
    with pytest.raises(ValueError):
        regs.put(0, regs.CC_.EN, 2)
    assert regs.version_string(0x00010400) == "1.4.0"


def test_doorbell_offsets():
    assert regs.doorbell_offset(0, False, 0) == 0x1000
    assert regs.doorbell_offset(0, True, 0) == 0x1004
    assert regs.doorbell_offset(1, False, 0) == 0x1008
    assert regs.doorbell_offset(3, True, 0) == 0x101C
    assert regs.doorbell_offset(1, True, 2) == 0x1000 + 3 * 16


def test_timeout_and_mps():
    assert regs.timeout_ms(regs.pack({regs.CAP_.TO: 30})) == 15000
    assert regs.timeout_ms(0) == 500  # CAP.TO=0 gets a floor
    cap = regs.pack({regs.CAP_.MPSMIN: 0, regs.CAP_.MPSMAX: 4})
    assert regs.choose_mps(cap, 4096) == 0
    assert regs.choose_mps(cap, 65536) == 4
    assert regs.choose_mps(regs.pack({regs.CAP_.MPSMIN: 1, regs.CAP_.MPSMAX: 2}), 4096) == 1


def test_command_table_batches():
    from nvmevfio.nvme.queue import CommandTable

    t = CommandTable(4)
    cids = t.take(3)
    assert cids.tolist() == [0, 1, 2] and t.free == 1
    tags = t.record(cids, 0x02, 5, 1, now=10.0)
    assert tags.tolist() == [1, 2, 3] and t.in_flight == 3
    cqes = np.zeros(2, dtype=CQE)
    cqes["cid"] = [2, 0]
    cqes["dw0"] = [7, 8]
    cqes["status"] = [(0x80 << 1) | 1, 1]  # LBA Out of Range, then success
    assert t.buffer_counts(np.array([2, 0])) == [(5, 1, 2)]
    done, counts = t.retire(cqes, now=10.5)
    assert counts == [(5, 1, 2)]
    assert done["tag"].tolist() == [3, 1] and done["status"].tolist() == [0x80, 0] and done["result"].tolist() == [7, 8]
    assert done["latency_s"].tolist() == [0.5, 0.5] and done["opcode"].tolist() == [2, 2]
    assert t.in_flight == 1 and t.free == 3 and t.busy_cids().tolist() == [1]
    with pytest.raises(ValueError, match="not in flight"):
        t.retire(cqes[:1], now=11.0)  # cid 2 again
    again = t.take(3)
    assert sorted(again.tolist()) == [0, 2, 3]
    t.give_back(again)
    assert t.free == 3
    assert t.record(t.take(1), 1, -1, 0, 12.0).tolist() == [4]  # tags keep counting


def test_cq_long_run_crosses_scalar_scan_and_wraps():
    from nvmevfio.nvme.queue import SCALAR_BATCH

    depth = 32
    ring = np.zeros(depth, dtype=CQE)
    cq = CompletionQueue(1, ring, ArrayMmio(0x2000), 0x100C)
    for s in range(20):
        _cqe(ring, s, s, 1)
    assert len(cq.reap(limit=3)) == 3  # scalar scan only
    got = cq.reap()
    assert got["cid"].tolist() == list(range(3, 20)) and cq.head == 20 and SCALAR_BATCH < 20 - 3
    for i in range(25):  # 12 to the end of the ring, 13 after the wrap with phase 0
        slot = (20 + i) % depth
        _cqe(ring, slot, 100 + i, 1 if slot >= 20 else 0)
    got = cq.reap()
    assert got["cid"].tolist() == [100 + i for i in range(25)] and cq.head == 13 and cq.phase == 0
    assert len(cq.reap()) == 0 and not cq.pending()


def test_sq_post_one_packs_the_same_bytes_as_the_dtype():
    from nvmevfio.nvme.spec import SQE_STRUCT

    mmio = ArrayMmio(0x2000)
    a = SubmissionQueue(1, np.zeros(4, dtype=SQE), mmio, 0x1008)
    b = np.zeros(1, dtype=SQE)
    fields = (0x02, 0, 7, 1, 0, 0, 0, 0x12345000, 0x12346000, 0xDEADBEEF, 0x1, 15, 0, 0, 0)
    for name, v in zip(SQE.names, fields):
        b[name] = v
    assert a.post_one(fields) == 0 and a.tail == 1
    assert a.ring[0].tobytes() == b.tobytes() and SQE_STRUCT.size == 64
