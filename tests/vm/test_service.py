"""`nvmevfio serve` in the guest: the daemon (root) owns a real controller through VFIO;
unprivileged users reach it through its socket with their grants. Every byte checked; the
refusals by name; a client SIGKILLed mid-I/O changes nothing for the others and its memory is
scrubbed; after the daemon stops, the data is where the windows say, read back directly."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import nvmevfio

ALICE, BOB, EVE, MALLORY = 1001, 1002, 1003, 1004  # rw window, ro window, no grant, rw (killed)
A_FIRST, A_BLOCKS = 0, 8192  # 4 MiB
B_FIRST, B_BLOCKS = 16384, 4096
M_FIRST, M_BLOCKS = 32768, 4096

GRANTS = f"""
[[grant]]
uid = {ALICE}
nsid = 1
first_lba = {A_FIRST}
blocks = {A_BLOCKS}
access = "rw"
queue_depth = 32
dma_memory = "4M"

[[grant]]
uid = {BOB}
nsid = 1
first_lba = {B_FIRST}
blocks = {B_BLOCKS}
access = "ro"
queue_depth = 8
dma_memory = "1M"

[[grant]]
uid = {MALLORY}
nsid = 1
first_lba = {M_FIRST}
blocks = {M_BLOCKS}
access = "rw"
queue_depth = 16
dma_memory = "1M"

[[grant]]
uid = 0
nsid = 1
first_lba = 0
blocks = 1
access = "ro"
"""

# What each unprivileged client runs: one JSON line of results on stdout.
CLIENT = r"""
import hashlib, json, os, sys, time
import numpy as np
import nvmevfio
from nvmevfio.errors import Refused
sock, role = sys.argv[1], sys.argv[2]
out = {"uid": os.getuid()}
try:
    dev = nvmevfio.connect(sock, 1)
except Refused as exc:
    print(json.dumps({**out, "connect": exc.reason})); sys.exit(0)
out["blocks"] = dev.info.block_count
bs = dev.block_size
if role == "alice":
    rng = np.random.default_rng(int(sys.argv[3]))
    buf = dev.alloc_buffer(1 << 20)
    h = hashlib.sha256()
    for rnd in range(int(sys.argv[4])):
        for start in range(0, dev.block_count, 2048):
            data = rng.integers(0, 256, 2048 * bs, dtype=np.uint8)
            buf.array[:] = data
            # 32 writes of 32 KiB in one batch, then read back into the same buffer, compared
            dev.submit_writes(start + np.arange(32) * 64, 64, buf, np.arange(32) * 64 * bs)
            assert not dev.reap(32)["status"].any()
            buf.array[:] = 0
            dev.submit_reads(start + np.arange(32) * 64, 64, buf, np.arange(32) * 64 * bs)
            assert not dev.reap(32)["status"].any()
            assert np.array_equal(buf.array, data), "read back differs"
            if rnd == int(sys.argv[4]) - 1:
                h.update(data.tobytes())
    out["sha256"] = h.hexdigest()
    try:
        dev.read_into(dev.block_count - 1, 2, buf)
    except Refused as exc:
        out["past_window"] = exc.reason
elif role == "bob":
    data = dev.read_blocks(0, dev.block_count)
    out["sha256"] = hashlib.sha256(data.tobytes()).hexdigest()
    try:
        dev.write_blocks(0, data[:bs])
    except Refused as exc:
        out["write"] = exc.reason
elif role == "mallory":
    buf = dev.alloc_buffer(1 << 20)
    buf.array[:] = 0xA5
    print(json.dumps({**out, "ready": True}), flush=True)
    while True:  # writes until killed
        dev.submit_writes(np.arange(16) * 128, 128, buf, np.arange(16) * 65536)
        dev.reap(16)
dev.close()
print(json.dumps(out))
"""


def _client(sock: str, uid: int, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CLIENT, sock, *args], user=uid, group=uid, extra_groups=[],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/tmp",
                            env={**os.environ, "HOME": "/tmp"})


def _result(proc: subprocess.Popen, timeout: float = 600) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _memfd_views(pid: int) -> list[np.ndarray]:
    """The nvmevfio DMA memfds mapped by process ``pid`` (root may open them through
    /proc/PID/map_files), mapped here too: they outlive the process."""
    import mmap

    views = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if "memfd:nvmevfio-dma" in line:
            span = line.split()[0]
            fd = os.open(f"/proc/{pid}/map_files/{span}", os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                views.append(np.frombuffer(mmap.mmap(fd, size, prot=mmap.PROT_READ), dtype=np.uint8))
            finally:
                os.close(fd)
    return views


@pytest.fixture(scope="module")
def service(data_ctrl, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    os.chmod(d, 0o755)
    grants = d / "grants.toml"
    grants.write_text(GRANTS)
    sock = str(d / "nvmevfio.sock")
    proc = subprocess.Popen([sys.executable, "-m", "nvmevfio", "serve", data_ctrl["address"], "--grants", str(grants),
                             "--socket", sock, "--clients", "4"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 120
    while not os.path.exists(sock):
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, "the daemon did not start"
        time.sleep(0.1)
    yield {"proc": proc, "socket": sock, "address": data_ctrl["address"]}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


def test_unprivileged_clients_with_their_grants(service):
    sock = service["socket"]
    # prepare Bob's read-only window from the daemon's side: root's grant is one block, so write
    # it through a temporary rw grant? No: Bob's bytes are whatever the namespace holds; his
    # hash is compared with a direct read after the daemon stops (test_after_stop).
    alice = _client(sock, ALICE, "alice", "7", "2")
    bob = _client(sock, BOB, "bob")
    eve = _client(sock, EVE, "eve")
    a, b, e = _result(alice), _result(bob), _result(eve)
    assert e == {"uid": EVE, "connect": "no-grant"}
    assert a["blocks"] == A_BLOCKS and a["past_window"] == "out-of-window"
    assert b["blocks"] == B_BLOCKS and b["write"] == "read-only"
    service["alice"], service["bob"] = a, b


def test_sigkill_mid_io_leaves_others_alone_and_memory_scrubbed(service):
    sock = service["socket"]
    mallory = _client(sock, MALLORY, "mallory")
    assert mallory.stdout is not None
    first = json.loads(mallory.stdout.readline())
    assert first["ready"]
    views = _memfd_views(mallory.pid)
    assert views and all((v == 0xA5).all() for v in views if v.size == 1 << 20)
    alice = _client(sock, ALICE, "alice", "11", "3")  # busy while Mallory dies
    time.sleep(1.0)
    mallory.send_signal(signal.SIGKILL)
    mallory.wait(30)
    a = _result(alice)
    assert a["past_window"] == "out-of-window"
    service["alice"] = a
    deadline = time.monotonic() + 60
    while any(v.any() for v in views):  # the daemon scrubs once its commands completed
        assert time.monotonic() < deadline, "the killed client's DMA memory was not scrubbed"
        time.sleep(0.2)
    # the daemon is still there for everyone else, and has no session of Mallory's left
    with nvmevfio.connect(sock, 1) as root:
        status = root.status()
        assert all(s["pid"] != mallory.pid for s in status["sessions"])
        assert root.read_blocks(0, 1).size == 512


def test_after_stop_the_data_is_where_the_windows_say(service):
    proc = service["proc"]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "session ended" in out and not os.path.exists(service["socket"])
    with nvmevfio.open(service["address"], 1) as dev:
        alice = dev.read_blocks(A_FIRST, A_BLOCKS)
        assert hashlib.sha256(alice.tobytes()).hexdigest() == service["alice"]["sha256"]
        bob = dev.read_blocks(B_FIRST, B_BLOCKS)
        assert hashlib.sha256(bob.tobytes()).hexdigest() == service["bob"]["sha256"]
