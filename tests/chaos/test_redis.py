"""The broker loses messages or goes away: FLUSHALL and a restart (no persistence)
with at least 200 live runs on two workers; Redis down 10 s while tools run.

Promises: PostgreSQL is the truth and the sweep re-publishes what was lost, so
every run completes, nobody is asked about an outcome, and a running tool is
never cut off by a broker blip."""

from __future__ import annotations

import pytest

from tests.chaos.invariants import Case, trials
from tests.support.fixtures import wait_until

pytestmark = pytest.mark.chaos

LIVE_RUNS = 220


def completed(case: Case) -> int:
    return sum(1 for s in case.statuses().values() if s == "completed")


@pytest.mark.parametrize("fault", ["flushall", "restart"])
def test_redis_loses_every_message_with_200_live_runs(
    fault: str, case: Case, start_chaos_worker
) -> None:
    for _ in range(trials()):
        done_before = completed(case)
        batch = [case.create("chaos chain") for _ in range(LIVE_RUNS)]
        if not case.faults:
            start_chaos_worker(name="a", beat=True)
            start_chaos_worker(name="b", beat=False)
        wait_until(
            lambda n=done_before: completed(case) >= n + 10, timeout=120, what="runs to progress"
        )
        status = case.statuses()
        live = sum(1 for r in batch if status[r] in ("queued", "running"))
        case.env.redis.flushall() if fault == "flushall" else case.env.redis.restart()
        case.fault(f"redis {fault}")
        case.fault("live runs at the fault", live)
        assert live >= 200, f"only {live} runs were live at the fault"
        # Before the fault the workers run ~1,000 iterations in ~15 s; healing is the
        # sweep's grace (0.5 s) away, so a minute and a half is a generous bound.
        case.settle(timeout=60 + 0.15 * LIVE_RUNS)
    case.check(healthy=True)


def test_redis_down_10s_with_tools_mid_flight(case: Case, start_chaos_worker) -> None:
    start_chaos_worker(concurrency=4)
    for _ in range(trials()):
        runs = [
            case.create(f"chaos one {tool} holding 4000ms")
            for tool in ("count_slow", "idem_count_slow", "count_slow", "idem_count_slow")
        ]
        for run_id in runs:
            case.wait_for_start(run_id)
        case.env.redis.down_for(10)
        case.fault("redis down 10 s")
        case.fault("tools mid-flight", len(runs))
        case.settle(timeout=90)
    case.check(healthy=True, uninterrupted=True)
