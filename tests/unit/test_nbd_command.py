"""The nbdkit command line `nvmevfio nbd` runs (a pure function of its options), the
environment that lets nbdkit's embedded Python import nvmevfio, and the CLI's refusals."""

import os
from pathlib import Path

from click.testing import CliRunner

from nvmevfio import nbd
from nvmevfio.cli import main


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
