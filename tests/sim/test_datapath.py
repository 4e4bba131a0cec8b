"""Data path against the simulator: PRP lists walked by the model, batches, long runs."""

import numpy as np
import pytest

from nvmevfio.blockdev import BlockDevice


def test_random_windows_roundtrip(rig):
    p = rig.ready(depth=16)
    rng = np.random.default_rng(7)
    shadow = np.zeros(4096 * 512, dtype=np.uint8)
    for _ in range(100):
        count = int(rng.integers(1, 600))
        slba = int(rng.integers(0, 4096 - count + 1))
        data = rng.integers(0, 256, count * 512, dtype=np.uint8)
        p.write(1, slba, data)
        shadow[slba * 512 : (slba + count) * 512] = data
    np.testing.assert_array_equal(p.read(1, 0, 4096), shadow)
    np.testing.assert_array_equal(rig.sim.namespaces[0].data, shadow)


def test_mdts_split(rig):
    p = rig.ready()
    # MDTS=5 with 4 KiB pages: 128 KiB per command; 1000 blocks -> 4 commands
    before = len([c for c in rig.sim.commands if c[0] == 1])
    p.write(1, 0, np.ones(1000 * 512, dtype=np.uint8))
    assert len([c for c in rig.sim.commands if c[0] == 1]) - before == 4


def test_chained_prp_lists_unlimited_mdts():
    from nvmevfio.sim.controller import SimNamespace
    from nvmevfio.sim.rig import Rig

    r = Rig([SimNamespace(16384)], mdts=0)
    p = r.ready()
    data = np.random.default_rng(3).integers(0, 256, 5000 * 512, dtype=np.uint8)  # 625 pages: chained
    p.write(1, 11, data)
    assert len([c for c in r.sim.commands if c[0] == 1]) == 1  # one command, walked a chain
    np.testing.assert_array_equal(p.read(1, 11, 5000), data)


def test_20000_commands_through_depth_16(rig):
    p = rig.ready(depth=16)
    buf = p.alloc_buffer(15 * 512)
    total = 0
    lba = 0
    while total < 20000:
        n = p.capacity()
        buf.array[:] = np.repeat(np.arange(n, dtype=np.uint8) + total % 200, 512)[: 15 * 512] if n == 15 else 0
        slbas = (lba + np.arange(n)) % 4096
        p.submit("write", 1, slbas, np.ones(n), buf, np.arange(n) * 512)
        got = p.reap(n)
        assert len(got) == n and not got["status"].any()
        total += n
        lba += n
    assert rig.broker.commands_completed >= 20000
    st = rig.broker.io[0].ring.state()
    # the CQ head wrapped 20000/16 times: the phase tag flipped each time
    assert st["completed"] == total and st["in_flight"] == 0 and st["free_top"] == 15
    assert st["cq_phase"] == (1 + total // 16) % 2 and st["cq_head"] == total % 16 == st["sq_tail"]


def test_blockdevice_and_file(rig):
    import shutil
    from io import BytesIO

    dev = BlockDevice(rig.p, 1)
    assert dev.info.block_count == 4096 and dev.info.block_size == 512
    f = dev.file()
    f.seek(100)
    f.write(b"hello, world")
    f.seek(100)
    assert f.read(12) == b"hello, world"
    src = BytesIO(bytes(range(256)) * 20)
    f.seek(0)
    shutil.copyfileobj(src, f)
    f.seek(0)
    assert f.read(5120) == bytes(range(256)) * 20
    dev.write_zeroes(0, 10)
    assert not dev.read_blocks(0, 10).any()
    dev.write_blocks(0, b"\xff" * 1024)
    dev.deallocate(0, 2)
    assert not dev.read_blocks(0, 2).any()
    dev.close()
    assert rig.p.state == "shutdown"


def test_page_limit_per_command():
    """A command touches at most max_transfer/page_size pages: at an in-page offset it
    carries one page less; transfer() splits accordingly, a batch entry is refused."""
    from nvmevfio.errors import Refused
    from nvmevfio.sim.controller import SimNamespace
    from nvmevfio.sim.rig import Rig

    r = Rig([SimNamespace(32768)], mdts=0)
    p = r.ready()
    size = p.max_transfer
    buf = p.alloc_buffer(2 * size)
    buf.array[:] = np.random.default_rng(4).integers(0, 256, buf.size, dtype=np.uint8)
    m = r.mark()
    with pytest.raises(Refused) as ei:
        p.submit("write", 1, [0], [size // 512], buf, [4])
    assert ei.value.reason == "count-out-of-range" and r.unchanged_since(m)
    p.submit("write", 1, [0], [(size - 4096) // 512], buf, [4])
    assert p.reap(1)["status"].tolist() == [0]
    before = len(r.sim.commands)
    p.write_from(1, 0, 2 * size // 512 - 8, buf, 0x200)  # unaligned: split into 3 commands, not 2
    assert len(r.sim.commands) - before == 3
    np.testing.assert_array_equal(p.read(1, 0, 2 * size // 512 - 8), buf.array[0x200 : 0x200 + 2 * size - 4096])


def test_batched_prp_lists_equal_the_pure_builder():
    """The vectorized list writer and nvme.prp.build agree entry for entry, and the model reads it."""
    from nvmevfio.nvme import prp
    from nvmevfio.sim.controller import SimNamespace
    from nvmevfio.sim.rig import Rig

    r = Rig([SimNamespace(65536)], mdts=0)
    p = r.ready(depth=32)
    # pages per command: none, one list page, one full list page (513), and a chained list (600)
    sizes = [3, 4, 9, 40, 513, 2, 1, 64, 100, 7, 30, 600, 12]
    offs = np.cumsum([0, *[(n + 1) * 4096 for n in sizes[:-1]]]) + 0x200
    nbytes = [n * 4096 - 0x200 for n in sizes]
    buf = p.alloc_buffer(int(offs[-1] + nbytes[-1] + 4096))
    buf.array[:] = np.random.default_rng(8).integers(0, 256, buf.size, dtype=np.uint8)
    lbas = np.cumsum([0, *[n // 512 for n in nbytes[:-1]]])
    counts = np.array(nbytes) // 512
    p.submit("write", 1, lbas, counts, buf, offs)
    qp = r.broker.io[0]
    sq = qp.ring.sq_ring
    base = r.ledger.iova(buf)
    for k in range(len(sizes)):
        e = sq[k]
        want = prp.build(base + int(offs[k]), int(counts[k]) * 512, 4096, qp.prp_list_iovas(int(e["cid"])))
        assert (int(e["prp1"]), int(e["prp2"])) == (want.prp1, want.prp2)
        if want.lists:
            per = 512
            row = qp.prp_array[int(e["cid"]) * qp.prp_pages * per :][: len(want.lists[0])]
            assert row.tolist() == want.lists[0].tolist()
    assert not p.reap(len(sizes))["status"].any()
    for k in (0, 4, 11, 12):
        got = p.read(1, int(lbas[k]), int(counts[k]))
        np.testing.assert_array_equal(got, buf.array[offs[k] : offs[k] + nbytes[k]])
