"""Zoned namespaces (ZNS 1.1) on QEMU 7.2's model (the nvmevfio-zns controller: 16 zones of 1024
4096-byte blocks, 768 of them writable, at most 4 open and 6 active zones, ZASL 32 blocks, 64-byte
descriptor extensions): every zone state the model can reach and each transition, every named
status the model can return, the broker's refusals before the device, 32 appends in flight to one
zone, a reset zone reading zeros, and the kernel's nvme driver and nvme-cli agreeing with nvmevfio
on the same zones both ways. QEMU 7.2 has no way to put a zone in Read Only or Offline (its
Offline action applies to Read Only zones only), so Zone Is Read Only and Zone Is Offline cannot
be provoked here; the Offline action's refusal is."""

import json
import subprocess

import numpy as np
import pytest
from cli_runner import nv
from conftest import kernel_blockdev

import nvmevfio
from nvmevfio import pci
from nvmevfio.errors import CommandError, Refused
from nvmevfio.nvme import zns
from nvmevfio.nvme.zns import ZoneState

BS, ZSZE, ZCAP, ZONES = 4096, 1024, 768, 16
APPEND_BLOCKS = (1 << 5) * 4096 // BS  # ZASL 5 in units of CAP.MPSMIN (4 KiB): 128 KiB


def zone(i: int) -> int:
    return i * ZSZE


@pytest.fixture
def zdev(zns_ctrl):
    """The zoned namespace, every zone reset (Empty) first."""
    with nvmevfio.open(zns_ctrl["address"], 1, queue_depth=64) as d:
        d.zone_action("reset", select_all=True)
        yield d


def states(dev, *indices: int) -> list[ZoneState]:
    zones = dev.zones()
    return [zones[i].state for i in indices]


def device_status(sc: int, fn, *args, **kw) -> CommandError:
    """``fn`` fails on the device with Command Specific Status ``sc``."""
    with pytest.raises(CommandError) as ei:
        fn(*args, **kw)
    assert (ei.value.sct, ei.value.sc) == (1, sc), str(ei.value)
    return ei.value


def refusal(reason: str, fn, *args, **kw) -> Refused:
    with pytest.raises(Refused) as ei:
        fn(*args, **kw)
    assert ei.value.reason == reason, str(ei.value)
    return ei.value


def pattern(seed: int, blocks: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, blocks * BS, dtype=np.uint8).tobytes()


def test_geometry(zdev):
    z = zdev.provider.namespace(1).zoned
    assert (z.zone_size, z.zones, z.max_active, z.max_open, z.append_limit, z.extension_bytes) == (
        ZSZE, ZONES, 6, 4, APPEND_BLOCKS * BS, 64)
    nr, zones = zdev.zone_report()
    assert nr == ZONES and [(x.slba, x.wp, x.capacity, x.state, x.type) for x in zones] == [
        (zone(i), zone(i), ZCAP, ZoneState.EMPTY, 2) for i in range(ZONES)]


def test_cli_identify(zns_ctrl):
    assert json.loads(nv("zns", "id-ctrl", zns_ctrl["address"], "-o", "json").stdout) == {"zasl": 5}
    idns = json.loads(nv("zns", "id-ns", zns_ctrl["address"], "-n", "1", "-o", "json").stdout)
    assert (idns["mar"], idns["mor"], idns["lbafe"][0]) == (5, 3, {"zsze": ZSZE, "zdes": 1})


def test_every_state_transition(zdev):
    z = zone(0)
    zdev.zone_write(z, pattern(1, 2))  # Empty -> Implicitly Opened, by a write
    assert [(x.state, x.wp) for x in zdev.zones()[:1]] == [(ZoneState.IMPLICITLY_OPENED, z + 2)]
    zdev.zone_action("close", z)  # Implicitly Opened -> Closed
    assert states(zdev, 0) == [ZoneState.CLOSED]
    zdev.zone_append(z, pattern(2, 1))  # Closed -> Implicitly Opened, by an append
    assert [(x.state, x.wp) for x in zdev.zones()[:1]] == [(ZoneState.IMPLICITLY_OPENED, z + 3)]
    zdev.zone_action("open", z)  # Implicitly -> Explicitly Opened
    assert states(zdev, 0) == [ZoneState.EXPLICITLY_OPENED]
    zdev.zone_action("close", z)  # Explicitly Opened -> Closed
    zdev.zone_action("open", z)  # Closed -> Explicitly Opened
    assert states(zdev, 0) == [ZoneState.EXPLICITLY_OPENED]
    zdev.zone_action("finish", z)  # Explicitly Opened -> Full
    assert states(zdev, 0) == [ZoneState.FULL]
    zdev.zone_action("reset", z)  # Full -> Empty, the write pointer back at the start
    assert [(x.state, x.wp) for x in zdev.zones()[:1]] == [(ZoneState.EMPTY, z)]
    zdev.zone_action("open", zone(1))  # Empty -> Explicitly Opened
    zdev.zone_action("finish", zone(2))  # Empty -> Full
    zdev.zone_write(zone(3), pattern(3, 1))
    zdev.zone_action("finish", zone(3))  # Implicitly Opened -> Full
    zdev.zone_action("open", zone(4))
    zdev.zone_action("reset", zone(4))  # Explicitly Opened -> Empty
    zdev.zone_write(zone(5), pattern(4, 1))
    zdev.zone_action("close", zone(5))
    zdev.zone_action("finish", zone(5))  # Closed -> Full
    assert states(zdev, 1, 2, 3, 4, 5) == [ZoneState.EXPLICITLY_OPENED, ZoneState.FULL, ZoneState.FULL,
                                           ZoneState.EMPTY, ZoneState.FULL]
    # the state filters (ZRASF) and a partial report
    assert [x.slba for x in zdev.zone_report(state="full")[1]] == [zone(2), zone(3), zone(5)]
    nr, got = zdev.zone_report(zone(3), state="full")  # from zone 3 on: the matches from there
    assert (nr, [x.slba for x in got]) == (2, [zone(3), zone(5)])
    assert [x.slba for x in zdev.zone_report(state="exp_opened")[1]] == [zone(1)]
    assert zdev.zone_report(state="empty", count=2, partial=True)[0] == 2  # partial: counts what it returns
    assert zdev.zone_report(state="empty", count=2)[0] == ZONES - 4  # otherwise: every match
    zdev.zone_action("reset", select_all=True)  # all of them at once
    assert set(states(zdev, *range(ZONES))) == {ZoneState.EMPTY}
    zdev.zone_action("open", zone(6))
    zdev.zone_action("close", select_all=True)
    zdev.zone_action("finish", zone(7))
    assert states(zdev, 6, 7) == [ZoneState.CLOSED, ZoneState.FULL]


def test_each_named_status_the_model_returns(zdev):
    # Zone Invalid Write: a plain write (not the zoned API, which refuses it first) off the write pointer
    device_status(0xBC, zdev.write_blocks, zone(1) + 5, pattern(5, 1))
    # Zone Boundary Error: a write past the zone's capacity, and a read across two zones
    zdev.write_blocks(zone(2), pattern(6, ZCAP - 8))
    device_status(0xB8, zdev.write_blocks, zone(2) + ZCAP - 8, pattern(7, 16))
    device_status(0xB8, zdev.read_blocks, zone(1) - 4, 8)
    # Zone Is Full: a write to a finished zone
    zdev.zone_action("finish", zone(3))
    device_status(0xB9, zdev.write_blocks, zone(3), pattern(8, 1))
    zdev.zone_action("reset", select_all=True)
    # Invalid Zone State Transition: close an Empty zone; the Offline action on one that is not Read Only
    device_status(0xBF, zdev.zone_action, "close", zone(4))
    device_status(0xBF, zdev.zone_action, "offline", zone(4))
    # Too Many Open Zones: a fifth explicitly opened zone (MOR 3: at most 4)
    for i in range(4):
        zdev.zone_action("open", zone(i))
    err = device_status(0xBE, zdev.zone_action, "open", zone(4))
    assert err.sc_name == "Too Many Open Zones"
    device_status(0xBE, zdev.write_blocks, zone(4), pattern(9, 1))  # an implicit open too
    # Too Many Active Zones: closed zones stay active (MAR 5: at most 6)
    zdev.zone_action("close", select_all=True)
    for i in (4, 5):
        zdev.zone_action("open", zone(i))
    err = device_status(0xBD, zdev.zone_action, "open", zone(6))
    assert err.sc_name == "Too Many Active Zones"
    assert states(zdev, *range(7)) == [ZoneState.CLOSED] * 4 + [ZoneState.EXPLICITLY_OPENED] * 2 + [ZoneState.EMPTY]


def test_refusals_before_the_device(zdev, data_ctrl):
    zdev.zone_write(zone(0), pattern(10, 4))
    before = zdev.zones()
    refusal("not-write-pointer", zdev.zone_write, zone(0) + 5, pattern(11, 1))
    refusal("not-write-pointer", zdev.zone_write, zone(0), pattern(11, 1))
    refusal("crosses-zone", zdev.zone_write, zone(0) + 4, pattern(12, ZCAP))
    refusal("append-too-large", zdev.zone_append, zone(1), pattern(13, APPEND_BLOCKS + 1))
    refusal("not-zone-start", zdev.zone_append, zone(1) + 1, pattern(13, 1))
    refusal("not-zone-start", zdev.zone_action, "open", zone(1) + 3)
    refusal("length-mismatch", zdev.zone_append, zone(1), b"\0" * 100)
    refusal("invalid-argument", zdev.zone_action, "explode", zone(1))
    refusal("invalid-argument", zdev.zone_report, state="sleepy")
    zdev.zone_action("finish", zone(2))
    refusal("zone-not-writable", zdev.zone_write, zone(2), pattern(14, 1))
    buf = zdev.alloc_buffer(64 * BS)
    refusal("append-too-large", zdev.submit_appends, [zone(3)], [APPEND_BLOCKS + 1], buf, [0])
    refusal("not-zone-start", zdev.submit_appends, [zone(3), zone(3) + 1], [1, 1], buf, [0, BS])
    after = zdev.zones()
    assert [(z.state, z.wp) for z in after if z.slba != zone(2)] == [(z.state, z.wp) for z in before
                                                                     if z.slba != zone(2)]
    assert zdev.in_flight() == 0
    with nvmevfio.open(data_ctrl["address"], 1) as plain:  # not a zoned namespace
        refusal("not-zoned", plain.zones)
        refusal("not-zoned", plain.zone_append, 0, b"\0" * 512)
        refusal("not-zoned", plain.zone_action, "reset", select_all=True)


def test_32_appends_in_flight_to_one_zone(zdev):
    n, per = 32, 2
    z = zone(8)
    buf = zdev.alloc_buffer(n * per * BS)
    data = np.frombuffer(pattern(20, n * per), dtype=np.uint8)
    buf.array[: len(data)] = data
    tags = zdev.submit_appends([z] * n, [per] * n, buf, [i * per * BS for i in range(n)]).tolist()
    assert zdev.in_flight() == n  # all 32 posted before the first completion is reaped
    done = []
    while sum(len(d) for d in done) < n:
        done.append(zdev.reap(n - sum(len(d) for d in done)))
    rec = np.concatenate(done)
    assert (rec["status"] == 0).all() and sorted(rec["tag"].tolist()) == sorted(tags)
    lbas = zns.appended_lbas(rec).tolist()
    assert len(set(lbas)) == n and sorted(lbas) == [z + per * i for i in range(n)]  # 32 distinct, packed
    for tag, lba in zip(rec["tag"].tolist(), lbas):
        i = tags.index(tag)
        assert zdev.read_blocks(lba, per).tobytes() == data[i * per * BS : (i + 1) * per * BS].tobytes()
    assert [(x.state, x.wp) for x in zdev.zones()[8:9]] == [(ZoneState.IMPLICITLY_OPENED, z + n * per)]
    # one synchronous append: the LBA from the completion's DW0/DW1
    assert zdev.zone_append(z, pattern(21, 3)) == z + n * per
    assert zdev.read_blocks(z + n * per, 3).tobytes() == pattern(21, 3)


def test_a_reset_zone_reads_zeros(zdev):
    z = zone(9)
    zdev.zone_write(z, pattern(30, 64))
    assert zdev.read_blocks(z, 64).tobytes() == pattern(30, 64)
    zdev.zone_action("reset", z)
    assert [(x.state, x.wp) for x in zdev.zones()[9:10]] == [(ZoneState.EMPTY, z)]
    assert not zdev.read_blocks(z, 64).any()
    zdev.zone_write(z, pattern(31, 1))  # written again from the start
    assert zdev.read_blocks(z, 1).tobytes() == pattern(31, 1)


REPORTS = [[], ["-d", "3"], ["-s", str(zone(2)), "-d", "4"], ["-S", "4"], ["-S", "5"], ["-S", "1", "-d", "2"],
           ["-e", "-d", "2"]]


def test_kernel_and_nvme_cli_agree_both_ways(zns_ctrl, io_dir):
    addr = zns_ctrl["address"]
    with nvmevfio.open(addr, 1) as dev:
        dev.zone_action("reset", select_all=True)
        dev.zone_write(zone(0), pattern(40, 8))
        dev.zone_append(zone(1), pattern(41, 4))
        dev.zone_action("open", zone(2))
        dev.zone_action("finish", zone(3))
        dev.flush()
    # nvmevfio's close shuts the controller down (CC.SHN): QEMU closes the open zones then, as it
    # does when the kernel's driver lets go; the reports are compared after that, on both sides
    ours = {" ".join(a): json.loads(nv("zns", "report-zones", addr, "-n", "1", *a, "-o", "json").stdout)
            for a in REPORTS}
    ours_text = nv("zns", "report-zones", addr, "-n", "1", "-d", "5").stdout.decode()
    assert ours[""]["nr_zones"] == ZONES and len(ours[""]["zone_list"]) == ZONES
    assert [(z["slba"], z["wp"], z["state"]) for z in ours["-d 3"]["zone_list"][:2]] == [
        (zone(0), zone(0) + 8, "CLOSED"), (zone(1), zone(1) + 4, "CLOSED")]
    assert ours["-S 5"]["nr_zones"] == 1 and [z["slba"] for z in ours["-S 5"]["zone_list"]] == [zone(3)]
    assert ours["-e -d 2"]["zone_list"][0]["ext_data"] == "Not valid"
    bdev = kernel_blockdev(addr)
    try:
        def nvme(*args: str) -> str:
            return subprocess.run(["nvme", "zns", *args], check=True, capture_output=True, text=True).stdout

        for a in REPORTS:
            theirs = json.loads(nvme("report-zones", bdev, *a, "-o", "json"))
            assert ours[" ".join(a)] == theirs, (a, ours[" ".join(a)], theirs)
        assert ours_text == nvme("report-zones", bdev, "-d", "5")
        # the kernel's zoned block device sees nvmevfio's writes: zone 0's write pointer (in 512-byte sectors)
        blk = subprocess.run(["blkzone", "report", "-c", "2", bdev], check=True, capture_output=True,
                             text=True).stdout.splitlines()
        assert "wptr 0x000040" in blk[0] and "zcond: 4(cl)" in blk[0], blk
        got = subprocess.run(["dd", f"if={bdev}", f"bs={BS}", "count=8", "iflag=direct", "status=none"],
                             check=True, capture_output=True).stdout
        assert got == pattern(40, 8)
        # the kernel appends (nvme-cli through the kernel driver) and writes at a write pointer (dd)
        src = io_dir / "zns-append.bin"
        src.write_bytes(pattern(42, 2))
        out = nvme("zone-append", bdev, "-s", str(zone(1)), "-z", str(2 * BS), "-d", str(src))
        assert out == f"Success appended data to LBA {zone(1) + 4:x}\n", out
        src.write_bytes(pattern(43, 3))
        subprocess.run(["dd", f"if={src}", f"of={bdev}", f"bs={BS}", f"seek={zone(5)}", "oflag=direct",
                        "status=none"], check=True)
    finally:
        pci.bind(addr, force=True)
    with nvmevfio.open(addr, 1) as dev:
        assert dev.read_blocks(zone(1) + 4, 2).tobytes() == pattern(42, 2)
        assert dev.read_blocks(zone(5), 3).tobytes() == pattern(43, 3)
        assert [(z.wp, z.state) for z in dev.zones()[5:6]] == [(zone(5) + 3, ZoneState.CLOSED)]
        dev.zone_action("reset", select_all=True)
    # nvmevfio's own zone-append line is nvme-cli's
    src = io_dir / "zns-append2.bin"
    src.write_bytes(pattern(44, 1))
    out = nv("zns", "zone-append", addr, "-n", "1", "-s", str(zone(6)), "-z", str(BS), "-d", str(src)).stdout
    assert out.decode() == f"Success appended data to LBA {zone(6):x}\n"
    out = nv("zns", "reset-zone", addr, "-n", "1", "-s", str(zone(6))).stdout
    assert out.decode() == f"zns-reset-zone: Success, action:4 zone:{zone(6):x} all:0 zcapc:0 nsid:1\n"


def test_perf_append_at_depth_and_writes_that_follow_write_pointers(zns_ctrl):
    from nvmevfio import perf

    addr = zns_ctrl["address"]
    with nvmevfio.open(addr, 1, queue_depth=64) as dev:
        dev.zone_write(zone(10), pattern(50, 1))  # perf resets the range's zones first
        r = perf.run(dev, workload="append", io_size=2 * BS, queue_depth=32, seconds=60,
                     lba_range=(zone(10), zone(12)))
        assert (r.errors, r.ios, r.writes) == (0, 2 * (ZCAP // 2), 2 * (ZCAP // 2)), r
        r = perf.run(dev, workload="write", io_size=4 * BS, queue_depth=16, seconds=60,
                     lba_range=(zone(12), zone(14)))
        assert (r.errors, r.ios) == (0, 2 * (ZCAP // 4)), r
        # every zone filled to its capacity (QEMU makes a zone Full when its write pointer reaches it)
        assert [(z.slba, z.state) for z in dev.zones()[10:14]] == [(zone(i), ZoneState.FULL) for i in range(10, 14)]
        assert dev.read_blocks(zone(13) + ZCAP - 4, 4).any() and not dev.read_blocks(zone(13) + ZCAP, 4).any()
        refusal("not-zone-start", perf.run, dev, workload="append", io_size=BS, queue_depth=4, count=4,
                lba_range=(zone(10) + 1, zone(12)))
        refusal("append-too-large", perf.run, dev, workload="append", io_size=(APPEND_BLOCKS + 1) * BS,
                queue_depth=4, count=4, lba_range=(zone(10), zone(12)))
        dev.zone_action("reset", select_all=True)
    res = json.loads(nv("perf", addr, "-w", "append", "-q", "32", "-s", str(BS), "--range",
                        f"{zone(14)}:{zone(16)}", "-t", "60", "-o", "json").stdout)
    assert (res["workload"], res["errors"], res["ios"], res["queue_depth"]) == ("append", 0, 2 * ZCAP, 32), res
    with nvmevfio.open(addr, 1) as dev:
        assert [z.state for z in dev.zones()[14:16]] == [ZoneState.FULL] * 2
        dev.zone_action("reset", select_all=True)
