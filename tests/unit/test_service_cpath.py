"""The service's compiled data path (cbits/service.c) on host memory, with exact values: each
refusal and its reason, the SQEs and PRP-list pages C authors from the broker's page tables
(chained lists included), held requests, the completion ring's room, completions back to the
client with its tags, the no-IOMMU lane's bounce copies."""

import errno
import os
import threading
import time

import numpy as np
import pytest

from nvmevfio._ffi import ffi, lib
from nvmevfio.mmio import ArrayMmio
from nvmevfio.nvme.queue import PRP_SLOT, QueuePair
from nvmevfio.nvme.spec import CQE, SQE
from nvmevfio.service import ring as rings

SQ_DB, CQ_DB = 0x1008, 0x100C
PS = 4096
PER = PS // 8


class Rig:
    """A session over a queue pair of ``qdepth`` on host memory: client ring of ``depth``, a
    grant of ``blocks`` from LBA 1000 (512-byte blocks), and buffers whose memory pages sit at made-up,
    scattered device addresses (so that every PRP value C writes must be a table entry)."""

    def __init__(self, depth=8, qdepth=16, writable=True, prp_pages=2, max_pages=1024, blocks=2000):
        self.mmio = ArrayMmio(0x2000)
        self.qp = QueuePair(1, np.zeros(qdepth, dtype=SQE), np.zeros(qdepth, dtype=CQE), self.mmio, SQ_DB, CQ_DB)
        self.memory = np.zeros(rings.ring_bytes(depth), dtype=np.uint8)
        self.ring = rings.SharedRings(self.memory, depth)
        s = ffi.new("struct nv_svc *")
        s.header, s.requests, s.completions = self.ring.pointers()
        s.depth, s.doorbell_fd, s.completion_fd = depth, -1, -1
        s.nsid, s.writable, s.first_lba, s.blocks, s.block_size = 1, int(writable), 1000, blocks, 512
        s.page_size, s.max_transfer, s.max_pages = PS, max_pages * PS, max_pages
        n = qdepth - 1
        self.prp_area = np.zeros(n * prp_pages * PER, dtype=np.uint64)
        self.prp_dev = 0xA000_0000 + PS * np.arange(n * prp_pages, dtype=np.uint64)
        s.prp_area = ffi.cast("uint64_t *", self.prp_area.ctypes.data)
        s.prp_dev = ffi.cast("uint64_t *", self.prp_dev.ctypes.data)
        s.prp_pages, s.ncids = prp_pages, n
        self._cids = [ffi.new(f"{t}[]", n) for t in ("int64_t", "uint32_t", "uint64_t", "uint32_t")]
        s.cid_tag, s.cid_buffer, s.cid_offset, s.cid_length = self._cids
        self.table = ffi.new("struct nv_svc_buffer[]", 4)
        s.buffers, s.nbuffers, s.next_buffer = self.table, 4, 1
        self.s = s
        self.keep = []
        self.tail = 0

    def add_buffer(self, ident, npages, generation=7, shadow=False):
        pages = (0x4000_0000 + 0x10_0000 * np.arange(npages, dtype=np.uint64)[::-1]).copy()  # falling order
        user = np.zeros(npages * PS, dtype=np.uint8)
        shadow_mem = np.zeros(npages * PS, dtype=np.uint8) if shadow else None
        self.keep += [pages, user, shadow_mem]
        e = self.table[ident]
        e.generation, e.size, e.npages = generation, npages * PS, npages
        e.pages = ffi.cast("uint64_t *", pages.ctypes.data)
        e.user = ffi.cast("uint8_t *", user.ctypes.data)
        e.shadow = ffi.cast("uint8_t *", shadow_mem.ctypes.data) if shadow else ffi.NULL
        e.ledger_slot, e.ledger_gen = 40 + ident, 3
        self.s.next_buffer = max(int(self.s.next_buffer), ident + 1)
        return pages, user, shadow_mem

    def publish(self, *reqs):
        """(opcode, buffer, generation, offset, lba, count, tag) each."""
        e = np.zeros(len(reqs), dtype=rings.REQUEST)
        for i, (opc, buf, gen, off, lba, count, tag) in enumerate(reqs):
            e[i] = (opc, 0, 0, buf, gen, off, lba, count, tag)
        self.tail = self.ring.put_requests(self.tail, e)

    def completions(self, head=0):
        got, _ = self.ring.take_completions(head)
        return [(int(c["tag"]), int(c["status"]), rings.REASONS[int(c["reason"])]) for c in got]

    def pump(self):
        return lib.nv_svc_pump(self.s, self.qp._qp)


def test_the_reason_codes_are_the_rings():
    for name, value in [("out-of-window", lib.NV_SVC_OUT_OF_WINDOW), ("read-only", lib.NV_SVC_READ_ONLY),
                        ("invalid-region", lib.NV_SVC_INVALID_REGION),
                        ("stale-generation", lib.NV_SVC_STALE_GENERATION),
                        ("region-overrun", lib.NV_SVC_REGION_OVERRUN), ("unaligned", lib.NV_SVC_UNALIGNED),
                        ("count-out-of-range", lib.NV_SVC_COUNT_OUT_OF_RANGE),
                        ("disallowed-opcode", lib.NV_SVC_DISALLOWED_OPCODE)]:
        assert rings.reason_code(name) == value


def test_every_refusal_named_and_nothing_posted():
    r = Rig(depth=16, qdepth=32)
    r.add_buffer(1, 4)
    r.add_buffer(3, 2)
    r.table[3].size = 0  # buffer 3 was freed
    R = rings.READ
    r.publish((0x05, 1, 7, 0, 0, 1, 1),        # Compare: not a service opcode
              (R, 1, 7, 0, 1999, 2, 2),        # one block past the window
              (R, 1, 7, 0, 0, 0, 3),           # zero blocks
              (R, 9, 7, 0, 0, 1, 4),           # never handed out
              (R, 3, 7, 0, 0, 1, 5),           # freed
              (R, 1, 6, 0, 0, 1, 6),           # an older generation
              (R, 1, 7, 4 * PS - 256, 0, 1, 7),  # runs 256 bytes past the buffer
              (R, 1, 7, 2, 0, 1, 8),           # PRP1 not dword aligned
              (R, 1, 7, 0, 0, 1 << 20, 9))     # past MDTS (window check first: 1 << 20 > 2000 blocks)
    assert r.pump() == 0
    assert r.completions() == [(1, 0x8000, "disallowed-opcode"), (2, 0x8000, "out-of-window"),
                               (3, 0x8000, "out-of-window"), (4, 0x8000, "invalid-region"),
                               (5, 0x8000, "stale-generation"), (6, 0x8000, "stale-generation"),
                               (7, 0x8000, "region-overrun"), (8, 0x8000, "unaligned"),
                               (9, 0x8000, "out-of-window")]
    assert r.qp.state()["posted"] == 0 and r.mmio.writes == []  # the device saw nothing
    assert (r.s.taken, r.s.refused, r.s.in_flight) == (9, 9, 0)


def test_read_only_and_mdts():
    r = Rig(writable=False, max_pages=4)
    r.add_buffer(1, 8)
    r.publish((rings.WRITE, 1, 7, 0, 0, 1, 1), (rings.WRITE_ZEROES, 0, 0, 0, 0, 1, 2),
              (rings.READ, 1, 7, 0, 0, 40, 3),  # 20 KiB: 5 pages, past MDTS (4 pages)
              (rings.READ, 1, 7, 2048, 0, 8, 4))  # 4 KiB at an in-page offset: 2 pages, fine
    assert r.pump() == 1
    assert r.completions() == [(1, 0x8000, "read-only"), (2, 0x8000, "read-only"),
                               (3, 0x8000, "count-out-of-range")]


def test_sqes_and_prps_come_from_the_tables():
    r = Rig(depth=8, qdepth=16, blocks=10000)
    pages, _, _ = r.add_buffer(1, 600)
    R, W = rings.READ, rings.WRITE
    r.publish((R, 1, 7, 512, 5, 1, 11),              # one page, at an in-page offset
              (W, 1, 7, PS - 512, 6, 2, 12),         # two pages: PRP2 is the next page's entry
              (R, 1, 7, 3 * PS, 7, 24, 13),          # three pages: a PRP list
              (R, 1, 7, 0, 8, 514 * PS // 512, 14))  # 514 pages: 513 entries, a chained list
    assert r.pump() == 4
    e = r.qp.sq_ring[:4]
    assert e["opc"].tolist() == [0x02, 0x01, 0x02, 0x02]
    assert e["cid"].tolist() == [0, 1, 2, 3] and e["nsid"].tolist() == [1, 1, 1, 1]
    assert e["cdw10"].tolist() == [1005, 1006, 1007, 1008]  # the window starts at LBA 1000
    assert e["cdw12"].tolist() == [0, 1, 23, 514 * 8 - 1]
    assert e["prp1"].tolist() == [int(pages[0]) + 512, int(pages[0]) + PS - 512, int(pages[3]), int(pages[0])]
    assert e["prp2"][:2].tolist() == [0, int(pages[1])]
    # cid 2's list: its first list page (2 per command id), entries for pages 4 and 5, zero after
    assert int(e["prp2"][2]) == int(r.prp_dev[2 * 2])
    row = r.prp_area[2 * 2 * PER : 2 * 2 * PER + 3]
    assert row.tolist() == [int(pages[4]), int(pages[5]), 0]
    # cid 3's: 511 entries and a pointer to its second list page, which holds the last two
    assert int(e["prp2"][3]) == int(r.prp_dev[3 * 2])
    first = r.prp_area[3 * 2 * PER : 3 * 2 * PER + PER]
    assert first[: PER - 1].tolist() == pages[1:PER].tolist()
    assert int(first[PER - 1]) == int(r.prp_dev[3 * 2 + 1])
    second = r.prp_area[(3 * 2 + 1) * PER : (3 * 2 + 1) * PER + 3]
    assert second.tolist() == [int(pages[PER]), int(pages[PER + 1]), 0]
    assert r.mmio.writes == [(SQ_DB, 4, 4)]  # one SQ tail doorbell for the batch
    assert r.qp.buf_slot[:4].tolist() == [41] * 4 and r.qp.buf_gen[:4].tolist() == [3] * 4
    assert r.s.in_flight == 4 and r.completions() == []


def test_a_list_longer_than_the_queues_list_pages_is_refused():
    r = Rig(prp_pages=1, blocks=10000)
    r.add_buffer(1, 600)
    r.publish((rings.READ, 1, 7, 0, 0, 514 * 8, 1))  # needs two list pages, the queue has one per id
    assert r.pump() == 0
    assert r.completions() == [(1, 0x8000, "count-out-of-range")]


def test_completions_carry_the_clients_tags():
    r = Rig()
    r.add_buffer(1, 4)
    r.publish((rings.READ, 1, 7, 0, 0, 1, 0xAB), (rings.READ, 1, 7, PS, 1, 1, 0xCD))
    assert r.pump() == 2
    r.qp.cq_ring[0] = (5, 0, 2, 1, 1, (0x80 << 1) | 1)  # cid 1: LBA Out of Range, phase 1
    r.qp.cq_ring[1] = (0, 0, 2, 1, 0, 1)
    assert lib.nv_svc_reap(r.s, r.qp._qp) == 2
    assert r.completions() == [(0xCD, 0x80, ""), (0xAB, 0, "")]
    assert r.mmio.writes[-1] == (CQ_DB, 4, 2)  # one CQ head doorbell
    assert r.s.in_flight == 0 and r.qp.in_flight == 0
    r.qp.cq_ring[2] = (0, 0, 2, 1, 9, 1)  # an id not in flight
    assert lib.nv_svc_reap(r.s, r.qp._qp) == -errno.EPROTO


def test_flush_write_zeroes_and_deallocate_posted_without_a_buffer():
    r = Rig(blocks=100000)
    r.s.oncs = 0x0C  # Write Zeroes and Dataset Management
    r.publish((rings.FLUSH, 0, 0, 0, 0, 0, 1), (rings.WRITE_ZEROES, 0, 0, 0, 10, 65536, 2),
              (rings.DEALLOCATE, 0, 0, 0, 0x123, 99000, 3))
    assert r.pump() == 3 and r.s.has_held == 0
    e = r.qp.sq_ring[:3]
    assert e["opc"].tolist() == [0x00, 0x08, 0x09] and e["nsid"].tolist() == [1, 1, 1]
    assert e["cdw10"].tolist() == [0, 1010, 0] and e["cdw12"].tolist() == [0, 65535, 0]
    assert int(e["cdw11"][2]) == 1 << 2  # Attribute - Deallocate, one range (NR 0)
    assert e["prp1"][:2].tolist() == [0, 0] and e["prp2"].tolist() == [0, 0, 0]
    assert int(e["prp1"][2]) == int(r.prp_dev[2 * 2])  # command id 2's own (broker-owned) list page
    assert r.prp_area[2 * 2 * PER : 2 * 2 * PER + 2].tolist() == [99000 << 32, 1000 + 0x123]  # NLB, SLBA
    assert r.qp.buf_slot[:3].tolist() == [-1, -1, -1]  # no client buffer is in flight
    r.qp.cq_ring[0:3] = [(0, 0, 3, 1, cid, 1) for cid in range(3)]
    assert lib.nv_svc_reap(r.s, r.qp._qp) == 3
    assert sorted(r.completions()) == [(1, 0, ""), (2, 0, ""), (3, 0, "")]


def test_what_c_cannot_post_is_held_for_python_and_stops_the_batch():
    r = Rig(blocks=100000)
    r.s.oncs = 0x08  # Write Zeroes only
    r.add_buffer(1, 4)
    r.publish((rings.READ, 1, 7, 0, 0, 1, 1), (rings.WRITE_ZEROES, 0, 0, 0, 0, 65537, 2),
              (rings.READ, 1, 7, 0, 0, 1, 3))
    assert r.pump() == 1  # the READ; the Write Zeroes is longer than one command
    assert r.s.has_held == 1 and r.s.held.tag == 2 and r.s.in_flight == 2 and r.s.taken == 2
    assert r.pump() == 0  # nothing more until Python ran the held one
    lib.nv_svc_put(r.s, 2, 0, 0, 0)
    r.s.has_held = 0
    assert r.completions() == [(2, 0, "")]
    r.publish((rings.DEALLOCATE, 0, 0, 0, 0, 8, 4))  # no Dataset Management on this controller
    assert r.pump() == 1 and r.s.taken == 4 and r.s.has_held == 1 and r.s.held.tag == 4


def _completion_ring_full_and_two_more_published():
    """A session whose client has not taken the four completions its ring holds, and has
    published two more requests."""
    r = Rig(depth=4, qdepth=16)
    r.add_buffer(1, 4)
    r.publish(*[(rings.READ, 1, 7, 0, 0, 1, t) for t in range(4)])
    assert r.pump() == 4
    r.qp.cq_ring[0:4] = [(0, 0, 4, 1, cid, 1) for cid in range(4)]
    assert lib.nv_svc_reap(r.s, r.qp._qp) == 4
    r.publish(*[(rings.READ, 1, 7, 0, 0, 1, t) for t in range(4, 6)])
    return r


def test_no_more_taken_than_the_completion_ring_can_answer():
    r = _completion_ring_full_and_two_more_published()
    assert r.pump() == 0 and r.s.taken == 4  # no room to answer: held back in the client's ring
    head = r.ring.take_completions(0)[1]
    assert head == 4 and r.pump() == 2


def test_no_iommu_bounce_copies():
    r = Rig()
    _, user, shadow = r.add_buffer(1, 2, shadow=True)
    user[:PS] = 0x5A
    r.publish((rings.WRITE, 1, 7, 0, 0, 8, 1), (rings.READ, 1, 7, PS, 8, 8, 2))
    assert r.pump() == 2
    assert (shadow[:PS] == 0x5A).all()  # the WRITE's bytes went to the device-visible copy first
    shadow[PS:] = 0xC3  # the device "read" into the shadow
    r.qp.cq_ring[0:2] = [(0, 0, 2, 1, 0, 1), (0, 0, 2, 1, 1, 1)]
    assert lib.nv_svc_reap(r.s, r.qp._qp) == 2
    assert (user[PS:] == 0xC3).all()  # and the READ's came back to the client's memory


@pytest.mark.parametrize("wild", [0xFFFF0000, 100])
def test_a_wild_client_head_stalls_only_itself(wild):
    r = Rig(depth=4)
    r.add_buffer(1, 4)
    r.memory[192:196].view("<u4")[0] = wild  # the CQ head, the client's to write
    r.publish((rings.READ, 1, 7, 0, 0, 1, 1))
    assert r.pump() == 0 and r.s.taken == 0


# ---- notification suppression (ring.py's DAEMON_POLLING and CLIENT_BUSY) ----
def _flag(r, at):
    return r.memory[at : at + 4].view("<u4")


def _wait_for(cond, seconds=5.0):
    end = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def test_the_completion_eventfd_is_written_only_when_the_client_waits_on_it():
    r = Rig()
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    r.s.completion_fd = efd
    r.add_buffer(1, 4)
    r.publish((rings.READ, 1, 7, 0, 0, 1, 0xA), (rings.READ, 1, 7, PS, 1, 1, 0xB))
    assert r.pump() == 2
    busy = _flag(r, rings.CLIENT_BUSY)
    busy[0] = 1  # the client looks at its ring itself
    r.qp.cq_ring[0] = (0, 0, 2, 1, 0, 1)
    assert lib.nv_svc_reap(r.s, r.qp._qp) == 1
    with pytest.raises(BlockingIOError):
        os.eventfd_read(efd)
    assert r.completions() == [(0xA, 0, "")]  # published all the same
    busy[0] = 0  # about to sleep on the eventfd
    r.qp.cq_ring[1] = (0, 0, 2, 1, 1, 1)
    assert lib.nv_svc_reap(r.s, r.qp._qp) == 1
    assert os.eventfd_read(efd) == 1
    os.close(efd)


def _serve_in_thread(r, idle_spin_s, timeout_s):
    svcs, qps = ffi.new("struct nv_svc *[]", [r.s]), ffi.new("struct nv_qp *[]", [r.qp._qp])
    watch, which, out = ffi.new("int[]", [0]), ffi.new("uint32_t *"), []

    def run():  # cffi lets go of the GIL while C runs
        out.append(lib.nv_svc_serve(svcs, qps, 1, watch, 0, 10**12, int(timeout_s * 1e9), int(idle_spin_s * 1e9),
                                    which))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_a_spinning_daemon_says_so_and_takes_requests_nobody_rang_for():
    r = Rig()
    r.add_buffer(1, 4)
    r.s.doorbell_fd = db = os.eventfd(0, os.EFD_NONBLOCK)
    polling = _flag(r, rings.DAEMON_POLLING)
    t, out = _serve_in_thread(r, idle_spin_s=60.0, timeout_s=3.0)
    assert _wait_for(lambda: polling[0] == 1)  # idle, but spinning over a polled queue
    r.publish((rings.READ, 1, 7, 0, 5, 1, 0x77))  # and no doorbell
    assert _wait_for(lambda: r.s.taken == 1, 2.0) and t.is_alive()
    assert int(r.qp.sq_ring["cdw10"][0]) == 1005 and r.qp.in_flight == 1
    t.join(10)
    assert out == [lib.NV_SVC_TIMEOUT] and polling[0] == 0  # back in Python: clients ring again
    os.close(db)


def test_a_sleeping_daemon_says_so_and_a_doorbell_wakes_it():
    r = Rig()
    r.add_buffer(1, 4)
    r.s.doorbell_fd = db = os.eventfd(0, os.EFD_NONBLOCK)
    polling = _flag(r, rings.DAEMON_POLLING)
    polling[0] = 1  # a stale value: the daemon writes its own before it sleeps
    t, out = _serve_in_thread(r, idle_spin_s=0.0, timeout_s=3.0)
    assert _wait_for(lambda: polling[0] == 0) and t.is_alive()  # it went to sleep in poll(2)
    r.publish((rings.READ, 1, 7, 0, 5, 1, 0x77))
    time.sleep(0.3)
    assert r.s.taken == 0  # asleep: it did not see the request
    os.eventfd_write(db, 1)
    assert _wait_for(lambda: r.s.taken == 1, 2.0) and t.is_alive()
    assert _wait_for(lambda: polling[0] == 1)  # a command in flight on a polled queue: it spins
    t.join(10)
    assert out == [lib.NV_SVC_TIMEOUT] and polling[0] == 0
    os.close(db)


def _client_perf(r, doorbell, completion, loop, slice_s):
    tail, head = ffi.new("uint32_t *"), ffi.new("uint32_t *")
    tail[0], head[0] = r.tail, r.head
    header, requests, completions = r.ring.pointers()
    got = lib.nv_svc_client_perf(header, requests, completions, r.ring.depth, doorbell, completion, -1, loop._p, PS,
                                 ffi.cast("int64_t *", loop.issued.ctypes.data), tail, head, int(slice_s * 1e9), 0)
    r.tail, r.head = int(tail[0]), int(head[0])
    return got


@pytest.mark.parametrize("daemon_polling", [0, 1])
def test_the_client_loop_rings_only_a_sleeping_daemon_and_reaps_without_an_eventfd(daemon_polling):
    from nvmevfio.nvme.perfloop import PerfCounters

    r = Rig(depth=8)
    r.head = 0
    loop = PerfCounters()
    p = loop._setup(nlb=8, block_size=512, lba_lo=0, positions=100, random=False, read_pct=100, depth=4, nslots=4,
                    max_ios=0, seed=1, timeout_s=5.0)
    p.buf_slot, p.buf_gen = 1, 7
    loop.issued = np.zeros(4, dtype=np.int64)
    doorbell, completion = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    _flag(r, rings.DAEMON_POLLING)[0] = daemon_polling
    assert _client_perf(r, doorbell, completion, loop, 0.05) == 0  # the slice ends: no daemon answered
    assert r.tail == 4 and r.ring.requests["lba"][:4].tolist() == [0, 8, 16, 24]
    if daemon_polling:
        assert p.doorbells == 0
        with pytest.raises(BlockingIOError):
            os.eventfd_read(doorbell)
    else:
        assert p.doorbells == 1 and os.eventfd_read(doorbell) == 1
    assert p.sleeps >= 1 and _flag(r, rings.CLIENT_BUSY)[0] == 0  # asked for the eventfd when it slept
    # two completions published without an eventfd: the loop looks at its ring before sleeping
    entries = np.zeros(2, dtype=rings.COMPLETION)
    entries["tag"] = [0x80000000 | int(t) for t in r.ring.requests["tag"][:2] & 0x7FFFFFFF]
    r.ring.put_completions(0, entries)
    assert _client_perf(r, doorbell, completion, loop, 0.05) == 0
    assert p.ios == 2 and p.errors == 0 and r.head == 2 and r.tail == 6
    os.close(doorbell)
    os.close(completion)


def test_a_client_that_does_not_reap_does_not_keep_the_daemon_awake():
    r = _completion_ring_full_and_two_more_published()
    t, out = _serve_in_thread(r, idle_spin_s=0.0, timeout_s=0.3)
    t.join(10)
    assert out == [lib.NV_SVC_TIMEOUT] and r.s.taken == 4
    assert r.s.sleeps == 1  # it slept in poll(2) until its time ran out, not spun on the two


def test_the_client_loop_issues_the_in_process_loops_workload():
    """One PRNG and one fill policy (cbits/perf.h): with the same seed the service client's loop
    (cbits/svc_client.c) publishes the LBAs, directions and slots nv_perf_run posts."""
    from nvmevfio.nvme.perfloop import PerfCounters

    def workload():
        loop = PerfCounters()
        p = loop._setup(nlb=8, block_size=512, lba_lo=64, positions=1000, random=True, read_pct=50, depth=6,
                        nslots=6, max_ios=0, seed=12345, timeout_s=5.0)
        return loop, p

    # in process: nothing completes, so one fill of 6 and the slice ends
    r = Rig(depth=8, qdepth=8)
    loop, p = workload()
    prps = np.zeros(6, dtype=PRP_SLOT)
    prps["prp1"] = 0x10000 + PS * np.arange(6, dtype=np.uint64)
    p.prps = ffi.cast("struct nv_prp_slot *", prps.ctypes.data)
    p.nsid, p.page_size = 1, PS
    assert lib.nv_perf_run(r.qp._qp, p, int(0.02e9), 0) == 0 and p.issued == 6 and p.fills == 1
    sq = r.qp.sq_ring[:6]
    posted = [(int(e["cdw10"]), int(e["opc"]), (int(e["prp1"]) - 0x10000) // PS) for e in sq]
    # the client: the same, published into its request ring (tags: the slot, bit 31 for a READ)
    c = Rig(depth=8)
    c.head = 0
    loop, p = workload()
    p.buf_slot, p.buf_gen = 1, 7
    loop.issued = np.zeros(6, dtype=np.int64)
    doorbell, completion = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    assert _client_perf(c, doorbell, completion, loop, 0.02) == 0 and p.issued == 6
    req = c.ring.requests[:6]
    published = [(int(q["lba"]), int(q["opcode"]), int(q["tag"]) & 0x7FFFFFFF) for q in req]
    assert published == posted
    assert {op for _, op, _ in posted} == {rings.READ, rings.WRITE}  # read_pct 50: both directions
    assert [int(q["offset"]) for q in req] == [slot * PS for _, _, slot in published]
    os.close(doorbell)
    os.close(completion)
