"""What a planner call is told: the plan, the failure, recent memory folded into
a running summary, the tool specs, the budget left; bounded whatever the run's
length."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Row

from app.engine.actions import Plan
from app.engine.models import RunSnapshot
from app.engine.redact import secret_values
from app.planner.base import EventView, PlanRequest, StepView, ToolSpec
from app.planner.prompt import RECENT_EVENTS, summarize_events
from app.service.base import ServiceBase
from app.store.records import EventRecord
from app.store.repo import Tx

log = logging.getLogger(__name__)


RECENT_COMPLETED_STEPS = 50
SUMMARY_FOLD_LIMIT = 500
REJECTED_STEPS = 50  # rejected calls a plan is checked against (the latest)


class Context(ServiceBase):
    def _plan_request(self, tx: Tx, row: Row[Any], run: RunSnapshot, action: Plan) -> PlanRequest:
        """What the planner is told; bounded whatever the run's length."""
        # Events up to summarized_through are in the summary already, and the recent
        # window never reaches back past them: reading only those after is the same
        # window, read in time bounded by the window rather than by the run's length.
        recent = tx.recent_events_with_positions(
            run.id, RECENT_EVENTS, after_id=row.summarized_through
        )
        summary = self._fold_memory(tx, row, [event for event, _ in recent])
        completed, rejected = tx.completed_and_rejected_steps(
            run.id, completed=RECENT_COMPLETED_STEPS, rejected=REJECTED_STEPS
        )
        return PlanRequest(
            run_id=run.id,
            task=run.task,
            purpose=action.purpose,
            config=run.config,
            tools=self._tool_specs(),
            failure=action.failure,
            completed=[StepView.of(s) for s in completed],
            current_plan=[StepView.of(s) for s in run.steps],
            recent_events=[event_view(e, position) for e, position in recent],
            memory_summary=summary,
            context_keys=sorted(run.context),
            secrets=secret_values(run.context, run.steps),
            rejected=[StepView.of(s) for s in rejected],
            **budget_left(run),
        )

    def _tool_specs(self) -> list[ToolSpec]:
        policies = self.tools.policies()
        return [
            ToolSpec(
                **spec,
                requires_approval=policies[spec["name"]].requires_approval,
                idempotent=policies[spec["name"]].idempotent,
            )
            for spec in self.tools.specs()
        ]

    def _fold_memory(self, tx: Tx, row: Row[Any], recent: list[EventRecord]) -> str:
        """Fold events older than the recent window into the run's running summary."""
        if not recent:
            return str(row.memory_summary)
        older = tx.events_between(
            row.id,
            after_id=row.summarized_through,
            before_id=recent[0].id,
            limit=SUMMARY_FOLD_LIMIT,
        )
        if not older:
            return str(row.memory_summary)
        summary = summarize_events(
            row.memory_summary, [event_view(e, None) for e in older], max_chars=4000
        )
        tx.save_memory_summary(row.id, summary, older[-1].id)
        return summary


def budget_left(run: RunSnapshot) -> dict[str, Any]:
    """What a run's budgets have left, as PlanRequest's tokens_left and usd_left."""
    cfg = run.config
    return {
        "tokens_left": None
        if cfg.budget_tokens is None
        else max(0, cfg.budget_tokens - run.tokens_total),
        "usd_left": None if cfg.budget_usd is None else max(0.0, cfg.budget_usd - run.cost_usd),
    }


def event_view(row: EventRecord, step_position: int | None) -> EventView:
    return EventView(
        id=row.id,
        kind=row.kind,
        message=row.message,
        step_position=step_position,
        created_at=row.created_at,
        data=row.data or {},
    )
