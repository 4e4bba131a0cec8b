"""IDENTIFY and log parsing from bytes captured from QEMU's NVMe model, checked
field by field against nvme-cli's JSON for the same bytes."""

import json
from pathlib import Path

import numpy as np
import pytest

from nvmevfio.nvme import spec, structures

DATA = Path(__file__).resolve().parent.parent / "data"


def _cmp(mine, ref):
    for k, v in ref.items():
        got = mine[k]
        if isinstance(v, str) and not isinstance(got, str):
            got = str(got)
        assert got == v, k


def test_dtypes():
    assert spec.SQE.itemsize == 64 and spec.CQE.itemsize == 16
    assert spec.SQE.fields["prp1"][1] == 24 and spec.SQE.fields["cdw10"][1] == 40
    assert spec.CQE.fields["status"][1] == 14


def test_identify_controller_matches_nvme_cli():
    c = structures.parse_identify_controller((DATA / "idctrl.bin").read_bytes())
    _cmp(c, json.loads((DATA / "idctrl.json").read_text()))
    assert c["vid"] == 0x1B36 and c["mdts"] == 7 and c["nn"] == 256 and c["sqes"] == 0x66


def test_identify_namespace_matches_nvme_cli():
    n = structures.parse_identify_namespace((DATA / "idns2.bin").read_bytes())
    _cmp(n, json.loads((DATA / "idns2.json").read_text()))
    idx = structures.flbas_index(n["flbas"], n["nlbaf"])
    assert idx == 4 and 1 << n["lbafs"][idx]["ds"] == 4096 and n["nsze"] == 8192


def test_identify_namespace_512():
    n = structures.parse_identify_namespace((DATA / "idns1.bin").read_bytes())
    assert n["nsze"] == 131072 and 1 << n["lbafs"][structures.flbas_index(n["flbas"], n["nlbaf"])]["ds"] == 512


def test_smart_log_matches_nvme_cli():
    _cmp(structures.parse_smart_log((DATA / "smart.bin").read_bytes()), json.loads((DATA / "smart.json").read_text()))


def test_flbas_high_bits():
    assert structures.flbas_index(0b0110_0011, 20) == 0x33  # bits 6:5 = 11b are index bits 5:4
    assert structures.flbas_index(0b0110_0011, 7) == 3


def test_status_names_and_split():
    assert spec.status_name(0, 0x80) == "LBA Out of Range"
    assert spec.status_name(1, 0x02) == "Invalid Queue Size"
    assert spec.status_name(2, 0x81) == "Unrecovered Read Error"
    assert spec.status_name(3, 0x71) == "Command Aborted By Host"
    assert spec.sct_name(1) == "Command Specific Status"
    status = (1 << 15) | (1 << 14) | (2 << 12) | (1 << 9) | (0x02 << 1) | 1
    assert spec.split_status(status) == (1, 0x02, 1, 2, 1, 1)


def test_active_namespace_list():
    d = np.zeros(1024, dtype="<u4")
    d[:3] = [1, 2, 7]
    assert structures.parse_active_namespaces(d.tobytes()) == [1, 2, 7]


def test_error_and_firmware_logs():
    e = np.zeros(64, dtype=np.uint8)
    e[0:8].view("<u8")[0] = 5
    e[12:14].view("<u2")[0] = (0x80 << 1) | 1
    [entry] = structures.parse_error_log(e.tobytes())
    assert entry["error_count"] == 5 and entry["status_field"] == 0x80 and entry["phase_tag"] == 1
    fw = bytearray(512)
    fw[0] = 1
    fw[8:16] = b"1.0     "
    assert structures.parse_firmware_log(bytes(fw))["frs1"] == "1.0     "
    assert structures.parse_firmware_log(bytes(fw))["frs2"] == ""


def test_short_buffers_rejected():
    with pytest.raises(ValueError):
        structures.parse_identify_controller(b"\0" * 100)


def test_sanitize_log_as_nvme_cli_shows_it():
    page = bytearray(512)
    page[0:2] = (0x8000).to_bytes(2, "little")  # SPROG: half done
    page[2:4] = (0x0100 | 2 << 3 | 2).to_bytes(2, "little")  # global erased, 2 passes, in progress
    page[4:8] = (0x0202).to_bytes(4, "little")
    page[8:12] = (600).to_bytes(4, "little")
    page[28:32] = (0xFFFFFFFF).to_bytes(4, "little")
    assert structures.parse_sanitize_log(bytes(page)) == {
        "sprog": 0x8000,
        "sstat": {"global_erased": 1, "no_cmplted_passes": 2, "status": "(2) Sanitize in Progress."},
        "cdw10_info": 0x202, "time_over_write": 600, "time_block_erase": 0, "time_crypto_erase": 0,
        "time_over_write_no_dealloc": 0, "time_block_erase_no_dealloc": 0,
        "time_crypto_erase_no_dealloc": 0xFFFFFFFF,
    }
    assert structures.parse_sanitize_log(bytes(512))["sstat"]["status"] == "(0) NVM Subsystem has never been sanitized."


def test_self_test_log_as_nvme_cli_shows_it():
    page = bytearray(564)
    page[0], page[1] = 0x2, 40  # an extended self-test running, 40 % done
    r0 = 4  # newest result: short test (1), failed segment (7), NSID and LBA valid
    page[r0] = 1 << 4 | 7
    page[r0 + 1], page[r0 + 2] = 3, 0x3
    page[r0 + 4 : r0 + 12] = (1234).to_bytes(8, "little")
    page[r0 + 12 : r0 + 16] = (1).to_bytes(4, "little")
    page[r0 + 16 : r0 + 24] = (0x10000).to_bytes(8, "little")
    page[r0 + 24], page[r0 + 25] = 0xFA, 0x81  # SCT only bits 2:0, and not valid (VDI bit 2 clear)
    for i in range(1, 20):
        page[4 + 28 * i] = 0xF  # entries not used
    d = structures.parse_self_test_log(bytes(page), entries=3)
    assert d == {
        "Current Device Self-Test Operation": 2, "Current Device Self-Test Completion": 40,
        "List of Valid Reports": [
            {"Self test result": 7, "Self test code": 1, "Segment number": 3, "Valid Diagnostic Information": 3,
             "Power on hours": 1234, "Namespace Identifier": 1, "Failing LBA": 0x10000, "Vendor Specific": 0},
            {"Self test result": 0xF}, {"Self test result": 0xF}],
    }
    page[r0 + 2] = 0xC  # now SCT and SC valid, NSID and LBA not
    report = structures.parse_self_test_log(bytes(page), entries=1)["List of Valid Reports"][0]
    assert report["Status Code Type"] == 2 and report["Status Code"] == 0x81 and "Failing LBA" not in report
    assert len(structures.parse_self_test_log(bytes(page))["List of Valid Reports"]) == 20
