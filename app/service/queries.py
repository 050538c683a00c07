"""Read models for the web app, the CLI and notifications."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from app.engine import sanitize
from app.engine.actions import NewEvent
from app.engine.models import Step
from app.errors import NotFound
from app.service.base import ServiceBase
from app.store.records import ApprovalRecord, EventRecord, RunRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunView:
    """A run as people read it: the row, every step, and the timeline."""

    run: RunRecord
    steps: list[Step]
    events: list[EventRecord]
    pending_approval: ApprovalRecord | None


@dataclass(frozen=True)
class RunPage:
    """One page of the runs list, and how many runs match in all."""

    rows: list[RunRecord]
    total: int


@dataclass(frozen=True)
class ApprovalView:
    """What a person deciding on an approval is shown."""

    approval: ApprovalRecord
    run: RunRecord
    step: Step
    plan: list[Step]


class Queries(ServiceBase):
    def status(self, run_id: str, *, after_event: int = 0) -> RunView:
        """The run, all its steps and its events after `after_event`. Raises NotFound."""
        with self.store.transaction() as tx:
            return RunView(
                run=tx.get_run(self._known_id(run_id)),
                steps=tx.all_steps(run_id),
                events=tx.events_after(run_id, after_event, limit=10_000),
                pending_approval=tx.pending_approval(run_id),
            )

    def list_runs(self, *, status: str | None = None, limit: int = 25, offset: int = 0) -> RunPage:
        """Newest first, optionally only runs with `status`; with the total for paging."""
        with self.store.transaction() as tx:
            return RunPage(
                rows=tx.list_runs(status=status, limit=limit, offset=offset),
                total=tx.count_runs(status=status),
            )

    def approval(self, approval_id: str) -> ApprovalView:
        """An approval with its run, its step and the plan around it. Raises NotFound."""
        if sanitize.text_problem(approval_id):
            raise NotFound(f"no approval with id {approval_id!r}")
        with self.store.transaction() as tx:
            row = tx.get_approval(approval_id)
            if row is None:
                raise NotFound(f"no approval with id {approval_id!r}")
            step = tx.get_step(row.step_id)
            return ApprovalView(
                approval=row,
                run=tx.get_run(row.run_id),
                step=step,
                plan=tx.plan_steps(row.run_id, step.plan_version),
            )

    def record_event(self, run_id: str, event: NewEvent) -> None:
        """Append to a run's timeline without touching its state (a notification that
        was sent, or could not be). Raises NotFound."""
        now = self.clock()
        with self.store.transaction() as tx:
            row = tx.get_run(run_id)
            tx.insert_events(run_id, row.iteration, [event], now)
