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


def bitwise_crc64(data: bytes) -> int:
    """CRC-64/NVME one bit at a time (poly AD93D23594C93659h reflected, init and final xor all ones)."""
    crc = (1 << 64) - 1
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x9A6C9329AC4BC9B5 if crc & 1 else crc >> 1
    return crc ^ ((1 << 64) - 1)


def test_crc64_nvme():
    assert pi.crc64_nvme(b"123456789") == 0xAE8B14860A799888  # the CRC catalogue's check value of CRC-64/NVME
    assert pi.crc64_nvme(b"56789", crc=pi.crc64_nvme(b"1234")) == 0xAE8B14860A799888  # continued
    rows = np.random.default_rng(3).integers(0, 256, (3, 520), dtype=np.uint8)
    assert pi.crc64_blocks(rows).tolist() == [bitwise_crc64(r.tobytes()) for r in rows]


def test_tuple64_layout_big_endian():
    raw = pi.pack_tuples(0x0102030405060708, 0xBEEF, 0x0000_A1A2A3A4A5A6, pi.PIF_64)
    assert raw.shape == (1, 16)
    assert raw[0].tobytes() == bytes.fromhex("0102030405060708 beef a1a2a3a4a5a6")
    t = pi.unpack_tuples(raw, pi.PIF_64)
    assert (int(t.guard[0]), int(t.apptag[0]), int(t.reftag[0])) == (0x0102030405060708, 0xBEEF, 0xA1A2A3A4A5A6)


def test_generate_and_check_64bit_guard():
    """PIF 2, 16 bytes of metadata, tuple last: it fills the whole metadata; ref tags are 48 bits."""
    prot = pi.Protection(1, 16, first=False, pif=pi.PIF_64)
    assert (prot.tuple_bytes, prot.offset, prot.reftag_mask) == (16, 0, (1 << 48) - 1)
    data = np.random.default_rng(4).integers(0, 256, 2 * 512, dtype=np.uint8)
    md = prot.generate(data, 512, (1 << 48) - 1, apptag=0x0102)
    rows = md.reshape(2, 16)
    for i in range(2):
        guard = bitwise_crc64(data[i * 512 : (i + 1) * 512].tobytes())
        ref = ((1 << 48) - 1 + i) & ((1 << 48) - 1)  # wraps at 48 bits
        assert rows[i].tobytes() == guard.to_bytes(8, "big") + b"\x01\x02" + ref.to_bytes(6, "big")
    assert prot.check(data, md, (1 << 48) - 1, apptag=0x0102) is None
    data[600] ^= 0x80
    m = prot.check(data, md, (1 << 48) - 1, apptag=0x0102)
    assert m is not None and (m.block, m.check) == (1, "guard")
    ms32 = pi.Protection(1, 32, first=False, pif=pi.PIF_64)  # 16 bytes before the tuple: in the guard
    user = np.arange(2 * 32, dtype=np.uint8)
    md = ms32.generate(data, 512, 0, metadata=user)
    guard0 = bitwise_crc64(data[:512].tobytes() + user[:16].tobytes())
    assert md[16:24].tobytes() == guard0.to_bytes(8, "big")


def test_elbaf_pif():
    """NVM Command Set Identify Namespace: ELBAF n at byte 12 + 4n, PIF bits 8:7 (QEMU: (pif & 3) << 7)."""
    from nvmevfio.nvme import structures

    raw = bytearray(4096)
    raw[12 + 4 * 9 : 12 + 4 * 10] = (2 << 7).to_bytes(4, "little")
    raw[12 : 16] = (0x7F | (1 << 7)).to_bytes(4, "little")  # STS 6:0 set too: not the PIF
    assert [structures.elbaf_pif(bytes(raw), i) for i in (0, 1, 9)] == [1, 0, 2]
    with pytest.raises(ValueError):
        structures.elbaf_pif(bytes(20), 9)
