"""The one field map of a transition: which run or step column each Transition and
StepUpdate field writes, and how.

Three writers follow it: `apply.apply_transition` (in memory), the PostgreSQL
statement that writes a transition at once and the SQLite statements that write it
one by one (`app/store/transition.py` compiles the map into their SET clauses and
parameters). A field added here is written by all three; a Transition or StepUpdate
field missing here fails tests/test_transition_semantics.py, which also proves the
three equal on both databases.

Pure data and plain Python: the engine imports it, so it names no SQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from app.engine.models import JSONDict, PlannedStep, StepStatus, idempotency_key


class How(StrEnum):
    """How a field's value becomes the column's new value."""

    REPLACE = "replace"  # the value when it is not None; None keeps the column
    FLAGGED = "flagged"  # the value (None included) when `flag` is true, else keep
    ADD = "add"  # the column plus the value (a delta)
    MERGE = "merge"  # the column's keys, then the value's; an empty value keeps it


@dataclass(frozen=True)
class Write:
    """One field of a Transition or StepUpdate written to one column."""

    field: str  # the Transition / StepUpdate attribute
    column: str  # the runs / steps column, and the RunSnapshot / Step attribute
    how: How
    flag: str | None = None  # FLAGGED: the boolean attribute that says "write it"
    in_snapshot: bool = True  # whether RunSnapshot / Step holds the column

    def __post_init__(self) -> None:
        if (self.flag is not None) != (self.how is How.FLAGGED):
            raise ValueError(f"{self.field}: a flag goes with FLAGGED, and only with it")

    def keeps(self, source: Any) -> bool:
        """Whether `source` leaves the column as it is."""
        value = getattr(source, self.field)
        if self.how is How.FLAGGED:
            return not getattr(source, str(self.flag))
        if self.how is How.ADD:
            return not value
        return not value if self.how is How.MERGE else value is None

    def new_value(self, source: Any, old: Any) -> Any:
        """The column's value after `source` is written over `old` (the semantics)."""
        if self.keeps(source):
            return old
        value = getattr(source, self.field)
        if self.how is How.ADD:
            return old + value
        if self.how is How.MERGE:
            return {**old, **value}
        return value

    def params(self, source: Any, old: Any = None) -> dict[str, Any]:
        """What a SQL statement is given for this field, by parameter name (the field,
        and the flag): REPLACE and MERGE pass None to keep the column (MERGE passes the
        merged value, computed here from `old` as read under the write's guard), ADD
        passes the delta, FLAGGED the flag and the value."""
        value = getattr(source, self.field)
        if self.how is How.FLAGGED:
            return {str(self.flag): bool(getattr(source, str(self.flag))), self.field: value}
        if self.how is How.MERGE:
            return {self.field: None if self.keeps(source) else self.new_value(source, old)}
        return {self.field: value}

    @property
    def param_names(self) -> tuple[str, ...]:
        return (self.field,) if self.flag is None else (self.flag, self.field)


# StepUpdate -> steps (and Step).
STEP_WRITES: tuple[Write, ...] = (
    Write("status", "status", How.REPLACE),
    Write("attempts", "attempts", How.REPLACE),
    Write("error_class", "error_class", How.REPLACE),
    Write("args", "args", How.REPLACE),
    Write("approved_args_hash", "approved_args_hash", How.REPLACE),
    # Kept per step so the context after any step can be rebuilt (a fork needs it).
    Write("context_updates", "context_updates", How.REPLACE),
    Write("result", "result", How.FLAGGED, flag="set_result"),
    Write("error", "error", How.FLAGGED, flag="set_error"),
)
STEP_KEY = "step_id"  # which step a StepUpdate writes

# Transition -> runs (and RunSnapshot, for the columns it holds).
RUN_WRITES: tuple[Write, ...] = (
    Write("status", "status", How.REPLACE),
    Write("new_plan_version", "plan_version", How.REPLACE),
    Write("replans_delta", "replans", How.ADD),
    Write("planner_failures", "planner_failures", How.REPLACE),
    Write("context_updates", "context", How.MERGE),
    Write("tokens_delta", "tokens_total", How.ADD),
    Write("cost_delta", "cost_usd", How.ADD),
    Write("report", "report", How.REPLACE, in_snapshot=False),
    Write("error", "error", How.REPLACE, in_snapshot=False),
    Write("ended_by", "ended_by", How.REPLACE, in_snapshot=False),
    Write("end_reason", "end_reason", How.REPLACE, in_snapshot=False),
)

# Transition fields that write no run column, and who handles each.
NOT_RUN_COLUMNS: dict[str, str] = {
    "step_updates": "STEP_WRITES, one step each",
    "new_steps": "new_step_columns: rows inserted into steps",
    "carried_approvals": "new_step_columns",
    "events": "rows appended to events",
    "human_request": "an approvals row",
    "delay": "when the service publishes the next iteration",
    "plan_finished": "which queue the next iteration is published on",
}


def new_step_columns(
    run_id: str,
    plan_version: int,
    position: int,
    planned: PlannedStep,
    approved_args_hash: str | None,
) -> dict[str, Any]:
    """A new step's columns, the same in memory and in the row the store inserts.
    Its id is the database's; result, error and error_class start NULL (None)."""
    args: JSONDict = planned.args
    return {
        "plan_version": plan_version,
        "position": position,
        "description": planned.description,
        "tool": planned.tool,
        "args": args,
        "status": StepStatus.PENDING,
        "attempts": 0,
        "approved_args_hash": approved_args_hash,
        "idempotency_key": idempotency_key(run_id, plan_version, position),
    }
