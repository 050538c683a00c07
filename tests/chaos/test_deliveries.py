"""Duplicate, stale and future-tick `agentloop.advance` deliveries, published by
hand to the private broker while a tool holds and after the runs finished, on two
workers. Each must be a no-op: nothing starts twice, every run completes."""

from __future__ import annotations

import pytest

from tests.chaos.invariants import Case, trials
from tests.support.private_services import ClientDispatcher

# On the private Redis, and on RabbitMQ (the session's vhost).
pytestmark = [
    pytest.mark.chaos,
    pytest.mark.parametrize("chaos_broker", ["redis", "rabbitmq"], indirect=True),
]

COPIES = 3


def flood(case: Case, client: ClientDispatcher, run_id: str) -> int:
    tick = case.query("SELECT tick FROM runs WHERE id IN :ids AND id = :run", run=run_id)[0].tick
    sent = 0
    for offset in (-2, -1, 0, 1, 5):  # stale, current (a duplicate), future
        for _ in range(COPIES):
            client.publish(run_id, max(0, tick + offset))
            sent += 1
    return sent


def test_duplicate_stale_and_future_deliveries(
    case: Case, chaos_client: ClientDispatcher, start_chaos_worker
) -> None:
    start_chaos_worker(name="a", beat=True)
    start_chaos_worker(name="b", beat=False)
    runs = []
    for _ in range(trials()):
        for tool in ("count", "idem_count"):
            runs.append(case.create(f"chaos one {tool} holding 2000ms"))
    for run_id in runs:
        case.wait_for_start(run_id)
        case.fault("deliveries while the tool holds", flood(case, chaos_client, run_id))
    for run_id in runs:
        (case.env.workspace(run_id) / "release").touch()
    case.settle(timeout=60 + 5 * trials())
    for run_id in runs:
        case.fault("deliveries to a finished run", flood(case, chaos_client, run_id))
    case.check(healthy=True)
