"""Retention: prune removes old finished runs with their history and workspaces, and
never an active or paused run; export → import keeps the history and runs nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from app.config import ConfigError, load_settings
from app.engine.models import RunStatus
from app.errors import InvalidInput
from app.service.retention import parse_age, parse_since
from app.store.schema import approvals, events, runs, steps
from tests.conftest import ROOT
from tests.support.fixtures import Harness, Worker, wait_until
from tests.support.fixtures import steps as plan
from tests.support.web import paused_run


def finished_run(harness: Harness, task: str = "prune me") -> str:
    harness.planner.script = [plan("noop")]
    run_id = harness.service.create_run(task, config={}, created_by="tests")
    harness.drain()
    assert harness.service.status(run_id).run.status == RunStatus.COMPLETED
    return run_id


def queued_run(harness: Harness) -> str:
    run_id = harness.service.create_run("still queued", config={}, created_by="tests")
    harness.dispatcher.sent.clear()
    return run_id


def age(harness: Harness, run_id: str, days: float) -> None:
    """Make the run look `days` older: created, updated and finished then."""
    then = harness.clock() - timedelta(days=days)
    with harness.service.store.transaction() as tx:
        tx.conn.execute(
            update(runs)
            .where(runs.c.id == run_id)
            .values(
                created_at=then,
                updated_at=then,
                finished_at=then,
            )
        )


def rows(harness: Harness, run_id: str) -> dict[str, int]:
    with harness.service.store.transaction() as tx:
        return {
            t.name: tx.conn.execute(
                select(func.count()).select_from(t).where(t.c.run_id == run_id)
            ).scalar_one()
            for t in (steps, events, approvals)
        } | {
            "runs": tx.conn.execute(
                select(func.count()).select_from(runs).where(runs.c.id == run_id)
            ).scalar_one()
        }


def make_workspace(harness: Harness, run_id: str) -> None:
    folder = harness.service.workspaces / run_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "file.txt").write_text("left by a step")


def test_prune_removes_old_finished_runs_and_leaves_active_and_paused_ones(harness: Harness):
    old = finished_run(harness)
    recent = finished_run(harness, "recent")
    paused = paused_run(harness)
    queued = queued_run(harness)
    for run_id in (old, paused, queued):
        age(harness, run_id, 40)
    for run_id in (old, recent, paused, queued):
        make_workspace(harness, run_id)
    assert rows(harness, old)["steps"] >= 1 and rows(harness, paused)["approvals"] == 1

    # Even when asked for by name, a paused or active run is refused.
    for wrong in (["paused"], ["queued"], ["running"], ["completed", "paused"]):
        with pytest.raises(InvalidInput, match="never"):
            harness.service.prune(older_than=timedelta(days=30), statuses=wrong)

    report = harness.service.prune(older_than=timedelta(days=30))
    pruned = {r.id for r in report.runs}
    assert old in pruned
    assert not pruned & {recent, paused, queued}
    assert rows(harness, old) == {"steps": 0, "events": 0, "approvals": 0, "runs": 0}
    assert not (harness.service.workspaces / old).exists()
    assert report.workspaces >= 1 and report.steps >= 1 and report.events >= 1
    for kept in (recent, paused, queued):
        assert rows(harness, kept)["runs"] == 1
        assert (harness.service.workspaces / kept / "file.txt").exists()
    assert harness.service.status(paused).run.status == RunStatus.PAUSED
    assert harness.service.status(queued).run.status == RunStatus.QUEUED


def test_a_dry_run_changes_nothing(harness: Harness):
    old = finished_run(harness)
    age(harness, old, 40)
    make_workspace(harness, old)
    before = rows(harness, old)
    report = harness.service.prune(older_than=timedelta(days=30), dry_run=True)
    assert report.dry_run and old in {r.id for r in report.runs}
    assert report.workspaces >= 1
    assert rows(harness, old) == before
    assert (harness.service.workspaces / old / "file.txt").exists()


def test_the_status_filter_prunes_only_the_statuses_named(harness: Harness):
    completed = finished_run(harness)
    cancelled = queued_run(harness)
    harness.service.cancel(cancelled, by="tests")
    for run_id in (completed, cancelled):
        age(harness, run_id, 40)
    report = harness.service.prune(older_than=timedelta(days=30), statuses=["cancelled"])
    assert cancelled in {r.id for r in report.runs}
    assert completed not in {r.id for r in report.runs}
    assert rows(harness, completed)["runs"] == 1


@pytest.mark.e2e
def test_beat_prunes_with_agentloop_retention_and_never_a_paused_run(
    harness: Harness, start_worker: Callable[..., Worker]
):
    """A real worker with beat: the agentloop.prune task, every half second, removes
    the old completed run; the old paused run and (not among the statuses asked
    for) the old cancelled run stay."""
    old = finished_run(harness)
    cancelled = queued_run(harness)
    harness.service.cancel(cancelled, by="tests")
    paused = paused_run(harness)
    for run_id in (old, cancelled, paused):
        age(harness, run_id, 40)
    start_worker(
        env={
            "AGENTLOOP_RETENTION": "30d",
            "AGENTLOOP_RETENTION_STATUSES": "completed",
            "AGENTLOOP_RETENTION_INTERVAL": "0.5",
        }
    )
    wait_until(lambda: rows(harness, old)["runs"] == 0, timeout=60, what="beat to prune")
    assert rows(harness, old) == {"steps": 0, "events": 0, "approvals": 0, "runs": 0}
    assert harness.service.status(paused).run.status == RunStatus.PAUSED
    assert rows(harness, paused)["approvals"] == 1
    assert harness.service.status(cancelled).run.status == RunStatus.CANCELLED


@pytest.mark.parametrize(
    ("env", "schedule"),
    [({}, None), ({"AGENTLOOP_RETENTION": "30d", "AGENTLOOP_RETENTION_INTERVAL": "600"}, 600.0)],
)
def test_the_prune_beat_entry_is_there_only_with_agentloop_retention(
    env: dict[str, str], schedule: float | None
):
    code = (
        "import celeryconfig, json\n"
        "entry = celeryconfig.beat_schedule.get('agentloop-prune')\n"
        "print(json.dumps(entry))\n"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("AGENTLOOP_RETENTION")}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**base, **env}, capture_output=True,
        text=True, check=True,
    )  # fmt: skip
    entry = json.loads(done.stdout.strip().splitlines()[-1])
    if schedule is None:
        assert entry is None
    else:
        assert entry == {"task": "agentloop.prune", "schedule": schedule}


def test_retention_settings_are_checked_with_prunes_own_rules():
    assert load_settings(retention="30d").retention_age == timedelta(days=30)
    assert load_settings().retention_age is None
    assert load_settings(retention_statuses="failed, cancelled").retention_status_list == [
        "failed",
        " cancelled",
    ]
    with pytest.raises(ConfigError, match="not an age"):
        load_settings(retention="30 days")
    with pytest.raises(ConfigError, match="never paused"):
        load_settings(retention="30d", retention_statuses="completed,paused")


def test_ages_and_times_parse():
    assert parse_age("30d") == timedelta(days=30)
    assert parse_age("12h") == timedelta(hours=12)
    assert parse_age("2w") == timedelta(days=14)
    for bad in ("", "30", "d", "-1d", "30 days"):
        with pytest.raises(InvalidInput):
            parse_age(bad)
    from datetime import UTC, datetime

    now = datetime(2026, 11, 30, tzinfo=UTC)
    assert parse_since("2d", now) == datetime(2026, 11, 28, tzinfo=UTC)
    assert parse_since("2026-11-01T10:00", now) == datetime(2026, 11, 1, 10, tzinfo=UTC)
    with pytest.raises(InvalidInput):
        parse_since("yesterday", now)


def comparable(harness: Harness, run_id: str) -> tuple[list, list, list]:
    view = harness.service.status(run_id)
    step_fields = [
        (s.plan_version, s.position, s.description, s.tool, s.args, s.status, s.attempts,
         s.result, s.error, s.approved_args_hash)
        for s in view.steps
    ]  # fmt: skip
    positions = {s.id: s.position for s in view.steps}
    event_fields = [
        (e.iteration, positions.get(e.step_id) if e.step_id else None, e.kind, e.message,
         e.data, e.created_at)
        for e in view.events
    ]  # fmt: skip
    with harness.service.store.transaction() as tx:
        asked = [
            (positions[a.step_id], a.kind, a.reason, a.decision, a.decided_by)
            for a in tx.run_approvals(run_id)
        ]
    return step_fields, event_fields, asked


def test_export_then_import_keeps_steps_events_and_approvals(harness: Harness):
    harness.planner.script = [plan("noop", "noop")]
    original = harness.service.create_run(
        "round trip", config={"approval_required": ["noop"]}, created_by="tests"
    )
    harness.drain()
    harness.service.approve(original, by="someone-else")
    harness.drain()
    harness.service.approve(original, by="someone-else")
    harness.drain()
    assert harness.service.status(original).run.status == RunStatus.COMPLETED

    document = harness.service.export_run(original)
    made = harness.service.import_run(document, by="tests")
    assert made.run_id != original and made.status == RunStatus.COMPLETED
    assert not harness.dispatcher.sent  # nothing is enqueued: nothing runs

    before, after = comparable(harness, original), comparable(harness, made.run_id)
    assert after[0] == before[0]  # steps
    assert after[1][:-1] == before[1]  # events, and one more saying where it came from
    assert "imported by tests from run " + original in after[1][-1][3]
    assert after[2] == before[2] and len(before[2]) == 2  # approvals
    copied = harness.service.status(made.run_id).run
    source = harness.service.status(original).run
    assert (copied.task, copied.config, copied.report, copied.iteration) == (
        source.task, source.config, source.report, source.iteration
    )  # fmt: skip
    assert copied.lease_owner is None and copied.next_run_at is None


def test_a_paused_run_is_imported_as_cancelled_and_cannot_be_resumed(harness: Harness):
    paused = paused_run(harness)
    made = harness.service.import_run(harness.service.export_run(paused), by="tests")
    assert made.original_status == RunStatus.PAUSED and made.status == RunStatus.CANCELLED
    copy = harness.service.status(made.run_id)
    assert copy.pending_approval is None
    assert "never executes" in (copy.run.end_reason or "") and copy.run.ended_by == "tests"
    with pytest.raises(Exception, match="not waiting"):
        harness.service.approve(made.run_id, by="someone-else")
    assert harness.service.status(paused).run.status == RunStatus.PAUSED  # source untouched


def test_import_refuses_what_is_not_an_export(harness: Harness):
    for bad in ({}, [], {"format": "agentloop-run", "version": 99}, {"format": "other"}):
        with pytest.raises(InvalidInput):
            harness.service.import_run(bad, by="tests")
    with pytest.raises(InvalidInput, match="malformed"):
        harness.service.import_run({"format": "agentloop-run", "version": 1}, by="tests")
