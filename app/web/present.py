"""How runs read on a page: ages, durations, money, plan history, step history.

Pure functions over rows and steps; the templates escape whatever they return.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from app.engine.models import PauseKind, Step, StepStatus
from app.store.records import ApprovalRecord, EventRecord, RunRecord
from app.timeline import format_outcome

SHORT_CHARS = 90


def _now() -> datetime:
    return datetime.now(UTC)


def age(when: datetime | None, now: datetime | None = None) -> str:
    if when is None:
        return "—"
    return _span((now or _now()) - when) + " ago"


def duration(start: datetime | None, end: datetime | None = None) -> str:
    """How long a run has taken (so far, when it has not ended)."""
    if start is None:
        return "—"
    return _span((end or _now()) - start)


def since(when: datetime, start: datetime) -> str:
    """A moment as the time since the run began: "+1.2 s", "+3 min 4 s"."""
    return "+" + _span(when - start)


def _span(delta: Any) -> str:
    seconds = max(0.0, delta.total_seconds())
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    return f"{hours // 24} days"


def outcome_preview(run: RunRecord) -> str:
    """One line of how a run ended, for the runs list: its error, or else the first
    line of its report; for a run a person's decision ended, who and why."""
    if outcome := format_outcome(run):
        return short(outcome)
    if run.error:
        return short(run.error)
    first = next((line for line in (run.report or "").splitlines() if line.strip()), "")
    return short(first.lstrip("#").strip())


WAITING_LABELS = {
    PauseKind.APPROVAL: "awaiting approval",
    PauseKind.OUTCOME_UNKNOWN: "awaiting a decision",
    PauseKind.NEEDS_HUMAN: "awaiting a person",
}


def step_status(step: Step, waiting: ApprovalRecord | None) -> str:
    """A step's status as a badge says it: a step a person has yet to decide on is
    "awaiting approval" (or a decision), not "pending" like the steps after it."""
    if waiting is not None and waiting.status == "pending" and waiting.step_id == step.id:
        return WAITING_LABELS.get(PauseKind(waiting.kind), str(step.status))
    return str(step.status)


def money(value: float | None) -> str:
    return f"${value or 0:.4f}"


def stamp(when: datetime | None) -> str:
    return "—" if when is None else when.strftime("%Y-%m-%d %H:%M:%S UTC")


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str, ensure_ascii=False)


def short(text: str | None, limit: int = SHORT_CHARS) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


@dataclass
class PlanVersion:
    """One version of the plan: what it said, why it was made, what changed."""

    version: int
    purpose: str
    reasoning: str
    planned: list[dict[str, Any]]
    failure: dict[str, Any] | None
    steps: list[Step]
    added: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    created_at: datetime | None = None


def plan_history(events: list[EventRecord], steps: list[Step]) -> list[PlanVersion]:
    """Every plan version, newest first, from the run's `plan` events and its steps."""
    by_version: dict[int, list[Step]] = defaultdict(list)
    for step in steps:
        by_version[step.plan_version].append(step)
    versions: list[PlanVersion] = []
    for event in events:
        if event.kind != "plan" or not isinstance(event.data, dict):
            continue
        data = event.data
        version = int(data.get("version") or len(versions) + 1)
        planned = [s for s in data.get("steps") or [] if isinstance(s, dict)]
        names = [_label(s) for s in planned]
        # A re-plan covers what was still to do: compare with the earlier plan's
        # steps that had not completed, not with the work already done.
        before = [
            f"{s.description} [{s.tool}]"
            for s in by_version.get(versions[-1].version if versions else -1, [])
            if s.status is not StepStatus.COMPLETED
        ]
        versions.append(
            PlanVersion(
                version=version,
                purpose=str(data.get("purpose") or ""),
                reasoning=str(data.get("reasoning") or ""),
                planned=planned,
                failure=data.get("failure") if isinstance(data.get("failure"), dict) else None,
                steps=by_version.get(version, []),
                added=[n for n in names if n not in before] if versions else [],
                dropped=[n for n in before if n not in names],
                created_at=event.created_at,
            )
        )
    return list(reversed(versions))


def _label(planned: dict[str, Any]) -> str:
    return f"{planned.get('description', '')} [{planned.get('tool', '')}]"


def step_history(events: list[EventRecord]) -> dict[int, list[EventRecord]]:
    """Each step's own events (calls, results, errors, retries, approvals), in order."""
    history: dict[int, list[EventRecord]] = defaultdict(list)
    for event in events:
        if event.step_id is not None:
            history[int(event.step_id)].append(event)
    return history


def state_key(run: RunRecord) -> str:
    """Changes whenever the run's row does: the page re-renders its sections then."""
    return f"{run.status}-{run.iteration}-{round(run.updated_at.timestamp() * 1e6)}"
