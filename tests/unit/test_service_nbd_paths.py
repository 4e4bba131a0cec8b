"""`nvmevfio nbd --socket PATH` (issue 27, item 10): the export's directories are those of its own
paths; /run/nvmevfio is not created when a socket path is given, and a directory that cannot be
created is a one-line NvmeVfioError, not a traceback. (The CLI's use of these: see nvmevfio/cli/disk.py's
nbd command.)"""

from pathlib import Path

import pytest

from nvmevfio import nbd
from nvmevfio.errors import NvmeVfioError


def test_a_socket_path_needs_nothing_of_run(tmp_path, monkeypatch):
    run = tmp_path / "run" / "nvmevfio"
    monkeypatch.setattr(nbd, "RUN_DIR", run)
    sock = tmp_path / "mine" / "export.sock"
    pidfile = nbd.default_pidfile("0000:00:04.0", 1, sock)
    nbd.prepare_run_dirs(sock, pidfile)
    assert pidfile == tmp_path / "mine" / "export.sock.pid" and sock.parent.is_dir() and not run.exists()
    assert nbd.default_pidfile("0000:00:04.0", 1) == run / "nbd-0000:00:04.0-n1.pid"  # no socket: RUN_DIR's


def test_a_directory_that_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(NvmeVfioError) as ei:
        nbd.prepare_run_dirs(None, blocker / "sub" / "export.sock")
    assert ei.value.reason == "run-dir" and "\n" not in str(ei.value) and str(blocker / "sub") in str(ei.value)
    assert not Path(blocker / "sub").exists()
