"""A new run's problems come all at once, at submit time, in words (issue 12, item
3): type errors, unknown tools, unknown approvers, the Claude planner without a key
and a task no runbook of the offline planner handles — from the service, the web
form, the JSON API and `agentloop run`."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from app.cli import main
from app.config import load_settings
from app.engine.actions import PlannerFatal
from app.planner.factory import PlannerFactory
from app.service import InvalidInput
from app.service.inputs import Problems
from tests.support.fixtures import Harness
from tests.support.web import csrf_token
from tests.test_web_api import api  # noqa: F401 - the API client fixture

POEM = "write a poem about queues"  # no runbook handles it


@pytest.fixture
def planners(harness: Harness) -> Harness:
    """The harness with this deployment's real planners: offline runbooks, and no
    ANTHROPIC_API_KEY (the tests' environment has none)."""
    harness.service.planners = PlannerFactory(load_settings())
    return harness


def problems_of(harness: Harness, task: str, config: dict[str, object]) -> dict[str, str]:
    with pytest.raises(Problems) as refused:
        harness.service.create_run(task, config=config)
    return {p.field: p.message for p in refused.value.problems}


def test_every_problem_of_a_run_is_listed_at_once(planners: Harness):
    found = problems_of(
        planners,
        POEM,
        {
            "planner": "offline",
            "max_iterations": "many",
            "timeout": -1,
            "approval_required": ["deploy", "nope"],
            "approvers": ["nobody-at-all"],
        },
    )
    assert set(found) == {
        "config.max_iterations",
        "config.timeout",
        "config.approval_required",
        "config.approvers",
        "task",
    }
    assert found["config.approval_required"] == "names unknown tools: nope"
    assert "names no user: nobody-at-all" in found["config.approvers"]


def test_a_task_no_runbook_handles_is_refused_in_words_not_a_regex(planners: Harness):
    found = problems_of(planners, POEM, {"planner": "offline"})
    message = found["task"]
    assert message.startswith("no runbook matches this task")
    assert "For example: “deploy PR 42 to staging, run the tests, report the results”" in message
    assert "(?i)" not in message and "\\b" not in message  # no pattern quoted
    assert "ANTHROPIC_API_KEY" in message
    # Auto plans offline without a key: the same answer.
    assert problems_of(planners, POEM, {})["task"] == message


def test_a_forced_runbook_that_does_not_fit_names_what_it_is_for(planners: Harness):
    found = problems_of(planners, POEM, {"planner": "offline", "runbook": "deploy_pr"})
    assert found == {
        "config.runbook": "runbook deploy_pr does not handle this task: Check out a PR of the "
        "example shop, build it, deploy it, run its tests there, report. For example: "
        "“deploy PR 42 to staging, run the tests, report the results”"
    }


def test_the_claude_planner_without_a_key_is_refused_with_the_rest(planners: Harness):
    found = problems_of(planners, POEM, {"planner": "anthropic", "max_retries": "x"})
    assert set(found) == {"config.planner", "config.max_retries"}
    assert "needs ANTHROPIC_API_KEY" in found["config.planner"]
    assert "choose the offline planner" in found["config.planner"]


def test_a_task_a_runbook_handles_is_created(planners: Harness):
    assert planners.service.create_run("noop chain", config={"planner": "offline"})


def test_the_form_shows_every_problem_at_once(signed_in, planners: Harness):
    page = signed_in.get("/runs/new")
    answer = signed_in.post(
        "/runs/new",
        data={
            "csrf_token": csrf_token(page.text),
            "task": POEM,
            "planner": "offline",
            "approval_required": "deploy, nope",
            "max_iterations": "many",
            "timeout": "-1",
        },
    )
    assert answer.status_code == 400
    html = answer.text
    assert "4 problems to fix before the run can start" in html
    assert 'href="#max_iterations"' in html and 'href="#timeout"' in html
    assert "names unknown tools: nope" in html
    assert "no runbook matches this task" in html and "(?i)" not in html
    assert html.count('aria-invalid="true"') == 4  # each next to its field


def test_the_form_reports_the_claude_planner_without_a_key(signed_in, planners: Harness):
    page = signed_in.get("/runs/new")
    answer = signed_in.post(
        "/runs/new",
        data={"csrf_token": csrf_token(page.text), "task": POEM, "planner": "anthropic",
              "max_retries": "x"},
    )  # fmt: skip
    assert answer.status_code == 400
    assert "2 problems to fix" in answer.text
    assert "needs ANTHROPIC_API_KEY" in answer.text


def test_the_api_lists_every_problem_in_a_422(api, planners: Harness):  # noqa: F811
    response = api(
        "POST",
        "/api/runs",
        {"task": POEM, "config": {"planner": "offline", "approval_required": ["nope"]}},
    )
    assert response.status_code == 422, response.json
    fields = {p["field"] for p in response.json["problems"]}
    assert fields == {"config.approval_required", "task"}


def test_a_body_that_breaks_the_document_lists_the_rest_too(api, planners: Harness):  # noqa: F811
    response = api(
        "POST",
        "/api/runs",
        {"task": POEM, "config": {"max_iterations": "7", "approval_required": ["nope"]}},
    )
    assert response.status_code == 400, response.json
    fields = {p["field"] for p in response.json["problems"]}
    assert fields == {"config.max_iterations", "config.approval_required", "task"}
    assert "config.max_iterations" in response.json["error"]


@pytest.fixture
def cli(database_url, redis_db) -> CliRunner:
    return CliRunner()


def test_agentloop_run_prints_every_problem(cli):
    result = cli.invoke(
        main,
        ["run", POEM, "--planner", "offline", "--max-iterations", "many",
         "--approval-required", "nope", "--timeout", "soon"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "4 problems; nothing was done" in result.output
    for expected in (
        "config.max_iterations:",
        "config.timeout:",
        "config.approval_required: names unknown tools: nope",
        "task: no runbook matches this task",
    ):
        assert expected in result.output


def test_a_bad_config_option_is_listed_with_the_rest(cli):
    result = cli.invoke(main, ["run", POEM, "--planner", "offline", "--config", "{nope"])
    assert result.exit_code == 2
    assert "2 problems" in result.output and "--config: is not valid JSON" in result.output


def test_problems_are_invalid_input(planners: Harness):
    with pytest.raises(InvalidInput, match="task: the task is empty"):
        planners.service.create_run("  ")


def test_a_run_that_failed_before_any_plan_does_not_say_the_planner_is_thinking(
    signed_in, harness: Harness
):
    harness.planner.script = [PlannerFatal(error="the API key was refused")]
    run_id = harness.service.create_run("doomed")
    harness.drain()
    page = signed_in.get(f"/runs/{run_id}").text
    assert "the planner is thinking" not in page
    assert "the run ended before the planner made one" in page
