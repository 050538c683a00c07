"""Retention: remove finished runs past an age, with their history and workspaces.

Only finished runs (completed, failed, rejected, cancelled) are ever removed. A
queued, running or paused run stays whatever is asked: the status filter is checked
here and again in the DELETE itself, so a run resumed between the listing and the
delete stays.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from app.engine.models import RunStatus
from app.errors import InvalidInput
from app.service.base import ServiceBase
from app.store.records import RunRecord

log = logging.getLogger(__name__)

FINISHED = tuple(status for status in RunStatus if status.is_terminal)
PRUNE_BATCH = 200

# An age: up to five digits (99999w is under 1,918 years: any age reaches back from
# now to a time a datetime holds) and a unit. A JSON Schema pattern as well (the
# API's `since` declares it): no flags, so both cases are spelt out.
AGE_PATTERN = r"^\s*(\d{1,5}(?:\.\d+)?)\s*([sSmMhHdDwW])\s*$"
_AGE = re.compile(AGE_PATTERN)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `45s`, `2w` as a timedelta; InvalidInput otherwise."""
    found = _AGE.match(text or "")
    if found is None:
        raise InvalidInput(
            f"{text!r} is not an age: give a number (up to 5 digits) and a unit, e.g. 30d, 12h, 90m"
        )
    return timedelta(seconds=float(found.group(1)) * _UNITS[found.group(2).lower()])


def parse_since(text: str, now: datetime) -> datetime:
    """An age (`2d`: that long before `now`) or an ISO 8601 time (UTC unless it says)."""
    try:
        if _AGE.match(text or ""):
            return now - parse_age(text)
        moment = datetime.fromisoformat(text.strip())
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except ValueError:
        raise InvalidInput(
            f"{text!r} is neither an age (a number of up to 5 digits and a unit: 2d, 12h) "
            "nor an ISO 8601 time (2026-11-30T12:00)"
        ) from None
    except OverflowError:
        raise InvalidInput(f"{text!r} reaches back before the year 1") from None


def finished_statuses(statuses: Iterable[str] | None) -> list[str]:
    """The statuses to prune: all finished ones, or those asked for, which must be
    finished; InvalidInput names any other."""
    if statuses is None:
        return [str(s) for s in FINISHED]
    asked = [s.strip().lower() for s in statuses if s.strip()]
    if not asked:
        return [str(s) for s in FINISHED]
    wrong = [s for s in asked if s not in {str(f) for f in FINISHED}]
    if wrong:
        raise InvalidInput(
            f"prune removes only finished runs ({', '.join(FINISHED)}), never "
            f"{', '.join(wrong)}: a queued, running or paused run is never pruned"
        )
    return sorted(set(asked))


@dataclass(frozen=True)
class PruneReport:
    """What a prune removed, or (dry_run) would remove."""

    runs: list[RunRecord]
    steps: int
    events: int
    approvals: int
    workspaces: int
    dry_run: bool
    cutoff: datetime
    statuses: list[str] = field(default_factory=list)


class Retention(ServiceBase):
    def prune(
        self,
        *,
        older_than: timedelta,
        statuses: Iterable[str] | None = None,
        dry_run: bool = False,
    ) -> PruneReport:
        """Remove runs with one of `statuses` (default: every finished one) that finished
        more than `older_than` ago, with their steps, events, approvals and workspace
        folders. Never a queued, running or paused run. With `dry_run`, nothing changes:
        the report says what would go."""
        if older_than <= timedelta(0):
            raise InvalidInput("the age must be more than zero (e.g. 30d)")
        chosen = finished_statuses(statuses)
        cutoff = self.clock() - older_than
        if dry_run:
            with self.store.transaction() as tx:
                found = tx.prunable_runs(statuses=chosen, finished_before=cutoff)
                counts = tx.count_run_children([r.id for r in found])
            folders = sum(1 for r in found if self._workspace_of(r.id).is_dir())
            return PruneReport(found, **counts, workspaces=folders, dry_run=True,
                               cutoff=cutoff, statuses=chosen)  # fmt: skip
        removed: list[RunRecord] = []
        totals = {"steps": 0, "events": 0, "approvals": 0}
        folders = 0
        while True:
            with self.store.transaction() as tx:
                batch = tx.prunable_runs(statuses=chosen, finished_before=cutoff, limit=PRUNE_BATCH)
                if not batch:
                    break
                counts = tx.count_run_children([r.id for r in batch])
                gone = set(
                    tx.delete_finished_runs(
                        [r.id for r in batch], statuses=chosen, finished_before=cutoff
                    )
                )
            for name in totals:
                totals[name] += counts[name]
            for row in batch:
                if row.id in gone:
                    removed.append(row)
                    folders += self._remove_workspace(row.id)
            if len(gone) < len(batch) or len(batch) < PRUNE_BATCH:
                break
        log.info("pruned %d runs finished before %s", len(removed), cutoff.isoformat())
        return PruneReport(removed, **totals, workspaces=folders, dry_run=False,
                           cutoff=cutoff, statuses=chosen)  # fmt: skip

    def _workspace_of(self, run_id: str) -> Path:
        if not run_id or Path(run_id).name != run_id or run_id in (".", ".."):
            raise InvalidInput(f"run id {run_id!r} cannot name a workspace folder")
        return self.workspaces / run_id

    def _remove_workspace(self, run_id: str) -> int:
        """Remove the run's workspace folder; 1 if there was one."""
        folder = self._workspace_of(run_id)
        if not folder.exists() and not folder.is_symlink():
            return 0
        try:
            if folder.is_symlink() or not folder.is_dir():
                folder.unlink()
            else:
                shutil.rmtree(folder)
        except OSError:
            log.exception("could not remove the workspace %s of pruned run %s", folder, run_id)
            return 0
        return 1
