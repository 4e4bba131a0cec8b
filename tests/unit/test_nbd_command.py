"""The nbdkit command line `nvmevfio nbd` runs (a pure function of its options), the
environment that lets nbdkit's embedded Python import nvmevfio, and the CLI's refusals."""

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from nvmevfio import nbd
from nvmevfio.cli import main
from nvmevfio.errors import NvmeVfioError


def test_foreground_unix_socket():
    cmd = nbd.nbdkit_command("0000:00:04.0", 1, socket=Path("/run/x.sock"), port=None, readonly=False, queues=4,
                             block_size=512)
    assert cmd == ["nbdkit", "--foreground", "--threads", "8", "--unix", "/run/x.sock", "python", str(nbd.PLUGIN),
                   "address=0000:00:04.0", "nsid=1", "queues=4", "mode=irq"]


def test_background_tcp_readonly_4k_blocks():
    cmd = nbd.nbdkit_command("0000:01:00.0", 2, socket=None, port=10809, readonly=True, queues=2, block_size=4096,
                             pidfile=Path("/run/p"), ready=Path("/run/r"), verbose=True, foreground=False,
                             mode="poll")
    assert cmd == ["nbdkit", "--log=stderr", "--threads", "4", "--ipaddr", "127.0.0.1", "--port", "10809",
                   "--readonly", "--pidfile", "/run/p", "--verbose", "--filter=blocksize", "python",
                   str(nbd.PLUGIN), "address=0000:01:00.0", "nsid=2", "queues=2", "mode=poll", "ready=/run/r",
                   "minblock=4096"]


def test_env_finds_this_checkout():
    paths = nbd.nbdkit_env()["PYTHONPATH"].split(os.pathsep)
    assert paths[0] == str(Path(nbd.__file__).resolve().parent.parent)
    assert len(paths) == len(set(paths))


def test_socket_and_port_exclude_each_other():
    r = CliRunner().invoke(main, ["nbd", "00:04.0", "--socket", "/tmp/s", "--port", "10809"])
    assert r.exit_code == 1 and "exclude each other" in r.output


def test_stop_without_a_running_export(tmp_path):
    r = CliRunner().invoke(main, ["nbd", "00:04.0", "--stop", "--pidfile", str(tmp_path / "none.pid")])
    assert r.exit_code == 1 and "no running export" in r.output


def test_stale_socket_is_removed(tmp_path):
    import socket

    path = tmp_path / "s.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # bound, never listening: what a killed server leaves
    nbd.clear_stale_socket(path)
    assert not path.exists()


# ------------------------------------------------------------------ --plugin: C over ublk, or Python
def test_auto_takes_the_file_plugin_exactly_where_the_kernel_has_ublk():
    assert nbd.choose_plugin("auto", True) == ("file", "ublk is available")
    assert nbd.choose_plugin("auto", False) == ("python", "this kernel has no ublk")
    assert nbd.choose_plugin("file", True) == ("file", "--plugin file")
    assert nbd.choose_plugin("python", True) == ("python", "--plugin python")
    assert nbd.choose_plugin("python", False) == ("python", "--plugin python")


def test_the_file_plugin_without_ublk_is_refused():
    with pytest.raises(NvmeVfioError) as e:
        nbd.choose_plugin("file", False)
    assert e.value.reason == "ublk-missing" and "--plugin python" in str(e.value)
    with pytest.raises(NvmeVfioError):
        nbd.choose_plugin("rust", True)


def test_file_plugin_command_line():
    cmd = nbd.nbdkit_file_command("/dev/ublkb3", socket=Path("/run/x.sock"), port=None, readonly=True, queues=2,
                                  pidfile=Path("/run/p"), foreground=False)
    assert cmd == ["nbdkit", "--log=stderr", "--threads", "4", "--unix", "/run/x.sock", "--readonly", "--pidfile",
                   "/run/p", "file", "file=/dev/ublkb3"]


@pytest.fixture
def devices(monkeypatch):
    """Fake ublk devices by number (their server's pid); records what was stopped."""
    from nvmevfio import ublk_devices

    devs: dict[int, int] = {}
    stopped: list[int] = []

    def info(dev_id):
        if dev_id not in devs:
            raise ublk_devices.UblkError(f"there is no ublk device {dev_id}", reason="unknown-device")
        return SimpleNamespace(dev_id=dev_id, server_pid=devs[dev_id])

    monkeypatch.setattr(ublk_devices, "device_info", info)
    monkeypatch.setattr(ublk_devices, "stop_device", lambda dev_id: stopped.append(dev_id))
    return devs, stopped


def test_stop_takes_down_the_ublk_device_the_export_started_and_nothing_else(tmp_path, devices):
    devs, stopped = devices
    claim = nbd.ublk_claim_path(tmp_path / "e.pid")
    devs.update({3: 100, 4: 200})
    nbd.write_claim(claim, {"device": "/dev/ublkb3", "dev_id": 3, "pid": 100, "size": 1})
    assert nbd.release_ublk(claim) == "/dev/ublkb3" and stopped == [3] and not claim.exists()
    # the number now belongs to another server (ours died, another device got it): left alone
    nbd.write_claim(claim, {"device": "/dev/ublkb4", "dev_id": 4, "pid": 999})
    assert nbd.release_ublk(claim) is None and stopped == [3]
    # no claim (the export found the device serving): nothing stopped
    assert nbd.release_ublk(claim) is None and stopped == [3]
    nbd.write_claim(claim, {"device": "/dev/ublkb9", "dev_id": 9, "pid": 5})  # gone already
    assert nbd.release_ublk(claim) is None and stopped == [3]


def test_stop_after_nbdkit_died_still_takes_down_its_ublk_device(tmp_path, devices):
    devs, stopped = devices
    pidfile = tmp_path / "e.pid"
    with pytest.raises(NvmeVfioError) as e:  # neither nbdkit nor a ublk device: nothing to stop
        nbd.stop_export(pidfile)
    assert e.value.reason == "not-running"
    devs[5] = 300
    nbd.write_claim(nbd.ublk_claim_path(pidfile), {"device": "/dev/ublkb5", "dev_id": 5, "pid": 300})
    assert nbd.stop_export(pidfile) == (None, "/dev/ublkb5") and stopped == [5]


def test_the_claim_is_read_only_when_whole(tmp_path):
    claim = tmp_path / "e.ublk"
    claim.write_text('{"device": "/dev/ublkb1"}')
    assert nbd.read_claim(claim) is None
    claim.write_text("not json")
    assert nbd.read_claim(claim) is None


def test_cli_file_plugin_without_ublk_is_one_line(monkeypatch):
    monkeypatch.setattr(nbd, "ublk_present", lambda: False)
    r = CliRunner().invoke(main, ["nbd", "00:04.0", "--plugin", "file"])
    assert r.exit_code != 0
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "no ublk" in lines[0] and "--plugin python" in lines[0], r.output


def test_cli_says_it_falls_back_to_the_python_plugin(monkeypatch):
    monkeypatch.setattr(nbd, "ublk_present", lambda: False)

    def no_nbdkit():
        raise NvmeVfioError("nbdkit is not installed", reason="nbdkit-missing")

    monkeypatch.setattr(nbd, "nbdkit_python_version", no_nbdkit)
    r = CliRunner().invoke(main, ["nbd", "00:04.0"])
    assert "nbdkit's Python plugin (this kernel has no ublk)" in r.output and "nbdkit is not installed" in r.output


def test_waiting_for_a_c_plugin_nbdkit_fails_when_it_or_its_server_exits(tmp_path):
    import subprocess

    log, pidfile = tmp_path / "n.log", tmp_path / "n.pid"
    log.write_text("nbdkit: error: cannot open file\n")
    failed = subprocess.Popen(["false"])
    with pytest.raises(NvmeVfioError, match=r"exited \(1\) before serving:\nnbdkit: error: cannot open file"):
        nbd.wait_forked(failed, pidfile, log, timeout_s=10)
    dead = subprocess.Popen(["true"])
    dead.wait()
    pidfile.write_text(f"{dead.pid}\n")  # the server it forked, gone (reaped: no such process)
    with pytest.raises(NvmeVfioError, match="exited before serving"):
        nbd.wait_forked(subprocess.Popen(["true"]), pidfile, log, timeout_s=10)
    pidfile.write_text(f"{os.getpid()}\n")
    assert nbd.wait_forked(subprocess.Popen(["true"]), pidfile, log, timeout_s=10) == os.getpid()
