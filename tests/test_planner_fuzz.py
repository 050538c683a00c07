"""Fuzzing AnthropicPlanner.plan() with malformed API answers over real HTTP.

Issue 8, defect 10: 149 of 800 fuzzed answers escaped plan() as exceptions and,
through a worker, ended runs as "internal error" with their token use lost.
Here hypothesis generates answers of every odd kind the API, or something in
front of it, could send: any status and content-type, non-JSON and invalid
UTF-8 bodies, JSON of the wrong shape, missing or ill-typed usage, content that
is null, a string or a list of odd blocks, tool_use input that is no object,
JSON nested ~10,000 levels, huge numbers, NULs and lone surrogates. The local
fake serves them to the real SDK, two to four per plan() so repairs run too.

Each plan() must end as a PlanOutcome without raising; a PlanProduced may
contain no step the registry's check refuses; every request sent is one the API
accepts (tests.fake_anthropic.conversation_problem); and every readable usage
an answer gave is in the outcome. Examples are derandomized: the same 800 plans
on every run, with no dependence on wall-clock time.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.engine.actions import (
    NoAlternative,
    PlanFinished,
    PlanInvalid,
    PlannerFatal,
    PlannerUnavailable,
    PlanProduced,
)
from app.engine.models import RunConfig
from app.planner.anthropic import AnthropicPlanner
from tests.fake_anthropic import Entry, FakeAnthropic, conversation_problem
from tests.test_anthropic_planner import DEPLOY, MODEL, SET_ENV, TESTS, check, request

EXAMPLES = 800  # plans; each is scripted two to four answers
MIN_ANSWERS = 1000
OUTCOMES = (
    PlanProduced, PlanFinished, NoAlternative, PlanInvalid, PlannerUnavailable, PlannerFatal,
)  # fmt: skip

# --- strategies -------------------------------------------------------------------------


def mostly(usual: st.SearchStrategy[Any], odd: st.SearchStrategy[Any], *, percent: int) -> Any:
    """`usual` in about `percent` of draws, `odd` in the rest (so repairs run often)."""
    coin = st.sampled_from([True] * percent + [False] * (100 - percent))
    return coin.flatmap(lambda heads: usual if heads else odd)


odd_text = st.text(
    alphabet=st.one_of(
        st.characters(codec=None, exclude_categories=()),  # surrogates included
        st.sampled_from(["\x00", "\ud800", "\udfff", "\ufffd", "\u202e", "{", '"', "\\"]),
    ),
    max_size=12,
)
huge_int = st.sampled_from([2**63, -(2**63) - 1, 10**40, 10**300, -1, 0])
numbers = st.one_of(
    st.integers(-(10**6), 10**6), huge_int, st.floats(allow_nan=False, allow_infinity=False)
)
scalars = st.one_of(st.none(), st.booleans(), numbers, odd_text)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(odd_text, inner, max_size=4)
    ),
    max_leaves=6,
)

good_steps = st.lists(st.sampled_from([DEPLOY, TESTS, SET_ENV]), min_size=1, max_size=3)
odd_step = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"description": odd_text, "tool": st.sampled_from(["deploy", "delete", "x", ""])},
        optional={"args": json_values},
    ),
    st.builds(lambda a: {**DEPLOY, "args": a}, json_values),
    st.builds(lambda d: {**SET_ENV, "description": d}, odd_text),
)
plan_inputs = st.one_of(
    st.builds(lambda s: {"reasoning": "ok", "steps": s}, good_steps),
    st.builds(lambda s: {"steps": s}, st.lists(odd_step, max_size=3)),
    st.builds(lambda r: {"done": True, "report": r}, odd_text),
    st.builds(lambda s: {"done": False, "steps": s}, good_steps),
    st.builds(lambda r: {"reasoning": "ok", "no_alternative": r}, odd_text),
    st.builds(lambda s, r: {"steps": s, "no_alternative": r}, good_steps, odd_text),
    json_values,  # objects of any shape, and inputs that are no object at all
)
tool_names = st.sampled_from(["submit_plan", "finish", "deploy", "", "bad name!", None, 7])
tool_ids = st.one_of(st.just(None), st.sampled_from(["toolu_1", "toolu_1", "a b", ""]), odd_text)
blocks = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("tool_use"), "name": tool_names, "input": plan_inputs},
        optional={"id": tool_ids},
    ),
    st.fixed_dictionaries({"type": st.just("text")}, optional={"text": json_values}),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["thinking", "redacted_thinking", "banana", None, 3])},
        optional={"thinking": json_values, "signature": json_values, "data": json_values},
    ),
    json_values,
)
usages = st.one_of(
    st.just({"input_tokens": 100, "output_tokens": 50}),
    st.fixed_dictionaries(
        {},
        optional={
            "input_tokens": scalars,
            "output_tokens": scalars,
            "cache_creation_input_tokens": scalars,
            "cache_read_input_tokens": scalars,
        },
    ),
    st.fixed_dictionaries({"input_tokens": huge_int, "output_tokens": huge_int}),
    json_values,
)


@st.composite
def messages_(draw: st.DrawFn) -> Entry:
    """A message-shaped body with any of its fields missing or of the wrong type."""
    content = st.lists(blocks, max_size=3)
    message: dict[str, Any] = {
        "id": "msg_fuzz",
        "type": draw(st.sampled_from(["message"] * 6 + ["error", None])),
        "role": "assistant",
        "model": draw(mostly(st.just(MODEL), st.one_of(odd_text, json_values), percent=80)),
        "content": draw(mostly(content, json_values, percent=85)),
        "stop_reason": draw(
            st.sampled_from(["tool_use", "end_turn", "max_tokens", "refusal", None, 5, "?"])
        ),
        "usage": draw(usages),
    }
    for name in draw(st.lists(st.sampled_from(sorted(message)), max_size=2)):
        message.pop(name, None)
    return {"body": message}


deep = st.builds(
    lambda n, opener: {"raw": opener[0] * n + opener[1] + opener[2] * n},
    st.integers(900, 12_000),
    st.sampled_from([("[", "1", "]"), ('{"a":', "1", "}"), ('{"content":[', "", "]}")]),
)
raw_bodies = st.one_of(
    st.builds(lambda t: {"raw": t}, odd_text),
    st.builds(lambda b: {"raw": b}, st.binary(max_size=40)),
    st.sampled_from(
        [
            {"raw": ""},
            {"raw": "NaN"},
            {"raw": '{"content": [], "usage": {"input_tokens": 1e999}}'},
            {"raw": '{"content": [], "usage": {"input_tokens": Infinity}}'},
            {"raw": '{"content": [], "usage": {"input_tokens": ' + "9" * 5000 + "}}"},
            {"raw": '{"content": [{"type": "text", "text": "\\ud800\\u0000"}]}'},
            {"raw": '{"content": "truncated'},
        ]
    ),
    deep,
)
statuses = mostly(
    st.just(200),
    st.sampled_from(
        [
            201,
            202,
            204,
            206,
            301,
            302,
            304,
            400,
            401,
            402,
            403,
            404,
            408,
            409,
            413,
            418,
            422,
            429,
            451,
            500,
            502,
            503,
            504,
            529,
            599,
        ]
    ),
    percent=80,
)
header_values = st.sampled_from(["7", "-3", "nan", "inf", "1e400", "soon", "", "0.5"])
headers = st.fixed_dictionaries(
    {},
    optional={
        "content-type": st.sampled_from(
            ["application/json", "text/html", "text/plain", "application/json; charset=latin-1"]
        ),
        "retry-after": st.one_of(header_values, st.just("Wed, 21 Oct 2015 07:28:00 GMT")),
        "retry-after-ms": header_values,
    },
)
answers = st.builds(
    lambda body, status, extra: {**body, "status": status, "headers": extra},
    mostly(
        messages_(),
        st.one_of(raw_bodies, st.builds(lambda v: {"body": v}, json_values)),
        percent=75,
    ),
    statuses,
    headers,
)


# --- the property -----------------------------------------------------------------------


@pytest.fixture
def served() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as server:
        yield server


def test_no_malformed_answer_escapes_plan(served: FakeAnthropic) -> None:
    planner = AnthropicPlanner(api_key="test-key", base_url=served.base_url, timeout=30)
    escapes: list[str] = []
    outcomes: Counter[str] = Counter()
    answered = 0

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        script=st.lists(answers, min_size=2, max_size=4),
        purpose=st.sampled_from(["initial", "replan", "verify"]),
        budget=mostly(st.none(), st.integers(-5, 5000), percent=80),
    )
    def one_plan(script: list[Entry], purpose: str, budget: int | None) -> None:
        nonlocal answered
        served.reset().script(*script)
        plan_request = request(
            purpose=purpose,
            config=RunConfig(model=MODEL, max_plan_repairs=len(script) - 1),
            tokens_left=budget,
        )
        try:
            outcome = planner.plan(plan_request, check=check)
        except Exception as exc:  # counting what escapes is the point
            escapes.append(f"{type(exc).__name__}: {str(exc)[:100]} <- {repr(script)[:300]}")
            return
        sent = served.requests
        answered += len(sent)
        outcomes[type(outcome).__name__] += 1
        assert isinstance(outcome, OUTCOMES)
        if isinstance(outcome, PlanProduced):
            assert check(outcome.steps) == []  # no tool ever runs from an invalid plan
        for request_sent in sent:
            assert conversation_problem(request_sent.body) is None, request_sent.body
        _assert_usage_kept(script[: len(sent)], outcome.usage)
        # Everything in an outcome can be stored and shown: no NUL, no lone surrogate.
        json.dumps(outcome.model_dump(mode="json"), ensure_ascii=False).encode()
        assert "\x00" not in outcome.model_dump_json()

    try:
        one_plan()
    finally:
        planner.close()
    assert escapes == [], f"{len(escapes)} escaped plan():\n" + "\n".join(escapes[:20])
    assert answered >= MIN_ANSWERS, (answered, outcomes)
    assert len(outcomes) >= 3, outcomes  # the generator reaches most outcomes


def _assert_usage_kept(consumed: list[Entry], recorded: list[Any]) -> None:
    """Every 2xx message that gave both token counts readably has them in the outcome."""
    counts = Counter((u.input_tokens, u.output_tokens) for u in recorded)
    for entry in consumed:
        body = entry.get("body")
        usage = body.get("usage") if isinstance(body, dict) else None
        if not (200 <= entry["status"] < 300 and entry["status"] != 204):
            continue
        if not isinstance(usage, dict) or body.get("type") == "error":
            continue
        pair = (usage.get("input_tokens"), usage.get("output_tokens"))
        if all(type(n) is int and 0 <= n < 10**12 for n in pair):
            counts[pair] -= 1
            assert counts[pair] >= 0, (pair, recorded)
