"""Graceful shutdown: SIGTERM lets a running step finish and save, then the worker
stops; after AGENTLOOP_SHUTDOWN_GRACE it stops anyway."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from app.engine.models import RunStatus
from app.service import AgentService
from tests.conftest import REDIS_DB, ROOT
from tests.support.fixtures import die_with_parent, drop_queue, wait_until, workspace

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
# The Makefile's `run` target: honcho with its SIGKILL wait raised to the grace + 5 s.
HONCHO = (
    "import sys, honcho.manager as m, honcho.command as c; "
    "m.KILL_WAIT = float(sys.argv.pop(1)) + 5; sys.argv[0] = 'honcho'; c.main()"
)


def effects(run_id: str) -> list[str]:
    log = workspace(run_id) / "effects.log"
    return log.read_text().splitlines() if log.exists() else []


def effect_step(service: AgentService, run_id: str):
    (step,) = [s for s in service.status(run_id).steps if s.tool == "effect"]
    return step


def assert_saved_and_finish(service: AgentService, run_id: str, start_worker) -> None:
    """The held step completed and was saved; a new worker finishes the run with it."""
    view = service.status(run_id)
    assert effect_step(service, run_id).status == "completed", view.events
    assert view.pending_approval is None  # not outcome-unknown
    assert [line.split()[0] for line in effects(run_id)] == ["start", "effect"]
    start_worker(beat=True)
    wait_until(
        lambda: service.status(run_id).run.status in (RunStatus.COMPLETED, RunStatus.FAILED),
        timeout=60,
        what="a new worker to finish the run",
    )
    assert service.status(run_id).run.status == RunStatus.COMPLETED
    assert [line.split()[0] for line in effects(run_id)] == ["start", "effect"]  # once


def test_sigterm_during_a_step_lets_it_finish_and_save(start_worker, live_service) -> None:
    worker = start_worker(beat=False)
    run_id = live_service.create_run("apply the effect holding 30s")
    wait_until(lambda: effects(run_id), what="the effect to start")
    worker.process.send_signal(signal.SIGTERM)
    time.sleep(1.5)
    assert worker.process.poll() is None, "the worker left before its step finished"
    (workspace(run_id) / "release").touch()
    assert worker.process.wait(timeout=30) == 0, worker.output()
    assert "Warm shutdown" in worker.output()
    assert_saved_and_finish(live_service, run_id, start_worker)


def test_sigterm_to_the_whole_process_group_spares_the_step(start_worker, live_service) -> None:
    """What honcho and systemd (KillMode=control-group) do: every process of the
    worker, the pool's children included, gets SIGTERM."""
    worker = start_worker(beat=False)
    run_id = live_service.create_run("apply the effect holding 30s")
    wait_until(lambda: effects(run_id), what="the effect to start")
    for pid in [worker.process.pid, *worker.child_pids()]:
        os.kill(pid, signal.SIGTERM)
    time.sleep(1.5)
    (workspace(run_id) / "release").touch()
    assert worker.process.wait(timeout=30) == 0, worker.output()
    assert "WorkerLostError" not in worker.output()
    assert_saved_and_finish(live_service, run_id, start_worker)


def test_the_grace_bounds_the_wait(start_worker, live_service) -> None:
    worker = start_worker(beat=False, env={"AGENTLOOP_SHUTDOWN_GRACE": "1"})
    run_id = live_service.create_run("apply the effect holding 30s")
    wait_until(lambda: effects(run_id), what="the effect to start")
    started = time.monotonic()
    worker.process.send_signal(signal.SIGTERM)
    worker.process.wait(timeout=20)
    assert time.monotonic() - started < 12, "the worker outlived its grace"
    assert "shutdown grace (AGENTLOOP_SHUTDOWN_GRACE=1 s) expired" in worker.output()
    assert [line.split()[0] for line in effects(run_id)] == ["start"]  # cut off mid-step
    (workspace(run_id) / "release").touch()


def test_stopping_make_runs_honcho_during_a_step_completes_it(
    live_service, database_url, redis_db, tmp_path
) -> None:
    """`make run`'s worker line under the same honcho, stopped as Ctrl-C stops it; the
    step outlasts honcho's stock 5 s SIGKILL wait."""
    drop_queue(redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB))
    # The tools' worker line, and the planner's that plans the run first.
    lines = [
        p
        for p in (ROOT / "Procfile").read_text().splitlines()
        if p.startswith(("worker:", "planner:"))
    ]
    procfile = tmp_path / "Procfile"
    procfile.write_text(
        "".join(line + " --concurrency=1 --without-gossip --without-mingle\n" for line in lines)
    )
    (tmp_path / ".env").write_text("")
    log = tmp_path / "honcho.log"
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),  # the test tools (tests.support.tools)
        "AGENTLOOP_SHUTDOWN_GRACE": "20",
    }
    with log.open("wb") as out:
        honcho = subprocess.Popen(
            [sys.executable, "-c", HONCHO, "20", "start", "-f", str(procfile),
             "-d", str(ROOT), "-e", str(tmp_path / ".env"), "--no-colour"],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, preexec_fn=die_with_parent,
        )  # fmt: skip
    output = lambda: log.read_text(errors="replace")  # noqa: E731
    try:
        wait_until(lambda: "ready." in output(), timeout=60, what="the worker under honcho")
        run_id = live_service.create_run("apply the effect holding 30s")
        wait_until(lambda: effects(run_id), what="the effect to start")
        honcho.send_signal(signal.SIGINT)  # Ctrl-C: honcho SIGTERMs the worker's group
        time.sleep(6.5)  # longer than honcho's stock 5 s before SIGKILL
        assert honcho.poll() is None, output()
        (workspace(run_id) / "release").touch()
        assert honcho.wait(timeout=40) in (0, 130), output()
    finally:
        if honcho.poll() is None:
            honcho.kill()
            honcho.wait()
    assert "worker.1 stopped (rc=0)" in output().replace("worker.1 | ", ""), output()
    assert "WorkerLostError" not in output()
    view = live_service.status(run_id)
    assert effect_step(live_service, run_id).status == "completed", view.events
    assert view.pending_approval is None
    assert [line.split()[0] for line in effects(run_id)] == ["start", "effect"]
