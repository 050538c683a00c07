"""The pure state machine: every transition, in milliseconds, no services."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from app.engine.actions import (
    AwaitHuman,
    Execute,
    Fail,
    LlmUsage,
    Plan,
    PlanFinished,
    PlanInvalid,
    PlannerFatal,
    PlannerUnavailable,
    PlanProduced,
    StepFailed,
    StepSucceeded,
)
from app.engine.apply import apply_transition
from app.engine.machine import (
    backoff_delay,
    begin_step,
    decide,
    fold_decision,
    fold_plan,
    fold_step,
    pause,
)
from app.engine.models import (
    Decision,
    ErrorClass,
    EventKind,
    PauseKind,
    PlannedStep,
    RetryPolicy,
    RunConfig,
    RunSnapshot,
    RunStatus,
    StepStatus,
    ToolPolicy,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
TOOLS = {
    "build": ToolPolicy(idempotent=True),
    "deploy": ToolPolicy(requires_approval=False),
    "wipe": ToolPolicy(requires_approval=True),
    "notify": ToolPolicy(),
    "release": ToolPolicy(idempotent=False),
}


def new_run(**config: object) -> RunSnapshot:
    return RunSnapshot(
        id="r1",
        task="ship it",
        status=RunStatus.RUNNING,
        config=RunConfig.model_validate(config),
        iteration=1,
        tick=1,
        deadline=NOW + timedelta(seconds=600),
    )


def planned(*tools: str) -> PlanProduced:
    return PlanProduced(steps=[PlannedStep(description=f"do {t}", tool=t) for t in tools])


def with_plan(run: RunSnapshot, *tools: str) -> RunSnapshot:
    transition = fold_plan(run, Plan(purpose="initial"), planned(*tools), jitter_sample=0)
    return apply_transition(run, transition)


def execute(run: RunSnapshot, outcome: StepSucceeded | StepFailed, jitter: float = 0.0):
    action = decide(run, now=NOW, tools=TOOLS)
    assert isinstance(action, Execute), action
    started = apply_transition(run, begin_step(run, action))
    step = started.step(action.step_id)
    assert step.status is StepStatus.RUNNING
    transition = fold_step(
        started, step, outcome, policy=TOOLS.get(step.tool), jitter_sample=jitter
    )
    return apply_transition(started, transition), transition


# --- backoff --------------------------------------------------------------------------


def test_backoff_is_exponential_then_capped():
    policy = RetryPolicy(base=2, factor=3, max_backoff=50, jitter=0)
    assert [backoff_delay(policy, n, jitter_sample=0) for n in (1, 2, 3, 4, 5)] == [
        2,
        6,
        18,
        50,
        50,
    ]


def test_jitter_only_shortens_and_stays_within_its_fraction():
    policy = RetryPolicy(base=10, factor=2, max_backoff=15, jitter=0.2)
    assert backoff_delay(policy, 1, jitter_sample=0) == 10
    assert backoff_delay(policy, 1, jitter_sample=0.999) == pytest.approx(8.002)
    assert backoff_delay(policy, 5, jitter_sample=0.5) == pytest.approx(15 * 0.9)


@pytest.mark.parametrize(
    "bad",
    [
        {"max_retries": -1},
        {"base": 0},
        {"factor": 0.5},
        {"max_backoff": 99_999},
        {"base": 10, "max_backoff": 5},
        {"jitter": 2},
    ],
)
def test_absurd_retry_policies_are_refused(bad):
    with pytest.raises(ValidationError):
        RetryPolicy.model_validate(bad)


@pytest.mark.parametrize(
    "bad",
    [
        {"max_iterations": 0},
        {"max_iterations": 10**9},
        {"timeout": -5},
        {"max_replans": -1},
        {"temperature": 3},
        {"planner": "magic"},
        {"unknown_option": 1},
    ],
)
def test_absurd_run_configs_are_refused(bad):
    with pytest.raises(ValidationError):
        RunConfig.model_validate(bad)


# --- the happy path -----------------------------------------------------------------------


def test_a_new_run_plans_first():
    assert decide(new_run(), now=NOW, tools=TOOLS) == Plan(purpose="initial")


def test_a_plan_becomes_pending_steps_and_a_plan_event():
    run = new_run()
    transition = fold_plan(
        run, Plan(purpose="initial"), planned("build", "notify"), jitter_sample=0
    )
    assert transition.delay == 0
    assert transition.new_plan_version == 1
    assert [e.kind for e in transition.events] == [EventKind.PLAN, EventKind.DECISION]
    after = apply_transition(run, transition)
    assert [s.status for s in after.steps] == [StepStatus.PENDING, StepStatus.PENDING]


def test_steps_execute_in_order_then_the_planner_verifies():
    run = with_plan(new_run(), "build", "notify")
    run, _ = execute(run, StepSucceeded(result={"ok": 1}))
    assert run.steps[0].status is StepStatus.COMPLETED
    assert decide(run, now=NOW, tools=TOOLS) == Execute(step_id=run.steps[1].id)
    run, _ = execute(run, StepSucceeded())
    assert decide(run, now=NOW, tools=TOOLS) == Plan(purpose="verify")
    done = fold_plan(run, Plan(purpose="verify"), PlanFinished(report="# done"), jitter_sample=0)
    assert done.status is RunStatus.COMPLETED and done.report == "# done" and done.delay is None


def test_context_updates_from_a_tool_reach_the_run():
    run = with_plan(new_run(), "notify")
    run, _ = execute(run, StepSucceeded(context_updates={"STAGE": "blue"}))
    assert run.context == {"STAGE": "blue"}


# --- approvals ------------------------------------------------------------------------------


def test_a_tool_in_the_configs_approval_list_pauses_before_it_runs():
    run = with_plan(new_run(approval_required=["deploy"]), "deploy")
    action = decide(run, now=NOW, tools=TOOLS)
    assert isinstance(action, AwaitHuman) and action.kind is PauseKind.APPROVAL
    transition = pause(run, action)
    assert transition.status is RunStatus.PAUSED and transition.delay is None
    assert transition.human_request is not None


def test_a_tool_flagged_for_approval_pauses_even_when_the_config_omits_it():
    run = with_plan(new_run(approval_required=[]), "wipe")
    assert isinstance(decide(run, now=NOW, tools=TOOLS), AwaitHuman)


def test_the_planner_cannot_waive_approval():
    with pytest.raises(ValidationError):
        PlannedStep.model_validate(
            {"description": "wipe", "tool": "wipe", "args": {}, "requires_approval": False}
        )


def test_approval_resumes_and_the_step_runs():
    run = with_plan(new_run(approval_required=["deploy"]), "deploy")
    step = run.steps[0]
    approved = apply_transition(
        run, fold_decision(step, PauseKind.APPROVAL, Decision.APPROVE, by="ann", context={})
    )
    assert decide(approved, now=NOW, tools=TOOLS) == Execute(step_id=step.id)


def test_approval_is_bound_to_the_exact_args():
    run = with_plan(new_run(approval_required=["deploy"]), "deploy")
    step = run.steps[0]
    approved = apply_transition(
        run, fold_decision(step, PauseKind.APPROVAL, Decision.APPROVE, by="ann", context={})
    )
    tampered = approved.model_copy(
        update={"steps": [approved.steps[0].model_copy(update={"args": {"env": "prod"}})]}
    )
    assert isinstance(decide(tampered, now=NOW, tools=TOOLS), AwaitHuman)


def test_approval_with_edited_args_runs_the_edited_args():
    run = with_plan(new_run(approval_required=["deploy"]), "deploy")
    step = run.steps[0]
    edited = apply_transition(
        run,
        fold_decision(
            step,
            PauseKind.APPROVAL,
            Decision.APPROVE,
            by="ann",
            context={},
            edited_args={"env": "qa"},
        ),
    )
    assert edited.steps[0].args == {"env": "qa"}
    assert isinstance(decide(edited, now=NOW, tools=TOOLS), Execute)


def test_a_rejection_leads_to_a_replan_that_carries_the_reason():
    run = with_plan(new_run(approval_required=["deploy"]), "deploy")
    rejected = apply_transition(
        run,
        fold_decision(
            run.steps[0],
            PauseKind.APPROVAL,
            Decision.REJECT,
            by="ann",
            context={},
            reason="not on friday",
        ),
    )
    action = decide(rejected, now=NOW, tools=TOOLS)
    assert isinstance(action, Plan) and action.purpose == "replan"
    assert action.failure is not None and "not on friday" in (action.failure.rejection_reason or "")


# --- failures -------------------------------------------------------------------------------


def test_a_transient_error_retries_with_backoff():
    run = with_plan(new_run(retry_policy={"base": 1, "factor": 2, "jitter": 0}), "build")
    run, transition = execute(run, StepFailed(error="503", error_class=ErrorClass.TRANSIENT))
    assert transition.delay == 1
    assert run.steps[0].status is StepStatus.PENDING and run.steps[0].attempts == 1
    assert [e.kind for e in transition.events] == [EventKind.ERROR, EventKind.RETRY]
    run, transition = execute(run, StepFailed(error="503", error_class=ErrorClass.TRANSIENT))
    assert transition.delay == 2


def test_transient_errors_past_max_retries_lead_to_a_replan():
    run = with_plan(new_run(retry_policy={"max_retries": 1, "jitter": 0}), "build")
    run, _ = execute(run, StepFailed(error="503", error_class=ErrorClass.TRANSIENT))
    run, transition = execute(run, StepFailed(error="503", error_class=ErrorClass.TRANSIENT))
    assert transition.delay == 0
    assert run.steps[0].status is StepStatus.FAILED
    assert "retries exhausted" in transition.events[-1].message
    assert decide(run, now=NOW, tools=TOOLS).purpose == "replan"  # type: ignore[union-attr]


def test_a_permanent_error_replans_at_once_without_retrying():
    run = with_plan(new_run(), "release", "notify")
    run, transition = execute(
        run, StepFailed(error="missing env var X", error_class=ErrorClass.PERMANENT)
    )
    assert transition.delay == 0 and run.steps[0].attempts == 1
    action = decide(run, now=NOW, tools=TOOLS)
    assert isinstance(action, Plan) and action.failure is not None
    assert action.failure.error == "missing env var X"


def test_a_replan_supersedes_pending_steps_and_keeps_completed_ones():
    run = with_plan(new_run(), "build", "release", "notify")
    run, _ = execute(run, StepSucceeded())
    run, _ = execute(run, StepFailed(error="boom", error_class=ErrorClass.PERMANENT))
    action = decide(run, now=NOW, tools=TOOLS)
    assert isinstance(action, Plan)
    transition = fold_plan(run, action, planned("notify", "release"), jitter_sample=0)
    run = apply_transition(run, transition)
    assert run.replans == 1 and run.plan_version == 2
    by_version = {(s.plan_version, s.tool): s.status for s in run.steps}
    assert by_version[(1, "build")] is StepStatus.COMPLETED
    assert by_version[(1, "release")] is StepStatus.FAILED
    assert by_version[(1, "notify")] is StepStatus.SKIPPED
    assert decide(run, now=NOW, tools=TOOLS) == Execute(step_id=run.steps[3].id)


def test_the_replan_budget_is_enforced():
    run = with_plan(new_run(max_replans=0), "release")
    run, _ = execute(run, StepFailed(error="boom", error_class=ErrorClass.PERMANENT))
    action = decide(run, now=NOW, tools=TOOLS)
    assert isinstance(action, Fail) and "gave up after 0 re-plan" in action.reason


def test_a_tool_asking_for_a_person_pauses_the_run():
    run = with_plan(new_run(), "notify")
    run, transition = execute(
        run, StepFailed(error="2FA code needed", error_class=ErrorClass.NEEDS_HUMAN)
    )
    assert transition.status is RunStatus.PAUSED
    assert transition.human_request is not None
    assert transition.human_request.kind is PauseKind.NEEDS_HUMAN


# --- limits ---------------------------------------------------------------------------------


def test_max_iterations_fails_the_run():
    run = new_run(max_iterations=3).model_copy(update={"iteration": 4})
    action = decide(run, now=NOW, tools=TOOLS)
    assert isinstance(action, Fail) and "max_iterations (3)" in action.reason


def test_the_deadline_fails_the_run():
    run = new_run(timeout=5)
    action = decide(run, now=run.deadline, tools=TOOLS)
    assert isinstance(action, Fail) and action.reason.startswith("timeout")


def test_a_spent_budget_fails_the_run():
    run = new_run(budget_tokens=1000).model_copy(update={"tokens_total": 1000})
    action = decide(run, now=NOW, tools=TOOLS)
    assert isinstance(action, Fail) and "token budget" in action.reason


# --- a worker that died mid-step ---------------------------------------------------------


def interrupted(tool: str) -> RunSnapshot:
    run = with_plan(new_run(), tool)
    action = decide(run, now=NOW, tools=TOOLS)
    assert isinstance(action, Execute)
    return apply_transition(run, begin_step(run, action))  # RUNNING, never finished


def test_an_interrupted_idempotent_step_runs_again_with_the_same_key():
    run = interrupted("build")
    action = decide(run, now=NOW, tools=TOOLS)
    assert action == Execute(step_id=run.steps[0].id, recovered=True)
    again = apply_transition(run, begin_step(run, action))
    assert again.steps[0].attempts == 2
    assert again.steps[0].idempotency_key == run.steps[0].idempotency_key


def test_an_interrupted_non_idempotent_step_pauses_with_outcome_unknown():
    run = interrupted("release")
    action = decide(run, now=NOW, tools=TOOLS)
    assert isinstance(action, AwaitHuman) and action.kind is PauseKind.OUTCOME_UNKNOWN
    paused = apply_transition(run, pause(run, action))
    assert paused.status is RunStatus.PAUSED
    assert paused.steps[0].error_class is ErrorClass.UNKNOWN_OUTCOME


@pytest.mark.parametrize(
    ("decision", "status"),
    [
        (Decision.RETRY, StepStatus.PENDING),
        (Decision.SKIP, StepStatus.SKIPPED),
        (Decision.MARK_DONE, StepStatus.COMPLETED),
    ],
)
def test_a_person_resolves_an_unknown_outcome(decision, status):
    run = interrupted("release")
    paused = apply_transition(run, pause(run, decide(run, now=NOW, tools=TOOLS)))  # type: ignore[arg-type]
    resolved = apply_transition(
        paused,
        fold_decision(paused.steps[0], PauseKind.OUTCOME_UNKNOWN, decision, by="ann", context={}),
    )
    assert resolved.status is RunStatus.RUNNING
    assert resolved.steps[0].status is status


# --- the planner's failures ------------------------------------------------------------------


def test_a_rate_limited_planner_waits_at_least_retry_after():
    run = new_run(retry_policy={"base": 1, "jitter": 0})
    transition = fold_plan(
        run,
        Plan(purpose="initial"),
        PlannerUnavailable(error="429", retry_after=7),
        jitter_sample=0,
    )
    assert transition.delay == 7 and transition.planner_failures == 1
    assert transition.events[-1].kind is EventKind.RETRY


def test_a_planner_that_stays_unavailable_fails_the_run():
    run = new_run(retry_policy={"max_retries": 2}).model_copy(update={"planner_failures": 2})
    transition = fold_plan(
        run, Plan(purpose="initial"), PlannerUnavailable(error="529"), jitter_sample=0
    )
    assert transition.status is RunStatus.FAILED


def test_invalid_plans_are_bounded():
    run = new_run(max_plan_repairs=1)
    first = fold_plan(run, Plan(purpose="initial"), PlanInvalid(error="bad"), jitter_sample=0)
    assert first.status is None and first.delay == 0
    run = apply_transition(run, first)
    second = fold_plan(run, Plan(purpose="initial"), PlanInvalid(error="bad"), jitter_sample=0)
    assert second.status is RunStatus.FAILED and "not a usable plan" in (second.error or "")


def test_a_fatal_planner_error_fails_the_run_with_its_message():
    transition = fold_plan(
        new_run(), Plan(purpose="initial"), PlannerFatal(error="key refused"), jitter_sample=0
    )
    assert transition.status is RunStatus.FAILED and "key refused" in (transition.error or "")


def test_llm_usage_is_recorded_as_events_and_totals():
    usage = LlmUsage(model="m", input_tokens=100, output_tokens=20, cost_usd=0.5)
    outcome = planned("notify").model_copy(update={"usage": [usage]})
    transition = fold_plan(new_run(), Plan(purpose="initial"), outcome, jitter_sample=0)
    assert transition.tokens_delta == 120 and transition.cost_delta == 0.5
    assert transition.events[0].kind is EventKind.LLM_CALL


# --- approvals across a re-plan ---------------------------------------------------------


def approved_then_failed(args: dict) -> RunSnapshot:
    run = with_plan(new_run(approval_required=["deploy"]), "deploy")
    run = run.model_copy(update={"steps": [run.steps[0].model_copy(update={"args": args})]})
    run = apply_transition(
        run,
        fold_decision(
            run.steps[0], PauseKind.APPROVAL, Decision.APPROVE, by="ann", context=run.context
        ),
    )
    run, _ = execute(run, StepFailed(error="missing env var X", error_class=ErrorClass.PERMANENT))
    return run


def replanned(run: RunSnapshot, *new: PlannedStep) -> RunSnapshot:
    action = decide(run, now=NOW, tools=TOOLS)
    assert isinstance(action, Plan)
    return apply_transition(
        run, fold_plan(run, action, PlanProduced(steps=list(new)), jitter_sample=0)
    )


def test_the_retry_of_the_exact_approved_call_keeps_its_approval():
    run = approved_then_failed({"env": "staging"})
    run = replanned(
        run,
        PlannedStep(description="set X", tool="notify"),
        PlannedStep(description="deploy again", tool="deploy", args={"env": "staging"}),
    )
    run, _ = execute(run, StepSucceeded())
    assert decide(run, now=NOW, tools=TOOLS) == Execute(step_id=run.steps[-1].id)


def test_a_replan_with_different_args_needs_a_new_approval():
    run = approved_then_failed({"env": "staging"})
    run = replanned(
        run, PlannedStep(description="deploy prod", tool="deploy", args={"env": "prod"})
    )
    assert isinstance(decide(run, now=NOW, tools=TOOLS), AwaitHuman)


# --- a tool that must not run twice -------------------------------------------------------


def test_an_ambiguous_failure_of_a_non_idempotent_tool_pauses_instead_of_retrying():
    """A timeout or a dropped connection may have taken effect: never run it again
    behind a person's back (it was retried, and ran three times)."""
    run = with_plan(new_run(), "release")
    run, transition = execute(
        run, StepFailed(error="release timed out after 60 s", error_class=ErrorClass.TRANSIENT)
    )
    assert run.status is RunStatus.PAUSED and transition.delay is None
    assert transition.human_request is not None
    assert transition.human_request.kind is PauseKind.OUTCOME_UNKNOWN
    assert run.steps[0].error_class is ErrorClass.UNKNOWN_OUTCOME
    assert "not safe to run twice" in (run.steps[0].error or "")


def test_a_non_idempotent_tool_is_retried_when_it_declares_nothing_was_applied():
    run = with_plan(new_run(retry_policy={"base": 1, "jitter": 0}), "release")
    refused = StepFailed(
        error="connection refused", error_class=ErrorClass.TRANSIENT, not_applied=True
    )
    run, transition = execute(run, refused)
    assert transition.delay == 1 and run.steps[0].status is StepStatus.PENDING


def test_an_unknown_tool_counts_as_not_idempotent():
    run = with_plan(new_run(), "vanished")
    action = decide(run, now=NOW, tools=TOOLS)
    assert isinstance(action, Execute)
    started = apply_transition(run, begin_step(run, action))
    transition = fold_step(
        started,
        started.steps[0],
        StepFailed(error="timed out", error_class=ErrorClass.TRANSIENT),
        policy=None,
        jitter_sample=0,
    )
    assert transition.status is RunStatus.PAUSED


# --- an approval is bound to what the call reads --------------------------------------------


def test_an_approval_does_not_survive_a_change_of_the_context_it_reads():
    """deploy {env: staging} approved, then a step sets an env var the deploy reads:
    the approval was for a different call, so a person is asked again."""
    run = approved_then_failed({"env": "staging"})
    run = replanned(
        run,
        PlannedStep(description="set X", tool="build"),
        PlannedStep(description="deploy again", tool="deploy", args={"env": "staging"}),
    )
    run, _ = execute(run, StepSucceeded(context_updates={"STAGING_DATABASE_URL": "pg://x"}))
    action = decide(run, now=NOW, tools=TOOLS)
    assert isinstance(action, AwaitHuman) and action.kind is PauseKind.APPROVAL


def test_an_approval_given_in_one_context_is_not_valid_in_another():
    run = with_plan(new_run(approval_required=["deploy"]), "deploy")
    approved = apply_transition(
        run,
        fold_decision(
            run.steps[0], PauseKind.APPROVAL, Decision.APPROVE, by="ann", context={"A": "1"}
        ),
    )
    assert isinstance(decide(approved, now=NOW, tools=TOOLS), AwaitHuman)
    same = approved.model_copy(update={"context": {"A": "1"}})
    assert isinstance(decide(same, now=NOW, tools=TOOLS), Execute)


def test_a_stored_config_is_validated_once_and_read_as_it_is_now():
    """Each iteration reads its run's config: the same stored text shares one frozen
    instance, and a changed config is read anew, never served from before."""
    stored = {"max_iterations": 7, "dropped_by_a_release": True}
    first = RunConfig.from_stored(stored)
    assert RunConfig.from_stored(dict(stored)) is first
    assert first.max_iterations == 7
    stored["max_iterations"] = 9
    assert RunConfig.from_stored(stored).max_iterations == 9
    with pytest.raises(ValidationError):
        first.max_iterations = 8  # shared, so it must not change under another reader
