"""End-to-end protection, pure (nvmevfio/nvme/pi.py): CRC-16 T10-DIF against known values and an
independent bit-by-bit CRC, the tuple's big-endian layout, generation and checking per PI type."""

from __future__ import annotations

import numpy as np
import pytest

from nvmevfio.nvme import pi


def bitwise_crc(data: bytes) -> int:
    """CRC-16 T10-DIF one bit at a time (poly 8BB7h, init 0, MSB first, no final xor)."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8BB7 if crc & 0x8000 else crc << 1) & 0xFFFF
    return crc


def test_crc_known_values():
    assert pi.crc16_t10dif(b"123456789") == 0xD0DB  # the CRC catalogue's check value of CRC-16/T10-DIF
    assert pi.crc16_t10dif(bytes(512)) == 0  # zeros: a zero guard
    assert pi.crc16_t10dif(b"\xff" * 512) == 0xE6A1
    assert pi.crc16_t10dif(b"23456789", crc=pi.crc16_t10dif(b"1")) == 0xD0DB  # continued
    assert pi.crc16_t10dif(b"12345678") == 0x4423  # an even length (two bytes a step)


def test_crc_blocks_match_bitwise():
    rng = np.random.default_rng(7)
    for length in (1, 7, 8, 512, 520):
        rows = rng.integers(0, 256, (5, length), dtype=np.uint8)
        got = pi.crc16_blocks(rows)
        assert got.dtype == np.uint16
        assert got.tolist() == [bitwise_crc(r.tobytes()) for r in rows]


def test_tuple_layout_big_endian():
    raw = pi.pack_tuples([0x1234, 0xABCD], 0xBEEF, [0x01020304, 0xFFFFFFFF])
    assert raw.shape == (2, 8)
    assert raw[0].tobytes() == bytes.fromhex("1234 beef 01020304")
    assert raw[1].tobytes() == bytes.fromhex("abcd beef ffffffff")
    t = pi.unpack_tuples(raw)
    assert (t.guard.tolist(), t.apptag.tolist(), t.reftag.tolist()) == ([0x1234, 0xABCD], [0xBEEF] * 2,
                                                                        [0x01020304, 0xFFFFFFFF])


def test_prinfo_bits():
    assert pi.prinfo(True, pi.PRCHK_GUARD) == (1 << 29) | (1 << 28)
    assert pi.prinfo(False, pi.PRCHK_ALL) == 7 << 26
    assert pi.prinfo(False, pi.PRCHK_REFTAG) == 1 << 26


def test_generate_type1_last_eight_of_sixteen():
    """ms=16, tuple last: the guard covers data then metadata bytes 0..7; ref tags count up."""
    prot = pi.Protection(1, 16, first=False)
    data = np.arange(2 * 512, dtype=np.uint32).astype(np.uint8)
    user = np.arange(32, dtype=np.uint8)
    md = prot.generate(data, 512, 0xFFFFFFFF, apptag=0x55AA, metadata=user)
    rows = md.reshape(2, 16)
    assert rows[:, :8].tobytes() == user.reshape(2, 16)[:, :8].tobytes()  # the caller's bytes kept
    for i in range(2):
        guard = bitwise_crc(data[i * 512 : (i + 1) * 512].tobytes() + user[i * 16 : i * 16 + 8].tobytes())
        ref = (0xFFFFFFFF + i) & 0xFFFFFFFF  # wraps at 32 bits
        assert rows[i, 8:].tobytes() == guard.to_bytes(2, "big") + b"\x55\xaa" + ref.to_bytes(4, "big")
    assert prot.check(data, md, 0xFFFFFFFF, apptag=0x55AA) is None


def test_generate_first_and_type3():
    prot = pi.Protection(3, 8, first=True)
    data = np.full(3 * 512, 0xA5, dtype=np.uint8)
    md = prot.generate(data, 512, 77)
    t = prot.tuples(md)
    assert t.reftag.tolist() == [77, 77, 77]  # type 3: not incremented
    assert t.guard.tolist() == [bitwise_crc(b"\xa5" * 512)] * 3
    assert prot.offset == 0 and pi.Protection(1, 16).offset == 8


@pytest.mark.parametrize("pi_type", [1, 2, 3])
def test_check_names_the_first_bad_block(pi_type):
    prot = pi.Protection(pi_type, 8, first=True)
    data = np.random.default_rng(1).integers(0, 256, 4 * 512, dtype=np.uint8)
    md = prot.generate(data, 512, 100, apptag=0x1111)
    assert prot.check(data, md, 100, apptag=0x1111) is None
    bad = data.copy()
    bad[2 * 512 + 5] ^= 1
    m = prot.check(bad, md, 100, apptag=0x1111)
    assert m is not None and (m.block, m.check) == (2, "guard") and m.found == prot.tuples(md).guard[2]
    assert prot.check(bad, md, 100, pi.PRCHK_APPTAG | pi.PRCHK_REFTAG, apptag=0x1111) is None  # guard not asked
    m = prot.check(data, md, 100, apptag=0x2222)
    assert m is not None and (m.block, m.check, m.expected, m.found) == (0, "apptag", 0x2222, 0x1111)
    assert prot.check(data, md, 100, apptag=0x2211, appmask=0x00FF) is None  # the mask
    m = prot.check(data, md, 101, apptag=0x1111)
    if pi_type == 3:  # type 3: the reference tag is not checked
        assert m is None
    else:
        assert m is not None and (m.block, m.check, m.expected, m.found) == (0, "reftag", 101, 100)


def test_escape_turns_checks_off():
    prot = pi.Protection(1, 8, first=True)
    data = np.ones(512, dtype=np.uint8)
    md = np.full(8, 0xFF, dtype=np.uint8)  # a block never written: all ones
    assert prot.check(data, md, 5) is None
    t3 = pi.Protection(3, 8, first=True)
    md[4:] = 0  # type 3: the application tag alone is not enough
    assert t3.check(data, md, 0, pi.PRCHK_GUARD) is not None
