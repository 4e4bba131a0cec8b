"""Passthrough with broker-authored data pointers: the caller gives dwords and bytes, never an
address; commands the broker owns are refused before the device sees anything."""

import numpy as np
import pytest

from nvmevfio import broker as brokermod
from nvmevfio.errors import CommandError, Refused
from nvmevfio.nvme.spec import AdminOpcode, IoOpcode


@pytest.fixture
def p(rig):
    return rig.ready(depth=16)


def test_identify_and_log_page_through_passthru(p, rig):
    dw0, data = p.admin_passthru(AdminOpcode.IDENTIFY, cdw10=1, data_len=4096)
    assert dw0 == 0 and data == rig.sim.identify_controller().tobytes()
    _, smart = p.admin_passthru(AdminOpcode.GET_LOG_PAGE, nsid=0xFFFFFFFF, cdw10=0x02 | ((512 // 4 - 1) << 16),
                                data_len=512)
    assert smart == p.get_log_page("smart")
    e = rig.sim.last_sqe[AdminOpcode.GET_LOG_PAGE]
    assert int(e["prp1"]) != 0 and int(e["mptr"]) == 0 and int(e["flags"]) == 0  # the broker's DPTR, PRPs


def test_io_write_then_read_through_passthru(p, rig):
    data = np.random.default_rng(4).integers(0, 256, 4 * 512, dtype=np.uint8)
    p.io_passthru(IoOpcode.WRITE, nsid=1, cdw10=40, cdw12=3, data=data.tobytes())
    assert np.array_equal(p.read(1, 40, 4), data)
    _, got = p.io_passthru(IoOpcode.READ, nsid=1, cdw10=40, cdw12=3, data_len=4 * 512)
    assert got == data.tobytes()


@pytest.mark.parametrize(("opcode", "cdw10", "what"), [
    (0x01, 0, "Create I/O Submission Queue"), (0x05, 0, "Create I/O Completion Queue"),
    (0x00, 0, "Delete I/O Submission Queue"), (0x08, 0, "Abort"), (0x7C, 0, "Doorbell Buffer Config"),
    (0x0C, 0, "Asynchronous Event Request"), (0x09, 0x07, "Number of Queues"), (0x09, 0x0D, "Host Memory Buffer"),
])
def test_broker_owned_commands_are_refused_before_the_device(p, rig, opcode, cdw10, what):
    mark = rig.mark()
    with pytest.raises(Refused) as ei:
        p.admin_passthru(opcode, cdw10=cdw10)
    assert ei.value.reason == "broker-owned-command" and what in str(ei.value)
    assert rig.unchanged_since(mark)


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"cdw0": 1}, "invalid-argument"), ({"prp1": 0x1000}, "invalid-argument"), ({"mptr": 8}, "invalid-argument"),
    ({"cdw10": 1 << 32}, "invalid-argument"), ({"cdw10": -1}, "invalid-argument"),
    ({"data": b"x", "data_len": 1}, "invalid-argument"), ({"data_len": brokermod.PASSTHRU_MAX + 1}, "length-mismatch"),
])
def test_hostile_arguments(p, rig, kwargs, reason):
    mark = rig.mark()
    with pytest.raises(Refused) as ei:
        p.admin_passthru(0xC1, **kwargs)
    assert ei.value.reason == reason
    assert rig.unchanged_since(mark)


def test_a_vendor_opcode_reaches_the_device_and_its_status_comes_back(p, rig):
    with pytest.raises(CommandError) as ei:
        p.admin_passthru(0xC2, data_len=4096, cdw12=7)  # the simulator does not implement it
    assert ei.value.sc_name == "Invalid Command Opcode"
    assert rig.sim.commands[-1][:2] == (0, 0xC2)
    assert int(rig.sim.last_sqe[0xC2]["cdw12"]) == 7
    assert rig.ledger.live_buffers() == len([s for s in rig.ledger._slots if s.mem is not None])
    p.admin_passthru(AdminOpcode.IDENTIFY, cdw10=1, data_len=4096)  # nothing broke


def test_passthru_buffers_are_freed(p, rig):
    before = rig.ledger.live_buffers()
    for _ in range(5):
        p.admin_passthru(AdminOpcode.IDENTIFY, cdw10=1, data_len=4096)
    assert rig.ledger.live_buffers() == before


def test_compare_and_verify(p, rig):
    data = np.random.default_rng(6).integers(0, 256, 8 * 512, dtype=np.uint8)
    p.write(1, 300, data)
    p.compare(1, 300, data)
    changed = data.copy()
    changed[100] ^= 1
    with pytest.raises(CommandError) as ei:
        p.compare(1, 300, changed)
    assert ei.value.sc_name == "Compare Failure" and ei.value.context["opcode"] == IoOpcode.COMPARE
    p.verify(1, 300, 8)
    assert rig.sim.commands[-1][1] == IoOpcode.VERIFY
    with pytest.raises(Refused) as ei:
        p.compare(1, 300, data[:100])
    assert ei.value.reason == "length-mismatch"


def test_set_features_and_get_log(p, rig):
    with pytest.raises(Refused) as ei:
        p.set_features(0x07, 0x00010001)  # Number of Queues: the broker's
    assert ei.value.reason == "broker-owned-command"
    assert p.get_log(0x02, 512) == p.get_log_page("smart")
    e = rig.sim.last_sqe[AdminOpcode.GET_LOG_PAGE]
    assert int(e["cdw10"]) == 0x02 | (127 << 16)


def test_commands_the_controller_lacks_come_back_with_its_status(p, rig):
    for call in (lambda: p.sanitize(2), lambda: p.device_self_test(1), lambda: p.firmware_commit(1, 1),
                 lambda: p.firmware_download(bytes(8192), xfer=4096), lambda: p.create_namespace(100, 100)):
        with pytest.raises(CommandError) as ei:
            call()
        assert ei.value.sc_name == "Invalid Command Opcode"
    with pytest.raises(Refused):
        p.sanitize(9)
    p.identify_controller()  # nothing broke
