"""Is anything consuming the queue? Told from the database, for the run page and
`agentloop run --follow` / `agentloop follow`.

A run is *due* when a worker should be advancing it now: queued, or running with
its next iteration's time (`next_run_at`) past and no live lease. A worker claims
a due run within moments of its message; a lost message is re-published by the
sweep (beat) every `sweep_interval` seconds. So a run that has stayed due for
longer than max(30 s, 2 * sweep interval) means no worker (or no beat, for a lost
message) is consuming the queue. This needs nothing written by workers: the claim
itself (which sets the lease and clears `next_run_at`) is the heartbeat, and it is
exactly what the person waiting is waiting for.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from app.engine.models import RunStatus

MIN_STALL_SECONDS = 30.0


def stall_after(sweep_interval: float) -> float:
    """How long a run may stay due before the warning: max(30 s, 2 * sweep interval)."""
    return max(MIN_STALL_SECONDS, 2 * sweep_interval)


def due_since(run: Any, now: datetime) -> datetime | None:
    """Since when `run` (a RunRecord) has been waiting for a worker, or None if it is
    not (finished, paused, leased to a live worker, or its next iteration is later)."""
    if run.status not in (RunStatus.QUEUED, RunStatus.RUNNING):
        return None
    if run.lease_expires_at is not None and run.lease_expires_at >= now:
        return None  # a worker holds it
    times = [t for t in (run.next_run_at, run.lease_expires_at) if t is not None]
    if not times:
        return None
    since: datetime = max(times)
    return since if since <= now else None


def warning(run: Any, now: datetime, sweep_interval: float) -> str | None:
    """The warning to show, or None when the run is not stuck waiting for a worker."""
    since = due_since(run, now)
    if since is None:
        return None
    waited = (now - since).total_seconds()
    if waited <= stall_after(sweep_interval):
        return None
    return (
        f"no worker has picked this run up for {_seconds(waited)}: is a worker running "
        "and consuming this queue? Start one with `agentloop worker --beat` "
        "(or `make run`)."
    )


def _seconds(waited: float) -> str:
    if waited < 120:
        return f"{waited:.0f} s"
    if waited < 7200:
        return f"{waited / 60:.0f} min"
    return f"{waited / 3600:.1f} h"
