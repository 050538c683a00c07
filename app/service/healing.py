"""The sweep: nudges for runs whose message was lost."""

from __future__ import annotations

import logging
from datetime import timedelta

from app import metrics
from app.service.base import ServiceBase

log = logging.getLogger(__name__)


class Healing(ServiceBase):
    def sweep(self) -> int:
        """Nudge active runs whose message was lost; returns how many were nudged.

        Each nudge is claimed in the database first, so a run has at most one nudge
        outstanding until a claim consumes it, however often the sweep runs and
        however far behind the queue is. An outstanding nudge is taken for lost
        after `nudge_timeout` — or at once when the queue holds fewer messages than
        there are outstanding nudges (the broker lost them: a restart, a flush)."""
        now = self.clock()
        overdue = now - timedelta(seconds=self.sweep_grace)
        renudge_before = now - timedelta(seconds=self.nudge_timeout)
        with self.store.transaction() as tx:
            outstanding = tx.count_nudged(before=overdue, now=now)
        depth = self.dispatcher.queue_depth() if outstanding else None
        if depth is not None and depth < outstanding:
            log.info("%d nudge(s) outstanding, %d message(s) queued", outstanding, depth)
            renudge_before = overdue
        with self.store.transaction() as tx:
            due = tx.claim_nudges(before=overdue, renudge_before=renudge_before, now=now)
        for row in due:
            self._publish(row.id, row.tick, 0)  # which work is next is not known here
        metrics.sweep_republished(len(due))
        if due:
            log.info("sweep nudged %d run(s)", len(due))
        return len(due)
