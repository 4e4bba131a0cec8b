"""Recovery through real VFIO against QEMU's NVMe model: commands made slow by QEMU's drive
throttling time out for real; the broker aborts (QEMU answers "not aborted"), resets the
controller, requeues what was in flight, and every byte lands; the host then compares the
backing image."""

import hashlib

import numpy as np
from conftest import record

import nvmevfio


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
