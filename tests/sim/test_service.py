"""The service over the simulator: the daemon in a thread, clients over its real Unix socket,
shared rings and memfd buffers. (The guest tier runs it against QEMU's NVMe with unprivileged
users.)"""

import json
import os
import threading
import time

import numpy as np
import pytest

import nvmevfio
from nvmevfio import perf
from nvmevfio.errors import Refused
from nvmevfio.service import ring
from nvmevfio.service.client import ServiceGone
from nvmevfio.service.daemon import Service
from nvmevfio.service.grants import parse_grants
from nvmevfio.sim.controller import SimNamespace
from nvmevfio.sim.rig import Rig

UID = os.getuid()


def _grants(text):
    return parse_grants(text.replace("UID", str(UID)))


RW = """
[[grant]]
uid = UID
nsid = 1
first_lba = 1000
blocks = 2000
access = "rw"
queue_depth = 16
dma_memory = "1M"
"""


@pytest.fixture
def served(tmp_path):
    def start(grants=RW, clients=2, directory=None):
        """``directory``: where the socket goes (tmp_path, which only root may enter, by default)."""
        rig = Rig([SimNamespace(8192), SimNamespace(1024, 4096)], mdts=5)
        path = str((directory or tmp_path) / "s.sock")
        service = Service(rig.p, _grants(grants), path, clients=clients, queue_depth=32, irq=False)
        service.start()
        def serve():  # as `nvmevfio serve` does: every session ended once the loop returns
            service.serve()
            service.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        service.serving = thread  # a test may ask whether the daemon still runs
        started.append((service, thread))
        return rig, service, path

    started = []
    yield start
    for service, thread in started:
        service.stop()
        thread.join(10)
        service.close()


def test_window_bytes_and_refusals(served):
    rig, _service, path = served()
    ns = rig.sim.namespaces[0]
    with nvmevfio.connect(path, 1) as dev:
        assert (dev.info.block_count, dev.info.block_size, dev.info.queue_depth) == (2000, 512, 16)
        assert dev.info.completion_mode == "service" and dev.writable
        data = np.random.default_rng(1).integers(0, 256, 64 * 512, dtype=np.uint8)
        dev.write_blocks(0, data)  # the client's LBA 0 is the window's first block
        assert np.array_equal(ns.data[1000 * 512 : 1064 * 512], data)
        assert np.array_equal(dev.read_blocks(0, 64), data)
        # a batch: 10 reads in one doorbell, each its own 4 KiB of one buffer
        buf = dev.alloc_buffer(40960)
        tags = dev.submit_reads(np.arange(10) * 8, 8, buf, np.arange(10) * 4096)
        done = dev.reap(10)
        assert sorted(done["tag"].tolist()) == sorted(tags.tolist()) and not done["status"].any()
        assert np.array_equal(buf.array[:4096], data[:4096])
        # one block past the window: refused by name, nothing reaches the device
        commands = len(rig.sim.commands)
        with pytest.raises(Refused) as ei:
            dev.read_into(1999, 2, buf)
        assert ei.value.reason == "out-of-window" and len(rig.sim.commands) == commands
        with pytest.raises(Refused) as ei:
            dev.read_into(0, 8, buf, offset=40960 - 2048)
        assert ei.value.reason == "region-overrun"
        with pytest.raises(Refused) as ei:
            dev.alloc_buffer(2 << 20)
        assert ei.value.reason == "quota-exceeded"
        dev.write_zeroes(0, 8)
        assert not ns.data[1000 * 512 : 1008 * 512].any()
        dev.flush()
        # a freed buffer's handle is stale; its memory was scrubbed by the daemon
        view = buf.array
        dev.free_buffer(buf)
        assert not view.any()
        with pytest.raises(Refused) as ei:
            dev.read_into(0, 1, buf)
        assert ei.value.reason == "stale-generation" and len(rig.sim.commands) == commands + 2
        assert dev.status()["session"]["refused"] == 3


def test_read_only_grant_and_no_grant(served, tmp_path):
    _rig, _service, path = served(RW.replace('"rw"', '"ro"'))
    with nvmevfio.connect(path, 1) as dev:
        buf = dev.alloc_buffer(4096)
        dev.read_into(0, 8, buf)
        with pytest.raises(Refused) as ei:
            dev.write_from(0, 8, buf)
        assert ei.value.reason == "read-only"
    with pytest.raises(Refused) as ei:
        nvmevfio.connect(path, 2)  # no grant for namespace 2
    assert ei.value.reason == "no-grant"


def test_a_client_that_goes_away_is_cleaned_up(served):
    rig, service, path = served()
    live = rig.broker.ledger.live_buffers()
    dev = nvmevfio.connect(path, 1)
    buf = dev.alloc_buffer(8192)
    buf.array[:] = 0x5A
    view = buf.array
    dev.submit_writes([0, 8], 8, buf, [0, 4096])
    dev._sock.close()  # hang up without a word, commands possibly in flight
    for _ in range(200):
        if not service.sessions:
            break
        threading.Event().wait(0.01)
    assert not service.sessions and not view.any()  # scrubbed
    assert rig.broker.ledger.live_buffers() == live  # its DMA memory is unmapped and freed
    with nvmevfio.connect(path, 1) as again:  # its queue pair serves the next client
        assert again.read_blocks(0, 1).size == 512


def test_service_gone(served):
    _rig, service, path = served()
    dev = nvmevfio.connect(path, 1)
    service.stop()
    threading.Event().wait(0.2)
    service.close()
    with pytest.raises(ServiceGone) as ei:
        dev.read_blocks(0, 1)
    assert ei.value.reason == "service-gone"
    with pytest.raises(ServiceGone):
        nvmevfio.connect(path, 1)
    dev.close()
    rig, _service, path = served()  # the daemon back on the same socket: connect again
    with nvmevfio.connect(path, 1) as again:
        again.write_blocks(3, np.full(512, 0x42, dtype=np.uint8))
        assert (again.read_blocks(3, 1) == 0x42).all()
        assert (rig.sim.namespaces[0].data[1003 * 512 : 1004 * 512] == 0x42).all()


def test_cli_block_commands_through_the_socket(served, tmp_path):
    from click.testing import CliRunner

    from nvmevfio.cli import main

    rig, _service, path = served()
    data = tmp_path / "in.bin"
    data.write_bytes(bytes(range(256)) * 4)  # two blocks
    runner = CliRunner()
    res = runner.invoke(main, ["write", "--socket", path, "--start-block", "5", "-d", str(data)])
    assert res.exit_code == 0, res.output
    assert bytes(rig.sim.namespaces[0].data[1005 * 512 : 1007 * 512]) == data.read_bytes()
    res = runner.invoke(main, ["read", "--socket", path, "--start-block", "5", "--block-count", "1", "-d",
                               str(tmp_path / "o")])
    assert res.exit_code == 0 and (tmp_path / "o").read_bytes() == data.read_bytes()
    res = runner.invoke(main, ["read", "--socket", path, "-s", "1999", "-c", "1"])
    assert res.exit_code == 1 and "out-of-window" in res.output  # refused, nothing sent (nvme-cli's read: 1)
    assert runner.invoke(main, ["flush", "--socket", path]).exit_code == 0
    assert runner.invoke(main, ["write-zeroes", "--socket", path, "-s", "5", "-c", "0"]).exit_code == 0
    assert not rig.sim.namespaces[0].data[1005 * 512 : 1006 * 512].any()
    assert runner.invoke(main, ["deallocate", "--socket", path, "-s", "6", "-c", "0"]).exit_code == 0
    res = runner.invoke(main, ["read", "-s", "0"])
    assert res.exit_code == 1 and "--socket" in res.output  # neither an address nor a socket
    res = runner.invoke(main, ["perf", "--socket", path, "-w", "randread", "-q", "4", "-n", "200", "-o", "json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert (got["ios"], got["reads"], got["errors"], got["mode"]) == (200, 200, 0, "service")
    res = runner.invoke(main, ["perf", "--socket", path, "--mode", "irq", "-n", "10"])
    assert res.exit_code == 1 and "--mode" in res.output


def test_a_malformed_request_costs_only_its_sender(served):
    from nvmevfio.service.protocol import receive, send

    _rig, service, path = served()
    good = nvmevfio.connect(path, 1, queue_depth=8)  # the grant's depth of 16 is the two sessions' to share
    bad = nvmevfio.connect(path, 1, queue_depth=8)
    send(bad._sock, {"op": "free", "buffer": 1, "generation": {"not": "a number"}})
    reply, _ = receive(bad._sock)
    assert reply is not None and not reply["ok"]
    send(bad._sock, {"op": "alloc", "size": [1, 2]})  # a list where a size goes
    reply, _ = receive(bad._sock)
    assert reply is not None and reply["reason"] == "invalid-argument"
    service._status = lambda *_: 1 // 0  # a handler that breaks (a bug): only this request's sender is cut off
    with pytest.raises(Refused) as ei:
        bad.status()
    assert ei.value.reason == "service-error" and "ZeroDivisionError" not in str(ei.value)
    with pytest.raises(ServiceGone):
        bad.status()
    assert good.read_blocks(0, 1).size == 512  # the daemon and the other client carry on
    good.close()
    bad.close()


def test_perf_through_the_service(served):
    """`nvmevfio perf`'s C closed loop on the client's rings, the daemon's C loop on its queue:
    every I/O counted once, in the window, none refused; a batch of FLUSH, Write Zeroes and
    deallocate (held back for Python) mixed with reads completes in order of need."""
    rig, _service, path = served()
    ns = rig.sim.namespaces[0]
    ns.data[:] = 0x11
    with nvmevfio.connect(path, 1) as dev:
        r = perf.run(dev, workload="randrw", queue_depth=8, count=3000, io_size=1024)
        assert (r.ios, r.reads + r.writes, r.errors, r.mode) == (3000, 3000, 0, "service")
        assert 1000 < r.reads < 2000 and r.lat_p50_us > 0
        written = np.flatnonzero((ns.data.reshape(-1, 512) != 0x11).any(axis=1))
        assert len(written) and written.min() >= 1000 and written.max() < 3000  # only the window changed
        buf = dev.alloc_buffer(8192)
        tags = [int(t) for t in dev.submit_reads([0, 8], 8, buf, [0, 4096])]
        ops = dev._submit(ring.WRITE_ZEROES, [16], [8], None, [0]), dev._submit(ring.FLUSH, [0], [0], None, [0])
        tags += [int(t[0]) for t in ops] + [int(t) for t in dev.submit_reads([24], 8, buf, [0])]
        done = dev.reap(5)
        assert sorted(done["tag"].tolist()) == sorted(tags) and not done["status"].any()
        assert not ns.data[1016 * 512 : 1024 * 512].any()
        assert dev.status()["session"]["refused"] == 0


def test_a_perf_loop_learns_at_once_that_the_service_went_away(served):
    """The client's C loop watches its socket while it waits: a daemon that stops mid-run ends
    the run with ServiceGone within moments, not at the end of the run or a timeout."""
    _rig, service, path = served()
    dev = nvmevfio.connect(path, 1)
    threading.Timer(0.5, service.stop).start()
    t0 = time.monotonic()
    with pytest.raises(ServiceGone):
        perf.run(dev, workload="randread", queue_depth=4, seconds=20)
    assert time.monotonic() - t0 < 10
    dev.close()


def test_perf_through_the_service_on_two_sessions(served):
    """perf --socket --queues 2: one session (one queue pair of the daemon) per queue, each run by
    its own thread; every request counted once, the rows adding up to the total."""
    _rig, _service, path = served()
    with nvmevfio.connect(path, 1, queue_depth=8) as a, nvmevfio.connect(path, 1, queue_depth=8) as b:
        r = perf.run([a, b], workload="randread", queue_depth=8, count=2000, io_size=1024, queues=2)
        assert (r.queues, r.ios, r.errors, r.mode) == (2, 2000, 0, "service")
        assert [q["ios"] for q in r.per_queue] == [1000, 1000]
        assert sum(q["iops"] for q in r.per_queue) == pytest.approx(r.iops, rel=1e-9)
        assert 0 < r.cpu_us_per_io < 1e5 and 0 <= r.wait_share <= 1
        with pytest.raises(Refused) as ei:
            perf.run([a, b], count=10, queues=3)
        assert ei.value.reason == "count-out-of-range"
