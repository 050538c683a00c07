"""Step references: ${steps.<position>.result...} in a step's arguments."""

from __future__ import annotations

import pytest

from app.engine.models import PlannedStep
from app.planner.refs import Ref, RefError, check_refs, find_refs, resolve_refs


def step(tool: str = "echo", **args: object) -> PlannedStep:
    return PlannedStep(description=f"run {tool}", tool=tool, args=dict(args))


# --- find_refs -----------------------------------------------------------------------


def test_find_refs_walks_nested_args_and_reports_where() -> None:
    args = {
        "url": "${steps.2.result.url}",
        "env": {"SHA": "sha=${steps.1.result.commit.sha}"},
        "list": ["x", "${steps.3.result}"],
    }
    assert find_refs(args) == [
        Ref("${steps.2.result.url}", 2, ("url",), ("url",)),
        Ref("${steps.1.result.commit.sha}", 1, ("commit", "sha"), ("env", "SHA")),
        Ref("${steps.3.result}", 3, (), ("list", 1)),
    ]


def test_find_refs_ignores_shell_variables_and_escapes() -> None:
    args = {"cmd": "echo ${HOME} $${steps.1.result}", "n": 5, "none": None}
    assert find_refs(args) == []


def test_find_refs_finds_several_in_one_string() -> None:
    refs = find_refs({"msg": "${steps.1.result.a} and ${steps.2.result.b}"})
    assert [(r.position, r.path) for r in refs] == [(1, ("a",)), (2, ("b",))]


# --- check_refs ----------------------------------------------------------------------


def test_refs_to_completed_and_earlier_plan_steps_are_valid() -> None:
    steps = [step(x="${steps.1.result}"), step(y="${steps.5.result.id}")]
    assert check_refs(steps, {1, 2}, first_position=5) == []


def test_ref_to_a_later_step_of_the_plan_is_an_error() -> None:
    steps = [step(x="${steps.6.result}"), step()]
    [problem] = check_refs(steps, {1}, first_position=5)
    assert "step 1 of your plan (echo)" in problem
    assert "a later step" in problem


def test_ref_to_itself_is_an_error() -> None:
    [problem] = check_refs([step(x="${steps.5.result}")], set(), first_position=5)
    assert "refers to itself" in problem


def test_ref_to_an_unknown_step_lists_the_usable_positions() -> None:
    [problem] = check_refs([step(x="${steps.9.result}")], {1, 2})
    assert "position 9" in problem
    assert "usable positions: 1, 2" in problem


def test_malformed_ref_is_an_error_with_the_syntax() -> None:
    [problem] = check_refs([step(x="${steps.two.result}")], {1})
    assert "'${steps.two.result}' is not a valid reference" in problem
    assert "${steps.<position>.result" in problem


def test_escaped_ref_is_not_checked() -> None:
    assert check_refs([step(x="$${steps.99.result}")], set()) == []


# --- resolve_refs --------------------------------------------------------------------


RESULTS = {
    1: {"url": "https://staging.example.com", "port": 8443, "items": [{"id": "a"}, {"id": "b"}]},
    2: "plain text",
}


def test_whole_value_ref_keeps_the_json_type() -> None:
    resolved = resolve_refs({"port": "${steps.1.result.port}", "all": "${steps.1.result}"}, RESULTS)
    assert resolved["port"] == 8443
    assert resolved["all"] == RESULTS[1]


def test_embedded_ref_is_replaced_by_text() -> None:
    args = {"msg": "open ${steps.1.result.url}:${steps.1.result.port} (${steps.2.result})"}
    assert resolve_refs(args, RESULTS) == {
        "msg": "open https://staging.example.com:8443 (plain text)"
    }


def test_list_indexes_and_nested_args_resolve() -> None:
    args = {"ids": ["${steps.1.result.items.1.id}"], "deep": {"x": "${steps.1.result.items.0}"}}
    assert resolve_refs(args, RESULTS) == {"ids": ["b"], "deep": {"x": {"id": "a"}}}


def test_escape_becomes_a_literal_and_other_values_pass_through() -> None:
    args = {"cmd": "echo $${steps.1.result} ${HOME}", "n": 3, "flag": True}
    assert resolve_refs(args, RESULTS) == {
        "cmd": "echo ${steps.1.result} ${HOME}",
        "n": 3,
        "flag": True,
    }


def test_missing_step_is_a_clear_error() -> None:
    with pytest.raises(RefError, match=r"\$\{steps.7.result\}: step 7 has no result"):
        resolve_refs({"x": "${steps.7.result}"}, RESULTS)


def test_missing_key_names_the_keys_there_are() -> None:
    with pytest.raises(RefError, match="result has no key 'host' \\(keys: items, port, url\\)"):
        resolve_refs({"x": "${steps.1.result.host}"}, RESULTS)


def test_bad_index_and_scalar_are_clear_errors() -> None:
    with pytest.raises(RefError, match=r"result\.items is a list of 2; '5' is not an index"):
        resolve_refs({"x": "${steps.1.result.items.5}"}, RESULTS)
    with pytest.raises(RefError, match="result is a str, not a dict or list"):
        resolve_refs({"x": "${steps.2.result.length}"}, RESULTS)


def test_missing_key_in_a_truncated_result_says_so() -> None:
    truncated = {3: {"truncated": True, "bytes": 99999, "preview": "{...", "note": "..."}}
    with pytest.raises(RefError, match="truncated"):
        resolve_refs({"x": "${steps.3.result.url}"}, truncated)


def test_resolve_does_not_change_its_input() -> None:
    args = {"x": ["${steps.1.result.port}"]}
    resolve_refs(args, RESULTS)
    assert args == {"x": ["${steps.1.result.port}"]}
