"""PostgreSQL restarts (fast: a clean shutdown; immediate: a crash) and outages
(stopped 5 s every 20 s) while runs progress.

Promises: a worker that has a tool's outcome keeps it and saves it when the
database is back, so no run fails and nobody is asked about an outcome; pooled
connections reconnect transparently."""

from __future__ import annotations

import threading
import time

import pytest

from tests.chaos.invariants import Case, trials
from tests.support.fixtures import wait_until

pytestmark = pytest.mark.chaos


def effects(case: Case) -> int:
    return sum(1 for r in case.runs for e in case.ledger(r) if e[0] == "EFFECT")


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restart_while_runs_progress(mode: str, case: Case, start_chaos_worker) -> None:
    start_chaos_worker(concurrency=2)
    for _ in range(trials()):
        runs = [case.create("chaos long chain holding 300ms") for _ in range(4)]
        floor = effects(case)
        wait_until(lambda n=floor: effects(case) >= n + 3, timeout=60, what="effects to start")
        case.env.pg.restart(mode)
        case.fault(f"postgres restart -m {mode}")
        # The first create after the restart goes through a pooled connection.
        runs.append(case.create("chaos long chain holding 300ms"))
        case.settle(timeout=120)
    case.check(healthy=True, database_crashed=mode == "immediate")


def test_postgres_stopped_5s_every_20s(case: Case, start_chaos_worker) -> None:
    start_chaos_worker(concurrency=2)
    stop = threading.Event()
    for _ in range(trials()):
        for _ in range(4):
            case.create("chaos long chain holding 400ms")
        time.sleep(15)  # the runs progress for 15 s of each 20 ...
        case.env.pg.down_for(5)  # ... and the database is away for 5
        case.fault("postgres stopped 5 s")
    stop.set()
    case.settle(timeout=150)
    case.check(healthy=True)
