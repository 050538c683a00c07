"""Typed run state, configuration and the values the engine exchanges.

Everything here is plain, serializable data: the engine reasons over it, the
store persists it, the planner and tools read it. No I/O, no frameworks.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

JSONDict = dict[str, Any]

MAX_TASK_CHARS = 10_000
MAX_STEPS_PER_PLAN = 50


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    # Ended by a person's decision, not by an error: a step was rejected and the
    # planner had no other way (the run's ended_by and end_reason say who and why),
    # or the run was cancelled.
    REJECTED = "rejected"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES

    @property
    def is_decision(self) -> bool:
        """Whether a person's decision ended the run (who: ended_by; why: end_reason)."""
        return self in DECISION_STATUSES


TERMINAL_STATUSES = frozenset(
    {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.REJECTED, RunStatus.CANCELLED}
)
DECISION_STATUSES = frozenset({RunStatus.REJECTED, RunStatus.CANCELLED})


ACTIVE_STATUSES = (RunStatus.QUEUED, RunStatus.RUNNING)


class StepStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
    REJECTED = "rejected"


class ErrorClass(StrEnum):
    """Who must act on an error."""

    TRANSIENT = "transient"  # the loop: retry with backoff
    PERMANENT = "permanent"  # the planner: re-plan around it at once
    NEEDS_HUMAN = "needs_human"  # a person: pause
    UNKNOWN_OUTCOME = "unknown_outcome"  # a worker died mid-tool; a person decides


class EventKind(StrEnum):
    OBSERVATION = "observation"
    DECISION = "decision"
    ERROR = "error"
    PLAN = "plan"
    APPROVAL = "approval"
    RETRY = "retry"
    TOOL_CALL = "tool_call"
    LLM_CALL = "llm_call"
    STATUS = "status"


class PauseKind(StrEnum):
    APPROVAL = "approval"  # a sensitive step waits for a yes / no
    OUTCOME_UNKNOWN = "outcome_unknown"  # retry / skip / mark done
    NEEDS_HUMAN = "needs_human"  # a tool asked for a person; retry / skip / mark done


class Decision(StrEnum):
    """What a person decided about a paused run."""

    APPROVE = "approve"
    REJECT = "reject"
    RETRY = "retry"
    SKIP = "skip"
    MARK_DONE = "mark_done"


DECISIONS_FOR: dict[PauseKind, frozenset[Decision]] = {
    PauseKind.APPROVAL: frozenset({Decision.APPROVE, Decision.REJECT}),
    PauseKind.OUTCOME_UNKNOWN: frozenset({Decision.RETRY, Decision.SKIP, Decision.MARK_DONE}),
    PauseKind.NEEDS_HUMAN: frozenset({Decision.RETRY, Decision.SKIP, Decision.MARK_DONE}),
}


class RetryPolicy(BaseModel):
    """Exponential backoff with jitter: delay(n) = min(max_backoff, base * factor**(n-1))."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    max_retries: int = Field(3, ge=0, le=20)
    base: float = Field(2.0, gt=0, le=600)
    factor: float = Field(2.0, ge=1, le=10)
    # The cap stays well under the broker's visibility timeout (one hour); longer
    # waits are kept as next_run_at in the database, not as a broker countdown.
    max_backoff: float = Field(60.0, gt=0, le=1800)
    jitter: float = Field(0.2, ge=0, le=1)

    @model_validator(mode="after")
    def _cap_not_below_base(self) -> RetryPolicy:
        if self.max_backoff < self.base:
            raise ValueError("max_backoff must be at least base")
        return self


# Sensitive by name: these need approval whenever a tool of that name exists.
DEFAULT_APPROVAL_REQUIRED = ("deploy", "delete", "send_email")


class RunConfig(BaseModel):
    """Per-run options. Validated when a run is created, stored with the run."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    planner: str = Field("auto", pattern=r"^(auto|offline|anthropic)$")
    runbook: str | None = Field(None, max_length=100)
    model: str = Field("claude-sonnet-4-20250514", min_length=1, max_length=100)
    max_tokens: int = Field(4096, ge=256, le=64_000)
    max_iterations: int = Field(50, ge=1, le=10_000)
    timeout: float = Field(600.0, gt=0, le=7 * 24 * 3600, description="seconds, whole run")
    approval_required: tuple[str, ...] = DEFAULT_APPROVAL_REQUIRED
    retry_policy: RetryPolicy = RetryPolicy()
    max_replans: int = Field(3, ge=0, le=50)
    max_plan_repairs: int = Field(2, ge=0, le=10)
    budget_tokens: int | None = Field(None, ge=1)
    budget_usd: float | None = Field(None, gt=0)
    approvers: tuple[str, ...] = ()

    @field_validator("approval_required", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(name.strip() for name in value.split(",") if name.strip())
        return value

    @classmethod
    def from_stored(cls, stored: Mapping[str, Any]) -> RunConfig:
        """A config as a run stored it, read leniently: strict validation belongs to
        creation. A field a later release dropped is ignored, and one whose value no
        longer validates takes its default, so an upgrade never fails active runs.
        Every iteration reads its run's config: the same text is validated once (a
        RunConfig is frozen, so every reader can share the one instance)."""
        try:
            text = json.dumps(stored)
        except (TypeError, ValueError, RecursionError):  # not JSON: read as given, uncached
            return cls._read_leniently(stored)
        return _stored_config(cls, text)

    @classmethod
    def _read_leniently(cls, stored: Mapping[str, Any]) -> RunConfig:
        known = _known_fields(cls, stored)
        try:
            return cls.model_validate(known)
        except ValidationError as exc:
            invalid = {err["loc"][0] for err in exc.errors() if err["loc"]}
            return cls.model_validate({k: v for k, v in known.items() if k not in invalid})


@functools.lru_cache(maxsize=256)  # bounded: a worker sees few distinct configs at once
def _stored_config(model: type[RunConfig], text: str) -> RunConfig:
    return model._read_leniently(json.loads(text))


def _known_fields(model: type[BaseModel], stored: Mapping[str, Any]) -> dict[str, Any]:
    """`stored` without the keys `model` does not have, nested models included."""
    known: dict[str, Any] = {}
    for name, value in stored.items():
        field = model.model_fields.get(name)
        if field is None:
            continue
        nested = field.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel) and isinstance(value, dict):
            value = _known_fields(nested, value)
        known[name] = value
    return known


class ToolPolicy(BaseModel):
    """What the engine needs to know about a tool: its flags, not its code."""

    model_config = ConfigDict(frozen=True)

    requires_approval: bool = False
    idempotent: bool = False
    timeout: float = 60.0
    # Calls of a tool that needs approval which a deployment declared safe: each is
    # (arg name, value). A call is safe when that arg equals the value, or — for a
    # list such as a command's argv — starts with it. E.g. ("argv", ("pytest",)).
    safe_calls: tuple[tuple[str, Any], ...] = ()

    def is_safe_call(self, args: JSONDict) -> bool:
        for name, value in self.safe_calls:
            given = args.get(name)
            if given == value:
                return True
            if _starts_with(given, value):
                return True
        return False


def _starts_with(given: Any, prefix: Any) -> bool:
    """Whether the list `given` starts with the non-empty tuple `prefix`."""
    if not (isinstance(given, list) and isinstance(prefix, tuple) and prefix):
        return False
    return tuple(given[: len(prefix)]) == prefix


class Step(BaseModel):
    """One step of a plan, as stored."""

    id: int
    plan_version: int
    position: int
    description: str
    tool: str
    args: JSONDict = Field(default_factory=dict)
    status: StepStatus = StepStatus.PENDING
    attempts: int = 0
    result: Any = None
    error: str | None = None
    error_class: ErrorClass | None = None
    approved_args_hash: str | None = None
    idempotency_key: str = ""
    # What the step set in the run context when it completed (None: nothing).
    context_updates: dict[str, str] | None = None

    @property
    def args_hash(self) -> str:
        return args_hash(self.args)

    def approved_in(self, context: JSONDict) -> bool:
        """Whether a person approved exactly this call, as it would run now: the same
        args reading the same run context (env values set by earlier steps)."""
        return self.approved_args_hash == approval_hash(self.args, context)


def idempotency_key(run_id: str, plan_version: int, position: int) -> str:
    """Stable across retries and worker crashes: the same step always has the same key."""
    return f"{run_id}:v{plan_version}:p{position}"


def approval_hash(args: JSONDict, context: JSONDict) -> str:
    """What an approval is bound to: the call's args and everything they read besides
    (step references name completed steps, whose results never change; the run
    context can). A plan that changes the context after an approval asks again."""
    return args_hash({"args": args, "context": context})


def args_hash(args: JSONDict) -> str:
    """A stable hash of a step's arguments: an approval is bound to exactly these."""
    canonical = json.dumps(args, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class RunSnapshot(BaseModel):
    """What one iteration knows about a run: the row plus the steps of the current
    plan it acts on — those `decide` looks at, or the whole plan when re-planning."""

    id: str
    task: str
    status: RunStatus
    config: RunConfig
    iteration: int
    tick: int
    plan_version: int = 0
    replans: int = 0
    planner_failures: int = 0
    context: JSONDict = Field(default_factory=dict)
    deadline: datetime
    tokens_total: int = 0
    cost_usd: float = 0.0
    steps: list[Step] = Field(default_factory=list)

    def step(self, step_id: int) -> Step:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)


class PlannedStep(BaseModel):
    """A step as a planner proposes it, before it is stored."""

    model_config = ConfigDict(extra="forbid")

    description: str = Field(min_length=1, max_length=500)
    tool: str = Field(min_length=1, max_length=100)
    args: JSONDict = Field(default_factory=dict)


PlanSteps = Annotated[list[PlannedStep], Field(min_length=1, max_length=MAX_STEPS_PER_PLAN)]
