"""`nvmevfio serve` in the guest: the daemon (root) owns a real controller through VFIO;
unprivileged users reach it through its socket with their grants. Every byte checked; the
refusals by name; a client SIGKILLed mid-I/O changes nothing for the others and its memory is
scrubbed; after the daemon stops, the data is where the windows say, read back directly."""

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from cli_runner import nvj

import nvmevfio
import nvmevfio.cli.longrun  # `perf` as a client runs it (loaded before the client drops its privileges)
import nvmevfio.perf
import nvmevfio.service.client  # loaded before a client drops its privileges
from nvmevfio.errors import Refused
from nvmevfio.nvme import prp
from nvmevfio.nvme.spec import SQE, IoOpcode
from nvmevfio.service.client import ServiceGone

ALICE, BOB, EVE, MALLORY = 1001, 1002, 1003, 1004  # rw window, ro window, no grant, rw (killed)
CAROL, DAVE = 1005, 1006  # the validated lane (Model B): Carol tries every hostile entry, Dave is her target
A_FIRST, A_BLOCKS = 0, 8192  # 4 MiB
B_FIRST, B_BLOCKS = 16384, 4096
M_FIRST, M_BLOCKS = 32768, 4096
C_FIRST, C_BLOCKS = 49152, 16384  # 8 MiB: a transfer past MDTS (4 MiB) fits the window
D_FIRST, D_BLOCKS = 65536, 2048

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
uid = {CAROL}
nsid = 1
first_lba = {C_FIRST}
blocks = {C_BLOCKS}
access = "rw"
queue_depth = 16
dma_memory = "1M"
lanes = ["validated"]

[[grant]]
uid = {DAVE}
nsid = 1
first_lba = {D_FIRST}
blocks = {D_BLOCKS}
access = "rw"
queue_depth = 16
dma_memory = "1M"
lanes = ["validated"]

[[grant]]
uid = 0
nsid = 1
first_lba = 0
blocks = 1
access = "ro"
"""

# What the clients use, loaded while this process may still read the interpreter's files:
# numpy's random generator imports more on first use.
np.random.default_rng(0).integers(0, 256, 16, dtype=np.uint8)


class Client:
    """An unprivileged client: a child forked from this (root) process that drops to ``uid``
    (setgroups, setgid, setuid: what SO_PEERCRED reports is the kernel's word) and runs
    ``role``; its results come back as JSON lines on a pipe. Forked rather than exec'd: the
    interpreter and its modules were already loaded (they may live where the user cannot read)."""

    def __init__(self, sock: str, uid: int, role, *args) -> None:
        r, w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                os.close(r)
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                out = os.fdopen(w, "w", buffering=1)
                out.write(json.dumps(role(sock, out, *args)) + "\n")
                code = 0
            except BaseException as exc:  # reported to the parent, which fails the test with it
                with contextlib.suppress(Exception):
                    os.write(w, (json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n").encode())
            finally:
                os._exit(code)
        os.close(w)
        self.out = os.fdopen(r)

    def line(self) -> dict:
        text = self.out.readline()
        assert text, "the client died without a word"
        got = json.loads(text)
        assert "error" not in got, got["error"]
        return got

    def result(self, timeout_s: float = 600) -> dict:
        got = self.line()
        deadline = time.monotonic() + timeout_s
        while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        return got

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


def alice(sock, out, seed, rounds):
    dev = nvmevfio.connect(sock, 1)
    got = {"uid": os.getuid(), "blocks": dev.info.block_count}
    bs = dev.block_size
    rng = np.random.default_rng(seed)
    # Write Zeroes, deallocate and FLUSH go to the device from the daemon's C loop as reads and
    # writes do (the rounds below overwrite these blocks)
    dev.write_blocks(0, np.full(16 * bs, 0xEE, dtype=np.uint8))
    dev.write_zeroes(0, 8)
    back = dev.read_blocks(0, 16)
    got["zeroed"] = bool(not back[: 8 * bs].any() and (back[8 * bs :] == 0xEE).all())
    dev.deallocate(8, 8)
    dev.flush()
    buf = dev.alloc_buffer(1 << 20)
    h = hashlib.sha256()
    for rnd in range(rounds):
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
            if rnd == rounds - 1:
                h.update(data.tobytes())
    got["sha256"] = h.hexdigest()
    try:
        dev.read_into(dev.block_count - 1, 2, buf)  # one block past the window
    except Refused as exc:
        got["past_window"] = exc.reason
    dev.close()
    return got


def bob(sock, out):
    dev = nvmevfio.connect(sock, 1)
    got = {"uid": os.getuid(), "blocks": dev.info.block_count}
    data = dev.read_blocks(0, dev.block_count)
    got["sha256"] = hashlib.sha256(data.tobytes()).hexdigest()
    try:
        dev.write_blocks(0, data[: dev.block_size])
    except Refused as exc:
        got["write"] = exc.reason
    dev.close()
    return got


def bob_perf(sock, out, seconds):
    """Bob's read-only window under `nvmevfio perf`'s C closed loop, through the daemon."""
    with nvmevfio.connect(sock, 1) as dev:
        r = nvmevfio.perf.run(dev, workload="randread", queue_depth=8, seconds=seconds)
    return {"ios": r.ios, "reads": r.reads, "errors": r.errors, "iops": r.iops}


def bob_perf_two_sessions(sock, out):
    """`nvmevfio perf --socket --queues 2` as Bob: two sessions (a queue pair of the daemon each,
    4 of his grant's depth of 8 each), a thread each."""
    d = nvj("perf", "--socket", sock, "-w", "randread", "-q", 4, "-n", 3001, "--queues", 2)
    return {k: d[k] for k in ("queues", "ios", "reads", "errors", "iops", "cpu_us_per_io", "wait_share",
                              "io_queue_size")} | {
        "rows": [(q["queue"], q["ios"], q["errors"]) for q in d["per_queue"]],
        "row_iops": sum(q["iops"] for q in d["per_queue"])}


def eve(sock, out):
    try:
        nvmevfio.connect(sock, 1)
    except Refused as exc:
        return {"uid": os.getuid(), "connect": exc.reason}
    return {"uid": os.getuid(), "connect": "connected"}


def _sqe(opc, slba=0, nlb=1, prp1=0, prp2=0, cid=1, nsid=1):
    e = np.zeros(1, dtype=SQE)
    e["opc"], e["cid"], e["nsid"], e["prp1"], e["prp2"] = opc, cid, nsid, prp1, prp2
    e["cdw10"], e["cdw11"], e["cdw12"] = slba & 0xFFFFFFFF, slba >> 32, nlb - 1
    return e


def dave(sock, out, done_flag):
    """A validated-lane client whose buffer Carol aims at: it reports the buffer's hash once
    the parent says Carol is done."""
    dev = nvmevfio.connect(sock, 1, lane="validated")
    buf = dev.alloc_buffer(65536)
    buf.array[:] = 0x5D
    out.write(json.dumps({"iova": buf.iova}) + "\n")
    deadline = time.monotonic() + 300
    while not os.path.exists(done_flag) and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"sha256": hashlib.sha256(buf.array.tobytes()).hexdigest()}


def carol(sock, out, dave_iova):
    """Model B with raw bytes in the shared ring: good entries (a PRP list in her own memory)
    move her bytes; one hostile entry per validator label comes back with that label; a list
    rewritten right after the doorbell moves her bytes or is refused, never Dave's."""
    dev = nvmevfio.connect(sock, 1, lane="validated")
    data = dev.alloc_buffer(65536)
    lists = dev.alloc_buffer(4096)
    short = dev.alloc_buffer(6000)
    freed = dev.alloc_buffer(4096)
    old = freed.iova
    dev.free_buffer(freed)
    got = {"good": 0}
    payload = np.random.default_rng(5).integers(0, 256, 65536, dtype=np.uint8)
    data.array[:] = payload
    p = prp.build(data.iova, 65536, 4096, [lists.iova])
    lists.array.view(np.uint64)[: len(p.lists[0])] = p.lists[0]
    dev.submit_raw(_sqe(IoOpcode.WRITE, 0, 128, p.prp1, p.prp2, cid=1))
    got["write"] = int(dev.reap(1)[0]["status"])
    data.array[:] = 0
    dev.submit_raw(_sqe(IoOpcode.READ, 0, 128, p.prp1, p.prp2, cid=2))
    got["read"] = int(dev.reap(1)[0]["status"])
    got["read_back"] = bool(np.array_equal(data.array, payload))
    got["good"] += 2
    s = short.iova
    hostile = {
        "out-of-window": _sqe(IoOpcode.READ, C_BLOCKS - 1, 2, s),
        "host-physical": _sqe(IoOpcode.READ, 0, 1, 1 << 60),
        "cross-owner-alias": _sqe(IoOpcode.READ, 0, 8, dave_iova),  # the device would write Dave's memory
        "region-overrun": _sqe(IoOpcode.WRITE, 0, 16, s, s + 4096),
        "unaligned": _sqe(IoOpcode.WRITE, 0, 16, s, s + 4096 + 8),
        "deep-prp-chain": _sqe(IoOpcode.READ, 0, 8193, data.iova, lists.iova),  # past MDTS (4 MiB)
        "stale-generation": _sqe(IoOpcode.READ, 0, 1, old),
        "invalid-region": _sqe(IoOpcode.READ, 0, 1, s + (1 << 30)),
        "disallowed-opcode": _sqe(0x05, 0, 1, s),
        "disallowed-namespace": _sqe(IoOpcode.READ, 0, 1, s, nsid=2),
    }
    got["labels"] = {}
    for i, (label, e) in enumerate(hostile.items()):
        e["cid"] = 10 + i
        dev.submit_raw(e)
        got["labels"][label] = str(dev.reap(1)[0]["reason"])
    # the list rewritten right after the doorbell, towards Dave's memory
    data.array[:] = 0x77
    page = lists.array.view(np.uint64)
    page[: len(p.lists[0])] = p.lists[0]
    dev.submit_raw(_sqe(IoOpcode.WRITE, 1024, 128, p.prp1, p.prp2, cid=40))
    page[:15] = dave_iova + 4096 * (np.arange(15, dtype=np.uint64) % 16)
    rec = dev.reap(1)[0]
    got["toctou"] = (int(rec["status"]), str(rec["reason"]))
    got["good"] += 0 if rec["reason"] else 1
    dev.close()
    return got


def mallory(sock, out):
    dev = nvmevfio.connect(sock, 1)
    buf = dev.alloc_buffer(1 << 20)
    buf.array[:] = 0xA5
    out.write(json.dumps({"ready": True}) + "\n")
    while True:  # writes until killed
        dev.submit_writes(np.arange(16) * 128, 128, buf, np.arange(16) * 65536)
        dev.reap(16)


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


@contextlib.contextmanager
def serving(address: str, grants_text: str, log_path: Path, clients: int = 4):
    """``nvmevfio serve`` (root) on ``address`` with these grants, its socket in a folder every
    user can reach, its log at ``log_path`` (on the host too, after the guest is gone); SIGTERM
    at the end, the log's tail printed."""
    d = Path(tempfile.mkdtemp(prefix="nvmevfio-serve-", dir="/tmp"))
    os.chmod(d, 0o755)
    grants = d / "grants.toml"
    grants.write_text(grants_text)
    sock = str(d / "nvmevfio.sock")
    log_file = open(log_path, "w")  # noqa: SIM115  # the daemon's; shown when a test fails
    proc = subprocess.Popen([sys.executable, "-m", "nvmevfio", "-v", "serve", address, "--grants",
                             str(grants), "--socket", sock, "--clients", str(clients)], stdout=log_file,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not os.path.exists(sock):
        assert proc.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, "the daemon did not start"
        time.sleep(0.1)
    try:
        yield {"proc": proc, "socket": sock, "address": address, "log": log_path, "dir": d}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        log_file.close()
        print("---- nvmevfio serve's log ----\n" + log_path.read_text()[-20000:])


@pytest.fixture(scope="module")
def service(data_ctrl, io_dir):
    with serving(data_ctrl["address"], GRANTS, io_dir / "serve.log") as served:
        yield served


def test_unprivileged_clients_with_their_grants(service):
    sock = service["socket"]
    # Bob's bytes are whatever his window holds: his hash is compared with a direct read after
    # the daemon stops (test_after_stop_the_data_is_where_the_windows_say).
    clients = [Client(sock, ALICE, alice, 7, 2), Client(sock, BOB, bob), Client(sock, EVE, eve)]
    a, b, e = (c.result() for c in clients)
    assert e == {"uid": EVE, "connect": "no-grant"}
    assert a["blocks"] == A_BLOCKS and a["past_window"] == "out-of-window" and a["zeroed"]
    assert b["blocks"] == B_BLOCKS and b["write"] == "read-only"
    service["alice"], service["bob"] = a, b


def test_sigkill_mid_io_leaves_others_alone_and_memory_scrubbed(service):
    sock = service["socket"]
    killed = Client(sock, MALLORY, mallory)
    assert killed.line()["ready"]
    views = _memfd_views(killed.pid)
    assert views and all((v == 0xA5).all() for v in views if v.size == 1 << 20)
    busy = Client(sock, ALICE, alice, 11, 3)  # busy while Mallory dies
    time.sleep(1.0)
    killed.kill()
    a = busy.result()
    assert a["past_window"] == "out-of-window"
    service["alice"] = a
    deadline = time.monotonic() + 60
    while any(v.any() for v in views):  # the daemon scrubs once its commands completed
        assert time.monotonic() < deadline, "the killed client's DMA memory was not scrubbed"
        time.sleep(0.2)
    # the daemon is still there for everyone else, and has no session of Mallory's left
    with nvmevfio.connect(sock, 1) as root:
        status = root.status()
        assert all(s["pid"] != killed.pid for s in status["sessions"])
        assert root.read_blocks(0, 1).size == 512


def test_perf_through_the_service_beside_a_busy_client(service):
    """Bob's perf loop keeps his queue full while Alice writes and checks every byte: both get
    their work done (round robin: neither starves the other), none of Bob's reads fails."""
    sock = service["socket"]
    busy = Client(sock, ALICE, alice, 13, 1)
    loop = Client(sock, BOB, bob_perf, 4.0)
    b, a = loop.result(), busy.result()
    assert b["ios"] > 1000 and b["reads"] == b["ios"] and b["errors"] == 0, b
    assert a["past_window"] == "out-of-window"
    service["alice"] = a


def test_perf_through_the_service_on_two_sessions(service):
    b = Client(service["socket"], BOB, bob_perf_two_sessions).result()
    assert (b["queues"], b["ios"], b["reads"], b["errors"]) == (2, 3001, 3001, 0), b
    assert b["rows"] == [[1, 1501, 0], [2, 1500, 0]] and b["row_iops"] == pytest.approx(b["iops"], rel=1e-9)
    assert 0 < b["cpu_us_per_io"] < 1e5 and 0 <= b["wait_share"] <= 1
    assert b["io_queue_size"] == 0  # the daemon's queues are not the client's to size (not the session's depth, 4)


def validated_refused(sock, out):
    try:
        nvmevfio.connect(sock, 1, lane="validated")
    except Refused as exc:
        return {"connect": exc.reason, "message": str(exc)}
    return {"connect": "connected"}


def test_validated_lane_every_label_and_the_rewritten_list(service, lane):
    sock = service["socket"]
    if lane == "noiommu":  # no IOVAs to tell a client: its buffers are bounced, and the lane says so
        got = Client(sock, CAROL, validated_refused).result()
        assert got["connect"] == "lane-unsupported" and "IOMMU" in got["message"]
        return
    done_flag = str(Path(sock).parent / "carol-done")  # where Dave (uid 1006) can see it
    target = Client(sock, DAVE, dave, done_flag)
    dave_iova = target.line()["iova"]
    try:
        with nvmevfio.connect(sock, 1) as root:
            before = root.status()["device_commands"]
            c = Client(sock, CAROL, carol, dave_iova).result()
            after = root.status()["device_commands"]
    finally:
        Path(done_flag).touch()
    d = target.result()
    assert (c["write"], c["read"], c["read_back"]) == (0, 0, True)
    assert c["labels"] == {label: label for label in c["labels"]} and len(c["labels"]) == 10
    # refused when the rewrite beat the check, else done with the checked list (JSON made it a list)
    assert tuple(c["toctou"]) in ((0, ""), (0x8000, "cross-owner-alias"))
    assert after - before == c["good"]  # the hostile entries never reached the device
    assert d["sha256"] == hashlib.sha256(b"\x5d" * 65536).hexdigest()  # Dave's memory untouched
    service["carol_toctou"] = tuple(c["toctou"])


def test_after_stop_the_data_is_where_the_windows_say(service):
    proc = service["proc"]
    connected = nvmevfio.connect(service["socket"], 1)  # still connected when the daemon stops
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)
    out = service["log"].read_text()
    assert proc.returncode == 0, out
    assert "session ended" in out and not os.path.exists(service["socket"])
    with pytest.raises(ServiceGone) as ei:
        connected.read_blocks(0, 1)
    assert ei.value.reason == "service-gone"
    connected.close()
    with nvmevfio.open(service["address"], 1) as dev:
        alice = dev.read_blocks(A_FIRST, A_BLOCKS)
        assert hashlib.sha256(alice.tobytes()).hexdigest() == service["alice"]["sha256"]
        bob = dev.read_blocks(B_FIRST, B_BLOCKS)
        assert hashlib.sha256(bob.tobytes()).hexdigest() == service["bob"]["sha256"]
        if "carol_toctou" not in service:  # the no-IOMMU lane has no validated lane
            return
        carol = dev.read_blocks(C_FIRST, 128)  # Model B: her first write, moved into her window
        assert np.array_equal(carol, np.random.default_rng(5).integers(0, 256, 65536, dtype=np.uint8))
        if service["carol_toctou"] == (0, ""):  # the rewritten list: her bytes where the checked list said
            assert (dev.read_blocks(C_FIRST + 1024, 128) == 0x77).all()
