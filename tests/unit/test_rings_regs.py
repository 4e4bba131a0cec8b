"""Ring arithmetic, register fields, doorbell offsets, CC selection: exact values."""

import pytest

from nvmevfio.nvme import regs
from nvmevfio.nvme.queue import ring_free, ring_used


def test_ring_arithmetic():
    assert ring_used(0, 0, 16) == 0 and ring_free(0, 0, 16) == 15
    assert ring_used(14, 2, 16) == 4 and ring_free(14, 2, 16) == 11
    assert ring_free(3, 2, 16) == 0  # full: one slot kept empty


def test_fields_and_packing():
    cap = 0x0040_3C03_2000_07FF  # a typical CAP
    d = regs.decode_cap(cap)
    assert d["MQES"] == 0x7FF and d["TO"] == 0x20 and d["DSTRD"] == 3 and d["MPSMIN"] == 0 and d["MPSMAX"] == 4
    assert d["CSS"] == 0xE0  # CAP bits 44:37 of 0x0040_3C03_2000_07FF: I/O command sets (bit 6), admin only (bit 7)
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
