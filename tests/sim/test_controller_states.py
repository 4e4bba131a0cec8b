"""The init state machine against the simulated register block."""

import pytest

from nvmevfio.errors import ControllerFatal, ControllerTimeout, Refused
from nvmevfio.nvme import regs


def test_bind_reads_only(rig):
    snap = rig.p.bind()
    assert rig.sim.mmio.writes == []
    assert snap.vs == 0x00010400 and regs.get(snap.cap, regs.CAP_.MQES) == 1023


def test_enable_programs_admin_queues_high_then_low(rig):
    rig.p.bind()
    rig.p.enable()
    w = rig.sim.mmio.writes
    offs = [o for o, _, _ in w]
    # AQA, ASQ high, ASQ low, ACQ high, ACQ low, then CC
    i = offs.index(regs.AQA)
    assert offs[i : i + 6] == [regs.AQA, regs.ASQ + 4, regs.ASQ, regs.ACQ + 4, regs.ACQ, regs.CC]
    assert w[i][2] == (31 << 16) | 31  # 32-entry admin queues, 0's based
    cc = w[i + 5][2]
    assert regs.decode_cc(cc) == {"EN": 1, "CSS": 0, "MPS": 0, "AMS": 0, "SHN": 0, "IOSQES": 6, "IOCQES": 4,
                                  "CRIME": 0}
    asq = rig.sim.mmio.read64(regs.ASQ)
    assert asq == rig.ledger.iova(rig.broker.admin.buffers[0])
    assert rig.p.state == "ready"


def test_ready_timeout(rig):
    rig.sim.never_ready = True
    rig.p.bind()
    with pytest.raises(ControllerTimeout) as ei:
        rig.p.enable()
    assert ei.value.reason == "ready-timeout" and "CSTS.RDY=1" in str(ei.value)


def test_fatal_on_enable(rig):
    rig.sim.fatal_on_enable = True
    rig.p.bind()
    with pytest.raises(ControllerFatal) as ei:
        rig.p.enable()
    assert ei.value.reason == "controller-fatal" and ei.value.context["csts"] & 2
    m = rig.mark()
    with pytest.raises(Refused) as ei2:
        rig.p.identify_controller()
    assert ei2.value.reason == "controller-fatal" and rig.unchanged_since(m)


def test_shutdown_sets_shn_and_waits_shst(rig):
    rig.ready()
    rig.p.shutdown()
    assert regs.get(rig.sim.mmio.read32(regs.CC), regs.CC_.SHN) == regs.SHN_NORMAL
    assert regs.get(rig.sim.mmio.read32(regs.CSTS), regs.CSTS_.SHST) == regs.SHST_COMPLETE
    assert rig.p.state == "shutdown" and rig.ledger.live_buffers() == 0
    # queues deleted before shutdown: SQ then CQ
    ops = [op for q, op, _ in rig.sim.commands if q == 0]
    assert ops[-2:] == [0x00, 0x04]


def test_reset_then_enable_again(rig):
    rig.ready()
    rig.p.reset()
    assert rig.p.state == "disabled" and rig.ledger.live_buffers() == 0
    rig.p.enable()
    rig.p.create_io_queues(1, 8)
    rig.p.write(1, 0, b"\x01" * 512)
    assert rig.p.read(1, 0, 1)[0] == 1


def test_create_io_queues_order_and_depth(rig):
    rig.p.bind()
    rig.p.enable()
    rig.p.identify_controller()
    rig.p.create_io_queues(2, 64)
    admin = [op for q, op, _ in rig.sim.commands if q == 0]
    # Identify, Set Features Asynchronous Event Configuration and AERL+1 (4) AERs; then Set
    # Features NoQ, CQ before SQ per pair, the namespace table (CNS 02h, CNS 00h x2)
    assert admin == [0x06, 0x09, 0x0C, 0x0C, 0x0C, 0x0C, 0x09, 0x05, 0x01, 0x05, 0x01, 0x06, 0x06, 0x06]
    assert rig.sim.cqs[1].depth == 64 and rig.sim.sqs[2].cqid == 2
