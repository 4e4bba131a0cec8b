"""Running nvmevfio commands in the guest without paying a Python process each (~8 s under TCG:
interpreter start, imports, device open): in-process through click's runner (``nv``), or from a
shell script through ``shell_nvmevfio``, which gives the script an ``nvmevfio`` shell function that
hands its argument list to this process over two FIFOs and returns the command's output and exit
status. Both go through ``main.main`` as ``python -m nvmevfio`` does (usage errors, exit codes)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from click.testing import CliRunner

from nvmevfio.cli import main


class Result:
    def __init__(self, returncode: int, stdout: bytes, stderr: bytes) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def nv(*args, input=None, check=True, real=False) -> Result:
    """Run an nvmevfio command: in-process through click's runner, or as a real ``python -m nvmevfio``
    process (``real``: its own interpreter, stdin and exit)."""
    argv = [str(a) for a in args]
    if real:
        r = subprocess.run([sys.executable, "-m", "nvmevfio", *argv], input=input, capture_output=True, timeout=300)
        res = Result(r.returncode, r.stdout, r.stderr)
    else:
        r = CliRunner().invoke(main, argv, input=input, prog_name="nvmevfio")
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            raise r.exception
        res = Result(r.exit_code, r.stdout_bytes, r.stderr_bytes)
    if check and res.returncode != 0:
        raise AssertionError(f"nvmevfio {' '.join(argv)} exited {res.returncode}: {res.stderr.decode()}")
    return res


def nvj(*args):
    return json.loads(nv(*args, "-o", "json").stdout)


SHELL_FUNCTION = """
nvmevfio() {
    printf '%s\\n' "$@" > "$NVMEVFIO_FIFO_DIR/request"
    read -r rc < "$NVMEVFIO_FIFO_DIR/status"
    cat "$NVMEVFIO_FIFO_DIR/stdout"
    cat "$NVMEVFIO_FIFO_DIR/stderr" >&2
    return "$rc"
}
"""


@contextlib.contextmanager
def shell_nvmevfio() -> Iterator[dict[str, str]]:
    """A server for the script's ``nvmevfio`` function (SHELL_FUNCTION): yields the environment the
    script needs; each request (one argument a line) runs in this process, its stdout and stderr go
    to files and its exit status back through the status FIFO. The FIFOs live in the guest's own
    /tmp (the shared I/O folder, 9p, has none)."""
    folder = Path(tempfile.mkdtemp(prefix="nvmevfio-fifo-"))
    for name in ("request", "status"):
        os.mkfifo(folder / name)
    stop = threading.Event()

    def serve() -> None:
        while True:
            with open(folder / "request") as f:
                argv = f.read().splitlines()
            if stop.is_set() or argv == ["__stop__"]:
                return
            try:
                res = nv(*argv, check=False)
            except BaseException:  # the script must get an answer, never wait forever
                import traceback

                res = Result(99, b"", traceback.format_exc().encode())
            (folder / "stdout").write_bytes(res.stdout)
            (folder / "stderr").write_bytes(res.stderr)
            with open(folder / "status", "w") as f:
                f.write(f"{res.returncode}\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield {"NVMEVFIO_FIFO_DIR": str(folder)}
    finally:
        stop.set()
        with contextlib.suppress(OSError):  # ENXIO: the server is no longer reading
            fd = os.open(folder / "request", os.O_WRONLY | os.O_NONBLOCK)
            os.write(fd, b"__stop__\n")
            os.close(fd)
        t.join(timeout=30)
