"""`agentloop demo`: the deploy scenario on embedded defaults, with a live timeline.

A real Celery worker process (solo pool, embedded beat for the sweep) advances
the run over the configured broker and database — by default kombu's
filesystem broker and SQLite, so no servers are needed. This process creates
the run, prints its memory as it grows, and asks at the approval on stdin.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from app import stall
from app.config import Settings, redact_url
from app.engine.models import Decision, PauseKind, RunStatus
from app.service import AgentService, RunView
from app.timeline import format_event, format_outcome, format_step

DEMO_TASK = "deploy PR 42 to staging, run the tests, report the results"
DEMO_CONFIG = {
    "planner": "offline",
    "runbook": "deploy_pr",
    "timeout": 300,
    # Short delays so the backoff is visible without a long wait.
    "retry_policy": {"max_retries": 3, "base": 0.5, "factor": 2.0, "max_backoff": 5.0},
}
POLL_SECONDS = 0.1

Asker = Callable[[AgentService, RunView], None]


def run_demo(settings: Settings, *, stdin: IO[str] = sys.stdin) -> int:
    """Run the scenario; 0 when the run completes, 1 when it does not."""
    from app.cli import connect
    from app.store.migrate import upgrade

    # The demo tools are registered for the demo only: in this process and in the
    # worker it starts (which reads the same environment).
    os.environ["AGENTLOOP_TOOL_MODULES"] = settings.with_demo_tools().tool_modules
    upgrade(settings.resolved_database_url)
    settings, service = connect()
    print(
        "agentloop demo\n"
        f"  database : {redact_url(settings.resolved_database_url)}\n"
        f"  broker   : {redact_url(settings.resolved_broker_url)}\n"
        "  planner  : offline (runbook deploy_pr) — no network, no API key\n"
        f"  task     : {DEMO_TASK}\n",
        flush=True,
    )
    worker = start_worker(settings)
    print(
        f"  worker   : celery worker pid {worker.pid} (log: {worker_log(settings)})\n", flush=True
    )
    run_id = ""
    try:
        run_id = service.create_run(DEMO_TASK, config=DEMO_CONFIG, created_by="demo")
        print(f"run {run_id} created\n", flush=True)
        return follow_run(
            service,
            run_id,
            ask=lambda svc, view: ask_at_terminal(svc, view, stdin),
            color=sys.stdout.isatty(),
            worker_alive=lambda: worker.poll() is None,
        )
    except KeyboardInterrupt:
        if run_id:
            service.cancel(run_id, by="demo (interrupted)")
        return 130
    finally:
        stop_worker(worker)


def worker_log(settings: Settings) -> Path:
    return settings.data_dir.resolve() / "demo-worker.log"


def start_worker(settings: Settings) -> subprocess.Popen[bytes]:
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "AGENTLOOP_DATA_DIR": str(data_dir)}
    argv = [
        sys.executable, "-m", "celery", "-A", "tasks", "worker",
        "--pool=solo", "--loglevel=INFO", "--without-gossip", "--without-mingle",
        "--beat", f"--schedule={data_dir / 'celerybeat-schedule'}",
    ]  # fmt: skip
    with worker_log(settings).open("wb") as log:
        # A process group of its own: the embedded beat is the worker's child, and
        # must not outlive the demo when the worker itself died.
        return subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.terminate()  # warm shutdown: the current iteration finishes first
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    # Whatever of its group is left (the embedded beat of a worker that died).
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGKILL)


def follow_run(
    service: AgentService,
    run_id: str,
    *,
    ask: Asker | None,
    color: bool,
    worker_alive: Callable[[], bool] = lambda: True,
    sweep_interval: float | None = None,
    warn: Callable[[str], None] | None = None,
) -> int:
    """Print the run's timeline until it ends; 0 if it completed.

    With `ask`, a pause is put to the person at the terminal; without it the
    command says how to decide and returns 0 (the run waits, holding no worker).
    When the run stays due with no worker claiming it (app/stall.py), `warn` (stderr
    by default) is told once, and the following goes on.
    """
    if sweep_interval is None:
        from app.config import load_settings

        sweep_interval = load_settings().sweep_interval
    warned = False
    last_event = 0
    while True:
        view = service.status(run_id, after_event=last_event)
        for event in view.events:
            print(format_event(event, color=color), flush=True)
            last_event = event.id
        status = RunStatus(view.run.status)
        if status.is_terminal:
            return finish(view)
        if status is RunStatus.PAUSED and view.pending_approval is not None:
            if ask is None:
                print(f"\nwaiting for a person: agentloop approve {run_id}  (or reject / resolve)")
                return 0
            ask(service, view)
            continue
        if not worker_alive():
            print("the worker stopped unexpectedly; see its log", file=sys.stderr)
            return 1
        stalled = stall.warning(view.run, service.clock(), sweep_interval)
        if stalled and not warned:
            (warn or _to_stderr)(f"warning: {stalled} (still following; Ctrl-C to stop)")
            warned = True
        time.sleep(POLL_SECONDS)  # sleep-ok: a terminal polling for display, not backoff


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def finish(view: RunView) -> int:
    run = view.run
    print("\nsteps:")
    for step in view.steps:
        print(format_step(step))
    if run.status == RunStatus.COMPLETED:
        print(f"\nrun {run.id} completed in {run.iteration} iterations.\n")
        print(run.report or "(no report)")
        return 0
    print(f"\nrun {run.id} {format_outcome(run) or f'{run.status}: {run.error}'}")
    return 1


def ask_at_terminal(service: AgentService, view: RunView, stdin: IO[str]) -> None:
    """Put the pending decision to the person; end of input means no."""
    pending = view.pending_approval
    assert pending is not None
    step = next(s for s in view.steps if s.id == pending.step_id)
    run_id = view.run.id
    if pending.kind == PauseKind.APPROVAL:
        what = service.tools.get(step.tool).describe_call(step.args)
        answer = prompt(f"\nApprove {what}? [y/N] ", stdin)
        if answer in ("y", "yes"):
            service.approve(run_id, by="terminal")
        else:
            reason = "end of input" if answer is None else "rejected at the terminal"
            service.reject(run_id, by="terminal", reason=reason)
        return
    answer = prompt(
        f"\nstep {step.position} ({step.tool}): {pending.reason}\n"
        "[r]etry, [s]kip, mark [d]one, or anything else to cancel? ",
        stdin,
    )
    choice = {"r": Decision.RETRY, "s": Decision.SKIP, "d": Decision.MARK_DONE}.get(answer or "")
    if choice is None:
        service.cancel(run_id, by="terminal")
    else:
        service.decide(run_id, choice, by="terminal")


def prompt(question: str, stdin: IO[str]) -> str | None:
    """One answer from stdin, lower-cased; None at end of input."""
    print(question, end="", flush=True)
    line = stdin.readline()
    if not line:
        print("(end of input)")
        return None
    if not stdin.isatty():
        print(line.strip())  # echo piped answers so the transcript reads naturally
    return line.strip().lower()
