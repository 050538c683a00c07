"""The embedded defaults — SQLite and kombu's filesystem broker — that `make demo`
runs on with no servers: the service on SQLite, and the demo command itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from app.engine.actions import PlanProduced
from app.engine.models import PlannedStep, RunStatus
from app.store.migrate import upgrade
from app.store.repo import Store, make_engine
from tests.conftest import ROOT
from tests.support.fixtures import make_harness, steps


def sqlite_store(tmp_path: Path) -> Store:
    url = f"sqlite:///{tmp_path / 'agentloop.db'}"
    upgrade(url)
    return Store(make_engine(url))


def test_the_loop_runs_on_sqlite(tmp_path: Path):
    store = sqlite_store(tmp_path)
    harness = make_harness(store, tmp_path)
    harness.planner.script = [
        PlanProduced(
            steps=[
                PlannedStep(description="probe", tool="noop"),
                PlannedStep(description="ship", tool="deploy", args={"env": "staging"}),
            ]
        ),
        steps("flaky"),
    ]
    run_id = harness.service.create_run("ship on sqlite")
    harness.drain()
    assert harness.service.status(run_id).run.status == RunStatus.PAUSED
    harness.service.approve(run_id, by="ann")
    harness.drain()  # deploy fails (no env var) → re-plan → flaky retries → verify
    view = harness.service.status(run_id)
    assert view.run.status == RunStatus.COMPLETED, view.run.error
    kinds = [e.kind for e in view.events]
    assert {"plan", "approval", "error", "retry", "observation"} <= set(kinds)
    store.dispose()


def run_demo(tmp_path: Path, answers: str) -> subprocess.CompletedProcess[str]:
    """`agentloop demo` as a new user runs it: no settings in the environment."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AGENTLOOP_") and k not in ("DATABASE_URL", "CELERY_BROKER_URL")
    }
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "demo"],
        input=answers,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        timeout=180,
    )


def test_the_demo_command_completes_on_embedded_defaults(tmp_path: Path):
    demo = run_demo(tmp_path, "y\ny\n")
    out = demo.stdout
    assert demo.returncode == 0, out + demo.stderr
    assert "database : sqlite:///" in out and "broker   : filesystem://" in out
    # Asked again after set_env: the approval was for the deploy without that env var.
    assert out.count("Approve deploy to staging? [y/N]") == 2
    assert "missing env var STAGING_DATABASE_URL" in out and "plan v2 (replan)" in out
    assert "RETRY" in out and "run completed" in out
    assert (tmp_path / ".agentloop" / "agentloop.db").exists()
    # Its worker stopped on SIGTERM (a warm shutdown), not killed after 30 s: with the
    # solo pool a SIGTERM ignored for the pool's sake had been the worker's own.
    assert "Warm shutdown" in (tmp_path / ".agentloop" / "demo-worker.log").read_text()


def test_the_demo_takes_end_of_input_as_no(tmp_path: Path):
    demo = run_demo(tmp_path, "")
    assert demo.returncode == 1
    assert "(end of input)" in demo.stdout
    assert "rejected by terminal: end of input" in demo.stdout
