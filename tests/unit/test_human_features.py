"""get-feature -H: each feature's decode, value (and data) in, nvme-cli 2.3's exact lines out (the strings
are nvme-print.c v2.3's printf formats filled in by hand; cross-checked against that code compiled)."""

import struct
import time

import pytest

from nvmevfio.cli.human_features import (
    FEATURE_NAMES,
    apst_entries,
    feature_data_len,
    feature_fields,
    feature_text,
    host_metadata,
    select_result,
)

AEN = ("Discovery Log Page Change Notices", "Endurance Group Event Aggregate Log Change Notices",
       "LBA Status Information Notices", "Predictable Latency Event Aggregate Log Change Notices",
       "Asymmetric Namespace Access Change Notices", "Telemetry Log Notices", "Firmware Activation Notices",
       "Namespace Attribute Notices", "SMART / Health Critical Warnings")


@pytest.mark.parametrize(("fid", "value", "lines"), [
    (0x01, 0x03020107, ["\tHigh Priority Weight   (HPW): 4", "\tMedium Priority Weight (MPW): 3",
                        "\tLow Priority Weight    (LPW): 2", "\tArbitration Burst       (AB): No limit"]),
    (0x01, 3, ["\tHigh Priority Weight   (HPW): 1", "\tMedium Priority Weight (MPW): 1",
               "\tLow Priority Weight    (LPW): 1", "\tArbitration Burst       (AB): 8"]),
    (0x02, 0x45, ["\tWorkload Hint (WH): 2 - Heavy Sequential Writes", "\tPower State   (PS): 5"]),
    (0x02, 0x20, ["\tWorkload Hint (WH): 1 - Extended Idle Period with a Burst of Random Writes",
                  "\tPower State   (PS): 0"]),
    (0x02, 0x60, ["\tWorkload Hint (WH): 3 - Reserved", "\tPower State   (PS): 0"]),
    (0x03, 0x02, ["\tNumber of LBA Ranges (NUM): 3"]),
    (0x04, 0x157, ["\tThreshold Type Select         (THSEL): 0 - Over Temperature Threshold",
                   "\tThreshold Temperature Select (TMPSEL): 0 - Composite Temperature",
                   "\tTemperature Threshold         (TMPTH): 70°C (343 Kelvin)"]),
    (0x04, 0x1F0110, ["\tThreshold Type Select         (THSEL): 1 - Under Temperature Threshold",
                      "\tThreshold Temperature Select (TMPSEL): 15 - Reserved",
                      "\tTemperature Threshold         (TMPTH): -1°C (272 Kelvin)"]),
    (0x05, 0x1000A, ["\tDeallocated or Unwritten Logical Block Error Enable (DULBE): Enabled",
                     "\tTime Limited Error Recovery                          (TLER): 1000 ms"]),
    (0x06, 1, ["\tVolatile Write Cache Enable (WCE): Enabled"]),
    (0x07, 0x003F003F, ["\tNumber of IO Completion Queues Allocated (NCQA): 64",
                        "\tNumber of IO Submission Queues Allocated (NSQA): 64"]),
    (0x08, 0, ["\tAggregation Time     (TIME): 0 usec", "\tAggregation Threshold (THR): 1"]),
    (0x09, 0x10003, ["\tCoalescing Disable (CD): True", "\tInterrupt Vector   (IV): 3"]),
    (0x0A, 0, ["\tDisable Normal (DN): False"]),
    (0x0B, 0x80004901, [f"\t{n:<58}: {s}" for n, s in zip(AEN, (
        "Send async event", "Send async event", "Do not send async event", "Do not send async event",
        "Send async event", "Do not send async event", "Do not send async event", "Send async event",
        "Send async event"))]),
    (0x0C, 1, ["\tAutonomous Power State Transition Enable (APSTE): Enabled"]),
    (0x0D, 0, ["\tEnable Host Memory (EHM): Disabled"]),
    (0x0E, 0x1234, []),  # the timestamp is all in the data
    (0x0F, 120000, ["\tKeep Alive Timeout (KATO) in milliseconds: 120000"]),
    (0x10, 0x01590173, ["\tThermal Management Temperature 1 (TMT1) : 345 Kelvin (72°C)",
                        "\tThermal Management Temperature 2 (TMT2) : 371 Kelvin (98°C)"]),
    (0x11, 1, ["\tNon-Operational Power State Permissive Mode Enable (NOPPME): True"]),
    (0x12, 0x13, ["\tRead Recovery Level (RRL): 3"]),
    (0x13, 1, ["\tPredictable Latency Window Enabled: True"]),
    (0x14, 2, ["\tWindow Select: Non-deterministic Window (NDWIN)"]),
    (0x14, 5, ["\tWindow Select: Reserved"]),
    (0x15, 0x00640032, ["\tLBA Status Information Poll Interval (LSIPI)  : 100",
                        "\tLBA Status Information Report Interval (LSIRI): 50"]),
    (0x16, 1, []),  # Host Behavior Support is in the data
    (0x17, 1, ["\tNo-Deallocate Response Mode (NODRM) : 1"]),
    (0x18, 0x00050003, ["\tEndurance Group Identifier (ENDGID): 3", "\tEndurance Group Critical Warnings  : 5"]),
    (0x19, 1, ["\tI/O Command Set Profile: True"]),
    (0x1A, 0, ["\tSpinup control feature Enabled: False"]),
    (0x1D, 0x301, ["\tFlexible Direct Placement Enable (FDPE)       : Yes",
                   "\tFlexible Direct Placement Configuration Index : 3"]),
    (0x80, 0x1FF, ["\tPre-boot Software Load Count (PBSLC): 255"]),
    (0x81, 0, []),
    (0x82, 0xA, ["\tMask Reservation Preempted Notification  (RESPRE): True",
                 "\tMask Reservation Released Notification   (RESREL): False",
                 "\tMask Registration Preempted Notification (REGPRE): True"]),
    (0x83, 1, ["\tPersist Through Power Loss (PTPL): True"]),
    (0x84, 2, ["\tNamespace Write Protect: Write Protect Until Power Cycle"]),
    (0x84, 7, ["\tNamespace Write Protect: Reserved"]),  # the whole DW0 is the state, as nvme-cli reads it
    (0x55, 1, []), (0xC0, 1, []),
])
def test_feature_value_decoded_in_nvme_cli_words(fid, value, lines):
    assert feature_fields(fid, value) == lines


def test_window_select_has_no_newline_and_the_others_do():
    assert feature_text(0x14, 1) == "\tWindow Select: Deterministic Window (DTWIN)"
    assert feature_text(0x06, 0) == "\tVolatile Write Cache Enable (WCE): Disabled\n"
    assert feature_text(0x55, 0) == ""


def test_data_buffers_decoded():
    lba = bytearray(4096)
    lba[0:2] = b"\x02\x03"
    struct.pack_into("<QQ", lba, 16, 0, 0x1000)
    lba[32:48] = bytes(range(16))
    lba[64] = 0x85
    assert feature_fields(0x03, 1, bytes(lba)) == [
        "\tNumber of LBA Ranges (NUM): 2",
        "\ttype       : 0x2 - RAID",
        "\tattributes : 0x3 - LBA range may be overwritten, LBA range should be hidden from the OS/EFI/BIOS",
        "\tslba       : 0", "\tnlb        : 0x1000", "\tguid       : 000102030405060708090a0b0c0d0e0f",
        "\ttype       : 0x85 - Vendor Specific",
        "\tattributes : 0 - LBA range should not be overwritten, LBA range should be visible from the OS/EFI/BIOS",
        "\tslba       : 0", "\tnlb        : 0", "\tguid       : 00000000000000000000000000000000"]
    apst = struct.pack("<2Q", 100 << 8 | 3 << 3, 0xFFFFFF << 8 | 0x1F << 3).ljust(256, b"\0")
    out = feature_fields(0x0C, 0, apst)
    assert out[:12] == ["\tAutonomous Power State Transition Enable (APSTE): Disabled",
                        "\tAuto PST Entries\t.................",
                        "\tEntry[ 0]   ", "\t.................", "\tIdle Time Prior to Transition (ITPT): 100 ms",
                        "\tIdle Transition Power State   (ITPS): 3", "\t.................",
                        "\tEntry[ 1]   ", "\t.................",
                        "\tIdle Time Prior to Transition (ITPT): 16777215 ms",
                        "\tIdle Transition Power State   (ITPS): 31", "\t................."]
    assert len(out) == 2 + 32 * 5 and out[-5] == "\tEntry[31]   " and apst_entries(b"")[1] == "\tEntry[ 0]   "
    hmb = struct.pack("<4I", 4096, 0xDEAD0000, 0x1, 8)
    assert feature_fields(0x0D, 1, hmb) == [
        "\tEnable Host Memory (EHM): Enabled", "\tHost Memory Descriptor List Entry Count (HMDLEC): 8",
        "\tHost Memory Descriptor List Address     (HMDLAU): 0x1",
        "\tHost Memory Descriptor List Address     (HMDLAL): 0xdead0000",
        "\tHost Memory Buffer Size                  (HSIZE): 4096"]
    plm = bytearray(512)
    struct.pack_into("<H", plm, 0, 0x1)
    struct.pack_into("<3Q", plm, 32, 10, 20, 30)
    assert feature_fields(0x13, 0, bytes(plm)) == [
        "\tPredictable Latency Window Enabled: False", "\tEnable Event          :0001",
        "\tDTWIN Reads Threshold :10", "\tDTWIN Writes Threshold:20", "\tDTWIN Time Threshold  :30"]
    assert feature_fields(0x16, 0, b"\x01" + bytes(511)) == ["\tHost Behavior Support: True"]
    assert feature_fields(0x16, 0, bytes(512)) == ["\tHost Behavior Support: False"]
    hostid = bytes(range(1, 17))
    assert feature_fields(0x81, 0, hostid) == [f"\tHost Identifier (HOSTID):  {0x0807060504030201}"]
    assert feature_fields(0x1E, 3, bytes([0x00, 1, 0x81, 0, 0x42, 1])) == [
        "\tReclaim Unit Not Fully Written                       : Enabled",
        "\tImplicitly Modified Reclaim Unit Handle              : Not Enabled",
        "\tUnknown                                              : Enabled"]


def test_timestamp(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        ms = 1764786898123  # 2025-12-03 18:34:58.123 UTC
        data = ms.to_bytes(6, "little") + bytes([2, 0])
        assert feature_fields(0x0E, 0, data) == [
            "\tThe timestamp is : 1764786898123 (Wed Dec  3 18:34:58 2025 UTC)",
            "\tThe Timestamp field was initialized with a Timestamp value using a Set Features command.",
            "\tThe controller counted time in milliseconds continuously since the Timestamp value was initialized."]
        assert feature_fields(0x0E, 0, bytes([0] * 6 + [1, 0]))[1:] == [
            "\tThe Timestamp field was initialized to \u20180\u2019 by a Controller Level Reset.",
            "\tThe controller may have stopped counting during vendor specific intervals after the Timestamp value "
            "was initialized"]
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_host_metadata_keeps_nvme_cli_stale_value_buffer():
    data = bytes([2, 0, 0x01, 1, 6, 0]) + b"linux\0" + bytes([0x55, 0, 2, 0]) + b"ab"
    assert host_metadata(0x7E, data) == [
        "\tNum Metadata Element Descriptors: 2",
        "\tElement[0  ]:", "\t\tType\t    : 0x01 (Operating System Controller Name)", "\t\tRevision : 1",
        "\t\tLength   : 6", "\t\tValue    : linux",
        "\tElement[1  ]:", "\t\tType\t    : 0x55 (Unknown Controller Type)", "\t\tRevision : 0",
        "\t\tLength   : 2", "\t\tValue    : abnux"]  # strncpy over the last value, never cleared
    assert host_metadata(0x7F, bytes([1, 0, 2, 0, 1, 0]) + b"x")[2] == "\t\tType\t    : 0x02 (Pre-boot Namespace Name)"


def test_data_lengths_and_names_as_nvme_cli():
    assert [feature_data_len(f, 0) for f in (0x01, 0x03, 0x0C, 0x0D, 0x0E, 0x13, 0x16, 0x19, 0x81, 0x7E)] == [
        0, 4096, 256, 4096, 8, 512, 512, 0, 8, 4096]
    assert feature_data_len(0x81, 1) == 16 and feature_data_len(0x1E, 0) == 510
    assert select_result(7) == ["  Feature is saveable", "  Feature is per-namespace", "  Feature is changeable"]
    assert select_result(4) == ["  Feature is changeable"] and select_result(0) == []
    assert (FEATURE_NAMES[0x0B], FEATURE_NAMES[0x18], FEATURE_NAMES[0x84]) == (
        "Async Event Configuration", "Endurance Event Group Configuration", "Namespace Write Protect")


class _Session:
    """Records the Get Features the command sends; answers DW0 ``value`` and a buffer of ``data_len`` bytes."""

    def __init__(self, value, fill):
        self.value, self.fill, self.calls = value, fill, []

    def get_features(self, fid, *, sel, nsid, cdw11):
        self.calls.append(("get_features", fid, sel, cdw11))
        return self.value

    def admin_passthru(self, opcode, *, nsid, data_len, cdw10, cdw11, cdw14):
        self.calls.append(("passthru", opcode, data_len, cdw10, cdw11))
        return self.value, self.fill[:data_len].ljust(data_len, b"\0")


def _get_feature(monkeypatch, args, value=0, fill=b""):
    import contextlib

    from click.testing import CliRunner

    from nvmevfio.cli import logs
    from nvmevfio.cli.common import main

    s = _Session(value, fill)
    monkeypatch.setattr(logs, "controller", lambda address: contextlib.nullcontext(s))
    r = CliRunner().invoke(main, ["get-feature", "00:04.0", *args])
    assert r.exit_code == 0, r.output
    return s.calls, r.stdout_bytes


def test_get_feature_reads_the_data_nvme_cli_reads_and_prints_as_it_does(monkeypatch):
    calls, out = _get_feature(monkeypatch, ["-f", "0x16", "-H"], fill=b"\x01")
    assert calls == [("passthru", 0x0A, 512, 0x16, 0)]  # libnvme's 512-byte Host Behavior structure
    assert out == b"get-feature:0x16 (Host Behavior), Current value:00000000\n\tHost Behavior Support: True\n"
    calls, out = _get_feature(monkeypatch, ["-f", "0x16"], fill=b"\x01")  # without -H: nvme-cli's dump
    assert out.splitlines()[1:3] == [b"       0  1  2  3  4  5  6  7  8  9  a  b  c  d  e  f",
                                     b'0000: 01 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 "................"']
    calls, out = _get_feature(monkeypatch, ["-f", "0x16", "-b"], fill=b"\x01")  # -b: the buffer only
    assert out == b"\x01" + bytes(511)
    calls, out = _get_feature(monkeypatch, ["-f", "0x16", "-s", "3", "-l", "64"], value=5)  # no data for SEL 3
    assert calls == [("get_features", 0x16, 3, 0)]
    assert out == b"get-feature:0x16 (Host Behavior), Supported capabilities value:0x00000005\n" \
                  b"  Feature is saveable\n  Feature is changeable\n"
    calls, out = _get_feature(monkeypatch, ["-f", "0x14", "-H"], value=1)
    assert calls == [("get_features", 0x14, 0, 0)] and out.endswith(b"\tWindow Select: Deterministic Window (DTWIN)")
    calls, _ = _get_feature(monkeypatch, ["-f", "0x81", "-c", "1", "-l", "4", "-H"])
    assert calls == [("passthru", 0x0A, 16, 0x81, 1)]  # the extended 128-bit Host Identifier, whatever -l says
    calls, _ = _get_feature(monkeypatch, ["-f", "0x1e", "-H"])
    assert calls == [("passthru", 0x0A, 510, 0x1E, 0xFF << 16)]  # FDP Events: 255 descriptors


class _Features(_Session):
    """A controller with features 0x04 (current 0x157, default ``default``) and 0x07; Invalid Field
    for every other feature id."""

    def __init__(self, default=0x15F, dnr=False):
        super().__init__(0, b"")
        self.default, self.dnr = default, dnr

    def _answer(self, fid, sel):
        from nvmevfio.errors import CommandError

        if fid not in (0x04, 0x07) or sel > 3:
            raise CommandError("Get Features", 0, 0x02, self.dnr, sct_name="Generic Command Status",
                               sc_name="Invalid Field in Command")
        return {(0x04, 0): 0x157, (0x04, 1): self.default, (0x07, 0): 0x3F003F}.get((fid, sel), 0x3F003F)

    def get_features(self, fid, *, sel, nsid, cdw11):
        self.calls.append(("get_features", fid, sel, cdw11))
        return self._answer(fid, sel)

    def admin_passthru(self, opcode, *, nsid, data_len, cdw10, cdw11, cdw14):
        self.calls.append(("passthru", opcode, data_len, cdw10, cdw11))
        return self._answer(cdw10 & 0xFF, cdw10 >> 8 & 7), None


def _features(monkeypatch, args, session):
    import contextlib

    from click.testing import CliRunner

    from nvmevfio.cli import logs
    from nvmevfio.cli.common import main

    monkeypatch.setattr(logs, "controller", lambda address: contextlib.nullcontext(session))
    return CliRunner().invoke(main, ["get-feature", "00:04.0", *args])


def test_get_feature_sel_8_shows_a_feature_only_when_changed(monkeypatch):
    """nvme-cli 2.3's -s 8: the current (SEL 0) and default (SEL 1) values, shown under "Changed" only
    when they differ."""
    s = _Features()
    r = _features(monkeypatch, ["-f", "0x04", "-s", "8", "-H"], s)
    assert r.exit_code == 0 and [c[:3] for c in s.calls] == [("get_features", 4, 0), ("get_features", 4, 1)]
    assert r.stdout.splitlines()[0] == "get-feature:0x04 (Temperature Threshold), Changed value:0x00000157"
    assert "\tTemperature Threshold         (TMPTH): 70°C (343 Kelvin)" in r.stdout
    s = _Features(default=0x157)  # unchanged: nothing shown, exit 0
    r = _features(monkeypatch, ["-f", "4", "-s", "8"], s)
    assert r.exit_code == 0 and r.stdout == ""


def test_get_feature_reserved_select_goes_to_the_device(monkeypatch):
    s = _Features()
    r = _features(monkeypatch, ["-f", "0x04", "-s", "5"], s)
    assert s.calls == [("passthru", 0x0A, 0, 0x504, 0)]  # SEL 5 in CDW10 10:8, as nvme-cli sends it
    assert r.exit_code == 1 and "Invalid Field in Command" in r.stderr
    r = _features(monkeypatch, ["-f", "0x04", "-s", "9"], s)  # nvme-cli: "invalid 'select' param", exit 1
    assert r.exit_code == 1 and len(s.calls) == 1


def test_get_feature_without_an_id_reads_every_feature(monkeypatch):
    """nvme-cli 2.3 without -f: features 0..255, Invalid Field skipped silently; its exit status is the
    last feature's (255: Invalid Field here, so 1)."""
    s = _Features()
    r = _features(monkeypatch, [], s)
    assert len(s.calls) == 256 and s.calls[0] == ("passthru", 0x0A, 0, 0, 0)
    assert r.stdout.splitlines() == ["get-feature:0x04 (Temperature Threshold), Current value:0x00000157",
                                     "get-feature:0x07 (Number of Queues), Current value:0x003f003f"]
    assert r.exit_code == 1 and r.stderr == ""
    r = _features(monkeypatch, ["-o", "json"], _Features())
    assert [d["feature_id"] for d in __import__("json").loads(r.stdout)] == [4, 7]
    # with Do Not Retry set (QEMU 7.2), nvme-cli 2.3's status check (the whole value) stops at feature 0
    s = _Features(dnr=True)
    r = _features(monkeypatch, [], s)
    assert len(s.calls) == 1 and r.stdout == "" and r.exit_code == 1 and "Invalid Field in Command" in r.stderr
