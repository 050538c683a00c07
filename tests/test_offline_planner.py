"""The offline runbook planner: plans, recoveries, verification; then a whole demo run
driven through the pure engine with the real demo tools."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from app.engine.actions import (
    AwaitHuman,
    Execute,
    Fail,
    Failure,
    NoAlternative,
    Plan,
    PlanFinished,
    PlanInvalid,
    PlannerFatal,
    PlanOutcome,
    PlanProduced,
)
from app.engine.apply import apply_transition
from app.engine.machine import begin_step, decide, fold_decision, fold_plan, fold_step, pause
from app.engine.models import (
    Decision,
    ErrorClass,
    EventKind,
    PlannedStep,
    RetryPolicy,
    RunConfig,
    RunSnapshot,
    RunStatus,
    Step,
    StepStatus,
)
from app.planner.base import PlanRequest, StepView, ToolSpec
from app.planner.offline import (
    OfflinePlanner,
    RunbookError,
    TemplateError,
    load_runbooks,
    render,
)
from app.tools.registry import ToolContext, load_registry, run_tool

TASK = "deploy PR 42 to staging, run the tests, report the results"
DEPLOY_ERROR = "missing env var STAGING_DATABASE_URL: the staging deploy needs its database URL"
REGISTRY = load_registry(["app.tools.builtin", "app.tools.demo"])
TOOL_SPECS = [
    ToolSpec(**t.spec(), requires_approval=t.requires_approval, idempotent=t.idempotent)
    for t in REGISTRY
]


def check(steps: list[PlannedStep]) -> list[str]:
    """The real check: every step's tool exists and its args validate."""
    return [problem for s in steps for problem in REGISTRY.check_args(s.tool, s.args)]


def request(purpose: str = "initial", task: str = TASK, **fields: Any) -> PlanRequest:
    config = fields.pop("config", RunConfig())
    return PlanRequest(
        run_id="run-1", task=task, purpose=purpose, config=config, tools=TOOL_SPECS, **fields
    )


def view(
    position: int, tool: str, args: dict[str, Any], status: str, version: int = 1, **kw: Any
) -> StepView:
    return StepView(
        position=position,
        plan_version=version,
        description=f"{tool} step",
        tool=tool,
        args=args,
        status=status,
        **kw,
    )


def deploy_failure(error: str = DEPLOY_ERROR, rejection: str | None = None) -> Failure:
    return Failure(
        step_id=3,
        description="Deploy the build to staging",
        tool="deploy",
        args={"env": "staging"},
        error=error,
        error_class=ErrorClass.PERMANENT,
        attempts=1,
        rejection_reason=rejection,
    )


def plan_v1(deploy_status: str = "failed") -> list[StepView]:
    return [
        view(1, "checkout_pr", {"pr": 42}, "completed"),
        view(2, "build", {}, "completed"),
        view(3, "deploy", {"env": "staging"}, deploy_status, error=DEPLOY_ERROR),
        view(4, "run_tests", {"env": "staging"}, "pending"),
        view(5, "report", {"title": "PR #42 deployed to staging"}, "pending"),
    ]


@pytest.fixture(scope="module")
def planner() -> OfflinePlanner:
    return OfflinePlanner()


def produced(outcome: PlanOutcome) -> PlanProduced:
    assert isinstance(outcome, PlanProduced), outcome
    return outcome


def fatal(outcome: PlanOutcome) -> str:
    assert isinstance(outcome, PlannerFatal), outcome
    return outcome.error


# --- initial ----------------------------------------------------------------------


def test_initial_plan_follows_the_runbook(planner: OfflinePlanner) -> None:
    plan = produced(planner.plan(request(), check=check))
    assert [(s.tool, s.args) for s in plan.steps] == [
        ("checkout_pr", {"pr": 42}),
        ("build", {}),
        ("deploy", {"env": "staging"}),
        ("run_tests", {"env": "staging"}),
        ("report", {"title": "PR #42 deployed to staging"}),
    ]
    assert plan.steps[0].description == "Check out PR #42 of the shop"
    assert "runbook deploy_pr matched: pr=42, env=staging" in plan.reasoning
    assert planner.name == "offline (runbook)"


def test_the_task_pattern_accepts_other_phrasings(planner: OfflinePlanner) -> None:
    plan = produced(
        planner.plan(request(task="Please deploy pull request #7 to staging"), check=check)
    )
    assert plan.steps[0].args == {"pr": 7}


def test_a_runbook_named_in_the_config_is_used(planner: OfflinePlanner) -> None:
    config = RunConfig(runbook="deploy_pr")
    assert produced(planner.plan(request(config=config), check=check)).steps


def test_an_unknown_runbook_in_the_config_is_fatal(planner: OfflinePlanner) -> None:
    error = fatal(planner.plan(request(config=RunConfig(runbook="nope")), check=check))
    assert "no runbook named 'nope'" in error and "deploy_pr" in error


def test_a_task_no_runbook_matches_is_fatal(planner: OfflinePlanner) -> None:
    error = fatal(planner.plan(request(task="write a poem about queues"), check=check))
    assert "no runbook matches this task" in error
    assert "deploy_pr" in error
    assert "set ANTHROPIC_API_KEY to let Claude plan arbitrary tasks" in error


def test_a_plan_the_check_rejects_is_invalid(planner: OfflinePlanner) -> None:
    outcome = planner.plan(request(task="deploy PR 42 to production"), check=check)
    assert isinstance(outcome, PlanInvalid), outcome
    assert "deploy" in outcome.error and "staging" in outcome.error
    assert [s["tool"] for s in outcome.raw][2] == "deploy"


def test_check_is_always_consulted(planner: OfflinePlanner) -> None:
    seen: list[list[PlannedStep]] = []

    def refuse(steps: list[PlannedStep]) -> list[str]:
        seen.append(steps)
        return ["build: not today"]

    outcome = planner.plan(request(), check=refuse)
    assert isinstance(outcome, PlanInvalid) and outcome.error == "build: not today"
    assert len(seen) == 1 and len(seen[0]) == 5


# --- replan -----------------------------------------------------------------------


def test_a_missing_env_var_inserts_set_env_before_the_failed_step(
    planner: OfflinePlanner,
) -> None:
    outcome = planner.plan(
        request("replan", failure=deploy_failure(), current_plan=plan_v1()), check=check
    )
    plan = produced(outcome)
    assert [(s.tool, s.args) for s in plan.steps] == [
        ("set_env", {"name": "STAGING_DATABASE_URL", "value": "sqlite:///staging.db"}),
        ("deploy", {"env": "staging"}),
        ("run_tests", {"env": "staging"}),
        ("report", {"title": "PR #42 deployed to staging"}),
    ]
    assert plan.steps[1].description == "Deploy the build to staging"
    assert "retrying deploy" in plan.reasoning


def test_recovery_retries_the_args_a_person_approved(planner: OfflinePlanner) -> None:
    failure = deploy_failure().model_copy(update={"args": {"env": "staging", "note": "x"}})
    plan = produced(
        planner.plan(request("replan", failure=failure, current_plan=plan_v1()), check=lambda s: [])
    )
    assert plan.steps[1].args == {"env": "staging", "note": "x"}


def test_a_rejected_step_leaves_no_alternative(planner: OfflinePlanner) -> None:
    """Not a planner error: the run ends as the person decided."""
    failure = deploy_failure(
        error="rejected by ana: not today", rejection="rejected by ana: not today"
    )
    plan = plan_v1(deploy_status="rejected")
    outcome = planner.plan(request("replan", failure=failure, current_plan=plan), check=check)
    assert isinstance(outcome, NoAlternative), outcome
    assert (
        outcome.reason
        == "runbook deploy_pr has no alternative to deploy after: rejected by ana: not today"
    )


def test_an_error_no_rule_matches_is_fatal(planner: OfflinePlanner) -> None:
    failure = deploy_failure(error="disk full")
    error = fatal(
        planner.plan(request("replan", failure=failure, current_plan=plan_v1()), check=check)
    )
    assert error == "runbook deploy_pr has no alternative to deploy after: disk full"


def test_a_missing_var_without_a_default_is_fatal(planner: OfflinePlanner) -> None:
    failure = deploy_failure(error="missing env var PAYMENTS_API_URL")
    error = fatal(
        planner.plan(request("replan", failure=failure, current_plan=plan_v1()), check=check)
    )
    assert "no [env_defaults] entry for PAYMENTS_API_URL" in error


def test_a_recovery_that_already_ran_is_not_repeated(planner: OfflinePlanner) -> None:
    done = [
        *plan_v1()[:2],
        view(
            6,
            "set_env",
            {"name": "STAGING_DATABASE_URL", "value": "sqlite:///staging.db"},
            "completed",
            version=2,
        ),
    ]
    current = [done[2], view(7, "deploy", {"env": "staging"}, "failed", version=2)]
    outcome = planner.plan(
        request("replan", failure=deploy_failure(), completed=done, current_plan=current),
        check=check,
    )
    assert "even after set_env" in fatal(outcome)


# --- verify -----------------------------------------------------------------------


def finished_run() -> tuple[list[StepView], list[StepView]]:
    """(completed, current_plan) after the recovery: v1 did checkout and build, v2 the rest."""
    v1 = plan_v1()[:2]
    v2 = [
        view(6, "set_env", {"name": "STAGING_DATABASE_URL", "value": "x"}, "completed", 2),
        view(7, "deploy", {"env": "staging"}, "completed", 2),
        view(8, "run_tests", {"env": "staging"}, "completed", 2),
        view(9, "report", {"title": "t"}, "completed", 2, result={"report": "# Done\n"}),
    ]
    return [*v1, *v2], v2


def test_verify_finishes_with_the_report_steps_markdown(planner: OfflinePlanner) -> None:
    completed, current = finished_run()
    outcome = planner.plan(
        request("verify", completed=completed, current_plan=current), check=check
    )
    assert isinstance(outcome, PlanFinished), outcome
    assert outcome.report == "# Done\n"


def test_verify_without_a_report_result_summarizes_the_steps(planner: OfflinePlanner) -> None:
    completed, _ = finished_run()
    completed[-1] = completed[-1].model_copy(update={"result": {"marked_done_by": "ana"}})
    outcome = planner.plan(request("verify", completed=completed), check=check)
    assert isinstance(outcome, PlanFinished), outcome
    assert outcome.report.startswith(f"# {TASK}")
    assert "Runbook `deploy_pr` completed" in outcome.report
    assert "(`run_tests`)" in outcome.report


def test_verify_plans_the_steps_still_missing(planner: OfflinePlanner) -> None:
    plan = [*plan_v1()[:2], *[s.model_copy(update={"status": "skipped"}) for s in plan_v1()[2:]]]
    outcome = planner.plan(request("verify", current_plan=plan), check=check)
    assert [s.tool for s in produced(outcome).steps] == ["deploy", "run_tests", "report"]


# --- runbook files and templates ----------------------------------------------------


def test_templates() -> None:
    variables = {"pr": "42", "name": "DB_URL"}
    tables = {"env_defaults": {"DB_URL": "sqlite:///x.db"}}
    assert render("{pr:int}", variables, tables) == 42
    assert render("PR #{pr} {{literal}}", variables, tables) == "PR #42 {literal}"
    assert render({"v": ["{env_defaults[name]}"]}, variables, tables) == {"v": ["sqlite:///x.db"]}
    with pytest.raises(TemplateError):
        render("{missing}", variables, tables)
    with pytest.raises(TemplateError):
        render("{name:int}", variables, tables)


RUNBOOK = """
name = "{name}"
description = "A test runbook."
match = '(?i)greet (?P<who>\\w+)'
[[steps]]
description = "Greet {step_var}"
tool = "shell"
args = {{ argv = ["echo", "hello"] }}
"""


def write_runbook(directory: Path, file: str, name: str = "greet", step_var: str = "{who}") -> None:
    directory.mkdir(exist_ok=True)
    (directory / file).write_text(RUNBOOK.format(name=name, step_var=step_var))


def test_a_runbook_directory_of_ones_own(tmp_path: Path) -> None:
    write_runbook(tmp_path, "greet.toml")
    plan = produced(OfflinePlanner(tmp_path).plan(request(task="greet Ana"), check=check))
    assert plan.steps[0].description == "Greet Ana"


def test_an_unknown_template_variable_is_a_load_error_naming_the_file(tmp_path: Path) -> None:
    write_runbook(tmp_path, "bad.toml", step_var="{nobody}")
    with pytest.raises(RunbookError, match=r"bad\.toml.*unknown variable \{nobody\}"):
        load_runbooks(tmp_path)


def test_broken_toml_and_duplicate_names_are_load_errors(tmp_path: Path) -> None:
    (tmp_path / "broken.toml").write_text("name = ")
    with pytest.raises(RunbookError, match=r"broken\.toml"):
        load_runbooks(tmp_path)
    (tmp_path / "broken.toml").unlink()
    write_runbook(tmp_path, "a.toml")
    write_runbook(tmp_path, "b.toml")
    with pytest.raises(RunbookError, match="already exists"):
        load_runbooks(tmp_path)


def test_the_shipped_runbooks_load() -> None:
    assert [r.name for r in OfflinePlanner().runbooks] == ["deploy_pr"]


# --- a whole demo run through the pure engine -------------------------------------

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def views(run: RunSnapshot, steps: list[Step]) -> list[StepView]:
    return [StepView.of(s) for s in steps]


def ask_planner(planner: OfflinePlanner, run: RunSnapshot, action: Plan) -> PlanOutcome:
    completed = [s for s in run.steps if s.status is StepStatus.COMPLETED]
    current = [s for s in run.steps if s.plan_version == run.plan_version]
    req = request(
        action.purpose,
        failure=action.failure,
        completed=views(run, completed),
        current_plan=views(run, current),
    )
    return planner.plan(req, check=check)


def execute(run: RunSnapshot, action: Execute, tmp_path: Path) -> RunSnapshot:
    run = apply_transition(run, begin_step(run, action))
    step = run.step(action.step_id)
    ctx = ToolContext(
        run_id=run.id,
        step_id=step.id,
        idempotency_key=step.idempotency_key,
        workspace=tmp_path / "workspace",
        env=run.context,
        settings={"examples_dir": "examples", "outbox_dir": str(tmp_path / "outbox")},
    )
    tool = REGISTRY.get(step.tool)
    outcome = run_tool(tool, step.args, ctx, timeout=tool.timeout)
    transition = fold_step(
        run, step, outcome, policy=REGISTRY.policies().get(step.tool), jitter_sample=0.0
    )
    return apply_transition(run, transition)


def test_the_demo_task_runs_to_completion_offline(
    planner: OfflinePlanner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # "examples" above is relative
    (tmp_path / "workspace").mkdir()
    config = RunConfig(retry_policy=RetryPolicy(base=0.01, max_backoff=0.01))
    run = RunSnapshot(
        id="run-1",
        task=TASK,
        status=RunStatus.RUNNING,
        config=config,
        iteration=0,
        tick=0,
        deadline=NOW + timedelta(hours=1),
    )
    approvals: list[str] = []
    events = []
    for _ in range(40):
        action = decide(run, now=NOW, tools=REGISTRY.policies())
        match action:
            case Plan():
                transition = fold_plan(
                    run, action, ask_planner(planner, run, action), jitter_sample=0.0
                )
            case Execute():
                run = execute(run, action, tmp_path)
                continue
            case AwaitHuman():
                step = run.step(action.step_id)
                approvals.append(REGISTRY.get(step.tool).describe_call(step.args))
                run = apply_transition(run, pause(run, action))
                transition = fold_decision(
                    step, action.kind, Decision.APPROVE, by="tester", context=run.context
                )
            case Fail():
                pytest.fail(action.reason)
        events += transition.events
        run = apply_transition(run, transition)
        if run.status is RunStatus.COMPLETED:
            final_report = transition.report
            break
    assert run.status is RunStatus.COMPLETED, [e.message for e in events][-6:]
    assert run.plan_version == 2 and run.replans == 1
    # Asked twice: the retry of the failed deploy has the very args that were approved,
    # but set_env changed the environment the deploy reads in between, so the first
    # approval was for a different call.
    assert approvals == ["deploy to staging", "deploy to staging"]
    assert run.context == {"STAGING_DATABASE_URL": "sqlite:///staging.db"}
    by_tool = {s.tool: s for s in run.steps if s.status is StepStatus.COMPLETED}
    assert by_tool["run_tests"].attempts == 2  # the cold fixture cache, then the real run
    assert by_tool["checkout_pr"].plan_version == 1  # completed work was not redone
    finished = [t for t in events if t.kind is EventKind.STATUS]
    assert finished and finished[-1].message == "run completed"
    report = (tmp_path / "workspace" / "report.md").read_text()
    assert report.startswith("# PR #42 deployed to staging")
    assert final_report == report  # the planner finished with the report step's markdown
    assert (tmp_path / "outbox" / "slack-run-1.json").is_file()


def test_a_runbook_whose_tools_this_deployment_lacks_is_not_followed(planner: OfflinePlanner):
    """deploy_pr ships with the package but uses the demo's tools: a deployment without
    them is told so, instead of getting a plan of unknown tools."""
    asked = request("initial").model_copy(update={"tools": []})
    outcome = planner.plan(asked, check=lambda steps: [])
    assert isinstance(outcome, PlannerFatal)
    assert "runbook deploy_pr matches the task but uses tools this deployment does not have" in (
        outcome.error
    )
    assert "checkout_pr" in outcome.error
