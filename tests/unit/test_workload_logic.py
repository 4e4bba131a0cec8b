"""The workload engine's pure logic, exact values: the --mix/--bs/--skew parsers, the draw's
cumulative shares, the jobs' slices, the token bucket (C, nv_wl_take), CRC32C (C, against the
crc32c package) and the verify map's states (C, nv_wl_stamp and nv_wl_check)."""

from __future__ import annotations

import crc32c
import numpy as np
import pytest

from nvmevfio._ffi import ffi, lib
from nvmevfio.errors import Refused
from nvmevfio.workload_engine import (
    cumulative,
    make_spec,
    parse_bs,
    parse_mix,
    parse_size,
    parse_skew,
    rate_interval,
    slices,
)
from nvmevfio.workload_map import GEN_FIRST, MISMATCH, NEVER, READING, UNDEF, VMAP, ZERO


def test_parse_mix():
    assert parse_mix("read:70,write:20,trim:5,flush:5") == {"read": 70, "write": 20, "trim": 5, "flush": 5,
                                                            "write-zeroes": 0}
    assert parse_mix("wz:40, READ:60") == {"read": 60, "write": 0, "trim": 0, "flush": 0, "write-zeroes": 40}
    assert parse_mix("write") == {"read": 0, "write": 100, "trim": 0, "flush": 0, "write-zeroes": 0}
    for bad in ("read:70,write:20", "read:50,read:50", "erase:100", "read:x", "read:-10,write:110"):
        with pytest.raises(Refused) as ei:
            parse_mix(bad)
        assert ei.value.reason == "invalid-argument", bad


def test_parse_bs_and_sizes():
    assert parse_size("4k") == 4096 and parse_size("128K") == 131072 and parse_size("1m") == 1 << 20
    assert parse_size("512") == 512 and parse_size("8KiB") == 8192
    assert parse_bs("128k:20,4k:50,16k:30") == [(4096, 50), (16384, 30), (131072, 20)]
    assert parse_bs("4k") == [(4096, 100)]
    for bad in ("4k:50", "4q:100", "k:100", ",".join(f"{i}k:{10 if i < 9 else 20}" for i in range(1, 10))):
        with pytest.raises(Refused):
            parse_bs(bad)


def test_parse_skew():
    assert parse_skew("80:20") == (80, 20)
    for bad in ("80", "0:20", "80:100", "a:b"):
        with pytest.raises(Refused):
            parse_skew(bad)


def test_cumulative_rate_and_slices():
    assert cumulative([70, 20, 5, 5, 0]) == [700000, 900000, 950000, 1000000, 1000000]
    assert cumulative([50, 30, 20]) == [500000, 800000, 1000000]
    assert rate_interval(1000, 1) == 1_000_000 and rate_interval(20000, 2) == 100_000
    with pytest.raises(Refused):
        rate_interval(0, 1)
    # 1000 blocks, 2 jobs, 256-block largest I/O: 2 slices of 256 (whole I/Os), disjoint
    assert slices(100, 1100, 2, 256) == [(100, 256), (356, 256)]
    assert slices(0, 4096, 3, 8) == [(0, 1360), (1360, 1360), (2720, 1360)]
    with pytest.raises(Refused) as ei:
        slices(0, 100, 2, 64)
    assert ei.value.reason == "window-past-namespace-end"
    with pytest.raises(Refused):
        make_spec(mix="read", bs="4k", step=-1)


def test_token_bucket_exact():
    w = ffi.new("struct nv_wl *")
    assert lib.nv_wl_take(w, 1000, 5) == 5  # no cap: everything
    w.interval_ns, w.burst_ns, w.next_ns = 100, 300, 0
    # first look at t=1000: the bucket holds its burst (next moved to 700): 4 may go (700, 800, 900, 1000)
    assert lib.nv_wl_take(w, 1000, 10) == 4 and w.next_ns == 1100
    assert lib.nv_wl_take(w, 1050, 10) == 0 and w.next_ns == 1100  # ahead: none
    assert lib.nv_wl_take(w, 1100, 10) == 1 and w.next_ns == 1200
    assert lib.nv_wl_take(w, 1450, 2) == 2 and w.next_ns == 1400  # two of the 3.5 due
    assert lib.nv_wl_take(w, 1450, 0) == 0 and w.next_ns == 1400
    assert lib.nv_wl_take(w, 10_000, 100) == 4 and w.next_ns == 10_100  # idle long: the burst, no more


def test_crc32c_matches_the_package():
    rng = np.random.default_rng(3)
    for n in (0, 1, 7, 8, 9, 480, 4064):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert lib.nv_crc32c(data, n) == crc32c.crc32c(data), n


def _check(mem: np.ndarray, lba: int, vmap: np.ndarray, nonce: int, bs: int = 512) -> tuple[int, np.ndarray, int]:
    out = np.zeros(len(vmap), dtype=MISMATCH)
    checked = ffi.new("uint64_t *")
    bad = lib.nv_wl_check(ffi.cast("uint8_t *", mem.ctypes.data), bs, lba, len(vmap),
                          ffi.cast("struct nv_wl_vmap *", vmap.ctypes.data), lba, nonce,
                          ffi.cast("struct nv_wl_mismatch *", out.ctypes.data), len(out), checked)
    return int(bad), out[:bad], int(checked[0])


def test_stamp_header_layout_and_map_states():
    bs, nonce = 512, 0x1234
    mem = np.zeros(4 * bs, dtype=np.uint8)
    lib.nv_wl_stamp(ffi.cast("uint8_t *", mem.ctypes.data), bs, 100, 4, 77, nonce)
    hdr = mem[:32].view("<u4")
    # perf.py's VERIFY_HEADER: magic "NVVF", CRC32C of the rest of the block, LBA, generation, then the nonce
    assert hdr[0] == 0x4656564E and hdr[1] == crc32c.crc32c(mem[32:bs].tobytes())
    assert mem[8:32].view("<u8").tolist() == [100, 77, nonce]
    assert mem[bs + 8 : bs + 16].view("<u8")[0] == 101
    vmap = np.zeros(4, dtype=VMAP)
    vmap["gen"] = [77, NEVER, UNDEF, 77]
    assert _check(mem, 100, vmap, nonce)[::2] == (0, 2)  # never written / undefined: nothing to check
    vmap["gen"] = 78  # a later generation acknowledged: all four lost
    bad, rows, checked = _check(mem, 100, vmap, nonce)
    assert bad == 4 and checked == 4 and rows["lba"].tolist() == [100, 101, 102, 103]
    assert rows["want"].tolist() == [78] * 4 and rows["found_gen"].tolist() == [77] * 4
    vmap["pend"] = 77  # ...unless the write of 77 was in flight when the map was saved: old or new is right
    assert _check(mem, 100, vmap, nonce)[0] == 0
    vmap["pend"] = READING  # a read in flight says nothing about the content
    assert _check(mem, 100, vmap, nonce)[0] == 4
    vmap["pend"], vmap["gen"] = NEVER, 77
    assert _check(mem, 100, vmap, nonce + 1)[0] == 4  # another run's stamps
    assert _check(mem, 101, vmap, nonce)[0] == 4  # the LBA in the header is checked
    mem[bs + 200] ^= 1
    bad, rows, _ = _check(mem, 100, vmap, nonce)
    assert bad == 1 and rows["lba"][0] == 101 and rows["crc"][0] != rows["found_crc"][0]
    vmap["gen"] = ZERO
    assert _check(mem, 100, vmap, nonce)[0] == 4
    assert _check(np.zeros(4 * bs, dtype=np.uint8), 100, vmap, nonce)[::2] == (0, 4)
    assert GEN_FIRST > READING


def test_the_command_line_refuses_before_the_device():
    from click.testing import CliRunner

    from nvmevfio.cli import main

    r = CliRunner().invoke(main, ["perf", "zz:zz", "--mix", "read:50,write:20"])
    assert r.exit_code == 3 and "the shares add up to 70, not 100 [invalid-argument]" in r.stderr, r.stderr
    r = CliRunner().invoke(main, ["perf", "zz:zz", "--bs", "4k:50,16x:50"])
    assert r.exit_code == 3 and "--bs: size '16x'" in r.stderr, r.stderr
    r = CliRunner().invoke(main, ["perf", "zz:zz", "--mix", "read", "--socket", "/nowhere"])
    assert r.exit_code == 1 and "[unsupported-workload]" in r.stderr, r.stderr
    r = CliRunner().invoke(main, ["perf", "zz:zz", "--verify-only"])
    assert r.exit_code == 1 and "give --verify-map FILE" in r.stderr, r.stderr
    r = CliRunner().invoke(main, ["perf", "zz:zz", "--jobs", "2", "--queues", "3", "--mix", "read"])
    assert r.exit_code == 1 and "given twice differently" in r.stderr, r.stderr
