"""Asynchronous events on the simulator: AERs stay outstanding beside every other admin
command, each event is decoded, its log page read with RAE=0, namespace notices refresh the
namespace table, a reset re-arms them, and a controller without AERs costs nothing."""

import threading
import time

import numpy as np
import pytest

from nvmevfio.errors import Refused
from nvmevfio.nvme.spec import AdminOpcode


def test_aers_are_outstanding_after_identify(rig):
    p = rig.ready()
    assert len(rig.sim.aers) == 4  # AERL 3: four outstanding
    assert rig.sim.aec == 0x1F | 1 << 8  # the five critical warnings and OAES's namespace notices
    assert p.event_config == {"aec": 0x11F, "outstanding": 4, "events_seen": 0, "events_off": None}
    assert rig.broker.admin.in_flight == 0
    p.write(1, 0, b"\x11" * 512)  # I/O and admin commands run beside them
    assert p.identify_controller()["aerl"] == 3 and p.poll_events() == []


def test_temperature_threshold_event_is_decoded_and_its_log_read(rig):
    p = rig.ready()
    p.set_features(0x04, 290)  # over temperature threshold 290 K < 300 K: SMART / health event
    events = p.poll_events(1.0)
    assert len(events) == 1
    ev = events[0]
    assert (ev.type, ev.info, ev.log_page) == (1, 0x01, 0x02)
    assert (ev.type_name, ev.info_name, ev.log_page_name) == (
        "SMART / Health status", "Temperature Threshold", "SMART / Health Information")
    assert ev.detail == {"critical_warning": 0x02, "temperature": 300} and len(ev.log) == 512
    glp = rig.sim.last_sqe[AdminOpcode.GET_LOG_PAGE]
    assert int(glp["cdw10"]) & 0xFF == 0x02 and not int(glp["cdw10"]) & (1 << 15)  # RAE=0: cleared
    assert len(rig.sim.aers) == 4 and 1 not in rig.sim.masked_types  # re-armed, unmasked
    d = ev.as_dict()
    assert d["type_name"] == "SMART / Health status" and d["critical_warning"] == 2 and d["log_page"] == 2
    assert "Temperature Threshold (0x01)" in str(ev)
    # a second one comes too (the first was cleared by reading its log)
    p.set_features(0x04, 280)
    assert [e.info for e in p.poll_events(1.0)] == [0x01]


def test_namespace_notice_refreshes_the_namespace_table(rig):
    p = rig.ready()
    block = p.identify_namespace(2).block_size
    pattern = np.arange(block, dtype=np.uint8) ^ 0x5A
    p.write(2, 0, pattern)
    assert np.array_equal(p.read(2, 0, 1), pattern)
    rig.sim.change_namespace(2, attached=False)  # the AER completes now; nobody has looked yet
    ev = p.poll_events(1.0)
    assert len(ev) == 1 and ev[0].namespace_changed and ev[0].nsids == (2,)
    assert ev[0].as_dict()["changed_nsids"] == [2]
    with pytest.raises(Refused) as ei:
        p.read(2, 0, 1)
    assert ei.value.reason == "namespace-inactive"  # refused before the device saw it
    rig.sim.change_namespace(2, attached=True)
    assert [e.nsids for e in p.poll_events(1.0)] == [(2,)]
    assert np.array_equal(p.read(2, 0, 1), pattern)  # attached again: the same data, read by the device


def test_an_event_met_by_another_admin_command_is_delivered_after_it(rig):
    p = rig.ready()
    seen = []
    rig.broker._event_callbacks.append(seen.append)  # no watcher thread: the command's thread delivers
    rig.sim.change_namespace(2, attached=False)
    ident = p.identify_controller()  # its reap meets the AER completion first, keeps it aside
    assert ident["aerl"] == 3 and [e.info for e in seen] == [0] and 2 not in rig.broker.namespaces


def test_on_event_watcher_delivers_without_any_command(rig):
    p = rig.ready()
    got = threading.Event()
    seen = []

    def callback(ev):
        seen.append(ev)
        got.set()

    p.on_event(callback)
    rig.sim.raise_event(1, 0x02, 0x02)  # Spare Below Threshold
    assert got.wait(2.0)
    assert seen[0].info_name == "Spare Below Threshold"
    rig.broker.close()
    assert rig.broker._watch is None


def test_aers_are_never_late(rig):
    p = rig.ready()
    rig.broker.command_timeout_s = 0.1
    time.sleep(0.3)  # the AERs are older than the command timeout
    p.identify_controller()
    p.write(1, 0, b"\x22" * 512)
    assert (rig.broker.aborts, rig.broker.resets) == (0, 0)


def test_a_reset_re_arms_the_aers(rig):
    p = rig.ready()
    rig.broker.command_timeout_s = 0.2
    rig.sim.drop_next = 1  # a lost completion: abort (not honoured), reset, requeue
    p.write(1, 8, b"\x33" * 512)
    assert rig.broker.resets == 1 and len(rig.sim.aers) == 4 and rig.broker.admin.ring.standing == 4
    p.set_features(0x04, 290)
    assert [e.info for e in p.poll_events(1.0)] == [0x01]


def test_a_controller_without_aers_turns_events_off(rig):
    rig.sim.fail_next[AdminOpcode.ASYNC_EVENT_REQUEST] = (0, 0x01)  # Invalid Command Opcode, once
    p = rig.ready()
    assert p.poll_events(0.05) == []  # the refused AER is met, events go off
    assert p.event_config["events_off"] == "Invalid Command Opcode (SCT 0x0, SC 0x01)"
    p.write(1, 0, b"\x44" * 512)
    assert bytes(p.read(1, 0, 1)) == b"\x44" * 512
