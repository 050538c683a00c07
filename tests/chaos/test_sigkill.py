"""SIGKILL of the pool child before, during and after the tool, and between the
commit of its outcome and the publish of the next iteration; for an idempotent
and a non-idempotent tool. One run per tool per trial, on one prefork worker.

Expected: an idempotent step runs again with the same key (its effect once); a
non-idempotent one pauses as outcome unknown and the person decides from the
ledger (mark done if the effect happened, else retry); a kill after the commit
costs nobody anything (the sweep publishes the lost message)."""

from __future__ import annotations

import os
import signal

import pytest

from tests.chaos.invariants import Case, trials

# On the private Redis, and on RabbitMQ (the session's vhost).
pytestmark = [
    pytest.mark.chaos,
    pytest.mark.parametrize("chaos_broker", ["redis", "rabbitmq"], indirect=True),
]

ARMED = {
    "before": ["kill-before-tool"],
    "after": ["kill-after-tool"],
    "publish": ["kill-at-publish-armed", "kill-at-publish"],
}


@pytest.mark.parametrize("point", ["before", "during", "after", "publish"])
def test_sigkill_of_the_pool_child(point: str, case: Case, start_chaos_worker) -> None:
    worker = start_chaos_worker(concurrency=2)
    hold = 2000 if point == "during" else 0
    runs = []
    for _ in range(trials()):
        for tool in ("count", "idem_count"):
            run_id = case.create(f"chaos one {tool} holding {hold}ms")
            if point in ARMED:
                case.env.arm(ARMED[point][0], run_id)
            runs.append(run_id)
    if point == "during":
        for run_id in runs:
            pid = case.wait_for_start(run_id)
            os.kill(pid, signal.SIGKILL)
            ended = any(e[0] == "END" and e[2] == str(pid) for e in case.ledger(run_id))
            case.fault("sigkill during the tool" if not ended else "sigkill too late")
    case.settle(timeout=60 + 20 * trials())
    if point in ARMED:
        for run_id in runs:
            fired = not any((case.env.faults_dir / f"{f}.{run_id}").exists() for f in ARMED[point])
            if fired and (point != "publish" or case.env.faults_dir.exists()):
                case.fault(f"sigkill {point}")
            else:
                case.violate("e", f"the fault {ARMED[point]} was never injected into {run_id}")
    # The fault was real: the worker saw each of its pool children die of SIGKILL.
    killed = worker.output().count("SIGKILL")
    case.fault("SIGKILL lines in the worker log", killed)
    assert killed >= len(runs), f"{killed} SIGKILL(s) in the worker log for {len(runs)} runs"
    case.check(healthy=point == "publish")
