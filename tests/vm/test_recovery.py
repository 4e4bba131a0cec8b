"""Recovery through real VFIO against QEMU's NVMe model: commands made slow by QEMU's drive
throttling time out for real; the broker aborts (QEMU answers "not aborted"), resets the
controller, requeues what was in flight, and every byte lands; the host then compares the
backing image."""

import hashlib
import threading

import numpy as np
import pytest
from conftest import record

import nvmevfio
from nvmevfio.errors import CommandError


def test_timeout_abort_reset_requeue_keeps_every_byte(slow_ctrl, io_dir):
    with nvmevfio.open(slow_ctrl["address"], 1, queue_depth=64, command_timeout_s=0.4) as dev:
        br = dev.provider._broker
        n = 24  # at 40 IOPS the last few wait > 0.4 s: they time out; requeued, they complete in time
        buf = dev.alloc_buffer(n * 4096)
        data = np.random.default_rng(808).integers(0, 256, buf.size, dtype=np.uint8)
        buf.array[:] = data
        tags = dev.submit_writes(np.arange(n) * 8, np.full(n, 8), buf, np.arange(n) * 4096)
        done = dev.reap(n)
        # every tag ends exactly once, successfully, after at least one abort and one reset
        assert sorted(done["tag"].tolist()) == sorted(tags.tolist()) and not done["status"].any()
        # QEMU answers Abort with DW0 bit 0 set (not aborted), so the broker reset the controller
        assert br.aborts >= 1 and 1 <= br.resets <= 2 and br.failed is None
        st = dev.doorbell_counters()
        assert st["in_flight"] == 0 and st["free_top"] == 63
        dev.free_buffer(buf)  # out of quarantine
        br.command_timeout_s = 30.0
        got = dev.read_blocks(0, n * 8)
        assert np.array_equal(got, data)
        dev.flush()
    record(io_dir, "images", {"address": slow_ctrl["address"], "nsid": 1, "offset": 0, "length": len(data),
                              "sha256": hashlib.sha256(data.tobytes()).hexdigest()})


def test_media_errors_name_the_status_and_lba(faulty_ctrl):
    """QEMU turns the injected EIO into Unrecovered Read Error / Write Fault for that command only:
    the caller gets the status name and the LBA at once (no retry), the rest of the batch is fine."""
    with nvmevfio.open(faulty_ctrl["address"], 1) as dev:
        br = dev.provider._broker
        buf = dev.alloc_buffer(3 * 512)
        tags = dev.submit_reads([99, 100, 101], [1, 1, 1], buf, [0, 512, 1024])
        done = dev.reap(3)
        status = dict(zip(done["tag"].tolist(), done["status"].tolist()))
        assert [status[t] for t in tags.tolist()] == [0, (2 << 8) | 0x81, 0]  # SCT 2h, SC 81h
        with pytest.raises(CommandError) as ei:
            dev.read_blocks(100, 1)
        e = ei.value
        assert (e.sct, e.sc, e.context["slba"]) == (2, 0x81, 100) and "Unrecovered Read Error" in str(e)
        assert br.retries == 0 and br.resets == 0
        with pytest.raises(CommandError) as ei:
            dev.write_blocks(200, np.zeros(512, np.uint8))
        assert ei.value.sct == 2 and ei.value.context["slba"] == 200
        dev.write_blocks(201, np.full(512, 7, np.uint8))  # its neighbour is fine
        assert (dev.read_blocks(201, 1) == 7).all()


def test_perf_loop_recovers_on_the_device(slow_ctrl):
    """The C closed loop on the throttled drive: the last commands time out, the broker aborts and
    resets, the loop gets them back requeued, and the run ends with every I/O done and no error."""
    from nvmevfio import perf

    with nvmevfio.open(slow_ctrl["address"], 1, queue_depth=33, command_timeout_s=0.4) as dev:
        br = dev.provider._broker
        # at 40 IOPS, 24 in flight: the last few wait past the timeout (as in the batch test above)
        r = perf.run(dev, workload="randwrite", io_size=4096, queue_depth=24, count=24, lba_range=(4096, 8192))
        assert (r.ios, r.errors) == (24, 0) and br.resets >= 1 and br.failed is None
        assert dev.doorbell_counters()["in_flight"] == 0


def test_reset_while_another_thread_waits_on_its_own_queue(slow_ctrl):
    """Two threads, a queue each, on the throttled drive: commands time out, one thread's recovery
    resets the controller while the other waits on its own queue; that one parks, its commands
    are requeued with the rest, and both threads see every tag end once with every byte right."""
    with nvmevfio.open(slow_ctrl["address"], 1, queue_depth=64, queues=2, command_timeout_s=0.4) as dev:
        br = dev.provider._broker
        n = 12
        results: dict[int, object] = {}

        def worker(qid: int) -> None:
            try:
                buf = dev.alloc_buffer(n * 4096)
                data = np.random.default_rng(900 + qid).integers(0, 256, buf.size, dtype=np.uint8)
                buf.array[:] = data
                lbas = 4096 + qid * 1024 + np.arange(n) * 8
                tags = dev.submit_writes(lbas, np.full(n, 8), buf, np.arange(n) * 4096, qid=qid)
                done = dev.reap(n, qid=qid)
                assert sorted(done["tag"].tolist()) == sorted(tags.tolist()) and not done["status"].any()
                dev.free_buffer(buf)
                results[qid] = (int(lbas[0]), data)
            except BaseException as exc:  # the test inspects it
                results[qid] = exc

        threads = [threading.Thread(target=worker, args=(q,)) for q in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        assert not [r for r in results.values() if isinstance(r, BaseException)], results
        assert br.resets >= 1 and br.failed is None
        br.command_timeout_s = 30.0
        for first, data in results.values():
            assert np.array_equal(dev.read_blocks(first, n * 8), data)
