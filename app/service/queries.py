"""Read models for the web app, the CLI and notifications."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

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
    """One page of the runs list, how many runs match in all, and how many of
    each status match the other filters (the status chips' counts)."""

    rows: list[RunRecord]
    total: int
    by_status: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ApprovalView:
    """What a person deciding on an approval is shown."""

    approval: ApprovalRecord
    run: RunRecord
    step: Step
    plan: list[Step]


class Queries(ServiceBase):
    def status(self, run_id: str, *, after_event: int = 0) -> RunView:
        """The run, all its steps and its events after `after_event`, as of one moment.
        Raises NotFound."""
        with self.store.snapshot() as tx:
            return RunView(
                run=tx.get_run(self._known_id(run_id)),
                steps=tx.all_steps(run_id),
                events=tx.events_after(run_id, after_event, limit=10_000),
                pending_approval=tx.pending_approval(run_id),
            )

    def list_runs(
        self,
        *,
        status: str | None = None,
        since: datetime | None = None,
        search: str | None = None,
        created_by: str | None = None,
        limit: int = 25,
        offset: int = 0,
    ) -> RunPage:
        """Newest first, filtered like search_runs (and by who started them); with the
        total for paging and the count of each status."""
        with self.store.transaction() as tx:
            rows = tx.find_runs(
                status=status, since=since, search=search, created_by=created_by,
                limit=limit, offset=offset,
            )  # fmt: skip
            by_status = tx.count_by_status(since=since, search=search, created_by=created_by)
        total = by_status.get(status, 0) if status else sum(by_status.values())
        return RunPage(rows=rows, total=total, by_status=by_status)

    def overdue_runs(self, *, waited: float, limit: int = 20) -> list[RunRecord]:
        """Active runs no worker holds that were due more than `waited` seconds ago,
        longest waiting first."""
        now = self.clock()
        with self.store.transaction() as tx:
            return tx.overdue_runs(before=now - timedelta(seconds=waited), now=now, limit=limit)

    def approval(self, approval_id: str) -> ApprovalView:
        """An approval with its run, its step and the plan around it. Raises NotFound."""
        if sanitize.text_problem(approval_id):
            raise NotFound(f"no approval with id {approval_id!r}")
        with self.store.snapshot() as tx:
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
