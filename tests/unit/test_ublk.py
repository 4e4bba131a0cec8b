"""The ublk server's host-side logic: the errno table C applies per request, the device's owner
kept in ublksrv_flags, the parameters derived from Identify, and the one-line refusal where
the kernel has no ublk (the guest tier, tests/vm/test_ublk.py, runs the device itself)."""

import errno
from pathlib import Path

import pytest
from click.testing import CliRunner

from nvmevfio import nbd, ublk, ublk_devices
from nvmevfio._ffi import lib
from nvmevfio.cli import disk as cli_disk
from nvmevfio.cli import main


def status(sct: int, sc: int, dnr: bool = False) -> int:
    """An NVMe status field as C sees it (CQE DW3[31:17]: SC bits 0-7, SCT 8-10, DNR 14)."""
    return sc | (sct << 8) | (int(dnr) << 14)


def test_c_errno_table_matches_the_nbd_exports():
    for (sct, sc), err in nbd._STATUS_ERRNO.items():
        assert lib.nv_ublk_errno(status(sct, sc)) == err, (sct, sc)
        assert lib.nv_ublk_errno(status(sct, sc, dnr=True)) == err, (sct, sc)


@pytest.mark.parametrize(("sct", "sc"), [(2, 0x81), (2, 0x80), (0, 0x04), (0, 0x06), (3, 0x00), (7, 0x12)])
def test_c_errno_is_eio_for_media_and_other_errors(sct, sc):
    assert lib.nv_ublk_errno(status(sct, sc)) == errno.EIO


def test_owner_round_trips_through_ublksrv_flags():
    flags = ublk_devices.encode_owner("0000:00:04.0", 1)
    assert flags & ublk_devices.SERVER_FLAGS_MARK
    assert ublk_devices.decode_owner(flags) == ("0000:00:04.0", 1)
    far = ublk_devices.encode_owner("7bcd:ff:1f.7", 0xFFFFFFFF)
    assert ublk_devices.decode_owner(far) == ("7bcd:ff:1f.7", 0xFFFFFFFF)
    with pytest.raises(ublk_devices.UblkError):
        ublk_devices.encode_owner("8000:00:04.0", 1)
    assert ublk_devices.decode_owner(0) is None  # a device another server added


def test_params_from_identify_with_a_volatile_cache():
    g = ublk.Geometry(block_size=512, blocks=1 << 19, io_bytes=128 << 10, volatile_cache=True,
                      oncs=ublk.ONCS_DSM | ublk.ONCS_WRITE_ZEROES)
    p = g.params(read_only=False)
    assert p.attrs == ublk.UBLK_ATTR_VOLATILE_CACHE | ublk.UBLK_ATTR_FUA
    assert (p.logical_bs_shift, p.physical_bs_shift, p.io_min_shift, p.io_opt_shift) == (9, 9, 9, 17)
    assert p.max_sectors == 256 and p.dev_sectors == 1 << 19
    assert p.discard_granularity == 512 and p.max_discard_sectors == 0xFFFFFFFF
    assert p.max_write_zeroes_sectors == 65536


def test_params_4k_blocks_read_only_without_cache():
    g = ublk.Geometry(block_size=4096, blocks=1000, io_bytes=4096, volatile_cache=False,
                      oncs=ublk.ONCS_DSM | ublk.ONCS_WRITE_ZEROES)
    p = g.params(read_only=True)
    assert p.attrs == ublk.UBLK_ATTR_READ_ONLY
    assert p.logical_bs_shift == 12 and p.dev_sectors == 8000 and p.max_sectors == 8
    assert p.max_discard_sectors == p.max_write_zeroes_sectors == 0  # nothing that writes
    p = g.params(read_only=False)
    assert p.max_discard_sectors % 8 == 0 and p.max_write_zeroes_sectors == 65536 * 8


def test_params_without_dsm_or_write_zeroes():
    g = ublk.Geometry(block_size=512, blocks=100, io_bytes=4096, volatile_cache=True, oncs=0)
    p = g.params(read_only=False)
    assert p.max_discard_sectors == p.max_write_zeroes_sectors == 0


@pytest.fixture
def no_ublk(monkeypatch, tmp_path):
    monkeypatch.setattr(ublk_devices, "UBLK_CONTROL", tmp_path / "ublk-control")
    ran = []
    monkeypatch.setattr(ublk_devices.subprocess, "run", lambda cmd, **kw: ran.append(cmd))
    return ran


def test_missing_ublk_is_one_typed_error_naming_nbd(no_ublk):
    with pytest.raises(ublk_devices.UblkError) as e:
        ublk_devices.require_ublk()
    assert e.value.reason == "ublk-missing" and "nvmevfio nbd" in str(e.value)
    assert no_ublk == [["modprobe", "-q", "ublk_drv"]]  # the module was asked for first


@pytest.mark.parametrize("args", [["0000:00:04.0"], ["--list"], ["--stop", "0"], ["--recover", "0"]])
def test_cli_says_ublk_is_missing_in_one_line(no_ublk, monkeypatch, args):
    monkeypatch.setattr(cli_disk, "_need_root", lambda: None)  # the ublk command's module
    r = CliRunner().invoke(main, ["ublk", *args])
    assert r.exit_code != 0
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "ublk is not available" in lines[0] and "nvmevfio nbd" in lines[0], r.output


def test_more_queues_than_ublk_gives_are_refused_before_anything_is_added(monkeypatch):
    monkeypatch.setattr(ublk, "possible_cpus", lambda: 2)
    with pytest.raises(ublk.Refused) as e:
        ublk.Server(None, address="0000:00:04.0", queues=3, depth=8)
    assert e.value.reason == "count-out-of-range" and "at most 2 queues" in str(e.value)


@pytest.mark.parametrize(("possible", "online", "want"), [(1, 1, 1), (2, 2, 2), (64, 2, 2), (8, 8, 4), (2, None, 1)])
def test_default_queues_is_one_per_cpu_up_to_four(monkeypatch, possible, online, want):
    monkeypatch.setattr(ublk, "possible_cpus", lambda: possible)
    monkeypatch.setattr(ublk.os, "cpu_count", lambda: online)
    assert ublk.default_queues() == want


def test_the_default_shape_follows_the_cpus_this_process_may_use():
    """One polled queue on the last allowed CPU where a queue per CPU would take every CPU (2 to
    DEFAULT_QUEUES_MAX of them); interrupts and a queue per CPU otherwise; any option given: asked."""
    two = ublk.choose_shape(None, None, None, allowed={0, 1}, per_cpu=2)
    assert (two.queues, two.mode, two.cpus) == (1, "poll", [1])
    assert two.why == ("the default: a server thread per CPU would take all 2 CPUs this process may use, so one queue, "
                       "polled, on CPU 1 (--mode irq: a queue per CPU, interrupts)")
    four = ublk.choose_shape(None, None, None, allowed={2, 5, 6, 7}, per_cpu=4)
    assert (four.queues, four.mode, four.cpus) == (1, "poll", [7])
    many = ublk.choose_shape(None, None, None, allowed=set(range(8)), per_cpu=4)
    assert (many.queues, many.mode, many.cpus) == (None, "irq", None)
    assert many.why == ("the default: a queue per CPU with interrupts (4 queues leave CPUs free of the 8 this "
                        "process may use)")
    one = ublk.choose_shape(None, None, None, allowed={3}, per_cpu=1)
    assert (one.queues, one.mode, one.cpus) == (None, "irq", None) and "one CPU" in one.why
    for asked, want in (((None, "poll", None), (None, "poll", None)), ((None, None, [0]), (None, "irq", [0])),
                        ((2, None, None), (2, "irq", None)), ((None, "irq", None), (None, "irq", None))):
        got = ublk.choose_shape(*asked, allowed={0, 1}, per_cpu=2)
        assert ((got.queues, got.mode, got.cpus), got.why) == (want, "asked for"), asked
    # --recover: the device's queue count stays; one queue takes the polled shape, more take interrupts
    assert ublk.choose_shape(None, None, None, allowed={0, 1}, per_cpu=2, fixed_queues=1).mode == "poll"
    two_q = ublk.choose_shape(None, None, None, allowed={0, 1}, per_cpu=2, fixed_queues=2)
    assert (two_q.queues, two_q.mode, two_q.cpus) == (2, "irq", None)
    assert "2 queues of the device recovered" in two_q.why
    assert ublk.choose_shape(None, "poll", None, allowed={0, 1}, per_cpu=2, fixed_queues=2).queues == 2


def test_possible_cpus_reads_the_kernels_range():
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    assert ublk.possible_cpus() == int(text.split(",")[-1].split("-")[-1]) + 1 >= 1


def _info(dev_id: int, pid: int, alive: bool) -> ublk_devices.DeviceInfo:
    return ublk_devices.DeviceInfo(dev_id=dev_id, state="live", server_pid=pid, server_alive=alive, queues=1,
                                   depth=8, max_io_bytes=4096, recoverable=True, address="0000:00:04.0", nsid=1,
                                   block_device=None)


def test_stop_returns_only_once_the_server_has_exited(monkeypatch):
    """The device goes before the server has shut the controller down: --stop waits for both."""
    monkeypatch.setattr(ublk_devices, "require_ublk", lambda: None)
    monkeypatch.setattr(ublk_devices, "device_info", lambda dev_id: _info(dev_id, 4242, True))
    monkeypatch.setattr(ublk_devices.os, "kill", lambda pid, sig: None)
    monkeypatch.setattr(ublk_devices, "_wait_gone", lambda dev_id, timeout_s: True)
    polls = iter([True, True, False])
    monkeypatch.setattr(ublk_devices, "_alive", lambda pid: next(polls))
    assert ublk_devices.stop_device(3).server_pid == 4242
    assert next(polls, "done") == "done"  # asked until the process was gone
    monkeypatch.setattr(ublk_devices, "_alive", lambda pid: True)
    with pytest.raises(ublk_devices.UblkError) as e:
        ublk_devices.stop_device(3, timeout_s=0.2)
    assert e.value.reason == "stop-timeout" and "did not stop within 0.2 s" in str(e.value)


class _FakeLib:
    def __init__(self, answers: list[int]) -> None:
        self.answers = answers
        self.calls = 0

    def nv_ublk_start_recovery(self, dev_id: int) -> int:
        self.calls += 1
        return self.answers.pop(0)


def test_recover_waits_while_the_dead_servers_device_is_still_held(monkeypatch):
    """START_USER_RECOVERY is EBUSY until the dead server's /dev/ublkcN is released."""
    server = ublk.Server.__new__(ublk.Server)
    server.geometry = ublk.Geometry(block_size=512, blocks=1 << 19, io_bytes=4096, volatile_cache=True, oncs=0)
    server.dev_id = None
    fake = _FakeLib([-errno.EBUSY, -errno.EBUSY, 0])
    monkeypatch.setattr(ublk, "lib", fake)
    server.adopt(_info(5, 77, False))
    assert server.dev_id == 5 and fake.calls == 3
    fake = _FakeLib([-errno.EINVAL])
    monkeypatch.setattr(ublk, "lib", fake)
    server.dev_id = None
    with pytest.raises(ublk.ShimError):
        server.adopt(_info(5, 77, False))
    assert server.dev_id is None and fake.calls == 1
