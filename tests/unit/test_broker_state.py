"""The broker's lifecycle: its transition table, exactly, and the one function that changes it."""

from __future__ import annotations

import types

import pytest

from nvmevfio.broker import Broker
from nvmevfio.broker.state import TRANSITIONS, BrokerState, Lifecycle
from nvmevfio.errors import IllegalTransition

S = BrokerState
ALLOWED = {
    (S.DISABLED, S.ADMIN_READY), (S.DISABLED, S.RESETTING), (S.DISABLED, S.GONE),
    (S.ADMIN_READY, S.IO_READY), (S.ADMIN_READY, S.DISABLED), (S.ADMIN_READY, S.RESETTING),
    (S.ADMIN_READY, S.GONE),
    (S.IO_READY, S.DISABLED), (S.IO_READY, S.RESETTING), (S.IO_READY, S.GONE),
    (S.RESETTING, S.DISABLED), (S.RESETTING, S.ADMIN_READY), (S.RESETTING, S.IO_READY), (S.RESETTING, S.FAILED),
    (S.RESETTING, S.GONE),
    (S.FAILED, S.DISABLED), (S.FAILED, S.GONE),
}


def test_the_states_and_their_names():
    assert [(s.name, s.value) for s in S] == [
        ("DISABLED", "disabled"), ("ADMIN_READY", "admin-ready"), ("IO_READY", "io-ready"),
        ("RESETTING", "resetting"), ("FAILED", "failed"), ("GONE", "gone")]


def test_the_table_is_exactly_the_allowed_transitions():
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets} == ALLOWED
    assert set(TRANSITIONS) == set(S)
    assert TRANSITIONS[S.GONE] == frozenset()  # gone is for good


def _at(state: BrokerState) -> Lifecycle:
    life = Lifecycle()
    life.state = state
    return life


@pytest.mark.parametrize(("old", "new"), sorted(ALLOWED, key=lambda t: (t[0].value, t[1].value)))
def test_every_allowed_transition(old, new):
    life = _at(old)
    assert life.to(new, why="w") is old
    assert life.state is new


REFUSED = [
    (S.DISABLED, S.IO_READY), (S.DISABLED, S.FAILED), (S.DISABLED, S.DISABLED), (S.ADMIN_READY, S.FAILED),
    (S.ADMIN_READY, S.ADMIN_READY), (S.IO_READY, S.ADMIN_READY), (S.IO_READY, S.FAILED), (S.IO_READY, S.IO_READY),
    (S.RESETTING, S.RESETTING), (S.FAILED, S.ADMIN_READY), (S.FAILED, S.IO_READY), (S.FAILED, S.RESETTING),
    (S.GONE, S.DISABLED), (S.GONE, S.ADMIN_READY), (S.GONE, S.RESETTING), (S.GONE, S.FAILED), (S.GONE, S.GONE),
]


@pytest.mark.parametrize(("old", "new"), REFUSED)
def test_a_refused_transition_names_both_states_and_changes_nothing(old, new):
    assert (old, new) not in ALLOWED
    life = _at(old)
    with pytest.raises(IllegalTransition) as ei:
        life.to(new)
    assert life.state is old
    assert (ei.value.from_state, ei.value.to_state) == (old.value, new.value)
    assert ei.value.reason == "illegal-transition"
    assert str(ei.value) == f"broker: no transition from {old.value} to {new.value} [illegal-transition]"
    assert ei.value.context == {"machine": "broker", "from_state": old.value, "to_state": new.value}


def test_failed_keeps_its_reason_until_enable_starts_again():
    life = _at(S.RESETTING)
    life.to(S.FAILED, why="3 controller resets within 60 s")
    assert life.failed_why == "3 controller resets within 60 s"
    life.to(S.GONE)
    assert life.failed_why == "3 controller resets within 60 s"  # refusals say gone first, as before
    life = _at(S.FAILED)
    life.failed_why = "x"
    life.to(S.DISABLED)
    assert life.failed_why is None


def test_to_if_moves_only_from_the_states_expected():
    life = _at(S.GONE)
    assert life.to_if((S.RESETTING,), S.IO_READY) is False and life.state is S.GONE
    life = _at(S.RESETTING)
    assert life.to_if((S.RESETTING,), S.IO_READY) is True and life.state is S.IO_READY


def test_the_facade_starts_disabled_and_no_component_holds_it():
    b = Broker(types.SimpleNamespace(), types.SimpleNamespace(page_size=4096))  # type: ignore[arg-type]
    assert b.lifecycle is S.DISABLED and b.failed is None and b.gone is False
    parts = [v for k, v in vars(b).items() if k.startswith("_") and not callable(v)]
    assert len(parts) >= 5
    for part in parts:
        assert all(v is not b for v in vars(part).values()), f"{type(part).__name__} holds the facade"
