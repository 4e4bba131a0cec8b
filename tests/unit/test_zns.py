"""The Zoned Namespace Command Set's pure parts (ZNS 1.1) with hand-computed values: the three
commands' dwords, the ZNS Identify structures, the Report Zones data, the CSI in a namespace's
descriptor list, the statuses' names, nvme-cli's JSON of a zone; the CLI's text helpers."""

import numpy as np
import pytest

from nvmevfio.broker.common import Zoned
from nvmevfio.cli import zns as cli
from nvmevfio.nvme import builders, spec, zns
from nvmevfio.nvme.builders import FieldOutOfRange
from nvmevfio.nvme.zns import Zone, ZoneState


def test_zone_management_send_dwords():
    c = builders.zone_management_send(1, 0x1_2345_6789, zns.ZoneSendAction.RESET)
    assert (c.opc, c.nsid, c.cdw10, c.cdw11, c.cdw12, c.cdw13) == (0x79, 1, 0x2345_6789, 0x1, 0, 0x04)
    c = builders.zone_management_send(7, 0, zns.ZoneSendAction.OPEN, select_all=True, zsaso=True)
    assert (c.cdw10, c.cdw11, c.cdw13) == (0, 0, 0x03 | 1 << 8 | 1 << 9)
    with pytest.raises(FieldOutOfRange) as ei:
        builders.zone_management_send(1, 0, 0x100)
    assert ei.value.field == "ZSA"


def test_zone_management_receive_dwords():
    # 64-byte header + 3 descriptors = 256 bytes = 64 dwords: NUMD 63 (0's based)
    c = builders.zone_management_receive(2, 0x400, 256, zrasf=5, partial=True)
    assert (c.opc, c.nsid, c.cdw10, c.cdw11, c.cdw12, c.cdw13) == (0x7A, 2, 0x400, 0, 63, 5 << 8 | 1 << 16)
    c = builders.zone_management_receive(1, 1 << 32, 4096, zra=zns.ZoneReceiveAction.EXTENDED_REPORT_ZONES)
    assert (c.cdw10, c.cdw11, c.cdw12, c.cdw13) == (0, 1, 1023, 1)
    with pytest.raises(FieldOutOfRange) as ei:
        builders.zone_management_receive(1, 0, 66)  # not whole dwords
    assert ei.value.field == "NUMD"


def test_zone_append_dwords():
    c = builders.zone_append(1, 0x800, 32, fua=True)
    assert (c.opc, c.nsid, c.cdw10, c.cdw11, c.cdw12) == (0x7D, 1, 0x800, 0, 31 | 1 << 30)
    with pytest.raises(FieldOutOfRange) as ei:
        builders.zone_append(1, 0, 0)
    assert ei.value.field == "NLB"


def test_status_and_command_names():
    names = {sc: spec.status_name(1, sc) for sc in range(0xB8, 0xC0)}
    assert names == {0xB8: "Zone Boundary Error", 0xB9: "Zone Is Full", 0xBA: "Zone Is Read Only",
                     0xBB: "Zone Is Offline", 0xBC: "Zone Invalid Write", 0xBD: "Too Many Active Zones",
                     0xBE: "Too Many Open Zones", 0xBF: "Invalid Zone State Transition"}
    # a completion's status field without the phase tag: SCT 1 (bits 10:8), SC BEh, DNR (bit 14)
    err = spec.command_error(1 << 14 | 1 << 8 | 0xBE, "Zone Management Send (open)")
    assert (err.sct, err.sc, err.dnr, err.sc_name) == (1, 0xBE, True, "Too Many Open Zones")
    assert [spec.command_name(False, op) for op in (0x79, 0x7A, 0x7D)] == [
        "Zone Management Send", "Zone Management Receive", "Zone Append"]
    assert (spec.Cns.NAMESPACE_DESCRIPTORS, spec.Cns.NAMESPACE_CSI, spec.Cns.CONTROLLER_CSI, spec.Csi.ZONED) == (
        3, 5, 6, 2)


def test_identify_structures():
    ctrl = bytearray(4096)
    ctrl[0] = 5
    assert zns.parse_zns_identify_controller(bytes(ctrl)) == {"zasl": 5}
    ns = bytearray(4096)
    ns[0:2] = (2).to_bytes(2, "little")  # ZOC: Zone Active Excursions
    ns[4:8] = (5).to_bytes(4, "little")  # MAR: 6 active zones
    ns[8:12] = (0xFFFFFFFF).to_bytes(4, "little")  # MOR: no limit
    ns[12:16] = (7).to_bytes(4, "little")  # RRL
    ns[32:36] = (9).to_bytes(4, "little")  # FRL1
    ns[2816:2824] = (1024).to_bytes(8, "little")  # LBAFE 0: ZSZE
    ns[2824] = 1  # ZDES: 64 bytes
    ns[2832:2840] = (8192).to_bytes(8, "little")  # LBAFE 1
    z = zns.parse_zns_identify_namespace(bytes(ns), 1)
    assert z == {"zoc": 2, "ozcs": 0, "mar": 5, "mor": 0xFFFFFFFF, "rrl": 7, "frl": 0, "rrl1": 0, "rrl2": 0,
                 "rrl3": 0, "frl1": 9, "frl2": 0, "frl3": 0, "numzrwa": 0, "zrwafg": 0, "zrwasz": 0, "zrwacap": 0,
                 "lbafe": [{"zsze": 1024, "zdes": 1}, {"zsze": 8192, "zdes": 0}]}
    assert (zns.limit(z["mar"]), zns.limit(z["mor"])) == (6, None)
    with pytest.raises(ValueError):
        zns.parse_zns_identify_namespace(bytes(100), 0)


def test_namespace_csi():
    # EUI64 (NIDT 1, 8 bytes), then CSI (NIDT 4, 1 byte: 02h), then the end of the list
    buf = bytes([1, 8, 0, 0, *range(8), 4, 1, 0, 0, 2]) + bytes(4096 - 17)
    assert zns.namespace_csi(buf) == 2
    assert zns.namespace_csi(bytes([1, 8, 0, 0, *range(8)]) + bytes(100)) is None
    assert zns.namespace_csi(bytes(4096)) is None


def _report(nr_zones: int, descs: list[tuple[int, int, int, int, int]], ext: int = 0) -> bytes:
    """A Report Zones buffer: (ZS, ZA, ZCAP, ZSLBA, WP) per descriptor, ``ext`` bytes of 0xEE after each."""
    out = bytearray(nr_zones.to_bytes(8, "little") + bytes(56))
    for zs, za, zcap, zslba, wp in descs:
        d = np.zeros(1, dtype=zns.ZONE_DESCRIPTOR)
        d["zt"], d["zs"], d["za"], d["zai"], d["zcap"], d["zslba"], d["wp"] = 2, zs << 4, za, 0, zcap, zslba, wp
        out += d.tobytes() + b"\xee" * ext
    return bytes(out)


def test_report_zones():
    raw = _report(16, [(1, 0, 768, 0, 0), (2, 0, 768, 1024, 1026), (0xE, 0, 768, 2048, 3072)])
    nr, zones = zns.parse_report_zones(raw)
    assert nr == 16
    assert zones == [Zone(0, 0, 768, ZoneState.EMPTY, 2, 0, 0), Zone(1024, 1026, 768, ZoneState.IMPLICITLY_OPENED, 2,
                                                                     0, 0),
                     Zone(2048, 3072, 768, ZoneState.FULL, 2, 0, 0)]
    assert [z.written for z in zones] == [0, 2, 768]
    assert zones[1].as_json() == {"slba": 1024, "wp": 1026, "cap": 768, "state": "IMP_OPENED", "type": "SEQWRITE_REQ",
                                  "attrs": 0}
    # the header counts 1 but the buffer holds 2: only what the header counts
    assert len(zns.parse_report_zones(_report(1, [(1, 0, 8, 0, 0), (1, 0, 8, 8, 8)]))[1]) == 1
    # extended: 64 extension bytes after each descriptor
    nr, zones = zns.parse_report_zones(_report(2, [(4, 0x80, 8, 0, 3), (3, 0, 8, 8, 8)], ext=64), 64)
    assert [(z.state, z.attributes, z.extension) for z in zones] == [
        (ZoneState.CLOSED, 0x80, b"\xee" * 64), (ZoneState.EXPLICITLY_OPENED, 0, b"\xee" * 64)]
    with pytest.raises(ValueError):
        zns.parse_report_zones(bytes(10))


def test_zoned_geometry_and_cli_text():
    z = Zoned(1024, 16, 6, 4, 131072, 64, {})
    assert (z.zone_start(0), z.zone_start(1023), z.zone_start(1024), z.zone_start(5000)) == (0, 0, 1024, 4096)
    assert (cli._hex(0), cli._hex(0x400)) == ("0", "0x400")
    assert cli._ext_json(bytes(range(20))) == ["00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f", "10 11 12 13"]
    assert cli.ZONE_COMMANDS == {"open-zone": ("open", 3), "close-zone": ("close", 1), "finish-zone": ("finish", 2),
                                 "reset-zone": ("reset", 4), "offline-zone": ("offline", 5)}
    assert all(zns.ZoneSendAction(zsa).name.lower() == action for action, zsa in cli.ZONE_COMMANDS.values())


def test_appended_lbas_from_completions():
    from nvmevfio.nvme.queue import COMPLETION

    rec = np.zeros(3, dtype=COMPLETION)
    rec["result"] = [0x400, 0xFFFF_FFFF, 7]
    rec["result_hi"] = [0, 1, 0x8000_0000]
    assert zns.appended_lbas(rec).tolist() == [0x400, 0x1_FFFF_FFFF, 0x8000_0000_0000_0007]
