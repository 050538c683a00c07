"""What leaves the store: typed records, not driver rows.

Pages, the API, the CLI and notifications read runs, events and approvals
through these, so none of them depends on how a row is fetched. (The claim's
read, on the hot path of every iteration, stays a row inside the service.)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Self

from sqlalchemy import Row


class _Record:
    @classmethod
    def of(cls, row: Row[Any]) -> Self:
        values = row._mapping
        return cls(**{f.name: values[f.name] for f in fields(cls)})  # type: ignore[arg-type]


@dataclass(frozen=True)
class RunRecord(_Record):
    """A run as stored (the `runs` table)."""

    id: str
    task: str
    status: str
    planner: str
    config: dict[str, Any]
    context: dict[str, Any]
    iteration: int
    tick: int
    plan_version: int
    replans: int
    planner_failures: int
    lease_owner: str | None
    lease_expires_at: datetime | None
    next_run_at: datetime | None
    deadline: datetime
    tokens_total: int
    cost_usd: float
    memory_summary: str
    summarized_through: int
    report: str | None
    error: str | None
    created_by: str | None
    parent_run_id: str | None  # a fork's parent run (migration 0005)
    forked_from_step: int | None  # and the step number it was forked from
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    nudged_at: datetime | None
    idempotency_key: str | None
    request_hash: str | None
    ended_by: str | None  # who ended the run by a decision (rejected, cancelled)
    end_reason: str | None  # and why, in their words


@dataclass(frozen=True)
class EventRecord(_Record):
    """One entry of a run's timeline (the append-only `events` table)."""

    id: int
    run_id: str
    iteration: int
    step_id: int | None
    kind: str
    message: str
    data: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class ApprovalRecord(_Record):
    """A question put to a person about one step (the `approvals` table)."""

    id: str
    run_id: str
    step_id: int
    kind: str
    status: str
    reason: str
    args_hash: str
    expires_at: datetime | None
    decision: str | None
    decided_by: str | None
    decided_at: datetime | None
    comment: str | None
    edited_args: dict[str, Any] | None
    created_at: datetime
