"""What the database and JSON cannot hold: found in a person's input, made harmless
in a model's or a tool's output (app/engine/sanitize.py)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine.actions import NewEvent, StepUpdate, Transition
from app.engine.sanitize import (
    MAX_DEPTH,
    TOO_DEEP,
    _clean,  # the fast check, tested against the full rebuild
    _scrubbed,
    problems,
    scrub,
    scrub_transition,
)


def nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"n": value}
    return value


def test_scrub_replaces_nul_lone_surrogates_and_non_finite_numbers():
    dirty = {"out\x00": ["\ud83d ok", {"n": float("inf"), "m": float("nan")}], "x": 1.5}
    clean = scrub(dirty)
    assert clean == {"out\ufffd": ["\ufffd ok", {"n": "inf", "m": "nan"}], "x": 1.5}
    json.dumps(clean, allow_nan=False).encode()  # strict JSON, valid UTF-8


def test_scrub_cuts_what_is_nested_too_deep_and_keeps_clean_values_as_they_are():
    assert TOO_DEEP in json.dumps(scrub(nested(MAX_DEPTH + 5)))
    clean = {"a": [1, "b", {"c": None}]}
    assert scrub(clean) is clean


def test_problems_name_where_each_one_is():
    found = problems(
        {"runbook": "a\x00", "budget": float("-inf"), "list": ["ok", "\udc00"]}, what="config"
    )
    assert found == [
        "config.runbook: contains a NUL character (\\u0000)",
        "config.budget: -inf is not a finite number",
        "config.list[1]: contains a lone surrogate (half of a UTF-16 pair) that is not valid "
        "Unicode",
    ]
    assert problems(nested(MAX_DEPTH + 1), what="args")[0].endswith("nested deeper than 64 levels")


def test_a_transition_is_scrubbed_field_by_field_and_left_alone_when_clean():
    clean = Transition(events=[NewEvent(kind="observation", message="fine")])
    assert scrub_transition(clean) is clean
    dirty = Transition(
        events=[NewEvent(kind="observation", message="a\x00", data={"r": float("nan")})],
        step_updates=[StepUpdate(step_id=1, result={"out": "\ud800"}, set_result=True)],
        report="done\x00",
    )
    scrubbed = scrub_transition(dirty)
    assert scrubbed.events[0].message == "a\ufffd" and scrubbed.events[0].data == {"r": "nan"}
    assert scrubbed.step_updates[0].result == {"out": "\ufffd"}
    assert scrubbed.report == "done\ufffd"


def test_a_clean_transition_and_its_parts_come_back_as_the_same_objects():
    data = {"out": ["ok", 1, 2.5, None, True, {"é ✓": "ünïcode"}]}
    event = NewEvent(kind="observation", message="fine ✓", data=data)
    clean = Transition(events=[event], context_updates={"k": "ünïcode ✓"}, report="\ufffd")
    assert scrub_transition(clean) is clean
    dirty = Transition(events=[event, NewEvent(kind="observation", message="a\x00")])
    assert scrub_transition(dirty).events[0] is event


# JSON-like values with what scrub must replace: NUL, lone surrogates, inf and nan.
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(alphabet=st.characters(codec=None, min_codepoint=0), max_size=8)
    | st.sampled_from(["\x00", "\ud800", "a\udfffb", "é", "\ufffd"])
)
JSON_LIKE = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(SCALARS, inner, max_size=3),
    max_leaves=20,
)


def nested_around(value: object, depth: int) -> object:
    for index in range(depth):
        value = [value] if index % 2 else {"n": value}
    return value


@settings(max_examples=300, deadline=None)
@given(value=JSON_LIKE, depth=st.integers(0, MAX_DEPTH + 2))
def test_the_fast_check_agrees_with_the_full_rebuild(value: object, depth: int):
    """scrub's one look-only pass (`_clean`) says clean exactly when rebuilding
    everything (`_scrubbed`) changes nothing; then scrub returns the value itself."""
    value = nested_around(value, depth)
    rebuilt = _scrubbed(value, 0)
    unchanged = json.dumps(rebuilt) == json.dumps(value)
    assert _clean(value, 0) is unchanged
    assert (scrub(value) is value) is unchanged
    assert json.dumps(scrub(value)) == json.dumps(rebuilt)
    json.dumps(rebuilt, allow_nan=False).encode()  # always storable
