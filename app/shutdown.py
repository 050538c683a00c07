"""Graceful worker shutdown: SIGTERM lets the running steps finish and save.

Celery's warm shutdown (SIGTERM to the worker's main process) stops taking
messages and waits for the running tasks. Two things defeat it in practice, and
this module, imported by every worker (celeryconfig `imports`), fixes both:

* Supervisors that signal the whole process group (honcho, systemd's default
  KillMode=control-group) also SIGTERM the prefork children, which die mid-step
  (WorkerLostError; the step becomes outcome-unknown). The children ignore
  SIGTERM here; the main process closes the pool once their tasks are done.
  Billiard still stops them on a hard time limit (it escalates to SIGKILL).
* Nothing bounds the wait. After AGENTLOOP_SHUTDOWN_GRACE seconds (default 30)
  the main process SIGKILLs its children and exits; a step cut off like this is
  outcome-unknown, as after any crash.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from celery.signals import task_prerun, worker_process_init, worker_shutting_down

log = logging.getLogger(__name__)
GRACE_ENV = "AGENTLOOP_SHUTDOWN_GRACE"
DEFAULT_GRACE = 30.0


def shutdown_grace() -> float:
    raw = os.environ.get(GRACE_ENV, "")
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_GRACE
    except ValueError:
        log.warning("%s=%r is not a number of seconds; using %g", GRACE_ENV, raw, DEFAULT_GRACE)
        return DEFAULT_GRACE


# The worker's main process (this module is imported there, before the pool
# forks). The solo and threads pools run tasks in it, and send worker_process_init
# in it too: its SIGTERM must keep starting the warm shutdown, so nothing here may
# touch it.
_MAIN_PID = os.getpid()
_in_pool_child = False


def _children_ignore_sigterm(**_: Any) -> None:
    global _in_pool_child
    if os.getpid() == _MAIN_PID:
        return
    _in_pool_child = True
    # SIG_IGN here: billiard replaces any other SIGTERM handler right after this
    # (with one that exits), but leaves an ignored signal alone.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _before_each_task(**_: Any) -> None:
    # Now a handler that does nothing, not SIG_IGN: an ignored signal stays ignored
    # across exec, and the commands tools start must still stop on SIGTERM.
    if _in_pool_child and signal.getsignal(signal.SIGTERM) is not _ignore:
        signal.signal(signal.SIGTERM, _ignore)


def _ignore(signum: int, frame: object) -> None:
    """SIGTERM in a pool process: the main process decides when the pool stops."""


def _bound_the_warm_shutdown(how: str = "", **_: Any) -> None:
    if how != "Warm":
        return
    grace = shutdown_grace()
    timer = threading.Timer(grace, _grace_expired, args=(grace,))
    timer.daemon = True
    timer.start()


def _grace_expired(grace: float) -> None:
    pids = _children()
    log.warning(
        "shutdown grace (%s=%g s) expired: killing %d pool process(es) mid-step",
        GRACE_ENV, grace, len(pids),
    )  # fmt: skip
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    # The pool notices its dead children and the worker exits; if not, leave anyway.
    last_resort = threading.Timer(10.0, os._exit, args=(1,))
    last_resort.daemon = True
    last_resort.start()


def _children() -> list[int]:
    me = os.getpid()
    found: list[int] = []
    for task in Path(f"/proc/{me}/task").glob("*/children"):
        try:
            found += [int(pid) for pid in task.read_text().split()]
        except OSError:
            continue
    return found


worker_process_init.connect(_children_ignore_sigterm)
task_prerun.connect(_before_each_task)
worker_shutting_down.connect(_bound_the_warm_shutdown)
