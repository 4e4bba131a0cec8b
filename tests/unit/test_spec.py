"""IDENTIFY and log parsing from bytes captured from QEMU's NVMe model, checked
field by field against nvme-cli's JSON for the same bytes."""

import json
from pathlib import Path

import numpy as np
import pytest

from nvmevfio.nvme import spec

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
    c = spec.parse_identify_controller((DATA / "idctrl.bin").read_bytes())
    _cmp(c, json.loads((DATA / "idctrl.json").read_text()))
    assert c["vid"] == 0x1B36 and c["mdts"] == 7 and c["nn"] == 256 and c["sqes"] == 0x66


def test_identify_namespace_matches_nvme_cli():
    n = spec.parse_identify_namespace((DATA / "idns2.bin").read_bytes())
    _cmp(n, json.loads((DATA / "idns2.json").read_text()))
    idx = spec.flbas_index(n["flbas"], n["nlbaf"])
    assert idx == 4 and 1 << n["lbafs"][idx]["ds"] == 4096 and n["nsze"] == 8192


def test_identify_namespace_512():
    n = spec.parse_identify_namespace((DATA / "idns1.bin").read_bytes())
    assert n["nsze"] == 131072 and 1 << n["lbafs"][spec.flbas_index(n["flbas"], n["nlbaf"])]["ds"] == 512


def test_smart_log_matches_nvme_cli():
    _cmp(spec.parse_smart_log((DATA / "smart.bin").read_bytes()), json.loads((DATA / "smart.json").read_text()))


def test_flbas_high_bits():
    assert spec.flbas_index(0b0110_0011, 20) == 0x33  # bits 6:5 = 11b are index bits 5:4
    assert spec.flbas_index(0b0110_0011, 7) == 3


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
    assert spec.parse_active_namespaces(d.tobytes()) == [1, 2, 7]


def test_error_and_firmware_logs():
    e = np.zeros(64, dtype=np.uint8)
    e[0:8].view("<u8")[0] = 5
    e[12:14].view("<u2")[0] = (0x80 << 1) | 1
    [entry] = spec.parse_error_log(e.tobytes())
    assert entry["error_count"] == 5 and entry["status_field"] == 0x80 and entry["phase_tag"] == 1
    fw = bytearray(512)
    fw[0] = 1
    fw[8:16] = b"1.0     "
    assert spec.parse_firmware_log(bytes(fw))["frs1"] == "1.0     "
    assert spec.parse_firmware_log(bytes(fw))["frs2"] == ""


def test_short_buffers_rejected():
    with pytest.raises(ValueError):
        spec.parse_identify_controller(b"\0" * 100)
