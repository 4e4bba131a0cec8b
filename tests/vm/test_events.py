"""Asynchronous events against QEMU's NVMe model through real VFIO: the broker keeps AERs
outstanding; a temperature threshold below the current temperature, a namespace detach or
attach (an nvme-subsys controller) and a SMART critical warning set from the QEMU monitor each
raise an event that arrives decoded, with its log page read; a namespace notice refreshes the
namespace table; `nvmevfio monitor` prints them."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import qmp

import nvmevfio
from nvmevfio.errors import Refused
from nvmevfio.nvme.spec import AdminOpcode
from nvmevfio.provider import open_controller


@pytest.fixture
def session(events_ctrl):
    s = open_controller(events_ctrl["address"])
    try:
        s.enable()
        s.identify_controller()
        yield s
    finally:
        s.close()


def test_aers_are_outstanding_and_a_temperature_threshold_raises_one(session):
    s = session
    cfg = s.event_config
    aerl = s.id_ctrl["aerl"]
    assert cfg["outstanding"] == min(aerl + 1, 4) and cfg["aec"] & 0x02 and cfg["events_off"] is None
    threshold = s.get_features(0x04) & 0xFFFF
    current = int.from_bytes(s.get_log(0x02, 512)[1:3], "little")
    assert threshold > current and s.poll_events(0.2) == []
    try:
        s.set_features(0x04, current - 20)  # over temperature threshold below the temperature
        events = s.poll_events(10.0)
    finally:
        s.set_features(0x04, threshold)
    assert [(e.type, e.info, e.log_page) for e in events] == [(1, 0x01, 0x02)], events
    ev = events[0]
    assert ev.info_name == "Temperature Threshold" and ev.log_page_name == "SMART / Health Information"
    assert len(ev.log) == 512 and ev.detail["temperature"] == current and ev.detail["critical_warning"] & 0x02
    assert s.event_config["outstanding"] == cfg["outstanding"]  # posted again
    s.write_register("INTMS", 0)  # the admin queue works beside the AERs
    assert s.identify_controller()["aerl"] == aerl


def _attachment(s, nsid: int, detach: bool) -> None:
    """Namespace Attachment through passthrough: no refresh of the namespace table by the verb,
    so only the event can refresh it."""
    lst = np.zeros(2048, dtype="<u2")
    lst[0], lst[1] = 1, s.id_ctrl["cntlid"]
    s.admin_passthru(AdminOpcode.NAMESPACE_ATTACHMENT, nsid=nsid, cdw10=int(detach), data=lst.tobytes())


def test_namespace_detach_and_attach_raise_notices_that_refresh_the_table(events_ctrl):
    with nvmevfio.open(events_ctrl["address"], 1) as dev:
        p = dev.provider
        data = np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8)
        p.write(2, 16, data)
        assert 2 in p._broker.namespaces
        _attachment(p, 2, detach=True)
        events = p.poll_events(10.0)
        assert [(e.type, e.info, e.log_page, e.nsids) for e in events] == [(2, 0x00, 0x04, (2,))], events
        assert events[0].info_name == "Namespace Attribute Changed"
        assert 2 not in p._broker.namespaces and p.active_namespaces() == [1]
        with pytest.raises(Refused) as ei:
            p.read(2, 16, 8)
        assert ei.value.reason == "namespace-inactive"  # refused before the device saw it
        _attachment(p, 2, detach=False)
        events = p.poll_events(10.0)
        assert [(e.info, e.nsids) for e in events] == [(0x00, (2,))]
        assert 2 in p._broker.namespaces
        assert np.array_equal(p.read(2, 16, 8), data)  # the same namespace, its data intact
        dev.write_blocks(0, bytes(range(256)) * 2)  # namespace 1's data path never stopped
        assert bytes(dev.read_blocks(0, 1)) == bytes(range(256)) * 2


def test_monitor_prints_an_event_raised_from_the_qemu_monitor(events_ctrl, io_dir):
    addr = events_ctrl["address"]
    proc = subprocess.Popen([sys.executable, "-m", "nvmevfio", "monitor", addr, "-o", "json", "--count", "1",
                             "--duration", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        while "no IOMMU:" in line:  # the no-IOMMU lane's warning comes first
            line = proc.stderr.readline()
        assert line.startswith(f"monitoring {addr}: ") and "Asynchronous Event Requests outstanding" in line, line
        path = f"/machine/peripheral/{events_ctrl['id']}"
        t0 = time.monotonic()
        r = qmp(io_dir, "qom-set", {"path": path, "property": "smart_critical_warning", "value": 1})
        assert "error" not in r, r
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        qmp(io_dir, "qom-set", {"path": f"/machine/peripheral/{events_ctrl['id']}",
                                "property": "smart_critical_warning", "value": 0})
    assert proc.returncode == 0, err
    assert time.monotonic() - t0 < 30
    lines = out.splitlines()
    assert len(lines) == 1, out
    ev = json.loads(lines[0])
    assert (ev["type"], ev["info"], ev["log_page"]) == (1, 0x02, 0x02)
    assert ev["type_name"] == "SMART / Health status" and ev["info_name"] == "Spare Below Threshold"
    assert ev["critical_warning"] & 0x01 and ev["log_length"] == 512
    assert err.strip().endswith("1 event")
