"""Recovery against injected faults: timeouts -> abort -> reset -> requeue, transient retries,
CSTS.CFS, surprise removal, the reset budget, one thread per queue. Every command ends exactly
once, no ids or pins leak, and a buffer in flight is never freed before the controller is
disabled."""

import threading
import time

import numpy as np
import pytest

from nvmevfio import broker as brokermod
from nvmevfio.broker import recovery as recoverymod
from nvmevfio.errors import CommandError, CommandTimeout, ControllerFailed, DeviceGone, Refused
from nvmevfio.nvme.spec import AdminOpcode, IoOpcode


@pytest.fixture
def p(rig):
    rig.broker.command_timeout_s = 0.2
    return rig.ready(depth=16)


def fill(p, lba, n, seed):
    data = np.random.default_rng(seed).integers(0, 256, n * 512, dtype=np.uint8)
    p.write(1, lba, data)
    return data


def admin_ops(rig):
    return [c[1] for c in rig.sim.commands if c[0] == 0]


def no_leaks(rig, p):
    qp = rig.broker.io[0]
    st = qp.ring.state()
    assert st["in_flight"] == 0 and st["free_top"] == qp.ring.ncids and not qp.cancelled
    assert all(s.in_flight == 0 for s in rig.ledger._slots if s.mem is not None)


def test_timeout_abort_not_honoured_resets_and_requeues(rig, p):
    data = fill(p, 100, 8, 1)
    buf = p.alloc_buffer(4096)
    rig.sim.drop_next = 1  # the device loses this read's completion
    t0 = time.monotonic()
    p.read_into(1, 100, 8, buf)  # times out, aborts (not honoured), resets, requeues, completes
    assert time.monotonic() - t0 < 2
    assert np.array_equal(buf.array, data)
    b = rig.broker
    assert (b.aborts, b.resets, rig.sim.resets) == (1, 1, 1)
    assert AdminOpcode.ABORT in admin_ops(rig)
    reads = [c for c in rig.sim.commands if c[0] == 1 and c[1] == IoOpcode.READ]
    assert len(reads) == 2  # the original and its one requeue
    no_leaks(rig, p)
    p.write(1, 200, data)  # the queues work after the reset
    assert np.array_equal(p.read(1, 200, 8), data)


def test_abort_honoured_is_retried_without_a_reset(rig, p):
    data = fill(p, 300, 8, 2)
    rig.sim.drop_next, rig.sim.honour_abort = 1, True
    assert np.array_equal(p.read(1, 300, 8), data)
    assert (rig.broker.aborts, rig.broker.resets, rig.broker.retries) == (1, 0, 1)
    no_leaks(rig, p)


def test_batch_every_tag_ends_exactly_once_across_a_reset(rig, p):
    buf = p.alloc_buffer(8 * 4096)
    buf.array[:] = np.repeat(np.arange(8, dtype=np.uint8) + 1, 4096)
    rig.sim.drop_next = 3  # three of the writes lose their completions
    tags = p.submit("write", 1, np.arange(8) * 8, np.full(8, 8), buf, np.arange(8) * 4096)
    tags = np.concatenate([tags, p.submit("read", 1, [0], [8], buf, [0])])
    with pytest.raises(Refused) as ei:
        p.free_buffer(buf)  # quarantined while in flight
    assert ei.value.reason == "buffer-in-flight"
    done = p.reap(9)
    assert sorted(done["tag"].tolist()) == sorted(tags.tolist()) and not done["status"].any()
    assert rig.broker.resets == 1
    no_leaks(rig, p)
    for k in range(8):
        assert (p.read(1, k * 8, 8) == k + 1).all()
    p.free_buffer(buf)


def test_retry_budget_then_a_named_error(rig, p, monkeypatch):
    monkeypatch.setattr(recoverymod, "RESET_LIMIT", 100)
    fill(p, 0, 8, 3)
    rig.sim.drop_next = 100  # the device never completes I/O again
    buf = p.alloc_buffer(4096)
    with pytest.raises(CommandTimeout) as ei:
        p.read_into(1, 0, 8, buf)
    assert ei.value.reason == "command-timeout" and "not retried" in str(ei.value)
    reads = [c for c in rig.sim.commands if c[0] == 1 and c[1] == IoOpcode.READ]
    assert len(reads) == 1 + brokermod.MAX_RETRIES and rig.broker.resets == brokermod.MAX_RETRIES + 1
    no_leaks(rig, p)
    p.free_buffer(buf)  # out of quarantine: the controller was disabled before it was cancelled


def test_reset_budget_declares_the_controller_failed(rig, p):
    rig.sim.drop_next = 100
    buf = p.alloc_buffer(4096)
    with pytest.raises(ControllerFailed) as ei:
        p.read_into(1, 0, 8, buf)
    assert ei.value.reason == "controller-failed" and rig.broker.resets == brokermod.RESET_LIMIT
    with pytest.raises(Refused) as ei:
        p.read(1, 0, 1)
    assert ei.value.reason == "controller-failed"
    no_leaks(rig, p)
    p.free_buffer(buf)


def test_transient_status_retried_media_error_reported(rig, p):
    data = fill(p, 400, 8, 4)
    rig.sim.fail_next[IoOpcode.READ] = (0, 0x82)  # Namespace Not Ready, DNR=0
    assert np.array_equal(p.read(1, 400, 8), data) and rig.broker.retries == 1
    rig.sim.fail_next[IoOpcode.READ] = (2, 0x81)  # Unrecovered Read Error: at once, with the LBA
    with pytest.raises(CommandError) as ei:
        p.read(1, 400, 8)
    assert ei.value.context["slba"] == 400 and "Unrecovered Read Error" in str(ei.value)
    assert rig.broker.retries == 1


def test_cfs_mid_io_resets_and_completes(rig, p):
    data = fill(p, 500, 8, 5)
    rig.sim.drop_next = 1
    buf = p.alloc_buffer(4096)
    timer = threading.Timer(0.05, rig.sim.raise_cfs)
    timer.start()
    rig.broker.command_timeout_s = 10.0  # CFS, not the timeout, must end the wait
    t0 = time.monotonic()
    p.read_into(1, 500, 8, buf)
    timer.join()
    assert time.monotonic() - t0 < 2 and rig.broker.resets == 1 and rig.broker.aborts == 0
    assert np.array_equal(buf.array, data)
    no_leaks(rig, p)


def test_surprise_removal_fails_fast_and_closes(rig, p):
    rig.sim.drop_next = 1
    buf = p.alloc_buffer(4096)
    rig.broker.command_timeout_s = 30.0
    threading.Timer(0.05, rig.sim.remove).start()
    t0 = time.monotonic()
    with pytest.raises(DeviceGone) as ei:
        p.read_into(1, 0, 8, buf)
    assert ei.value.reason == "device-gone" and time.monotonic() - t0 < 1
    with pytest.raises(Refused) as ei:
        p.read(1, 0, 1)
    assert ei.value.reason == "device-gone"
    no_leaks(rig, p)
    p.close()  # no spinning on all-ones registers, nothing raised


def test_device_request_ends_waits_and_refuses(rig, p):
    """VFIO's device request (the kernel wants the device back): a thread waiting on a command
    that will never complete is woken at once with device-gone, a batch in flight on another
    queue ends, and every later call is refused naming why, before touching the device."""
    rig.sim.drop_next = 1
    buf = p.alloc_buffer(4096)
    rig.broker.command_timeout_s = 30.0
    seen: list[BaseException] = []

    def reader() -> None:
        try:
            p.read_into(1, 0, 8, buf)
        except BaseException as exc:  # the test inspects it
            seen.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.1)
    assert rig.broker.io[0].in_flight == 1
    t0 = time.monotonic()
    stuck = rig.broker.device_removed("the kernel asked for the device back (test)")
    t.join(2)
    assert not t.is_alive() and stuck == [] and time.monotonic() - t0 < 1
    assert isinstance(seen[0], DeviceGone) and seen[0].reason == "device-gone"
    commands = len(rig.sim.commands)
    with pytest.raises(Refused) as ei:
        p.read(1, 0, 1)
    assert ei.value.reason == "device-gone" and "asked for the device back" in str(ei.value)
    assert len(rig.sim.commands) == commands  # refused before anything reached the device
    no_leaks(rig, p)
    p.free_buffer(buf)  # unpinned: the device can no longer DMA into it
    p.close()


def test_device_request_ends_a_polled_perf_slice_at_once(rig):
    """A closed loop polling in C (perf, the workload engine) whose commands will never complete:
    VFIO's device request ends it within its next millisecond's look at the stop flag, not at its
    slice's end or when a command turns late, so the release takes the queue (none stuck)."""
    from nvmevfio.blockdev import BlockDevice

    rig.broker.command_timeout_s = 30.0  # no command turns late meanwhile
    dev = BlockDevice(rig.p, 1, queue_depth=64)
    buf = dev.alloc_buffer(8 * 4096)
    loop = dev.perf_loop(rig.p.register_buffer(buf, 4096), io_size=4096, lba_range=(0, 1024), random=False,
                         read_pct=100, depth=8)
    rig.sim.drop_next = 10**6  # nothing completes
    seen: list[BaseException] = []

    def run() -> None:
        try:
            loop.step(20.0)  # one slice of 20 s: the C loop holds the queue all along
        except BaseException as exc:  # the test inspects it
            seen.append(exc)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    stuck = rig.broker.device_removed("the kernel asked for the device back (test)")
    t.join(5)
    took = time.monotonic() - t0
    assert not t.is_alive() and stuck == [] and took < 1, (stuck, took)
    assert isinstance(seen[0], DeviceGone) and "asked for the device back" in str(seen[0]), seen


def test_one_thread_per_queue(rig, p):
    rig.sim.drop_next = 1
    rig.broker.command_timeout_s = 0.5
    buf = p.alloc_buffer(8192)
    t = threading.Thread(target=p.read_into, args=(1, 0, 8, buf))
    t.start()
    time.sleep(0.1)
    with pytest.raises(Refused) as ei:
        p.read_into(1, 8, 8, buf, 4096)
    assert ei.value.reason == "queue-busy" and "another thread" in str(ei.value)
    t.join()
    p.read_into(1, 8, 8, buf, 4096)  # free again


def test_interrupted_caller_leaves_the_queue_consistent(rig, p):
    """A KeyboardInterrupt between posting a batch and the device seeing its doorbell: the caller
    sees the interrupt, the buffer stays in flight, and the next reap recovers every command."""
    data = fill(p, 600, 8, 6)
    real = rig.sim._doorbell

    def interrupted(off, value):
        rig.sim._doorbell = real
        raise KeyboardInterrupt

    rig.sim._doorbell = interrupted
    buf = p.alloc_buffer(4096)
    with pytest.raises(KeyboardInterrupt):
        p.submit("read", 1, [600], [8], buf, [0])
    with pytest.raises(Refused) as ei:
        p.free_buffer(buf)
    assert ei.value.reason == "buffer-in-flight"
    done = p.reap(1)  # the device never saw the doorbell: timeout, abort, reset, requeue
    assert len(done) == 1 and done["status"][0] == 0 and rig.broker.resets == 1
    assert np.array_equal(buf.array, data)
    no_leaks(rig, p)
    p.free_buffer(buf)


def test_perf_loop_recovers(rig):
    """The C closed loop meets lost completions: abort, reset, requeue, and the run completes."""
    from nvmevfio import perf
    from nvmevfio.blockdev import BlockDevice

    rig.broker.command_timeout_s = 0.2
    dev = BlockDevice(rig.p, 1, queue_depth=16)
    p = rig.p
    rig.sim.drop_next = 2
    r = perf.run(dev, workload="randwrite", queue_depth=8, count=200, io_size=1024, lba_range=(0, 512))
    assert (r.ios, r.errors) == (200, 0) and rig.broker.resets == 1
    no_leaks(rig, p)


def test_reset_with_another_thread_busy_on_its_own_queue(rig):
    """A timeout on one queue escalates to a controller reset while another thread keeps doing I/O
    on a second queue: the other thread's waits end (the pause), it parks, the reset requeues its
    commands too, and both threads finish with every byte right and nothing leaked."""
    rig.broker.command_timeout_s = 0.2
    p = rig.p
    p.bind()
    p.enable()
    p.identify_controller()
    p.create_io_queues(2, 16)
    data = np.random.default_rng(9).integers(0, 256, 8 * 512, dtype=np.uint8)
    p.write(1, 100, data)
    errors: list[BaseException] = []
    stop = threading.Event()
    rounds = [0]

    def busy() -> None:  # queue 2: writes and reads its own blocks, checked
        buf = p.alloc_buffer(4096)
        rng = np.random.default_rng(10)
        try:
            while not stop.is_set():
                block = rng.integers(0, 256, 4096, dtype=np.uint8)
                buf.array[:] = block
                p.write_from(1, 2000, 8, buf, qid=2)
                buf.array[:] = 0
                p.read_into(1, 2000, 8, buf, qid=2)
                assert np.array_equal(buf.array, block)
                rounds[0] += 1
        except BaseException as exc:  # the test inspects it
            errors.append(exc)

    t = threading.Thread(target=busy)
    t.start()
    while rounds[0] < 20:
        time.sleep(0.01)
    buf = p.alloc_buffer(4096)
    rig.sim.drop_next = 1  # some command (this thread's or the other's) loses its completion
    for _ in range(5):
        p.read_into(1, 100, 8, buf, qid=1)
        assert np.array_equal(buf.array, data)
    time.sleep(0.5)  # the other thread may be the one whose command was lost: let it recover
    stop.set()
    t.join(10)
    assert not t.is_alive() and not errors, errors[:1]
    assert rig.broker.resets >= 1 and rig.broker.failed is None
    before = rounds[0]
    p.read_into(1, 100, 8, buf, qid=1)
    for qp in rig.broker.io:
        st = qp.ring.state()
        assert st["in_flight"] == 0 and st["free_top"] == qp.ring.ncids and not qp.cancelled
    assert all(s.in_flight == 0 for s in rig.ledger._slots if s.mem is not None)
    assert before > 20
