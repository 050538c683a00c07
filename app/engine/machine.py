"""The loop's state machine: decide the next action, fold an outcome back.

Pure functions over RunSnapshot. Time and randomness come in as arguments so
every transition is reproducible in a test.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from app.engine.actions import (
    Action,
    AwaitHuman,
    Execute,
    Fail,
    Failure,
    HumanRequest,
    NewEvent,
    NoAlternative,
    Plan,
    PlanFinished,
    PlanInvalid,
    PlannerFatal,
    PlannerUnavailable,
    PlanOutcome,
    PlanProduced,
    Rejection,
    StepFailed,
    StepOutcome,
    StepSucceeded,
    StepUpdate,
    Transition,
)
from app.engine.models import (
    Decision,
    ErrorClass,
    EventKind,
    JSONDict,
    PauseKind,
    RetryPolicy,
    RunConfig,
    RunSnapshot,
    RunStatus,
    Step,
    StepStatus,
    ToolPolicy,
    approval_hash,
)

Tools = Mapping[str, ToolPolicy]


def backoff_delay(policy: RetryPolicy, attempt: int, *, jitter_sample: float) -> float:
    """Seconds to wait before retry number `attempt` (1-based).

    Exponential, capped at `max_backoff`, then shortened by up to `jitter` of
    itself (jitter_sample in [0, 1)) so the cap is never exceeded and retries
    of many runs spread out instead of arriving together.
    """
    raw = policy.base * policy.factor ** (attempt - 1)
    capped = min(policy.max_backoff, raw)
    return capped * (1 - policy.jitter * jitter_sample)


def needs_approval(config: RunConfig, step: Step, policy: ToolPolicy | None) -> bool:
    """Approval comes from the run's config and the tool's own flag (less the calls the
    deployment declared safe), never from the plan."""
    if step.tool in config.approval_required:
        return True
    return policy is not None and policy.requires_approval and not policy.is_safe_call(step.args)


def over_budget(run: RunSnapshot) -> str | None:
    cfg = run.config
    if cfg.budget_tokens is not None and run.tokens_total >= cfg.budget_tokens:
        return f"token budget exhausted: {run.tokens_total} of {cfg.budget_tokens} tokens used"
    if cfg.budget_usd is not None and run.cost_usd >= cfg.budget_usd:
        return f"cost budget exhausted: ${run.cost_usd:.4f} of ${cfg.budget_usd:.4f} spent"
    return None


def decide(run: RunSnapshot, *, now: datetime, tools: Tools) -> Action:
    """The next action for a run that a worker has just claimed."""
    cfg = run.config
    if run.iteration > cfg.max_iterations:
        return Fail(
            reason=f"max_iterations ({cfg.max_iterations}) reached before the task was done"
        )
    if now >= run.deadline:
        return Fail(reason=f"timeout: the run exceeded its {cfg.timeout:g} s limit")
    if reason := over_budget(run):
        return Fail(reason=reason)
    if interrupted := _first(run, StepStatus.RUNNING):
        return _recover(interrupted, tools.get(interrupted.tool))
    if run.plan_version == 0:
        return Plan(purpose="initial")
    if failed := _first(run, StepStatus.FAILED, StepStatus.REJECTED):
        if run.replans >= cfg.max_replans:
            rejected = failed.status is StepStatus.REJECTED
            return Fail(
                reason=f"gave up after {run.replans} re-plan(s); step {failed.position} "
                f"({failed.tool}) {'was' if rejected else 'failed:'} {failed.error}",
                rejection=Rejection.of(failed) if rejected else None,
            )
        return Plan(purpose="replan", failure=Failure.of(failed))
    pending = _first(run, StepStatus.PENDING)
    if pending is None:
        return Plan(purpose="verify")
    if needs_approval(cfg, pending, tools.get(pending.tool)) and not pending.approved_in(
        run.context
    ):
        return AwaitHuman(
            step_id=pending.id,
            kind=PauseKind.APPROVAL,
            reason=f"{pending.tool} needs approval before it runs",
        )
    return Execute(step_id=pending.id)


def _first(run: RunSnapshot, *statuses: StepStatus) -> Step | None:
    matching = [
        step
        for step in run.steps
        if step.plan_version == run.plan_version and step.status in statuses
    ]
    return min(matching, key=lambda step: step.position) if matching else None


def _recover(step: Step, policy: ToolPolicy | None) -> Action:
    """A step found `running` at claim time: its worker died mid-tool."""
    if policy is not None and policy.idempotent:
        return Execute(step_id=step.id, recovered=True)
    return AwaitHuman(
        step_id=step.id,
        kind=PauseKind.OUTCOME_UNKNOWN,
        reason=f"the worker stopped while {step.tool} was running; it may or may not "
        "have taken effect, and it is not safe to run twice",
    )


# --- transitions ----------------------------------------------------------------


def fail(reason: str) -> Transition:
    return Transition(
        status=RunStatus.FAILED,
        error=reason,
        events=[NewEvent(kind=EventKind.STATUS, message=f"run failed: {reason}")],
    )


def stop(action: Fail) -> Transition:
    """End the run `decide` said to end: as a person's rejection when one left the
    planner no way on, else as a failure."""
    if action.rejection is not None:
        return end_rejected(action.rejection, why=action.reason)
    return fail(action.reason)


def end_rejected(rejection: Rejection, *, why: str) -> Transition:
    """A person rejected a step and the planner has no other way: the run ends as they
    decided. An outcome, not an error: `why` (the planner's account) is a decision
    event, and the run keeps who rejected and their reason."""
    who = rejection.by or "a person"
    return Transition(
        status=RunStatus.REJECTED,
        ended_by=rejection.by,
        end_reason=rejection.reason,
        events=[
            NewEvent(kind=EventKind.DECISION, message=f"no other way to do the task: {why}"),
            NewEvent(
                kind=EventKind.STATUS,
                message=f"run rejected by {who}: {rejection.reason}",
                data={
                    "outcome": RunStatus.REJECTED,
                    "by": rejection.by,
                    "reason": rejection.reason,
                },
            ),
        ],
    )


def pause(run: RunSnapshot, action: AwaitHuman) -> Transition:
    step = run.step(action.step_id)
    updates = []
    if action.kind is PauseKind.OUTCOME_UNKNOWN:
        updates.append(
            StepUpdate(
                step_id=step.id,
                status=StepStatus.FAILED,
                error="outcome unknown: " + action.reason,
                set_error=True,
                error_class=ErrorClass.UNKNOWN_OUTCOME,
            )
        )
    return Transition(
        status=RunStatus.PAUSED,
        step_updates=updates,
        human_request=HumanRequest(
            step_id=step.id, kind=action.kind, reason=action.reason, args_hash=step.args_hash
        ),
        events=[
            NewEvent(
                kind=EventKind.APPROVAL,
                step_id=step.id,
                message=f"paused for a person ({action.kind}): {action.reason}",
                data={"kind": action.kind, "tool": step.tool, "args": step.args},
            )
        ],
    )


def begin_step(run: RunSnapshot, action: Execute) -> Transition:
    """Mark a step running (committed before the tool starts, so a crash is visible)."""
    step = run.step(action.step_id)
    note = " again after its worker stopped (idempotent)" if action.recovered else ""
    return Transition(
        status=RunStatus.RUNNING,
        step_updates=[
            StepUpdate(step_id=step.id, status=StepStatus.RUNNING, attempts=step.attempts + 1)
        ],
        events=[
            NewEvent(
                kind=EventKind.TOOL_CALL,
                step_id=step.id,
                message=f"step {step.position}: {step.description} — calling {step.tool}{note}",
                data={
                    "tool": step.tool,
                    "args": step.args,
                    "attempt": step.attempts + 1,
                    "idempotency_key": step.idempotency_key,
                },
            )
        ],
    )


def fold_step(
    run: RunSnapshot,
    step: Step,
    outcome: StepOutcome,
    *,
    policy: ToolPolicy | None,
    jitter_sample: float,
) -> Transition:
    """Fold a tool's outcome in. `step` is as begin_step left it (attempts counted);
    `policy` is its tool's (None for a tool this worker does not know)."""
    if isinstance(outcome, StepSucceeded):
        # `run` holds the plan's next pending step, if any (hot.decision_steps).
        return _step_succeeded(step, outcome, last=_first(run, StepStatus.PENDING) is None)
    return _step_failed(run, step, _unambiguous(outcome, policy), jitter_sample=jitter_sample)


def _unambiguous(outcome: StepFailed, policy: ToolPolicy | None) -> StepFailed:
    """A transient failure of a tool that must not run twice is a retry only when the
    tool declares its effect was not applied; otherwise the effect is unknown (the
    call timed out, or the connection dropped after the request was sent)."""
    idempotent = policy is not None and policy.idempotent
    if outcome.error_class is not ErrorClass.TRANSIENT or idempotent or outcome.not_applied:
        return outcome
    return outcome.model_copy(
        update={
            "error_class": ErrorClass.UNKNOWN_OUTCOME,
            "error": f"{outcome.error} — it may or may not have taken effect, and it is "
            "not safe to run twice, so it is not retried",
        }
    )


def _step_succeeded(step: Step, outcome: StepSucceeded, *, last: bool) -> Transition:
    summary = outcome.summary or "completed"
    return Transition(
        delay=0,
        plan_finished=last,
        step_updates=[
            StepUpdate(
                step_id=step.id,
                status=StepStatus.COMPLETED,
                result=outcome.result,
                set_result=True,
                error=None,
                set_error=True,
                context_updates=outcome.context_updates or None,
            )
        ],
        context_updates=outcome.context_updates,
        events=[
            NewEvent(
                kind=EventKind.OBSERVATION,
                step_id=step.id,
                message=f"step {step.position} ({step.tool}) succeeded: {summary}",
                data={"result": outcome.result},
            )
        ],
    )


def _step_failed(
    run: RunSnapshot, step: Step, outcome: StepFailed, *, jitter_sample: float
) -> Transition:
    policy = run.config.retry_policy
    error_event = NewEvent(
        kind=EventKind.ERROR,
        step_id=step.id,
        message=f"step {step.position} ({step.tool}) failed [{outcome.error_class}] "
        f"on attempt {step.attempts}: {outcome.error}",
        data={"error_class": outcome.error_class, "detail": outcome.detail},
    )
    failed = StepUpdate(
        step_id=step.id,
        status=StepStatus.FAILED,
        error=outcome.error,
        set_error=True,
        error_class=outcome.error_class,
    )
    cls = outcome.error_class
    if cls is ErrorClass.TRANSIENT and step.attempts <= policy.max_retries:
        delay = backoff_delay(policy, step.attempts, jitter_sample=jitter_sample)
        retry = NewEvent(
            kind=EventKind.RETRY,
            step_id=step.id,
            message=f"transient error: retry {step.attempts} of {policy.max_retries} "
            f"in {delay:.2f} s",
            data={"retry": step.attempts, "delay": round(delay, 3)},
        )
        pending = failed.model_copy(update={"status": StepStatus.PENDING})
        return Transition(delay=delay, step_updates=[pending], events=[error_event, retry])
    if cls in (ErrorClass.NEEDS_HUMAN, ErrorClass.UNKNOWN_OUTCOME):
        kind = PauseKind.NEEDS_HUMAN if cls is ErrorClass.NEEDS_HUMAN else PauseKind.OUTCOME_UNKNOWN
        paused = pause(run, AwaitHuman(step_id=step.id, kind=kind, reason=outcome.error))
        return paused.model_copy(
            update={"step_updates": [failed], "events": [error_event, *paused.events]}
        )
    why = (
        f"retries exhausted after {step.attempts} attempt(s)"
        if cls is ErrorClass.TRANSIENT
        else "a permanent error will not go away by retrying"
    )
    decision = NewEvent(
        kind=EventKind.DECISION,
        step_id=step.id,
        message=f"re-plan around step {step.position}: {why}",
    )
    return Transition(delay=0, step_updates=[failed], events=[error_event, decision])


def fold_plan(
    run: RunSnapshot, action: Plan, outcome: PlanOutcome, *, jitter_sample: float
) -> Transition:
    """Fold a planner's answer in, with its token use."""
    usage_events = [
        NewEvent(
            kind=EventKind.LLM_CALL,
            message=f"{u.model} ({u.purpose or action.purpose}): {u.input_tokens} in, "
            f"{u.output_tokens} out, {u.cache_read_tokens} cached, ${u.cost_usd:.4f}",
            data=u.model_dump(),
        )
        for u in outcome.usage
    ]
    tokens = sum(u.total_tokens for u in outcome.usage)
    cost = sum(u.cost_usd for u in outcome.usage)
    core = _fold_plan_outcome(run, action, outcome, jitter_sample=jitter_sample)
    return core.model_copy(
        update={
            "events": usage_events + core.events,
            "tokens_delta": tokens,
            "cost_delta": cost,
        }
    )


def _fold_plan_outcome(
    run: RunSnapshot, action: Plan, outcome: PlanOutcome, *, jitter_sample: float
) -> Transition:
    match outcome:
        case PlanProduced():
            return _new_plan(run, action, outcome)
        case PlanFinished():
            return Transition(
                status=RunStatus.COMPLETED,
                report=outcome.report,
                planner_failures=0,
                events=[
                    NewEvent(kind=EventKind.DECISION, message="verified: the task is done"),
                    NewEvent(kind=EventKind.STATUS, message="run completed"),
                ],
            )
        case PlanInvalid():
            return _planner_failed(
                run,
                limit=run.config.max_plan_repairs,
                message=f"the planner's answer was not a usable plan: {outcome.error}",
                data={"raw": outcome.raw},
                delay=0,
            )
        case PlannerUnavailable():
            attempt = run.planner_failures + 1
            delay = backoff_delay(run.config.retry_policy, attempt, jitter_sample=jitter_sample)
            if outcome.retry_after is not None:
                delay = max(delay, outcome.retry_after)
            return _planner_failed(
                run,
                limit=run.config.retry_policy.max_retries,
                message=f"planner unavailable (transient): {outcome.error}; "
                f"retrying in {delay:.2f} s",
                data={"retry_after": outcome.retry_after, "delay": round(delay, 3)},
                delay=delay,
                kind=EventKind.RETRY,
            )
        case NoAlternative():
            if action.failure is None or action.failure.rejection is None:
                return fail(f"planner error: {outcome.reason}")  # nothing was rejected
            return end_rejected(action.failure.rejection, why=outcome.reason)
        case PlannerFatal():
            return fail(f"planner error: {outcome.error}")


def _planner_failed(
    run: RunSnapshot,
    *,
    limit: int,
    message: str,
    data: dict[str, object],
    delay: float,
    kind: EventKind = EventKind.ERROR,
) -> Transition:
    failures = run.planner_failures + 1
    if failures > limit:
        failed = fail(f"{message} (giving up after {failures} planner failures)")
        return failed.model_copy(
            update={
                "events": [
                    NewEvent(kind=EventKind.ERROR, message=message, data=data),
                    *failed.events,
                ]
            }
        )
    return Transition(
        delay=delay,
        planner_failures=failures,
        events=[NewEvent(kind=kind, message=message, data=data)],
    )


def _new_plan(run: RunSnapshot, action: Plan, outcome: PlanProduced) -> Transition:
    version = run.plan_version + 1
    superseded = [
        StepUpdate(
            step_id=step.id,
            status=StepStatus.SKIPPED,
            error=f"superseded by plan v{version}",
            set_error=True,
        )
        for step in run.steps
        if step.plan_version == run.plan_version and step.status is StepStatus.PENDING
    ]
    listing = "; ".join(f"{i}. {s.description} [{s.tool}]" for i, s in enumerate(outcome.steps, 1))
    carried = _carried_approvals(run, action, outcome)
    notes = [
        NewEvent(
            kind=EventKind.APPROVAL,
            message=f"approval carried over to the retry of {outcome.steps[i].tool} "
            "(same tool, same args and context as the approved step that failed); "
            "a step that changes the context before it runs makes it ask again",
        )
        for i in carried
    ]
    return Transition(
        delay=0,
        new_plan_version=version,
        new_steps=outcome.steps,
        carried_approvals=carried,
        step_updates=superseded,
        replans_delta=1 if action.purpose == "replan" else 0,
        planner_failures=0,
        events=[
            NewEvent(
                kind=EventKind.PLAN,
                message=f"plan v{version} ({action.purpose}): {listing}",
                data={
                    "version": version,
                    "purpose": action.purpose,
                    "reasoning": outcome.reasoning,
                    "steps": [s.model_dump() for s in outcome.steps],
                    "failure": action.failure.model_dump() if action.failure else None,
                },
            ),
            NewEvent(
                kind=EventKind.DECISION,
                message=outcome.reasoning or f"follow plan v{version}",
            ),
            *notes,
        ],
    )


def _carried_approvals(run: RunSnapshot, action: Plan, outcome: PlanProduced) -> dict[int, str]:
    """A re-plan that retries the very call a person approved keeps that approval.

    Only an identical call (tool, args and the run context they read) of a step that
    failed after being approved qualifies, so a plan can never grant itself a new
    approval; and as the approval stays bound to that context, a step of the new
    plan that changes the context before the retry runs makes it ask again.
    """
    failure = action.failure
    if failure is None or failure.approved_args_hash is None:
        return {}
    for index, planned in enumerate(outcome.steps):
        same = approval_hash(planned.args, run.context) == failure.approved_args_hash
        if planned.tool == failure.tool and same:
            return {index: failure.approved_args_hash}
    return {}


def fold_decision(
    step: Step,
    kind: PauseKind,
    decision: Decision,
    *,
    by: str,
    context: JSONDict,
    reason: str = "",
    edited_args: dict[str, object] | None = None,
) -> Transition:
    """A person's decision about a paused step; the run resumes at once. An approval
    is bound to the args and the run `context` as they are now (see approval_hash)."""
    args = edited_args if edited_args is not None else step.args
    update = StepUpdate(step_id=step.id)
    match decision:
        case Decision.APPROVE:
            update.approved_args_hash = approval_hash(args, context)
            update.args = args if edited_args is not None else None
        case Decision.REJECT:
            update.status = StepStatus.REJECTED
            update.error = f"rejected by {by}: {reason or 'no reason given'}"
            update.set_error = True
            update.result = Rejection(by=by, reason=reason or "no reason given").record()
            update.set_result = True
        case Decision.RETRY:
            update.status = StepStatus.PENDING
        case Decision.SKIP:
            update.status = StepStatus.SKIPPED
            update.error = f"skipped by {by}"
            update.set_error = True
        case Decision.MARK_DONE:
            update.status = StepStatus.COMPLETED
            update.result = {"marked_done_by": by, "comment": reason}
            update.set_result = True
    detail = f" with edited args {args}" if edited_args is not None else ""
    because = f": {reason}" if reason else ""
    return Transition(
        status=RunStatus.RUNNING,
        delay=0,
        step_updates=[update],
        events=[
            NewEvent(
                kind=EventKind.APPROVAL,
                step_id=step.id,
                message=f"{by} decided {decision} on step {step.position} ({step.tool})"
                f"{detail}{because}",
                data={
                    "decision": decision,
                    "by": by,
                    "kind": kind,
                    "reason": reason,
                    "edited_args": edited_args,
                },
            )
        ],
    )
