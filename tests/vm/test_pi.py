"""End-to-end protection on QEMU's model: data and metadata written and read back for PI types
1, 2 and 3, PRACT 0 and 1, separate and extended metadata; the controller's End-to-end Guard,
Application Tag and Reference Tag Check Errors on write and on read, named; the kernel nvme
driver (block integrity) reads what nvmevfio wrote, and nvmevfio reads what the kernel wrote."""

import subprocess

import numpy as np
import pytest
from cli_runner import nv
from conftest import kernel_blockdev, kernel_write

from nvmevfio import pci
from nvmevfio.errors import CommandError, Refused
from nvmevfio.nvme import pi
from nvmevfio.provider import open_controller

BS = 512
# The round trips and passthrough depend on the lane (MPTR is a device address: physical in the
# no-IOMMU lane); the rest builds the same commands in every lane, and the kernel cross-check needs
# block integrity (CONFIG_BLK_DEV_INTEGRITY), which Debian's kernel (type1) has and the custom one lacks.
TYPE1_ONLY = pytest.mark.lanes("type1", why="the same commands and statuses in every lane; the kernel "
                               "cross-check needs Debian's kernel (block integrity)")
GUARD_ERROR, APPTAG_ERROR, REFTAG_ERROR = 0x82, 0x83, 0x84  # SCT 2 (Media and Data Integrity Errors)


@pytest.fixture
def session(pi_ctrl):
    with open_controller(pi_ctrl["address"]) as s:
        s.enable()
        s.create_io_queues(1, 16)
        s.refresh_namespaces()
        yield s


def payload(seed: int, blocks: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, blocks * BS, dtype=np.uint8)


def protection(s, nsid: int) -> pi.Protection:
    prot = s.namespace(nsid, metadata=True).protection
    assert prot is not None
    return prot


def expect_status(sc: int, fn, *a, **kw) -> CommandError:
    with pytest.raises(CommandError) as ei:
        fn(*a, **kw)
    e = ei.value
    assert (e.sct, e.sc) == (2, sc), str(e)
    assert e.sc_name == {GUARD_ERROR: "End-to-end Guard Check Error",
                         APPTAG_ERROR: "End-to-end Application Tag Check Error",
                         REFTAG_ERROR: "End-to-end Reference Tag Check Error"}[sc]
    assert e.sc_name in str(e)
    return e


def round_trip(s, nsid: int, slba: int, blocks: int, pract: bool, seed: int, reftag: int | None = None) -> None:
    """Write with every check on (PRACT 0: the host's tuples; PRACT 1: the controller's), read back
    data and metadata with every check on, and check the tuples here too."""
    prot = protection(s, nsid)
    checks = pi.PRCHK_ALL if prot.pi_type != 3 else pi.PRCHK_GUARD | pi.PRCHK_APPTAG  # type 3: no reference tag check
    data = payload(seed, blocks)
    ref = slba if reftag is None else reftag
    user = np.random.default_rng(seed + 1).integers(0, 256, blocks * prot.metadata_size, dtype=np.uint8)
    md = prot.generate(data, BS, ref, apptag=0x5A5A, metadata=user)
    if pract:
        extra = {"metadata": user} if prot.metadata_size > prot.tuple_bytes else {}
        assert s.write(nsid, slba, data, pract=True, prchk=checks, reftag=ref, apptag=0x5A5A, **extra) == blocks
    else:
        assert s.write(nsid, slba, data, metadata=md, prchk=checks, reftag=ref, apptag=0x5A5A,
                       appmask=0xFFFF) == blocks
    got, got_md = s.read(nsid, slba, blocks, metadata=True, prchk=checks, reftag=ref, apptag=0x5A5A,
                         appmask=0xFFFF)
    assert got.tobytes() == data.tobytes()
    assert got_md.tobytes() == md.tobytes()  # PRACT 1: the controller's guard is our CRC, tags as asked
    assert prot.check(got, got_md, ref, apptag=0x5A5A) is None
    if pract and prot.metadata_size == prot.tuple_bytes:  # checked and stripped by the controller: data alone
        assert s.read(nsid, slba, blocks, pract=True, prchk=checks, reftag=ref, apptag=0x5A5A).tobytes() \
            == data.tobytes()


@pytest.mark.parametrize("pract", [False, True], ids=["pract0", "pract1"])
@pytest.mark.parametrize("nsid", [1, 2, 3, 5], ids=["type1-extended", "type1-separate", "type3-ms16-first",
                                                    "type1-64bit-guard"])
def test_pi_round_trip(session, nsid, pract):
    assert session.namespace(nsid, metadata=True).extended_lba == (nsid == 1)
    assert protection(session, nsid).pif == (pi.PIF_64 if nsid == 5 else pi.PIF_16)  # Identify CNS 05h's ELBAF
    round_trip(session, nsid, 8 + 40 * pract, 5, pract, seed=nsid * 10 + pract)
    round_trip(session, nsid, 1000, 1, pract, seed=99)
    # more than one command (MDTS, QEMU's default 512 KiB): the reference tags carry on across them
    round_trip(session, nsid, 4000 + 4000 * pract, 2500, pract, seed=7)


@TYPE1_ONLY
@pytest.mark.parametrize("pi_type", [2, 3, 1])
def test_pi_format_types_at_runtime(pi_ctrl, pi_type):
    """Format NVM with PI type 2/3/1 (LBA format 1: 512 + 8); type 2 takes its reference tags from
    the command's EILBRT, not the LBA."""
    with open_controller(pi_ctrl["address"]) as s:
        s.enable()
        s.format_nvm(4, 1, pi=pi_type)
    with open_controller(pi_ctrl["address"]) as s:
        s.enable()
        s.create_io_queues(1, 16)
        s.refresh_namespaces()
        ns = s.namespace(4, metadata=True)
        assert (ns.protection.pi_type, ns.metadata_size, ns.lba_format) == (pi_type, 8, 1)
        for pract in (False, True):
            round_trip(s, 4, 16 + 8 * pract, 4, pract, seed=pi_type, reftag=0xABCD0000 if pi_type != 1 else None)


@TYPE1_ONLY
@pytest.mark.parametrize("nsid", [1, 2, 5])
def test_pi_bad_guard_refused_on_write_and_on_read(session, nsid):
    prot = protection(session, nsid)
    data = payload(5, 2)
    md = prot.generate(data, BS, 300)
    bad = md.copy()
    bad[prot.offset + prot.metadata_size + 1] ^= 0x01  # block 1's guard (its low byte: 16-bit or 64-bit)
    e = expect_status(GUARD_ERROR, session.write, nsid, 300, data, metadata=bad, prchk=pi.PRCHK_GUARD)
    assert e.context["slba"] == 300
    # written raw (no checks asked), it is the read's check that fails
    session.write(nsid, 300, data, metadata=bad, prchk=0)
    expect_status(GUARD_ERROR, session.read, nsid, 300, 2, prchk=pi.PRCHK_GUARD)
    got, got_md = session.read(nsid, 300, 2, metadata=True, prchk=0)  # unchecked: the bad tuple as written
    assert got.tobytes() == data.tobytes() and got_md.tobytes() == bad.tobytes()
    assert prot.check(got, got_md, 300).check == "guard"


@TYPE1_ONLY
def test_pi_apptag_and_reftag_errors(session):
    nsid = 2
    prot = protection(session, nsid)
    data = payload(6, 3)
    md = prot.generate(data, BS, 400, apptag=0x1234)
    session.write(nsid, 400, data, metadata=md, prchk=pi.PRCHK_ALL, apptag=0x1234, appmask=0xFFFF)
    expect_status(APPTAG_ERROR, session.read, nsid, 400, 3, prchk=pi.PRCHK_APPTAG, apptag=0x4321, appmask=0xFFFF)
    session.read(nsid, 400, 3, prchk=pi.PRCHK_APPTAG, apptag=0x4321, appmask=0x0000)  # masked out
    expect_status(APPTAG_ERROR, session.write, nsid, 400, data, metadata=md, prchk=pi.PRCHK_APPTAG, apptag=0x1,
                  appmask=0xFFFF)
    wrong_ref = prot.generate(data, BS, 7, apptag=0x1234)  # tuples counting from 7, not from the LBA
    expect_status(REFTAG_ERROR, session.write, nsid, 400, data, metadata=wrong_ref, prchk=pi.PRCHK_REFTAG)
    session.write(nsid, 400, data, metadata=wrong_ref, prchk=0)
    expect_status(REFTAG_ERROR, session.read, nsid, 400, 3, prchk=pi.PRCHK_REFTAG)


@TYPE1_ONLY
def test_pi_refusals_before_the_device(session):
    with pytest.raises(Refused) as ei:
        session.write(2, 0, bytes(BS))  # no metadata, no PRACT
    assert ei.value.reason == "metadata-required"
    with pytest.raises(Refused) as ei:
        session.write(3, 0, bytes(BS), pract=True)  # 16 bytes: 8 beside the tuple are the caller's
    assert ei.value.reason == "metadata-required"
    with pytest.raises(Refused) as ei:
        session.read(3, 0, 1, prchk=pi.PRCHK_REFTAG)  # type 3 has no reference tag check (QEMU: Invalid PI)
    assert ei.value.reason == "invalid-argument"
    with pytest.raises(Refused) as ei:
        session.write(2, 0, bytes(2 * BS), metadata=bytes(8))
    assert ei.value.reason == "length-mismatch"
    buf = session.alloc_buffer(4096)
    with pytest.raises(Refused) as ei:
        session.read_into(2, 0, 1, buf)  # the data-only path
    assert ei.value.reason == "unsupported-lba-format"


def test_pi_passthru_with_metadata(session):
    """io-passthru: the caller's metadata through the broker's buffer, MPTR the broker's; without it,
    a data command on a separate-metadata namespace is refused before the device."""
    prot = protection(session, 2)
    data = payload(51, 2)
    md = prot.generate(data, BS, 500)
    session.write(2, 500, data, metadata=md)
    got_md = bytearray(16)
    _, got = session.io_passthru(0x02, nsid=2, data_len=2 * BS, metadata=got_md, cdw10=500, cdw12=1 | (7 << 26),
                                 cdw14=500)
    assert got == data.tobytes() and bytes(got_md) == md.tobytes()
    bad = md.copy()
    bad[8] ^= 1  # block 1's guard
    with pytest.raises(CommandError) as ei:
        session.io_passthru(0x01, nsid=2, data=data.tobytes(), metadata=bad.tobytes(), cdw10=500, cdw12=1 | (4 << 26))
    assert (ei.value.sct, ei.value.sc) == (2, GUARD_ERROR)
    with pytest.raises(Refused) as ei:
        session.io_passthru(0x02, nsid=2, data_len=BS, cdw10=500)
    assert ei.value.reason == "metadata-required"


@TYPE1_ONLY
def test_pi_cli_io_passthru_metadata(pi_ctrl, io_dir):
    addr = pi_ctrl["address"]
    data = payload(52, 2)
    (io_dir / "pt.bin").write_bytes(data.tobytes())
    nv("write", addr, "-n", 2, "-s", 600, "-c", 1, "-d", io_dir / "pt.bin", "--prinfo", 8)  # the controller's PI
    r = nv("io-passthru", addr, "-n", 2, "--opcode", 0x02, "--cdw10", 600, "--cdw12", 1, "--data-len", 2 * BS,
           "--metadata-len", 16, "-M", io_dir / "pt.md", "--read", "-b")
    assert r.stdout == data.tobytes()
    md = np.frombuffer((io_dir / "pt.md").read_bytes(), dtype=np.uint8)
    assert len(md) == 16 and pi.Protection(1, 8, first=True).check(data, md, 600, appmask=0) is None
    r = nv("io-passthru", addr, "-n", 2, "--opcode", 0x02, "--cdw10", 600, "--data-len", BS, "--read", check=False)
    assert r.returncode == 1 and b"[metadata-required]" in r.stderr, r.stderr


@TYPE1_ONLY
def test_pi_cli_format_then_io(pi_ctrl, io_dir):
    """nvme-cli's options: format --lbaf 1 (512 + 8) --pi 1 --ms 1 (MSET: extended LBA), then write
    and read with --prinfo, -M and the tags; a bad guard is the command's named status, exit 1."""
    addr = pi_ctrl["address"]
    r = nv("format", addr, "-n", 4, "--lbaf", 1, "--pi", 1, "--ms", 1, "--force")
    assert r.stderr.decode().strip().splitlines()[-1] == (
        "namespace 4: 16131 blocks of 512 bytes + 8 bytes of metadata (extended LBA, PI type 1, the tuple last)")
    data = payload(41, 3)
    src, dst, md_file = io_dir / "pi-in.bin", io_dir / "pi-out.bin", io_dir / "pi-out.md"
    src.write_bytes(data.tobytes())
    r = nv("write", addr, "-n", 4, "-s", 8, "-c", 2, "-d", src, "--prinfo", 8 | 7)  # PRACT: the controller's PI
    assert r.stderr.decode().strip() == "write: Success"
    nv("read", addr, "-n", 4, "-s", 8, "-c", 2, "-d", dst, "-M", md_file, "--prinfo", 7)
    assert dst.read_bytes() == data.tobytes()
    md = np.frombuffer(md_file.read_bytes(), dtype=np.uint8)
    assert len(md) == 24 and pi.Protection(1, 8).check(data, md, 8, apptag=0, appmask=0xFFFF) is None
    # our own tuples from a file, checked by the controller; then one with a bad guard
    good = pi.Protection(1, 8).generate(data, BS, 100, apptag=0x77)
    (io_dir / "pi-good.md").write_bytes(good.tobytes())
    nv("write", addr, "-n", 4, "-s", 100, "-c", 2, "-d", src, "-M", io_dir / "pi-good.md", "--prinfo", 7,
       "--app-tag", 0x77, "--app-tag-mask", 0xFFFF)
    bad = good.copy()
    bad[1] ^= 1
    (io_dir / "pi-bad.md").write_bytes(bad.tobytes())
    r = nv("write", addr, "-n", 4, "-s", 200, "-c", 2, "-d", src, "-M", io_dir / "pi-bad.md", "--prinfo", 4,
           check=False)
    assert r.returncode == 1 and "End-to-end Guard Check Error" in r.stderr.decode(), r.stderr
    r = nv("read", addr, "-n", 4, "-s", 100, "-c", 2, "-d", dst, "--prinfo", 2, "--app-tag", 0x78, "-m", 0xFFFF,
           check=False)
    assert r.returncode == 1 and "End-to-end Application Tag Check Error" in r.stderr.decode(), r.stderr
    r = nv("write", addr, "-n", 4, "-s", 8, "-d", src, check=False)  # no metadata, no PRACT
    assert r.returncode == 1 and "[metadata-required]" in r.stderr.decode(), r.stderr


@TYPE1_ONLY
def test_pi_kernel_cross_check(pi_ctrl, io_dir):
    """Namespace 2 (type 1, separate metadata): the kernel's block integrity generates and checks
    the tuples; what each side wrote, the other reads, and a bad guard is the kernel's EIO."""
    addr = pi_ctrl["address"]
    ours = payload(31, 64)
    with open_controller(addr) as s:
        s.enable()
        s.create_io_queues(1, 16)
        s.refresh_namespaces()
        s.write(2, 2048, ours, pract=True)  # the controller's tuples
        prot = protection(s, 2)
        good = payload(32, 1)
        md = prot.generate(good, BS, 2200)
        s.write(2, 2200, good, metadata=md)  # our tuples
        bad = md.copy()
        bad[0] ^= 0xFF
        s.write(2, 2300, good, metadata=bad)  # a bad guard, unchecked on the way in
        s.flush(2)
    bdev = kernel_blockdev(addr, 2)
    try:
        def dd(skip: int, count: int) -> subprocess.CompletedProcess:
            return subprocess.run(["dd", f"if={bdev}", "bs=512", f"skip={skip}", f"count={count}", "iflag=direct",
                                   "status=none"], capture_output=True)
        r = dd(2048, 64)
        assert r.returncode == 0 and r.stdout == ours.tobytes(), r.stderr
        r = dd(2200, 1)
        assert r.returncode == 0 and r.stdout == good.tobytes(), r.stderr
        r = dd(2300, 1)
        # the kernel's End-to-end Guard Check Error: BLK_STS_PROTECTION, EILSEQ (not a plain EIO)
        assert r.returncode != 0 and b"Invalid or incomplete multibyte" in r.stderr, (r.returncode, r.stderr)
        theirs = payload(33, 32).tobytes()
        kernel_write(bdev, theirs, 3000, io_dir / "kernel-pi-write.bin")  # the kernel generates the tuples
    finally:
        pci.bind(addr, force=True)
    with open_controller(addr) as s:
        s.enable()
        s.create_io_queues(1, 16)
        s.refresh_namespaces()
        got, md = s.read(2, 3000, 32, metadata=True, prchk=pi.PRCHK_ALL)
        assert got.tobytes() == theirs
        assert protection(s, 2).check(got, md, 3000, apptag=0, appmask=0) is None  # the kernel's tuples, verified
