"""nvme-cli's fields of the NVM I/O commands (LR, FUA, PRINFO, STC, DTYPE/DSPEC, the DSM hints, the
protection tags): the command builders.nvm_io builds, and the command each nvme-cli command line
sends (through a recording provider: the exact dwords), with the refusals before the device."""

from __future__ import annotations

import contextlib

import pytest
from click.testing import CliRunner

from nvmevfio.cli import main
from nvmevfio.nvme import builders
from nvmevfio.nvme.builders import FieldOutOfRange


def test_nvm_io_fields_exact():
    """CDW12 LR 31, FUA 30, PRINFO 29:26, STC 24, DTYPE 23:20, NLB 15:0; CDW13 DSPEC 31:16, DSM 7:0;
    CDW14 EILBRT; CDW15 LBATM 31:16, LBAT 15:0 (NVM Command Set 1.0, 3.2.4; libnvme's nvme_io)."""
    c = builders.nvm_io(0x01, 1, 0x1_0000_0010, 8, lr=True, fua=True, prinfo=0xF, stc=True, dtype=2, dspec=0x1234,
                        dsm=0x87, reftag=0xDEAD_BEEF, apptag=0xBEEF, appmask=0xFF00, command="Write")
    assert (c.opc, c.nsid, c.cdw10, c.cdw11) == (0x01, 1, 0x10, 1)
    assert c.cdw12 == (1 << 31) | (1 << 30) | (0xF << 26) | (1 << 24) | (2 << 20) | 7 == 0xFD20_0007
    assert (c.cdw13, c.cdw14, c.cdw15) == (0x1234_0087, 0xDEAD_BEEF, 0xFF00_BEEF)
    c = builders.nvm_io(0x08, 3, 0, 65536, cdw12=1 << 25)  # Write Zeroes' DEAC through cdw12
    assert (c.cdw12, c.cdw13, c.cdw14, c.cdw15) == (0x0200_FFFF, 0, 0, 0)
    for field, kw in (("DTYPE", {"dtype": 16}), ("DSPEC", {"dspec": 1 << 16}), ("DSM", {"dsm": 256}),
                      ("PRINFO", {"prinfo": 16}), ("EILBRT", {"reftag": 1 << 32}), ("LBAT", {"apptag": -1}),
                      ("NLB", {"nlb": 65537})):
        args = {"nlb": 1, **kw}
        with pytest.raises(FieldOutOfRange) as ei:
            builders.nvm_io(0x02, 1, 0, args.pop("nlb"), **args)
        assert ei.value.field == field and ei.value.reason == "invalid-argument"


class _Provider:
    def __init__(self, oacs: int) -> None:
        self.id_ctrl = {"oacs": oacs}
        self.sent: list[tuple[int, dict]] = []

    def io_passthru(self, opcode, *, nsid, data=None, data_len=0, metadata=None, **cdws):
        self.sent.append((opcode, {"nsid": nsid, "data": data, "data_len": data_len, **cdws}))
        return 0, bytes(range(256)) * (data_len // 256) if data_len else None

    def verify(self, *a):
        self.sent.append((0x0C, {"verb": a}))


class _Dev:
    block_size, metadata_size, protection, nsid = 512, 0, None, 1

    def __init__(self, oacs: int) -> None:
        self.provider = _Provider(oacs)
        self.windows: list[tuple[int, int]] = []
        self.zeroed: list[tuple[int, int]] = []

    def check_window(self, slba, count):
        self.windows.append((slba, count))

    def write_zeroes(self, slba, count):
        self.zeroed.append((slba, count))


@pytest.fixture
def dev(monkeypatch):
    from nvmevfio.cli import data

    holder = {"dev": _Dev(0)}

    @contextlib.contextmanager
    def fake(address, nsid, socket_path=None, **kw):
        holder["dev"].nsid = nsid
        yield holder["dev"]

    monkeypatch.setattr(data, "blockdev", fake)
    return holder


def _run(args, tmp_path):
    r = CliRunner().invoke(main, [a.replace("$T", str(tmp_path)) for a in args])
    return r


def test_write_with_lr_fua_and_the_dsm_hint_is_one_command(dev, tmp_path):
    (tmp_path / "d").write_bytes(b"\x5a" * 1000)
    r = _run(["write", "00:04.0", "-s", "0x10", "-c", "1", "-z", "1024", "-d", "$T/d", "-l", "-f", "-D", "0x7",
              "--force"], tmp_path)
    assert r.exit_code == 0 and "write: Success" in r.stderr, r.output
    ((opc, sent),) = dev["dev"].provider.sent
    assert opc == 0x01 and sent["data"] == b"\x5a" * 1000 + bytes(24) and dev["dev"].windows == [(0x10, 2)]
    assert {k: sent[k] for k in ("nsid", "cdw10", "cdw11", "cdw12", "cdw13", "cdw14", "cdw15")} == {
        "nsid": 1, "cdw10": 0x10, "cdw11": 0, "cdw12": 0xC000_0001, "cdw13": 7, "cdw14": 0, "cdw15": 0}


def test_read_with_stc_and_a_directive(dev, tmp_path):
    dev["dev"] = _Dev(oacs=1 << 5)
    r = _run(["read", "00:04.0", "-n", "2", "-s", "0", "-c", "0", "-z", "256", "-d", "$T/o", "-C", "-T", "1",
              "-S", "0x3"], tmp_path)
    assert r.exit_code == 0, r.output
    ((opc, sent),) = dev["dev"].provider.sent
    assert (opc, sent["nsid"], sent["data_len"], sent["cdw12"], sent["cdw13"]) == (0x02, 2, 512, 0x0110_0000, 0x3_0000)
    assert (tmp_path / "o").read_bytes() == bytes(range(256))  # --data-size bytes of the block


@pytest.mark.parametrize(("args", "reason"), [
    (["read", "00:04.0", "-c", "0", "-z", "512", "-T", "1"], "[directives-unsupported]"),
    (["write", "00:04.0", "-c", "0", "-d", "/dev/null", "--dir-spec", "1"], "[directives-unsupported]"),
    (["read", "00:04.0", "-c", "0", "-g", "1"], "[storage-tag-unsupported]"),
    (["verify", "00:04.0", "-S", "0x10"], "[storage-tag-unsupported]"),
])
def test_what_the_controller_cannot_take_is_refused_by_name_exit_1(dev, tmp_path, args, reason):
    r = _run(args, tmp_path)
    assert r.exit_code == 1 and reason in r.stderr and r.stderr.count("\n") == 1, r.output
    assert dev["dev"].provider.sent == []  # nothing sent


def test_a_directive_type_past_15_is_a_usage_error(dev, tmp_path):
    r = _run(["read", "00:04.0", "-T", "16"], tmp_path)  # nvme-cli: "Invalid directive type", exit 1
    assert r.exit_code == 1 and dev["dev"].provider.sent == []


def test_verify_and_write_zeroes_with_protection_and_fua(dev, tmp_path):
    r = _run(["verify", "00:04.0", "-s", "8", "-c", "3", "-p", "7", "-r", "0x100", "-a", "0xbeef", "-m", "0xffff"],
             tmp_path)
    assert r.exit_code == 0, r.output
    r = _run(["write-zeroes", "00:04.0", "-s", "8", "-c", "3", "-d", "-f", "-l"], tmp_path)
    assert r.exit_code == 0, r.output
    (v_opc, v), (z_opc, z) = dev["dev"].provider.sent
    assert (v_opc, v["cdw10"], v["cdw12"], v["cdw14"], v["cdw15"]) == (0x0C, 8, (7 << 26) | 3, 0x100, 0xFFFF_BEEF)
    assert (z_opc, z["cdw12"], z["cdw13"]) == (0x08, (1 << 31) | (1 << 30) | (1 << 25) | 3, 0)
    r = _run(["write-zeroes", "00:04.0", "-s", "8", "-c", "3"], tmp_path)  # no fields: the block device's verb
    r2 = _run(["verify", "00:04.0", "-s", "8", "-c", "3"], tmp_path)
    assert r.exit_code == r2.exit_code == 0 and dev["dev"].zeroed == [(8, 4)]
    assert dev["dev"].provider.sent[-1] == (0x0C, {"verb": (1, 8, 4)})


def test_compare_with_fua_sends_the_file(dev, tmp_path):
    (tmp_path / "d").write_bytes(b"\x11" * 512)
    r = _run(["compare", "00:04.0", "-s", "4", "-c", "1", "-z", "512", "-d", "$T/d", "-f"], tmp_path)
    assert r.exit_code == 0, r.output
    ((opc, sent),) = dev["dev"].provider.sent
    assert (opc, sent["data"], sent["cdw10"], sent["cdw12"]) == (0x05, b"\x11" * 512 + bytes(512), 4, 0x4000_0001)


def test_id_ns_text_lists_the_formats_past_nlbaf(capsys):
    """nvme-cli 2.3 prints LBA formats 0..NLBAF+NULBAF in text and -H (its JSON stops at NLBAF)."""
    from nvmevfio.cli.identify import _print_id_ns, lba_formats
    from nvmevfio.nvme import structures

    raw = bytearray(4096)
    raw[25], raw[26], raw[82] = 1, 0x01, 2  # NLBAF 1 (two formats), FLBAS 1, NULBAF 2 (byte 82, NVM 1.1)
    for i, (ms, ds, rp) in enumerate(((0, 9, 0), (8, 9, 1), (16, 12, 2), (64, 12, 3))):
        raw[128 + 4 * i : 132 + 4 * i] = (ms | ds << 16 | rp << 24).to_bytes(4, "little")
    n = structures.parse_identify_namespace(bytes(raw))
    assert len(n["lbafs"]) == 2 and n["nulbaf"] == 2
    assert lba_formats(n, bytes(raw))[3] == {"ms": 64, "ds": 12, "rp": 3} and lba_formats(n, None) == n["lbafs"]
    _print_id_ns(1, n, False, bytes(raw))
    lines = capsys.readouterr().out.splitlines()
    assert lines[-4:] == ["lbaf  0 : ms:0   lbads:9  rp:0 ", "lbaf  1 : ms:8   lbads:9  rp:0x1 (in use)",
                          "lbaf  2 : ms:16  lbads:12 rp:0x2 ", "lbaf  3 : ms:64  lbads:12 rp:0x3 "]
    _print_id_ns(1, n, True, bytes(raw))
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == ("LBA Format  3 : Metadata Size: 64  bytes - Data Size: 4096 bytes - Relative Performance: "
                         "0x3 Degraded ")


def test_copy_dwords_and_range_tags_exact():
    """Copy CDW12: NR 7:0, format 11:8, PRINFOR 15:12, DTYPE 23:20, PRINFOW 29:26, FUA 30, LR 31; CDW13 DSPEC;
    CDW14 ILBRT; CDW15 LBATM:LBAT. A format 0 range: EILBRT at byte 24, ELBAT 28, ELBATM 30 (NVM 3.2.2)."""
    from nvmevfio.cli.data import copy_dwords, copy_ranges

    assert copy_dwords(0x1_0000_0200, 2, lr=True, fua=True, prinfor=0x5, prinfow=0xA, dtype=2, dspec=0x77,
                       ilbrt=0x1234, lbat=0xBEEF, lbatm=0xF0F0) == {
        "cdw3": 0, "cdw10": 0x200, "cdw11": 1, "cdw12": (1 << 31) | (1 << 30) | (0xA << 26) | (2 << 20) | (5 << 12) | 1,
        "cdw13": 0x77 << 16, "cdw14": 0x1234, "cdw15": 0xF0F0_BEEF}
    d = copy_dwords(0, 1, ilbrt=0x11_2233_4455, fmt=1)  # format 1: CDW12 11:8, a 64-bit ILBRT's high dword in CDW3
    assert (d["cdw3"], d["cdw12"], d["cdw14"]) == (0x11, 1 << 8, 0x2233_4455)
    r1 = copy_ranges([10], [3], mssrl=128, mcl=128, msrc=127, eilbrts=(0x0102_0304_0506,), elbats=(0x11,),
                     elbatms=(0x22,), fmt=1)
    assert len(r1) == 40 and r1[26:36] == bytes(4) + bytes([1, 2, 3, 4, 5, 6]) and r1[36:40] == b"\x11\0\x22\0"
    r = copy_ranges([10, 20], [3, 0], mssrl=128, mcl=128, msrc=127, eilbrts=(0xA1B2C3D4,), elbats=(0x11, 0x22),
                    elbatms=(0xFFFF,))
    assert r[24:28] == (0xA1B2C3D4).to_bytes(4, "little") and r[28:30] == b"\x11\x00" and r[30:32] == b"\xff\xff"
    assert r[32 + 24 : 32 + 28] == bytes(4) and r[32 + 28 : 32 + 30] == b"\x22\x00" and r[32 + 30 :] == bytes(2)


def test_create_ns_host_fields_and_si_sizes(monkeypatch):
    """create-ns with nvme-cli's fields: the host's Identify Namespace structure, CSI in CDW11 31:24, the
    format found by --block-size, --nsze-si in bytes over the format's block (data + metadata)."""
    from nvmevfio.cli import admin
    from nvmevfio.cli.admin import ns_management_host, si_blocks

    assert si_blocks("1G", 4096) == 244140 and si_blocks("2048", 4096) == 2048 and si_blocks("1.5k", 512) == 2
    with pytest.raises(ValueError, match="'1x'"):
        si_blocks("1x", 512)
    h = ns_management_host(0x1000, 0x800, 2, dps=1, nmic=1, anagrpid=7, nvmsetid=3, lbstm=0xFF)
    assert (h[0:8], h[8:16], h[26], h[29], h[30]) == ((0x1000).to_bytes(8, "little"), (0x800).to_bytes(8, "little"),
                                                      2, 1, 1)
    assert (h[92:96], h[100:102], h[384:392], len(h)) == (b"\x07\0\0\0", b"\x03\0", b"\xff" + bytes(7), 4096)

    ident = bytearray(4096)
    ident[25] = 2  # three formats: 512+0, 512+8, 4096+0
    for i, (ms, ds) in enumerate(((0, 9), (8, 9), (0, 12))):
        ident[128 + 4 * i : 132 + 4 * i] = (ms | ds << 16).to_bytes(4, "little")

    class Session:
        id_ctrl = {"oacs": 0x0A}
        sent: list = []

        def admin_passthru(self, opcode, *, nsid=0, data=None, data_len=0, timeout_s=None, **cdws):
            self.sent.append((opcode, nsid, data, data_len, timeout_s, cdws))
            return (5, None) if opcode == 0x0D else (0, bytes(ident))

    s = Session()
    monkeypatch.setattr(admin, "controller", lambda address: contextlib.nullcontext(s))
    r = CliRunner().invoke(main, ["create-ns", "00:04.0", "-S", "1M", "-C", "1M", "-b", "4096", "-y", "2", "-t",
                                  "5000"])
    assert r.exit_code == 0 and r.stdout == "create-ns: Success, created nsid:5\n", r.output
    (id_op, id_nsid, *_), (op, _, host, _, timeout_s, cdws) = s.sent
    assert (id_op, id_nsid) == (0x06, 0xFFFFFFFF)  # the common namespace: OACS has Namespace Management
    assert (op, cdws, timeout_s) == (0x0D, {"cdw10": 0, "cdw11": 2 << 24}, 5.0)
    assert host == ns_management_host(244, 244, 2)  # 1,000,000 bytes over 4096-byte blocks, format 2
    r = CliRunner().invoke(main, ["create-ns", "00:04.0", "-s", "8", "-c", "8"])  # nvme-cli: -f or -b needed
    assert r.exit_code == 1 and "--flbas" in r.stderr
    r = CliRunner().invoke(main, ["create-ns", "00:04.0", "-s", "8", "-c", "8", "-f", "1", "-b", "512"])
    assert r.exit_code == 1 and "not both" in r.stderr and len(s.sent) == 2  # nothing more sent


def test_set_feature_with_a_uuid_index_goes_through_the_passthrough(monkeypatch):
    from nvmevfio.cli import logs

    class Session:
        sent: list = []

        def admin_passthru(self, opcode, **kw):
            self.sent.append((opcode, kw))
            return 0, None

    s = Session()
    monkeypatch.setattr(logs, "controller", lambda address: contextlib.nullcontext(s))
    r = CliRunner().invoke(main, ["set-feature", "00:04.0", "-f", "0x04", "-v", "0x150", "-U", "3", "-s"])
    assert r.exit_code == 0, r.output
    assert s.sent == [(0x09, {"nsid": 0, "data": None, "cdw10": 0x8000_0004, "cdw11": 0x150, "cdw12": 0,
                              "cdw14": 3})]


def test_fw_download_as_nvme_cli(monkeypatch, tmp_path):
    """--offset in dwords (the image from there), --xfer rounded to 4096, progress lines, three tries unless
    DNR, Overlapping Range ignored with --ignore-ovr."""
    from nvmevfio.cli import admin
    from nvmevfio.errors import CommandError

    class Session:
        def __init__(self, fail=None):
            self.sent, self.fail = [], fail

        def firmware_download(self, piece, *, offset, xfer):
            self.sent.append((offset, len(piece)))
            if self.fail is not None and len(self.sent) == 1:
                raise self.fail

    def run(session, *args, image=bytes(10000)):
        monkeypatch.setattr(admin, "controller", lambda address: contextlib.nullcontext(session))
        (tmp_path / "fw.bin").write_bytes(image)
        return CliRunner().invoke(main, ["fw-download", "00:04.0", "-f", str(tmp_path / "fw.bin"), *args])

    s = Session()
    r = run(s, "-x", "5000", "-o", "0x100", "-p")
    assert r.exit_code == 0 and s.sent == [(1024, 4096), (5120, 4096), (9216, 784)]
    assert r.stdout_bytes.decode() == ("Firmware download: transferring 0x00000400/0x00002710 bytes: 010%\r"
                        "Firmware download: transferring 0x00001400/0x00002710 bytes: 051%\r"
                        "Firmware download: transferring 0x00002400/0x00002710 bytes: 092%\r\n"
                        "Firmware download success\n")
    ovr = CommandError("Firmware Image Download", 1, 0x14, True, sct_name="Command Specific Status",
                       sc_name="Overlapping Range")
    s = Session(ovr)
    r = run(s, "-i")
    assert r.exit_code == 0 and len(s.sent) == 3  # the overlap ignored, the rest sent
    s = Session(ovr)
    r = run(s)
    assert r.exit_code == 1 and len(s.sent) == 1 and "Use --ignore-ovr" in r.stderr
    s = Session(CommandError("Firmware Image Download", 0, 0x06, False, sct_name="Generic Command Status",
                             sc_name="Internal Error"))
    r = run(s)
    assert r.exit_code == 0 and len(s.sent) == 4 and "retrying offset 0 (1/3)" in r.stderr  # retried once
    r = run(Session(), image=bytes(10))
    assert r.exit_code == 1 and "Invalid size:10 for f/w image" in r.stderr


def test_show_regs_binary_and_the_sanitize_log_text():
    from nvmevfio.cli.identify import register_file
    from nvmevfio.cli.logs import sanitize_log_text

    raw = register_file({"cap": 0x0040_2030_1000_07FF, "vs": 0x10400, "cc": 0x460001, "csts": 1, "aqa": 0x1F001F,
                         "asq": None, "acq": 0x2000, "nssr": 0, "pmrmscu": 0xAABBCCDD, "crto": 0x10})
    assert len(raw) == 0xE1C and raw[0:8] == (0x0040_2030_1000_07FF).to_bytes(8, "little")
    assert raw[0x14:0x18] == (0x460001).to_bytes(4, "little") and raw[0x28:0x30] == bytes(8)  # ASQ withheld: 0
    assert raw[0x30:0x38] == (0x2000).to_bytes(8, "little") and raw[0x68] == 0x10 and raw[0xE18:] == b"\xdd\xcc\xbb\xaa"
    page = bytearray(512)
    page[0:2], page[2:4], page[4:8] = (0x8000).to_bytes(2, "little"), (0x10A).to_bytes(2, "little"), b"\x02\0\0\0"
    page[8:12] = b"\xff\xff\xff\xff"
    assert sanitize_log_text(bytes(page), False).splitlines()[:4] == [
        "Sanitize Progress                      (SPROG) :  32768",
        "Sanitize Status                        (SSTAT) :  0x2",
        "Sanitize Command Dword 10 Information (SCDW10) :  0x2",
        "Estimated Time For Overwrite                   :  4294967295 (No time period reported)"]
    human = sanitize_log_text(bytes(page), True).splitlines()
    assert human[:5] == ["Sanitize Progress                      (SPROG) :  32768\t(50.000000%)",
                         "Sanitize Status                        (SSTAT) :  0x2",
                         "\t[2:0]\tSanitize in Progress.",
                         "\t[7:3]\tNumber of completed passes if most recent operation was overwrite:\t1",
                         "\t  [8]\tGlobal Data Erased set: no NS LB in the NVM subsystem has been written to and "
                         "no PMR in the NVM subsystem has been enabled"]
    assert len(human) == 12 and human[-1] == "Estimated Time For Crypto Erase (No-Deallocate):  0"
