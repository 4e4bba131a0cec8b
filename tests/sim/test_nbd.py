"""The NBD export's logic (nvmevfio.nbd.Export, what the nbdkit plugin calls) against the
simulated controller: byte ranges to blocks and chunks, concurrent requests on a lane (queue
pair) each, errno mapping, Write Zeroes with DEAC, and the plugin's glue with a stand-in for
nbdkit's module. The real thing (nbdkit, nbd-client, ext4) runs in tests/vm/test_nbd.py."""

import errno
import importlib
import sys
import threading
import types

import numpy as np
import pytest

from nvmevfio import nbd
from nvmevfio.blockdev import BlockDevice
from nvmevfio.nvme.spec import IoOpcode

BS = 512


@pytest.fixture
def export(rig):
    dev = BlockDevice(rig.p, 1, queue_depth=16, queues=3)
    ex = nbd.Export(dev, queues=3)
    yield ex
    ex.close()


def disk(rig):
    return rig.sim.namespaces[0].data


def test_geometry(export, rig):
    assert export.size == 4096 * BS and export.block_size == BS
    # MDTS=5 with 4 KiB pages: 128 KiB per command, which is also the most a lane moves at once
    assert export.chunk == 128 << 10 and export.block_sizes() == (BS, 4096, 128 << 10)


def test_pread_any_range_matches_the_disk(export, rig):
    disk(rig)[:] = np.random.default_rng(1).integers(0, 256, disk(rig).size, dtype=np.uint8)
    for offset, length in [(0, 512), (100, 1), (511, 2), (4000, 300 << 10), (BS * 4095, BS), (7, 128 << 10)]:
        out = bytearray(length)
        export.pread(out, offset)
        assert bytes(out) == disk(rig)[offset : offset + length].tobytes(), (offset, length)


def test_pwrite_chunks_and_refuses_partial_blocks(export, rig):
    data = np.random.default_rng(2).integers(0, 256, 300 << 10, dtype=np.uint8)
    export.pwrite(memoryview(data.tobytes()), 8 * BS)  # three commands: 128 + 128 + 44 KiB
    assert np.array_equal(disk(rig)[8 * BS : 8 * BS + data.size], data)
    before = len(rig.sim.commands)
    with pytest.raises(nbd.ExportError) as ei:
        export.pwrite(b"x" * 100, 0)
    assert ei.value.errno == errno.EINVAL and "nbd-client -b 512" in str(ei.value)
    assert len(rig.sim.commands) == before  # refused before the device saw anything


def test_trim_zero_flush(export, rig):
    disk(rig)[:] = 0xAB
    export.trim(100, 3 * BS)  # whole blocks inside only: LBA 1 and 2
    assert disk(rig)[:BS].tolist() == [0xAB] * BS
    assert not disk(rig)[BS : 3 * BS].any() and disk(rig)[3 * BS] == 0xAB
    export.zero(8 * BS, 4 * BS, may_trim=False)
    assert not disk(rig)[8 * BS : 12 * BS].any()
    assert not int(rig.sim.last_sqe[IoOpcode.WRITE_ZEROES]["cdw12"]) & (1 << 25)
    export.zero(16 * BS, BS, may_trim=True)  # DEAC: the controller may deallocate
    assert int(rig.sim.last_sqe[IoOpcode.WRITE_ZEROES]["cdw12"]) == (1 << 25) | 0
    export.flush()
    assert rig.sim.commands[-1][1] == IoOpcode.FLUSH


def test_concurrent_requests_each_on_a_queue_of_their_own(export, rig):
    rng = np.random.default_rng(3)
    blobs = [rng.integers(0, 256, 64 << 10, dtype=np.uint8) for _ in range(8)]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(5):
                export.pwrite(blobs[i].tobytes(), i * (64 << 10))
                out = bytearray(64 << 10)
                export.pread(out, i * (64 << 10))
                assert bytes(out) == blobs[i].tobytes()
        except BaseException as exc:  # the test inspects it
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:1]
    assert {q for q, opc, _ in rig.sim.commands if q and opc == IoOpcode.WRITE} <= {1, 2, 3}
    for i, blob in enumerate(blobs):
        assert np.array_equal(disk(rig)[i * (64 << 10) : (i + 1) * (64 << 10)], blob)


@pytest.mark.parametrize(("sct", "sc", "want"), [(2, 0x81, errno.EIO), (0, 0x80, errno.EINVAL),
                                                 (0, 0x81, errno.ENOSPC), (0, 0x06, errno.EIO)])
def test_nvme_status_to_errno(export, rig, sct, sc, want):
    rig.sim.fail_next[IoOpcode.READ] = (sct, sc)
    with pytest.raises(nbd.ExportError) as ei:
        export.pread(bytearray(BS), 0)
    assert ei.value.errno == want and "read at byte 0" in str(ei.value)
    out = bytearray(BS)
    export.pread(out, 0)  # the lane is back and works


def test_plugin_glue(rig, monkeypatch):
    """nbd_plugin.py with a stand-in for nbdkit's built-in module: parameters, the export opened
    after the fork, callbacks, and a failure's errno handed to nbdkit."""
    fake = types.SimpleNamespace(THREAD_MODEL_PARALLEL=3, FUA_EMULATE=1, FLAG_MAY_TRIM=0x1, errors=[])
    fake.set_error = fake.errors.append
    monkeypatch.setitem(sys.modules, "nbdkit", fake)
    plugin = importlib.reload(importlib.import_module("nvmevfio.nbd_plugin")) if "nvmevfio.nbd_plugin" in \
        sys.modules else importlib.import_module("nvmevfio.nbd_plugin")
    with pytest.raises(ValueError, match="unknown parameter"):
        plugin.config("adress", "x")
    with pytest.raises(ValueError, match="address"):
        plugin.config_complete()
    plugin.config("address", "0000:00:04.0")
    plugin.config("queues", "2")
    plugin.config_complete()
    monkeypatch.setattr(plugin, "open_export",
                        lambda address, nsid, queues, queue_depth, irq: nbd.Export(
                            BlockDevice(rig.p, nsid, queue_depth=8, queues=queues), queues=queues))
    plugin.after_fork()
    h = plugin.open(False)
    assert plugin.get_size(h) == 4096 * BS and plugin.can_write(h) and not plugin.can_write(plugin.open(True))
    assert plugin.thread_model() == 3 and plugin.can_fua(h) == 1 and plugin.can_multi_conn(h)
    plugin.pwrite(h, b"\x5a" * BS, BS, 0)
    out = bytearray(BS)
    plugin.pread(h, out, BS, 0)
    assert out == b"\x5a" * BS
    plugin.zero(h, BS, BS, 0x1)
    assert int(rig.sim.last_sqe[IoOpcode.WRITE_ZEROES]["cdw12"]) & (1 << 25)
    rig.sim.fail_next[IoOpcode.WRITE] = (2, 0x80)  # Write Fault
    with pytest.raises(nbd.ExportError):
        plugin.pwrite(h, b"\x00" * BS, 0, 0)
    assert fake.errors == [errno.EIO]
    plugin.cleanup()
