"""What the engine decides (actions), what slow work reports back (outcomes),
and the state change the engine folds them into (transitions)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.engine.models import (
    ErrorClass,
    EventKind,
    JSONDict,
    PauseKind,
    PlannedStep,
    RunStatus,
    Step,
    StepStatus,
)

# --- actions: decide() returns exactly one ------------------------------------


class Rejection(BaseModel):
    """Who rejected a step and why, in their words: kept in the rejected step's result
    when the decision is made, so an outcome never has to be read back out of text."""

    model_config = ConfigDict(frozen=True)

    by: str | None  # None for a step rejected before this record was kept
    reason: str

    def record(self) -> JSONDict:
        """What the rejected step's result holds."""
        return {"rejected_by": self.by, "reason": self.reason}

    @classmethod
    def of(cls, step: Step) -> Rejection:
        kept = step.result if isinstance(step.result, dict) else {}
        by, reason = kept.get("rejected_by"), kept.get("reason")
        return cls(
            by=by if isinstance(by, str) else None,
            reason=reason if isinstance(reason, str) else step.error or "",
        )


class Failure(BaseModel):
    """Why a re-plan is needed, as the planner is told."""

    model_config = ConfigDict(frozen=True)

    step_id: int
    description: str
    tool: str
    args: JSONDict
    error: str
    error_class: ErrorClass | None
    attempts: int
    rejection_reason: str | None = None
    approved_args_hash: str | None = None
    rejection: Rejection | None = None  # who rejected it and why, when a person did

    @classmethod
    def of(cls, step: Step) -> Failure:
        rejected = step.status is StepStatus.REJECTED
        return cls(
            step_id=step.id,
            description=step.description,
            tool=step.tool,
            args=step.args,
            error=step.error or "",
            error_class=step.error_class,
            attempts=step.attempts,
            rejection_reason=step.error if rejected else None,
            approved_args_hash=None if rejected else step.approved_args_hash,
            rejection=Rejection.of(step) if rejected else None,
        )


class Plan(BaseModel):
    """Ask the planner: for a first plan, a re-plan after a failure, or to verify."""

    model_config = ConfigDict(frozen=True)
    type: Literal["plan"] = "plan"
    purpose: Literal["initial", "replan", "verify"]
    failure: Failure | None = None


class Execute(BaseModel):
    """Run one step's tool. `recovered` when a worker died while it was running."""

    model_config = ConfigDict(frozen=True)
    type: Literal["execute"] = "execute"
    step_id: int
    recovered: bool = False


class AwaitHuman(BaseModel):
    """Pause the run until a person decides about one step."""

    model_config = ConfigDict(frozen=True)
    type: Literal["await_human"] = "await_human"
    step_id: int
    kind: PauseKind
    reason: str


class Fail(BaseModel):
    """Stop the run; the reason is recorded. With `rejection`, the run ends because a
    person rejected a step (status rejected), not because something went wrong."""

    model_config = ConfigDict(frozen=True)
    type: Literal["fail"] = "fail"
    reason: str
    rejection: Rejection | None = None


Action = Plan | Execute | AwaitHuman | Fail

# --- outcomes: what slow work reports back ------------------------------------


class LlmUsage(BaseModel):
    """Tokens and cost of one model call."""

    model_config = ConfigDict(frozen=True)

    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_tokens: int = 0
    cache_read_tokens: int = 0
    cost_usd: float = 0.0
    purpose: str = ""
    request_bytes: int = 0
    # Why the model stopped (end_turn, tool_use, max_tokens, refusal); None when the
    # answer did not say.
    stop_reason: str | None = None

    @property
    def total_tokens(self) -> int:
        return (
            self.input_tokens
            + self.output_tokens
            + self.cache_creation_tokens
            + self.cache_read_tokens
        )


class PlanProduced(BaseModel):
    type: Literal["plan_produced"] = "plan_produced"
    steps: list[PlannedStep]
    reasoning: str = ""
    usage: list[LlmUsage] = Field(default_factory=list)


class PlanFinished(BaseModel):
    """The planner verified the task is done; `report` is the final markdown."""

    type: Literal["plan_finished"] = "plan_finished"
    report: str
    usage: list[LlmUsage] = Field(default_factory=list)


class PlanInvalid(BaseModel):
    """The planner answered, but not with a usable plan (kept for the record)."""

    type: Literal["plan_invalid"] = "plan_invalid"
    error: str
    raw: Any = None
    usage: list[LlmUsage] = Field(default_factory=list)


class PlannerUnavailable(BaseModel):
    """A transient planner failure (rate limit, overload, timeout)."""

    type: Literal["planner_unavailable"] = "planner_unavailable"
    error: str
    retry_after: float | None = None
    usage: list[LlmUsage] = Field(default_factory=list)


class NoAlternative(BaseModel):
    """The planner has no way to do the task without the step a person rejected: the
    run ends as that person decided. `reason` is the planner's own account."""

    type: Literal["no_alternative"] = "no_alternative"
    reason: str
    usage: list[LlmUsage] = Field(default_factory=list)


class PlannerFatal(BaseModel):
    """A planner failure a person must fix (bad key, bad request)."""

    type: Literal["planner_fatal"] = "planner_fatal"
    error: str
    usage: list[LlmUsage] = Field(default_factory=list)


PlanOutcome = (
    PlanProduced | PlanFinished | PlanInvalid | PlannerUnavailable | NoAlternative | PlannerFatal
)


class StepSucceeded(BaseModel):
    type: Literal["step_succeeded"] = "step_succeeded"
    result: Any = None
    summary: str = ""
    context_updates: dict[str, str] = Field(default_factory=dict)


class StepFailed(BaseModel):
    """A tool's failure. `not_applied`: the tool declares its effect did not happen
    (e.g. the connection was refused before anything was sent), so even a tool that
    must not run twice may be tried again. Without it, a failure of such a tool is
    ambiguous (a timeout, a connection lost after sending) and a person decides."""

    type: Literal["step_failed"] = "step_failed"
    error: str
    error_class: ErrorClass
    detail: Any = None
    not_applied: bool = False


StepOutcome = StepSucceeded | StepFailed

# --- transitions: the state change to persist ---------------------------------


class NewEvent(BaseModel):
    kind: EventKind
    message: str
    step_id: int | None = None
    data: JSONDict = Field(default_factory=dict)


class StepUpdate(BaseModel):
    """Fields to change on one existing step (only those set are written)."""

    step_id: int
    status: StepStatus | None = None
    attempts: int | None = None
    result: Any = None
    set_result: bool = False
    error: str | None = None
    set_error: bool = False
    error_class: ErrorClass | None = None
    args: JSONDict | None = None
    approved_args_hash: str | None = None
    context_updates: dict[str, str] | None = None


class HumanRequest(BaseModel):
    """Open an approval record: a person must decide about this step."""

    step_id: int
    kind: PauseKind
    reason: str
    args_hash: str


class Transition(BaseModel):
    """Everything one iteration (or one human decision) changes."""

    status: RunStatus | None = None
    delay: float | None = None  # seconds until the next iteration; None: do not enqueue
    # The step that succeeded was its plan's last pending one: the next iteration
    # verifies, a planner call (its message goes to the planner's queue).
    plan_finished: bool = False
    step_updates: list[StepUpdate] = Field(default_factory=list)
    new_steps: list[PlannedStep] = Field(default_factory=list)
    new_plan_version: int | None = None
    # Index into new_steps -> the args hash a person already approved for that exact call.
    carried_approvals: dict[int, str] = Field(default_factory=dict)
    replans_delta: int = 0
    planner_failures: int | None = None
    context_updates: dict[str, str] = Field(default_factory=dict)
    events: list[NewEvent] = Field(default_factory=list)
    human_request: HumanRequest | None = None
    report: str | None = None
    error: str | None = None
    # A run a person's decision ended (rejected, cancelled): who, and why in their words.
    ended_by: str | None = None
    end_reason: str | None = None
    tokens_delta: int = 0
    cost_delta: float = 0.0
