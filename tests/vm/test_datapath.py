"""The broker's data path through real VFIO and the vIOMMU, against QEMU's NVMe model."""

import hashlib

import numpy as np
import pytest
from conftest import record

import nvmevfio
from nvmevfio.errors import Refused
from nvmevfio.provider import open_controller


def test_info(dev):
    i = dev.info
    assert (i.block_size, i.block_count, i.capacity_bytes) == (512, 131072, 64 << 20)
    assert i.model == "QEMU NVMe Ctrl" and i.serial == "nvmevfio-data" and i.max_transfer_bytes == 4 << 20


def test_chained_prp_lists_one_command(dev):
    """MDTS=0 (capped at 4 MiB = 1024 pages): one aligned 4 MiB command is PRP1 + 1023 list
    entries, a full list page chained to a second; the device walks the chain. At an in-page
    offset a command may touch no more pages, so the broker refuses 4 MiB there."""
    from nvmevfio.nvme import prp

    size = 4 << 20
    assert dev.info.max_transfer_bytes == size
    assert prp.list_pages_needed(0, size, 4096) == 2
    assert prp.list_pages_needed(0x600, size - 4096, 4096) == 2
    buf = dev.alloc_buffer(size + 4096)
    buf.array[:] = np.random.default_rng(5).integers(0, 256, buf.size, dtype=np.uint8)
    dev.submit_writes([2048], [size // 512], buf, [0])
    assert dev.reap(1)["status"].tolist() == [0]
    assert np.array_equal(dev.read_blocks(2048, size // 512), buf.array[:size])
    out = dev.alloc_buffer(size + 4096)
    dev.submit_reads([2048], [(size - 4096) // 512], out, [0x600])  # chained read at an offset
    assert dev.reap(1)["status"].tolist() == [0]
    assert np.array_equal(out.array[0x600 : 0x600 + size - 4096], buf.array[: size - 4096])
    with pytest.raises(Refused) as ei:
        dev.submit_reads([2048], [size // 512], out, [0x600])
    assert ei.value.reason == "count-out-of-range"
    dev.read_into(2048, size // 512, out, 0x600)  # the synchronous form splits it instead
    assert np.array_equal(out.array[0x600 : 0x600 + size], buf.array[:size])
    dev.free_buffer(buf)
    dev.free_buffer(out)


def test_offsets_inside_pages(dev):
    buf = dev.alloc_buffer(64 << 10)
    buf.array[:] = 0
    buf.array[0x204 : 0x204 + 3 * 4096 + 512] = 0x5A
    dev.write_from(300, 3 * 8 + 1, buf, 0x204)  # PRP1 offset 0x204, spans a list
    assert (dev.read_blocks(300, 25) == 0x5A).all()
    dev.free_buffer(buf)


def test_zeroes_and_deallocate(dev):
    dev.write_blocks(4096, np.full(64 * 512, 0xEE, dtype=np.uint8))
    dev.write_zeroes(4096, 32)
    got = dev.read_blocks(4096, 64)
    assert not got[: 32 * 512].any() and (got[32 * 512 :] == 0xEE).all()
    dev.deallocate(4096 + 32, 32)  # QEMU reports DLFEAT=1: deallocated blocks read as zeroes
    assert not dev.read_blocks(4096, 64).any()


def test_20000_commands_depth_16(data_ctrl):
    """The CQ phase tag wraps >1000 times: every byte of every command checked."""
    with nvmevfio.open(data_ctrl["address"], 1, queue_depth=16) as dev:
        per = dev.capacity()  # 15: one slot stays free
        assert per == 15
        wbuf = dev.alloc_buffer(per * 512)
        rbuf = dev.alloc_buffer(per * 512)
        base = 20000
        done = 0
        rounds = 0
        while done < 20000:
            pattern = (np.arange(per * 512, dtype=np.uint32) * 31 + rounds).astype(np.uint8)
            wbuf.array[:] = pattern
            lbas = base + (rounds * per + np.arange(per)) % 8192
            dev.submit_writes(lbas, np.ones(per), wbuf, np.arange(per) * 512)
            assert not dev.reap(per)["status"].any()
            dev.submit_reads(lbas, np.ones(per), rbuf, np.arange(per) * 512)
            assert not dev.reap(per)["status"].any()
            assert np.array_equal(rbuf.array, pattern), rounds
            done += 2 * per
            rounds += 1
        assert dev.provider._broker.commands_completed >= 20000


def test_4096_byte_namespace(data_ctrl, io_dir):
    with nvmevfio.open(data_ctrl["address"], 2) as dev:
        assert dev.block_size == 4096 and dev.block_count == (32 << 20) // 4096
        data = np.random.default_rng(9).integers(0, 256, 300 * 4096, dtype=np.uint8)
        dev.write_blocks(dev.block_count - 300, data)
        assert np.array_equal(dev.read_blocks(dev.block_count - 300, 300), data)
        with pytest.raises(Refused) as ei:
            dev.write_blocks(0, b"\0" * 512)
        assert ei.value.reason == "length-mismatch"
        dev.flush()
        record(io_dir, "images", {"address": data_ctrl["address"], "nsid": 2,
                                  "offset": (dev.block_count - 300) * 4096, "length": len(data),
                                  "sha256": hashlib.sha256(data.tobytes()).hexdigest()})


def test_mdts_split_small_controller(small_ctrl):
    with nvmevfio.open(small_ctrl["address"], 1) as dev:
        assert dev.info.max_transfer_bytes == 128 << 10
        before = dev.provider._broker.commands_completed
        data = np.random.default_rng(11).integers(0, 256, 1 << 20, dtype=np.uint8)
        dev.write_blocks(0, data)
        assert dev.provider._broker.commands_completed - before == 8  # 1 MiB / 128 KiB
        assert np.array_equal(dev.read_blocks(0, 2048), data)


def test_refusals_post_nothing(data_ctrl):
    """After a refusal, the next command's CQE.SQHD advanced by exactly one: nothing else was posted."""
    with nvmevfio.open(data_ctrl["address"], 1, queue_depth=32) as dev:
        br = dev.provider._broker
        ring = br.io[0].ring
        dev.write_blocks(10, np.full(512, 0x11, dtype=np.uint8))
        st0, done0 = ring.state(), br.commands_completed
        cases = [
            ("window-past-namespace-end", lambda: dev.write_blocks(dev.block_count, b"\0" * 512)),
            ("length-mismatch", lambda: dev.write_blocks(10, b"\0" * 100)),
            ("count-out-of-range", lambda: dev.read_blocks(10, 0)),
            ("namespace-inactive", lambda: dev.provider.read(7, 0, 1)),
        ]
        for reason, fn in cases:
            with pytest.raises(Refused) as ei:
                fn()
            assert ei.value.reason == reason
        assert ring.state() == st0 and br.commands_completed == done0
        got = dev.read_blocks(10, 1)
        assert (got == 0x11).all()  # the refused writes left the data alone
        st = ring.state()  # the device saw exactly one new command
        assert st["sq_head"] == (st0["sq_head"] + 1) % ring.depth and st["posted"] == st0["posted"] + 1


def test_stale_handle_and_scrub(data_ctrl):
    with nvmevfio.open(data_ctrl["address"], 1) as dev:
        buf = dev.alloc_buffer(8192)
        view = buf.array
        dev.read_into(0, 16, buf)
        view[:] = 0x77
        dev.free_buffer(buf)
        assert not view.any()  # scrubbed before it was unmapped
        with pytest.raises(Refused) as ei:
            dev.read_into(0, 16, buf)
        assert ei.value.reason == "stale-handle"


def test_admin_verbs(data_ctrl):
    with open_controller(data_ctrl["address"]) as s:
        s.enable()
        c = s.identify_controller()
        assert c["vid"] == 0x1B36 and c["sn"].strip() == "nvmevfio-data"
        assert s.active_namespaces() == [1, 2, 3]
        smart = s.get_log_page("smart")
        assert len(smart) == 512 and 250 < int.from_bytes(smart[1:3], "little") < 400  # Kelvin
        assert len(s.get_log_page("error", entries=4)) == 256
        assert s.get_log_page("firmware")[0] & 0x7 == 1  # AFI: slot 1 active
        nq = s.get_features(0x07)
        assert (nq & 0xFFFF) + 1 >= 1
        s.shutdown()
        assert s.state == "shutdown"


def test_metadata_format(data_ctrl):
    """Namespace 3 is formatted with 8 bytes of separate metadata per block (QEMU nvme-ns ms=8, no
    protection information): read/write move it (the broker authors MPTR); the data-only paths refuse."""
    with open_controller(data_ctrl["address"]) as s:
        s.enable()
        s.create_io_queues(1, 16)
        ns = s.identify_namespace(3)
        assert ns.metadata_size == 8 and ns.block_size == 512 and not ns.extended_lba and ns.protection is None
        buf = s.alloc_buffer(4096)
        with pytest.raises(Refused) as ei:
            s.read_into(3, 0, 1, buf)
        assert ei.value.reason == "unsupported-lba-format"
        with pytest.raises(Refused) as ei:
            s.write(3, 0, b"\0" * 512)
        assert ei.value.reason == "metadata-required"
        rng = np.random.default_rng(12)
        data, md = rng.integers(0, 256, 3 * 512, dtype=np.uint8), rng.integers(0, 256, 3 * 8, dtype=np.uint8)
        assert s.write(3, 40, data, metadata=md) == 3
        got, got_md = s.read(3, 40, 3, metadata=True)
        assert got.tobytes() == data.tobytes() and got_md.tobytes() == md.tobytes()
        assert s.read(1, 0, 1).size == 512  # the controller is fine


def test_file_adapter_copyfileobj(small_ctrl, io_dir):
    import shutil

    src = io_dir / "copy-src.bin"
    src.write_bytes(np.random.default_rng(3).integers(0, 256, (3 << 20) + 1234, dtype=np.uint8).tobytes())
    with nvmevfio.open(small_ctrl["address"], 1) as dev:
        f = dev.file()
        f.seek(777)  # unaligned start: edge blocks are read-modify-written
        with src.open("rb") as fin:
            shutil.copyfileobj(fin, f)
        assert f.tell() == 777 + src.stat().st_size
        f.seek(777)
        assert f.read(src.stat().st_size) == src.read_bytes()
        f.seek(0, 2)
        assert f.tell() == dev.info.capacity_bytes and f.read(10) == b""


def test_device_reset_and_reenable(data_ctrl):
    from nvmevfio import vfio

    with vfio.open_function(data_ctrl["address"], reset=True) as fn:
        assert fn.device.can_reset  # QEMU's NVMe function supports FLR
        assert fn.device.reset()
    with nvmevfio.open(data_ctrl["address"], 1, reset=True) as dev:
        assert dev.read_blocks(0, 1).size == 512


def test_hugetlb_backed_queues(data_ctrl):
    from pathlib import Path

    def free_huge():
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
        raise AssertionError("no HugePages_Free")

    Path("/proc/sys/vm/nr_hugepages").write_text("64")
    before = free_huge()
    assert before >= 16
    with nvmevfio.open(data_ctrl["address"], 1, hugetlb=True) as dev:
        assert free_huge() < before  # the admin/I/O queues and PRP lists sit in huge pages
        data = np.random.default_rng(12).integers(0, 256, 1 << 20, dtype=np.uint8)
        dev.write_blocks(40000, data)
        assert np.array_equal(dev.read_blocks(40000, 2048), data)
    assert free_huge() == before  # all returned


@pytest.mark.parametrize("irq", [False, True])
def test_several_queue_pairs(small_ctrl, irq):
    """Three I/O queue pairs (MSI-X vectors 1..3 in irq mode); commands on each queue complete
    on that queue, and a fourth queue does not exist."""
    with nvmevfio.open(small_ctrl["address"], 1, queues=3, queue_depth=8, irq=irq) as dev:
        buf = dev.alloc_buffer(3 * 7 * 512)
        buf.array[:] = np.repeat(np.arange(21, dtype=np.uint8), 512)
        for qid in (1, 2, 3):
            base = (qid - 1) * 7
            dev.submit_writes(1000 + base + np.arange(7), np.ones(7), buf, (base + np.arange(7)) * 512, qid=qid)
        for qid in (1, 2, 3):
            done = dev.reap(7, qid=qid)
            assert len(done) == 7 and not done["status"].any()
            assert dev.in_flight(qid) == 0
        got = dev.read_blocks(1000, 21)
        assert np.array_equal(got, buf.array)
        with pytest.raises(Refused) as ei:
            dev.submit_reads([0], [1], buf, [0], qid=4)
        assert ei.value.reason == "io-queues-not-created"


def test_registered_buffer_slots(dev):
    """Registered buffers: PRPs authored once per slot (one page, two pages, a PRP list); batches
    and the synchronous form name slots; bytes read back equal bytes written."""
    for slot_size, nlb in ((4096, 8), (8192, 16), (64 << 10, 128), (64 << 10, 100)):
        buf = dev.alloc_buffer(8 * slot_size)
        reg = dev.register_buffer(buf, slot_size)
        assert reg.slots == 8
        data = np.random.default_rng(slot_size + nlb).integers(0, 256, buf.size, dtype=np.uint8)
        reg.array[:] = data
        lbas = 4000 + np.arange(8) * nlb
        tags = dev.submit_writes(lbas, np.full(8, nlb), reg, np.arange(8) * slot_size)
        done = dev.reap(8)
        assert sorted(done["tag"].tolist()) == sorted(tags.tolist()) and not done["status"].any()
        reg.array[:] = 0
        dev.submit_reads(lbas[::-1], np.full(8, nlb), reg, np.arange(8) * slot_size)  # slots reversed
        assert not dev.reap(8)["status"].any()
        for k in range(8):
            got = reg.array[k * slot_size : k * slot_size + nlb * 512]
            want = data[(7 - k) * slot_size : (7 - k) * slot_size + nlb * 512]
            assert np.array_equal(got, want), (slot_size, k)
        dev.read_into(int(lbas[3]), nlb, reg, 5 * slot_size)  # the synchronous form, into slot 5
        assert np.array_equal(reg.array[5 * slot_size : 5 * slot_size + nlb * 512],
                              data[3 * slot_size : 3 * slot_size + nlb * 512])
        with pytest.raises(Refused) as ei:
            dev.submit_reads([0], [1], reg, [100])  # not a slot
        assert ei.value.reason == "length-mismatch"
        dev.free_buffer(buf)  # drops the registration
        with pytest.raises(Refused) as ei:
            dev.submit_reads([0], [1], reg, [0])
        assert ei.value.reason == "stale-handle"


def test_perf_loop_writes_what_its_slots_hold(dev):
    """The C closed loop posts real commands with the broker's PRPs: after a sequential write
    run, every I/O-sized chunk of the range holds one of the perf buffer's slots."""
    from nvmevfio import perf

    lo, hi, io = 6000, 6000 + 64 * 8, 4096
    r = perf.run(dev, workload="write", io_size=io, queue_depth=8, count=256, lba_range=(lo, hi), seed=77)
    assert (r.ios, r.writes, r.reads, r.errors) == (256, 256, 0, 0)
    slots = np.random.default_rng(77).integers(0, 256, 8 * io, dtype=np.uint8).reshape(8, io)
    got = dev.read_blocks(lo, hi - lo).reshape(-1, io)
    for chunk in got:
        assert (slots == chunk).all(axis=1).any()
    r = perf.run(dev, workload="randread", io_size=io, queue_depth=16, seconds=0.5)
    assert r.ios > 16 and r.errors == 0 and r.lat_min_us <= r.lat_p50_us <= r.lat_p99_us <= r.lat_max_us


@pytest.mark.parametrize("irq", [False, True])
def test_one_thread_per_queue(small_ctrl, irq):
    """Four threads on four queue pairs at once, each on its own LBA window, batched and
    synchronous I/O mixed; every byte is checked, and a thread entering a busy queue is refused."""
    import threading

    with nvmevfio.open(small_ctrl["address"], 1, queues=4, queue_depth=17, irq=irq) as dev:  # 16 usable
        errors = []

        def worker(qid: int) -> None:
            try:
                rng = np.random.default_rng(qid)
                buf = dev.alloc_buffer(16 * 4096)
                base = 20000 + qid * 4096
                for rnd in range(20):
                    data = rng.integers(0, 256, buf.size, dtype=np.uint8)
                    buf.array[:] = data
                    tags = dev.submit_writes(base + np.arange(16) * 8, np.full(16, 8), buf, np.arange(16) * 4096,
                                             qid=qid)
                    done = dev.reap(16, qid=qid)
                    assert sorted(done["tag"].tolist()) == sorted(tags.tolist()) and not done["status"].any()
                    buf.array[:] = 0
                    for k in range(16):
                        dev.read_into(base + k * 8, 8, buf, k * 4096, qid=qid)
                    assert np.array_equal(buf.array, data), (qid, rnd)
                dev.free_buffer(buf)
            except BaseException as exc:  # reported by the main thread
                errors.append((qid, exc))

        threads = [threading.Thread(target=worker, args=(q,)) for q in (1, 2, 3, 4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
