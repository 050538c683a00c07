"""The JSON API's requests and responses as pydantic models: the views validate with
them and /api/openapi.json is generated from their JSON Schema, so the document
and the server cannot drift.

Requests are strict (no coercion: "5" is not an integer in a body) and refuse
unknown fields; strings hold no NUL (the database cannot) and the JSON parser
refuses lone surrogates, Infinity/NaN and nesting past its recursion limit. What a
request may say and the service still refuses (an unknown tool, an approver no
user answers to, edited args the waiting tool does not take) is a 422; a request
the document itself rules out is a 400.
"""

from __future__ import annotations

import re
import types
from copy import copy
from datetime import datetime
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    create_model,
)

from app.engine import sanitize
from app.engine.models import (
    MAX_TASK_CHARS,
    EventKind,
    PauseKind,
    RetryPolicy,
    RunConfig,
    RunStatus,
    Step,
)
from app.service.fork import MAX_INSTRUCTION_CHARS
from app.service.inputs import MAX_IDEMPOTENCY_KEY_CHARS, MAX_RUN_ID_CHARS, Problem
from app.service.retention import AGE_PATTERN

# Strings the database can hold: no NUL (lone surrogates never get past the parser).
NO_NUL = r"^[^\x00]*$"
MAX_TEXT_CHARS = 10_000
MAX_NAMES = 50  # approval_required, approvers
MAX_LIMIT = 200
MAX_OFFSET = 1_000_000_000
# Event ids stay exact in every JSON reader (JavaScript's largest safe integer).
MAX_EVENT_ID = 2**53 - 1
# JSON bodies: far more than any request needs (a task is at most 10,000 characters).
MAX_BODY_BYTES = 256 * 1024
MAX_ARGS_DEPTH = sanitize.MAX_DEPTH
# A request's problems listed in one answer: every one a person could make, and a bound.
MAX_PROBLEMS = 50

Text = Annotated[str, StringConstraints(pattern=NO_NUL)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=NO_NUL)]
ApprovalId = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_RUN_ID_CHARS, pattern=NO_NUL)
]
# Visible ASCII, no space at either end: what survives every HTTP hop unchanged.
IdempotencyKey = Annotated[
    str,
    StringConstraints(
        min_length=1,
        max_length=MAX_IDEMPOTENCY_KEY_CHARS,
        pattern=r"^[!-~]([ -~]*[!-~])?$",
    ),
]

REQUEST = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


# --- request bodies ---------------------------------------------------------------------


def _json_integer(value: Any) -> Any:
    """JSON Schema's integer: 7 and 7.0 are both integers; "7" and true are not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _safe(annotation: Any, *, item: bool = False) -> Any:
    """`annotation` with every str without NUL, and the items of lists bounded names."""
    if annotation is str:
        return Name if item else Text
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return tuple[_safe(args[0], item=True), ...]  # type: ignore[misc]
    if origin in (Union, types.UnionType):
        return Union[tuple(_safe(a, item=item) for a in args)]  # noqa: UP007
    return annotation


# Bounds the service leaves open, so that every number and list in a request is bounded.
BOUNDS: dict[str, dict[str, Any]] = {
    "approval_required": {"max_length": MAX_NAMES},
    "approvers": {"max_length": MAX_NAMES},
    "budget_tokens": {"le": 10**12},
    "budget_usd": {"le": 10**9},
}


def _mirror(model: type[BaseModel], name: str, doc: str) -> type[BaseModel]:
    """A strict request model with exactly `model`'s fields, defaults and bounds: the
    fields come from the one source, the service's model. Its validators (which JSON
    Schema cannot say) stay in the service: what they refuse is a 422."""
    fields: dict[str, Any] = {}
    for field_name, info in model.model_fields.items():
        if info.annotation is RetryPolicy:
            fields[field_name] = (RetryPolicyIn, Field(default_factory=RetryPolicyIn))
            continue
        # A field with a pattern of its own (planner) already rules NUL out.
        own_pattern = any(getattr(m, "pattern", None) for m in info.metadata)
        annotation = info.annotation if own_pattern else _safe(info.annotation)
        # The field's bounds go on the value itself (not on `X | None`, where pydantic's
        # JSON Schema would lose them).
        constraints = [*info.metadata, *([Field(**b)] if (b := BOUNDS.get(field_name)) else [])]
        options = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else ()
        optional = len(options) == 2 and type(None) in options
        value: Any = next(o for o in options if o is not type(None)) if optional else annotation
        if value is int:
            # Bounds first, then JSON Schema's idea of an integer (else the document
            # would lose the bounds).
            constraints.append(BeforeValidator(_json_integer))
        if constraints:
            value = Annotated[value, *constraints]
        annotation = value | None if optional else value
        field = copy(info)
        field.metadata = []
        fields[field_name] = (annotation, field)
    mirrored: type[BaseModel] = create_model(name, __config__=REQUEST, __doc__=doc, **fields)
    return mirrored


RetryPolicyIn = _mirror(RetryPolicy, "RetryPolicy", RetryPolicy.__doc__ or "")
RunConfigIn = _mirror(
    RunConfig,
    "RunConfig",
    "Per-run options; every field is optional. approval_required adds to the tools "
    "the deployment guards and approvers to the deployment's approvers.",
)


class NewRun(BaseModel):
    """A run to create."""

    model_config = REQUEST

    task: Annotated[
        str, StringConstraints(min_length=1, max_length=MAX_TASK_CHARS, pattern=NO_NUL)
    ] = Field(description="What the agent should do")
    config: RunConfigIn = Field(default_factory=RunConfigIn)  # type: ignore[valid-type]


class Approve(BaseModel):
    """Approve the step the run waits on, optionally with edited args."""

    model_config = REQUEST

    args: dict[str, Any] | None = Field(
        None,
        description="Edited args for the waiting step's tool, checked by the tool "
        "(422 when they do not fit it)",
    )
    comment: Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS, pattern=NO_NUL)] = ""
    approval_id: ApprovalId | None = Field(
        None, description="Decide only this approval (409 when it is no longer pending)"
    )


class Reject(BaseModel):
    """Reject the step the run waits on; the agent re-plans around the reason."""

    model_config = REQUEST

    reason: Annotated[
        str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS, pattern=NO_NUL)
    ] = Field(description="Why: the agent re-plans around it")
    approval_id: ApprovalId | None = Field(
        None, description="Decide only this approval (409 when it is no longer pending)"
    )


class Cancel(BaseModel):
    """Cancel the run; optionally say why (kept with who cancelled it)."""

    model_config = REQUEST

    reason: Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS, pattern=NO_NUL)] = ""


class ForkRun(BaseModel):
    """Fork the run from one of its completed steps (time travel)."""

    model_config = REQUEST

    from_step: Annotated[int, Field(ge=1, le=2**31 - 1), BeforeValidator(_json_integer)] = Field(
        description="N, the step's number as the run shows it (its position): the fork "
        "keeps steps 1 to N as they ended and plans what follows. 422 when the run has "
        "no step N, 409 when step N did not complete."
    )
    instruction: (
        Annotated[str, StringConstraints(max_length=MAX_INSTRUCTION_CHARS, pattern=NO_NUL)] | None
    ) = Field(None, description="Added to the task for the fork's planner")


# --- query parameters -------------------------------------------------------------------

_INTEGER = re.compile(r"-?[0-9]{1,20}")


def _integer(value: Any) -> Any:
    """A query string's integer is digits (an optional minus): no "1.0", " 1", "1e3"."""
    if isinstance(value, str):
        if not _INTEGER.fullmatch(value):
            raise ValueError("must be an integer")
        return int(value)
    return value


QueryInt = Annotated[int, BeforeValidator(_integer)]

_DATE = re.compile(r"\d{4}-")


def _time(value: Any) -> Any:
    """A query string's time is ISO 8601 (pydantic would take "0.5" as a Unix time)."""
    if isinstance(value, str) and not _DATE.match(value):
        raise ValueError("must be an ISO 8601 time, e.g. 2026-11-30T12:00:00Z")
    return value


QueryTime = Annotated[datetime, BeforeValidator(_time)]
# An age back from now, as `agentloop runs --since` and the runs page take it (2d, 12h).
QueryAge = Annotated[str, StringConstraints(pattern=AGE_PATTERN)]
QUERY = ConfigDict(extra="forbid", frozen=True)


class NoQuery(BaseModel):
    """An operation without query parameters refuses any."""

    model_config = QUERY


class RunsQuery(BaseModel):
    model_config = QUERY

    status: RunStatus | None = Field(None, description="Only runs with this status")
    created_by: Name | None = Field(None, description="Only runs this user started")
    since: QueryTime | QueryAge | None = Field(
        None,
        description="Only runs created at or after this time (UTC unless it says), or "
        "within this age back from now (30m, 12h, 2d, 1w)",
        union_mode="left_to_right",
    )
    search: (
        Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=NO_NUL)] | None
    ) = Field(
        None, description="Only runs whose task contains this text (any case, taken literally)"
    )
    limit: QueryInt = Field(50, ge=1, le=MAX_LIMIT, description="Runs per page")
    offset: QueryInt = Field(0, ge=0, le=MAX_OFFSET, description="Runs to skip")


class EventsQuery(BaseModel):
    model_config = QUERY

    after: QueryInt = Field(0, ge=0, le=MAX_EVENT_ID, description="Events after this id")


# --- responses ---------------------------------------------------------------------------


class ProblemOut(BaseModel):
    """One thing wrong with a request."""

    field: str = Field(description='Where, as a dotted path: "task", "config.timeout"')
    message: str = Field(description="What is wrong, in words")


class Error(BaseModel):
    error: str = Field(description="What went wrong, naming the field when one is wrong")
    problems: list[ProblemOut] | None = Field(
        None,
        description="Creating a run: every problem of the request at once, the document's "
        "(400) and the service's (422) alike",
    )


class Run(BaseModel):
    id: str
    task: str
    status: RunStatus
    planner: str
    parent_run_id: str | None = Field(description="The run this one was forked from")
    forked_from_step: int | None = Field(description="The parent's step it was forked from")
    config: dict[str, Any]
    iteration: int
    plan_version: int
    tokens_total: int
    cost_usd: float
    created_by: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    report: str | None
    error: str | None = Field(description="What went wrong, for a failed run")
    ended_by: str | None = Field(
        description="Who ended the run by a decision (status rejected or cancelled)"
    )
    end_reason: str | None = Field(description="Why, in their words (None: not given)")
    url: str = Field(description="The run's page")


class PendingApproval(BaseModel):
    id: str
    kind: PauseKind
    step_id: int
    reason: str
    created_at: datetime


class RunDetail(Run):
    steps: list[Step]
    pending_approval: PendingApproval | None
    last_event: int
    forks: list[str] = Field(description="Ids of the runs forked from this one, oldest first")


class RunPage(BaseModel):
    runs: list[Run]
    total: int
    limit: int
    offset: int


class Event(BaseModel):
    id: int
    iteration: int
    step_id: int | None
    kind: EventKind
    message: str
    data: dict[str, Any]
    created_at: datetime


class EventPage(BaseModel):
    events: list[Event]
    last_event: int = Field(description="Pass it as `after` to get only newer events")
    status: RunStatus


# --- errors ------------------------------------------------------------------------------


def problems(exc: ValidationError, *, what: str = "body") -> list[Problem]:
    """A ValidationError as Problems, each naming its field, e.g. config.max_iterations:
    "Input should be less than or equal to 10000" (at most MAX_PROBLEMS of them)."""
    return [_problem(error, what) for error in exc.errors(include_url=False)[:MAX_PROBLEMS]]


def _problem(error: Any, what: str) -> Problem:
    place = ".".join(sanitize.scrub_text(str(p))[:80] for p in error["loc"]) or what
    if error["type"] == "extra_forbidden":
        return Problem(place, "unknown field")
    if error["type"] == "string_pattern_mismatch" and error.get("ctx", {}).get("pattern") == NO_NUL:
        return Problem(place, "must not contain a NUL character (\\u0000)")
    if error["type"] == "json_invalid":
        return Problem(what, f"not valid JSON: {error['msg'].removeprefix('Invalid JSON: ')}")
    return Problem(place, str(error["msg"]))


def describe(exc: ValidationError, *, what: str = "body") -> str:
    """A ValidationError as one line naming each field (the first five)."""
    return "; ".join(str(p) for p in problems(exc, what=what)[:5])


def depth(value: Any) -> int:
    """How deeply `value` (parsed JSON) nests, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack += [(v, level + 1) for v in item.values()]
        elif isinstance(item, list):
            stack += [(v, level + 1) for v in item]
    return deepest
