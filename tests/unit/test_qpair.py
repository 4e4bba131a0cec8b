"""The C queue pair (cbits/qpair.c) on host memory: exact ring indexes, phase tags, command
ids, doorbell values, the EventIdx rule, PRP selection for registered slots, the histogram
(cbits/perf.c)."""

import numpy as np
import pytest

from nvmevfio._ffi import lib
from nvmevfio.errors import ControllerFatal, Refused, ShimError
from nvmevfio.mmio import ArrayMmio, BarMmio
from nvmevfio.nvme.queue import CID_TAKE, PRP_SLOT, QueuePair
from nvmevfio.nvme.spec import CQE, SQE
from nvmevfio.perf_stats import bucket_value, percentiles

SQ_DB, CQ_DB = 0x1008, 0x100C


def make(depth=4, mmio=None):
    mmio = mmio or ArrayMmio(0x2000)
    sq, cq = np.zeros(depth, dtype=SQE), np.zeros(depth, dtype=CQE)
    return QueuePair(1, sq, cq, mmio, SQ_DB, CQ_DB), mmio


def entries(cids, opc=0x02):
    e = np.zeros(len(cids), dtype=SQE)
    e["cid"] = cids
    e["opc"] = opc
    e["cdw10"] = np.arange(len(cids)) + 100
    return e


def complete(qp, slot, cid, phase, sqhd, status=0, dw0=0):
    qp.cq_ring[slot] = (dw0, 0, sqhd, 1, cid, (status << 1) | phase)


def test_post_ring_and_full_queue():
    qp, mmio = make(depth=4)
    assert qp.ncids == 3 and qp.capacity == 3
    cids = qp.take(3)
    assert cids.tolist() == [0, 1, 2] and qp.capacity == 0
    with pytest.raises(Refused) as ei:
        qp.take(1)
    assert ei.value.reason == "queue-full"
    assert qp.post(entries(cids), 3, buf_slot=5, buf_gen=1) == 1  # first tag
    assert mmio.writes == []  # posting never touches a register
    assert qp.sq_ring["cid"].tolist() == [0, 1, 2, 0] and qp.sq_ring["cdw10"].tolist() == [100, 101, 102, 0]
    assert qp.ring_sq() and mmio.writes == [(SQ_DB, 4, 3)]
    assert not qp.ring_sq() and len(mmio.writes) == 1  # nothing new: no second write
    st = qp.state()
    assert (st["sq_tail"], st["in_flight"], st["next_tag"], st["free_top"]) == (3, 3, 4, 0)
    assert qp.busy.tolist() == [2, 2, 2] and qp.buf_slot.tolist() == [5, 5, 5]


def test_reap_phase_wrap_recycling_and_doorbells():
    qp, mmio = make(depth=4)
    qp.post(entries(qp.take(3)), 3, 7, 2)
    qp.ring_sq()
    assert not qp.pending() and len(qp.reap()[0]) == 0
    complete(qp, 0, 2, 1, sqhd=3, status=0x80, dw0=9)  # LBA Out of Range
    complete(qp, 1, 0, 1, sqhd=3)
    done, unpin = qp.reap()
    assert done["tag"].tolist() == [3, 1] and done["cid"].tolist() == [2, 0]
    assert done["status"].tolist() == [0x80, 0] and done["result"].tolist() == [9, 0]
    assert done["opcode"].tolist() == [2, 2] and (done["latency_s"] >= 0).all()
    assert unpin == [(7, 2, 2)]
    assert qp.ring_cq() and mmio.writes[-1] == (CQ_DB, 4, 2)
    # ids come back last-in first-out: 0 then 2
    assert qp.take(2).tolist() == [0, 2]
    st = qp.state()
    assert (st["cq_head"], st["cq_phase"], st["sq_head"], st["in_flight"]) == (2, 1, 3, 1)
    qp.post(entries([0, 2]), 2)  # slots 3 and 0: the SQ wraps
    assert qp.sq_ring["cid"][[3, 0]].tolist() == [0, 2] and qp.state()["sq_tail"] == 1
    qp.ring_sq()
    assert mmio.writes[-1] == (SQ_DB, 4, 1)
    complete(qp, 2, 1, 1, sqhd=1)
    complete(qp, 3, 0, 1, sqhd=1)
    complete(qp, 0, 2, 0, sqhd=1)  # second pass of the CQ: phase 0
    done, unpin = qp.reap()
    assert done["cid"].tolist() == [1, 0, 2] and done["tag"].tolist() == [2, 4, 5]
    assert unpin == [(7, 2, 1)]  # the two later commands had no buffer
    st = qp.state()
    assert (st["cq_head"], st["cq_phase"], st["in_flight"], st["free_top"]) == (1, 0, 0, 3)
    qp.ring_cq()
    assert mmio.writes[-1] == (CQ_DB, 4, 1)


def test_reap_limit_and_a_completion_for_an_id_not_in_flight():
    qp, _ = make(depth=8)
    qp.post(entries(qp.take(5)), 5)
    for s in range(5):
        complete(qp, s, s, 1, sqhd=5)
    assert qp.reap(limit=2)[0]["cid"].tolist() == [0, 1]
    assert qp.reap()[0]["cid"].tolist() == [2, 3, 4]
    complete(qp, 5, 3, 1, sqhd=5)  # cid 3 completed already
    with pytest.raises(ControllerFatal) as ei:
        qp.reap()
    assert ei.value.context["cid"] == 3 and qp.state()["cq_head"] == 5  # not consumed


def test_post_refuses_ids_not_taken_and_writes_nothing():
    qp, mmio = make(depth=4)
    [cid] = qp.take(1)
    with pytest.raises(ShimError):
        qp.post(entries([cid, 2]), 2)  # id 2 was never taken: nothing of the batch is written
    assert qp.state()["sq_tail"] == 0 and qp.in_flight == 0 and not qp.sq_ring.view(np.uint8).any()
    qp.post(entries([cid]), 1)
    with pytest.raises(ShimError):
        qp.post(entries([cid]), 1)  # in flight already
    with pytest.raises(ShimError):
        qp.post(entries([9]), 1)  # no such id
    with pytest.raises(ShimError):
        qp.untake(np.array([cid]))  # posted ids do not go back
    assert qp.state()["sq_tail"] == 1 and qp.in_flight == 1 and mmio.writes == []


def test_untake_returns_ids():
    qp, _ = make(depth=4)
    cids = qp.take(2)
    qp.untake(cids)
    assert qp.capacity == 3 and qp.take(3).tolist() == [0, 1, 2]


def test_mmio_doorbells_are_stores_into_the_bar():
    bar = np.zeros(0x2000, dtype=np.uint8)
    qp, _ = make(depth=8, mmio=BarMmio(bar.ctypes.data, bar.size))
    qp.post(entries(qp.take(5)), 5)
    qp.ring_sq()
    assert int(bar[SQ_DB : SQ_DB + 4].view(np.uint32)[0]) == 5
    for s in range(5):
        complete(qp, s, s, 1, sqhd=5)
    qp.reap()
    qp.ring_cq()
    assert int(bar[CQ_DB : CQ_DB + 4].view(np.uint32)[0]) == 5
    assert np.count_nonzero(bar) == 2  # nothing else written


def test_shadow_doorbells_follow_the_eventidx_rule():
    qp, mmio = make(depth=16)
    shadow = np.zeros(1024, dtype=np.uint32)
    eventidx = np.zeros(1024, dtype=np.uint32)
    qp.set_shadow(shadow, eventidx, 2, 3)  # queue 1, DSTRD 0
    qp.post(entries(qp.take(1)), 1)
    assert qp.ring_sq()  # EventIdx 0, 0 -> 1 passes it: MMIO
    assert shadow[2] == 1 and mmio.writes == [(SQ_DB, 4, 1)]
    eventidx[2] = 5  # the controller: "ring when the tail passes 5"
    qp.post(entries(qp.take(2)), 2)
    assert not qp.ring_sq() and shadow[2] == 3 and len(mmio.writes) == 1
    qp.post(entries(qp.take(3)), 3)
    assert qp.ring_sq() and shadow[2] == 6 and mmio.writes[-1] == (SQ_DB, 4, 6)
    st = qp.state()
    assert (st["sq_mmio"], st["sq_shadow_only"]) == (2, 1)
    # CQ head: EventIdx 0 and the head moving 0 -> 2 passes it
    complete(qp, 0, 0, 1, sqhd=6)
    complete(qp, 1, 1, 1, sqhd=6)
    qp.reap()
    assert qp.ring_cq() and shadow[3] == 2 and mmio.writes[-1] == (CQ_DB, 4, 2)
    eventidx[3] = 100
    complete(qp, 2, 2, 1, sqhd=6)
    qp.reap()
    assert not qp.ring_cq() and shadow[3] == 3
    qp.set_shadow(None, None, 0, 0)
    assert not qp.shadow_doorbells


def test_post_slots_picks_the_brokers_prp2_by_page_count():
    qp, _ = make(depth=8)
    prps = np.zeros(3, dtype=PRP_SLOT)
    prps[:] = [(0x10000, 0x11000, 0x90000, 0), (0x20000, 0x21000, 0x90008, 0), (0x30000, 0x31000, 0x90010, 0)]
    first = qp.post_slots(0x01, 1, np.array([10, 20, 30], np.uint64), np.array([8, 16, 9], np.uint32),
                          np.array([0, 1, 2], np.uint32), prps, 512, 4096, 3, 1)
    sq = qp.sq_ring[:3]
    assert first == 1 and sq["opc"].tolist() == [1, 1, 1] and sq["nsid"].tolist() == [1, 1, 1]
    assert sq["prp1"].tolist() == [0x10000, 0x20000, 0x30000]
    # 4096 bytes: one page, PRP2 unused; 8192: two pages; 4608: two pages
    assert sq["prp2"].tolist() == [0, 0x21000, 0x31000]
    assert sq["cdw10"].tolist() == [10, 20, 30] and sq["cdw12"].tolist() == [7, 15, 8]
    qp.post_slots(0x02, 1, np.array([1 << 33], np.uint64), np.array([24], np.uint32), np.array([1], np.uint32),
                  prps, 512, 4096, 3, 1)
    e = qp.sq_ring[3]
    assert (int(e["prp2"]), int(e["cdw10"]), int(e["cdw11"])) == (0x90008, 0, 2)  # 3 pages: the list
    assert int(e["flags"]) == 0  # PSDT 00b: PRPs


def test_post_slots_writes_an_sgl_data_block_for_an_sgl_slot():
    qp, _ = make(depth=8)
    prps = np.zeros(2, dtype=PRP_SLOT)
    prps[:] = [(0x10000, 0x11000, 0x90000, 1), (0x20200, 0x21000, 0x90008, 1)]
    qp.post_slots(0x02, 1, np.array([10, 20], np.uint64), np.array([24, 1], np.uint32), np.array([0, 1], np.uint32),
                  prps, 512, 4096, 3, 1)
    sq = qp.sq_ring[:2]
    # PSDT 01b (CDW0 bits 15:14), SGL1 = Data Block: Address, Length 24 * 512, identifier byte 00h
    assert sq["flags"].tolist() == [0x40, 0x40]
    assert sq["prp1"].tolist() == [0x10000, 0x20200] and sq["prp2"].tolist() == [12288, 512]


def test_exec_times_out_and_leaves_the_command_in_flight():
    qp, mmio = make(depth=4)
    e = entries([CID_TAKE])
    assert qp.exec(e, 0.05, buf_slot=4, buf_gen=9) is None
    assert qp.in_flight == 1 and qp.buf_slot[0] == 4 and mmio.writes == [(SQ_DB, 4, 1)]
    with pytest.raises(Refused) as ei:
        qp.exec(entries([CID_TAKE]), 0.05)
    assert ei.value.reason == "queue-busy"


def test_histogram_buckets_exact():
    assert [lib.nv_hist_bucket(v) for v in (0, 1, 127, 128, 129, 255, 256, 1_000_000)] == \
        [0, 1, 127, 128, 128, 191, 192, 954]
    assert lib.nv_hist_bucket(1 << 62) == lib.nv_hist_buckets() - 1 == 1855
    assert [bucket_value(i) for i in (5, 127, 128, 191, 192, 954)] == [5, 127, 129, 255, 258, 1003520]
    hist = np.zeros(1856, dtype=np.uint64)
    hist[[10, 128, 954]] = [90, 9, 1]
    assert percentiles(hist, [50, 90, 91, 99, 99.9, 100]) == [10, 10, 129, 129, 1003520, 1003520]
    assert percentiles(np.zeros(4, dtype=np.uint64), [50]) == [0.0]


def test_standing_commands_are_kept_aside_and_never_in_flight():
    """An Asynchronous Event Request stays outstanding: not in in_flight (an exec may run beside
    it), its completion goes to take_events, not to a reap, and a reset drops it."""
    qp, mmio = make(depth=8)
    aer = entries([0], opc=0x0C)
    cid = qp.post_standing(aer)
    qp.ring_sq()
    assert cid == 0 and qp.standing == 1 and qp.in_flight == 0 and qp.busy[0] == 3
    assert mmio.writes == [(SQ_DB, 4, 1)]
    # a normal command beside it: id 1, tail 2
    qp.post(entries(qp.take(1)), 1)
    qp.ring_sq()
    assert qp.in_flight == 1 and len(qp.busy_cids()) == 1
    complete(qp, 0, 0, 1, sqhd=2, dw0=0x00040002)  # the AER: notice, log 04h
    complete(qp, 1, 1, 1, sqhd=2, dw0=7)
    done, _ = qp.reap()
    assert done["cid"].tolist() == [1] and done["result"].tolist() == [7]  # the event is not a reap result
    qp.ring_cq()
    assert mmio.writes[-1] == (CQ_DB, 4, 2)  # the head moved over both entries
    st = qp.state()
    assert (st["standing"], st["nevents"], st["in_flight"], st["cq_head"]) == (0, 1, 0, 2)
    ev = qp.take_events()
    assert ev["cid"].tolist() == [0] and ev["result"].tolist() == [0x00040002] and ev["opcode"].tolist() == [0x0C]
    assert len(qp.take_events()) == 0 and qp.busy[0] == 0
    # an event that arrives while a reap_wait waits for another command rings the CQ head too
    aer_cid = qp.post_standing(entries([0], opc=0x0C))
    qp.post(entries(qp.take(1)), 1)
    qp.ring_sq()
    complete(qp, 2, aer_cid, 1, sqhd=4, dw0=0x0101)
    done, _ = qp.reap_wait(1, 0.01)
    assert len(done) == 0 and qp.state()["cq_rung"] == 3 and len(qp.take_events()) == 1
    # after CC.EN=0 the standing ids go back
    qp.post_standing(entries([0], opc=0x0C))
    assert qp.standing == 1 and qp.drop_standing() == 1 and qp.standing == 0
    assert qp.capacity == 6  # 7 ids, 1 still in flight


def test_exec_runs_beside_a_standing_command():
    qp, _ = make(depth=4)
    qp.post_standing(entries([0], opc=0x0C))
    qp.ring_sq()
    e = entries([CID_TAKE], opc=0x06)
    assert qp.exec(e, 0.001) is None  # not refused queue-busy: the AER is not in flight; timed out
    assert qp.in_flight == 1 and qp.standing == 1


def test_exec_rw_builds_the_entry_from_its_fields():
    qp, mmio = make(depth=4)
    # no device behind ArrayMmio: the wait times out at once and the command stays in flight
    assert qp.exec_rw(0x02, 7, (5 << 32) | 9, 16, 0x1000_0200, 0x2000_0000, 0, buf_slot=3, buf_gen=2) is None
    e = qp.sq_ring[0]
    assert (int(e["opc"]), int(e["cid"]), int(e["nsid"])) == (0x02, 0, 7)
    assert (int(e["prp1"]), int(e["prp2"])) == (0x1000_0200, 0x2000_0000)
    assert (int(e["cdw10"]), int(e["cdw11"]), int(e["cdw12"])) == (9, 5, 15)  # NLB 0's based
    assert mmio.writes == [(SQ_DB, 4, 1)] and qp.in_flight == 1 and qp.buf_slot[0] == 3


def test_shadow_doorbells_pay_everywhere_but_on_qemus_model():
    """The broker's default when the caller does not choose (create_io_queues(shadow_doorbells=None)):
    off on QEMU's nvme model, by its Identify Controller VID (0x1B36) or its model name (the VID is
    Intel's with use-intel-id=on), on for any other controller."""
    from nvmevfio.nvme.structures import shadow_doorbells_pay

    assert shadow_doorbells_pay({"vid": 0x1B36, "mn": "QEMU NVMe Ctrl"}) is False
    assert shadow_doorbells_pay({"vid": 0x8086, "mn": "QEMU NVMe Ctrl"}) is False
    assert shadow_doorbells_pay({"vid": 0x1B36, "mn": ""}) is False
    assert shadow_doorbells_pay({"vid": 0x144D, "mn": "SAMSUNG MZVL21T0HCLR-00B00"}) is True
    assert shadow_doorbells_pay({"vid": 0x1D0F, "mn": "Amazon Elastic Block Store"}) is True
    assert shadow_doorbells_pay({}) is True
