"""End to end: real `celery worker` processes, PostgreSQL, and Redis or RabbitMQ.

Each iteration is a real task over the real broker; the tests watch the
database from outside, as a person watching the run page would. Every test runs
on both brokers.
"""

from __future__ import annotations

import os
import signal

import pytest

from app.demo import DEMO_CONFIG, DEMO_TASK
from app.engine.models import Decision, RunStatus
from app.service import AgentService
from tests.support.fixtures import wait_until, workspace

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.parametrize("broker", ["redis", "rabbitmq"], indirect=True),
]


def status_of(service: AgentService, run_id: str) -> str:
    return str(service.status(run_id).run.status)


def wait_for_status(service: AgentService, run_id: str, *statuses: str, timeout: float = 60):
    wait_until(
        lambda: status_of(service, run_id) in statuses,
        timeout=timeout,
        what=f"run {run_id} to be {' or '.join(statuses)} (is {status_of(service, run_id)})",
    )
    return service.status(run_id)


def effects(run_id: str) -> list[str]:
    log = workspace(run_id) / "effects.log"
    return log.read_text().splitlines() if log.exists() else []


def test_the_deploy_scenario_heals_itself_and_completes(start_worker, live_service):
    start_worker(env={"AGENTLOOP_RUNBOOKS_DIR": ""})
    run_id = live_service.create_run(DEMO_TASK, config=DEMO_CONFIG, created_by="e2e")
    approvals = 0
    while True:
        view = wait_for_status(live_service, run_id, "paused", "completed", "failed")
        if view.run.status != RunStatus.PAUSED:
            break
        live_service.approve(run_id, by="e2e")
        approvals += 1
    assert view.run.status == RunStatus.COMPLETED, view.run.error
    assert approvals == 2  # set_env changed what the deploy reads: asked again
    messages = [(e.kind, e.message) for e in view.events]
    text = "\n".join(m for _, m in messages)
    assert "missing env var STAGING_DATABASE_URL" in text
    plans = [m for k, m in messages if k == "plan"]
    assert len(plans) == 2 and "set_env" in plans[1]
    assert any(k == "retry" for k, _ in messages)  # the cold fixture cache: backoff shown
    assert any(k == "approval" and "decided approve" in m for k, m in messages)
    assert view.run.report and "PR #42" in view.run.report
    assert [s.tool for s in view.steps if s.status == "completed"] == [
        "checkout_pr", "build", "set_env", "deploy", "run_tests", "report",
    ]  # fmt: skip


def test_cancel_stops_a_run_mid_step(start_worker, live_service):
    start_worker()
    run_id = live_service.create_run("apply the effect holding 30s")
    wait_until(lambda: effects(run_id), what="the effect to start")
    live_service.cancel(run_id, by="e2e")
    (workspace(run_id) / "release").touch()
    wait_until(
        lambda: any("discarded" in e.message for e in live_service.status(run_id).events),
        what="the worker to discard the cancelled iteration's result",
    )
    assert status_of(live_service, run_id) == RunStatus.CANCELLED


def test_max_iterations_fails_the_run(start_worker, live_service):
    start_worker()
    run_id = live_service.create_run("noop chain", config={"max_iterations": 2})
    view = wait_for_status(live_service, run_id, "failed", "completed")
    assert view.run.status == RunStatus.FAILED
    assert "max_iterations (2)" in view.run.error


def test_the_deadline_fails_a_run_whose_step_outlives_it(start_worker, live_service):
    start_worker()
    run_id = live_service.create_run(
        "apply the idempotent effect holding 30s",
        config={"timeout": 3, "retry_policy": {"base": 0.2, "max_backoff": 1}},
    )
    view = wait_for_status(live_service, run_id, "failed", "completed", timeout=30)
    assert view.run.status == RunStatus.FAILED
    assert view.run.error.startswith("timeout")
    assert any("timed out" in e.message for e in view.events)


def test_duplicate_messages_across_two_workers_execute_once(start_worker, live_service, broker):
    start_worker(name="a", beat=False)
    start_worker(name="b", beat=False)
    run_id = live_service.create_run("apply the effect holding 1s")
    wait_until(lambda: effects(run_id), what="the effect to start")
    tick = live_service.status(run_id).run.tick
    for _ in range(4):  # the same message, redelivered to whichever worker is free
        broker.client.publish(run_id, tick - 1)
        broker.client.publish(run_id, tick)
    view = wait_for_status(live_service, run_id, "completed", "failed")
    assert view.run.status == RunStatus.COMPLETED
    assert sum(line.startswith("start") for line in effects(run_id)) == 1


def kill_tool_process(run_id: str) -> None:
    """SIGKILL the worker child that is running the tool (its pid is in the log)."""
    start = wait_until(lambda: effects(run_id), what="the tool to start")[0]
    os.kill(int(start.split()[1]), signal.SIGKILL)


def test_sigkill_during_a_non_idempotent_tool_pauses_with_outcome_unknown(
    start_worker, live_service
):
    start_worker()
    run_id = live_service.create_run("apply the effect holding 30s")
    kill_tool_process(run_id)
    view = wait_for_status(live_service, run_id, "paused", "failed", timeout=40)
    assert view.run.status == RunStatus.PAUSED
    assert view.pending_approval.kind == "outcome_unknown"
    assert [line.split()[0] for line in effects(run_id)] == ["start"]  # never run twice
    live_service.decide(run_id, Decision.MARK_DONE, by="e2e", comment="checked by hand")
    view = wait_for_status(live_service, run_id, "completed", "failed")
    assert view.run.status == RunStatus.COMPLETED
    assert effects(run_id)[-1].startswith("start")  # marked done, not executed again


def test_sigkill_during_an_idempotent_tool_retries_it_with_the_same_key(start_worker, live_service):
    start_worker()
    run_id = live_service.create_run("apply the idempotent effect holding 30s")
    kill_tool_process(run_id)
    (workspace(run_id) / "release").touch()
    view = wait_for_status(live_service, run_id, "completed", "failed", timeout=40)
    assert view.run.status == RunStatus.COMPLETED, view.run.error
    lines = effects(run_id)
    keys = {line.split()[-1] for line in lines}
    assert len(keys) == 1  # one idempotency key across both attempts
    assert sum(line.startswith("start") for line in lines) == 2
    assert sum(line.startswith("effect") for line in lines) == 1


def test_a_run_whose_message_is_lost_is_resumed_by_the_sweep(start_worker, live_service, broker):
    worker = start_worker(beat=False)
    run_id = live_service.create_run(
        "flaky 1 times", config={"retry_policy": {"base": 3, "jitter": 0}}
    )
    wait_until(
        lambda: any(e.kind == "retry" for e in live_service.status(run_id).events),
        what="the first retry to be scheduled",
    )
    worker.stop()  # the retry message, back in the broker after shutdown ...
    broker.drop_queues()  # ... is lost
    start_worker(beat=True)
    view = wait_for_status(live_service, run_id, "completed", "failed", timeout=60)
    assert view.run.status == RunStatus.COMPLETED
