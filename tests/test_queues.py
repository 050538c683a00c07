"""Queues by kind of work (issue 13, items 2 and 3): planner iterations, tool
iterations and notices each on a queue of their own; no notice at all when no
channel could deliver it.

In process: which queue each publish picks, and the forwarding of a message that
landed on the wrong one. Through real workers over Redis: paused runs leave no
notice message behind unless a channel is configured, and tool steps keep flowing
while fifty planner calls wait on the network; over Redis and RabbitMQ: a message
retried while the database is away comes back on its own queue.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from app.engine.actions import PlannerUnavailable
from app.engine.models import RunStatus
from app.engine.routing import WorkKind
from app.service import AgentService
from tasks import queue_depth
from tests.conftest import QUEUE, REDIS_DB, ROOT
from tests.fake_anthropic import FakeAnthropic, plan_reply, slow
from tests.support.fixtures import (
    Harness,
    die_with_parent,
    noop_then_flaky,
    steps,
    wait_until,
)
from tests.support.private_services import free_port

PLAN_QUEUE = f"{QUEUE}.plan"
NOTIFY_QUEUE = f"{QUEUE}.notify"


# --- in process: the publisher's guess, the consumer's forwarding ---------------------


def kind_of_last(harness: Harness, run_id: str) -> WorkKind:
    tick = harness.service.status(run_id).run.tick
    return harness.dispatcher.kinds[(run_id, tick)]


def test_each_iteration_is_published_for_the_work_it_will_do(harness: Harness) -> None:
    harness.planner.script = [noop_then_flaky()]
    no_retries = {"retry_policy": {"max_retries": 0}}
    run_id = harness.service.create_run("queues: plan, tool, re-plan", config=no_retries)
    assert kind_of_last(harness, run_id) is WorkKind.PLAN  # a new run is planned first
    harness.step()  # the plan
    assert kind_of_last(harness, run_id) is WorkKind.TOOL  # its first step runs next
    harness.step()  # noop succeeded
    assert kind_of_last(harness, run_id) is WorkKind.TOOL
    harness.step()  # flaky failed, and no retry is left
    assert kind_of_last(harness, run_id) is WorkKind.PLAN  # planned around


def test_the_verification_after_the_last_step_goes_straight_to_the_planners_queue(
    harness: Harness,
) -> None:
    """After the plan's last step the next iteration verifies: its message goes to the
    planner's queue at once, not to the tools' queue to be forwarded from there (a
    wasted hop per plan, a twelfth of a short run's messages)."""
    harness.planner.script = [steps("noop", "noop")]
    run_id = harness.service.create_run("queues: verify after the last step")
    harness.step()  # the plan
    harness.step()  # step 1 of 2
    assert kind_of_last(harness, run_id) is WorkKind.TOOL  # step 2 runs next
    harness.step()  # step 2 of 2: the last
    assert kind_of_last(harness, run_id) is WorkKind.PLAN
    harness.dispatcher.sent.clear()
    run = harness.service.status(run_id).run
    assert harness.service.advance(run_id, run.tick, kind=WorkKind.PLAN) == "plan (verify)"


def test_a_planner_that_failed_is_asked_again_on_the_planners_queue(harness: Harness) -> None:
    harness.planner.script = [PlannerUnavailable(error="overloaded", retry_after=1.0)]
    run_id = harness.service.create_run("queues: planner retry")
    harness.step()
    assert harness.service.status(run_id).run.planner_failures == 1
    assert kind_of_last(harness, run_id) is WorkKind.PLAN


def test_a_message_on_the_wrong_queue_is_forwarded_unclaimed(harness: Harness) -> None:
    run_id = harness.service.create_run("queues: forward")
    harness.dispatcher.sent.clear()
    before = harness.service.status(run_id).run
    harness.service.advance(run_id, before.tick, kind=WorkKind.TOOL)  # a plan is due
    after = harness.service.status(run_id).run
    assert (after.tick, after.iteration) == (before.tick, before.iteration)  # not claimed
    assert harness.dispatcher.sent == [(run_id, before.tick, 0)]
    assert harness.dispatcher.kinds[(run_id, before.tick)] is WorkKind.PLAN
    harness.service.advance(run_id, before.tick, kind=WorkKind.PLAN)  # the right queue
    assert harness.service.status(run_id).run.iteration == before.iteration + 1  # planned


# --- real workers: notices ----------------------------------------------------------


def queued(name: str) -> list[tuple[str, list[Any]]]:
    """The messages waiting in queue `name`: each task's name and arguments."""
    client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
    try:
        messages = [json.loads(raw) for raw in client.lrange(name, 0, -1)]
    finally:
        client.close()
    return [(m["headers"]["task"], json.loads(base64.b64decode(m["body"]))[0]) for m in messages]


def pause_runs(service: AgentService, count: int) -> list[str]:
    """`count` runs, each paused for approval before its first step."""
    ids = [
        service.create_run("noop chain", config={"approval_required": ["noop"]})
        for _ in range(count)
    ]
    for run_id in ids:
        wait_until(
            lambda run_id=run_id: service.status(run_id).run.status == RunStatus.PAUSED,
            what=f"run {run_id} to pause",
        )
    return ids


def test_no_notice_is_published_when_no_channel_is_configured(start_worker, live_service):
    # The worker does not consume notices: whatever is published stays to be counted.
    start_worker(queues=f"{QUEUE},{PLAN_QUEUE}")
    pause_runs(live_service, 20)
    assert queued(NOTIFY_QUEUE) == []


def test_notices_travel_on_their_own_queue(start_worker, live_service):
    # A channel that would deliver (nobody listens on port 9: the notices are only counted).
    smtp = {"AGENTLOOP_SMTP_HOST": "127.0.0.1", "AGENTLOOP_SMTP_PORT": "9"}
    start_worker(queues=f"{QUEUE},{PLAN_QUEUE}", env=smtp)
    paused = pause_runs(live_service, 20)
    # (Runs earlier tests left unfinished may be swept to an end, and noticed, too.)
    expected = sorted(("agentloop.notify", ["approval_needed", run_id]) for run_id in paused)
    wait_until(
        lambda: sorted(m for m in queued(NOTIFY_QUEUE) if m[1][1] in paused) == expected,
        what="20 notices on the notify queue",
    )
    assert all(task != "agentloop.notify" for task, _ in queued(QUEUE) + queued(PLAN_QUEUE))


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"], indirect=True)
def test_a_planner_message_retried_while_the_database_is_away_stays_on_its_queue(
    start_worker, broker
) -> None:
    """The database is away before the claim: Celery delivers the message again, with
    backoff, on the queue it came from. (On RabbitMQ the message of a countdown comes
    through the delayed-delivery exchanges, and a retry left to Celery went by the
    routing key it arrived with: to the tools' queue, for a tool worker to forward.)"""
    away = f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/away"
    worker = start_worker(queues=PLAN_QUEUE, beat=False, env={"DATABASE_URL": away})
    broker.client.publish("a-run-nobody-can-read", 1, kind=WorkKind.PLAN, countdown=1)
    wait_until(
        lambda: worker.output().count(" retry: Retry in") >= 3,
        timeout=60,
        what="the message to come back to the planner's queue twice",
    )
    assert queue_depth(broker.client.app, QUEUE) == 0


# --- real workers: planner calls never hold tools back ---------------------------------

PLANNER_RUNS = 50
TOOL_RUNS = 5


@pytest.fixture
def claude_env(fake_anthropic: FakeAnthropic, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {"ANTHROPIC_API_KEY": "test-key", "ANTHROPIC_BASE_URL": fake_anthropic.base_url}
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # create_run builds the planner to check it can
    return env


def waiting(fake: FakeAnthropic) -> set[str]:
    """The runs of this test whose planner call the fake has received (its task is in
    the prompt)."""
    return {task for r in fake.requests for task in re.findall(r"plan slowly #\d+#", r.text())}


def test_tool_steps_keep_flowing_while_fifty_planner_calls_wait(
    fake_anthropic: FakeAnthropic, claude_env: dict[str, str], start_worker: Any, database_url
):
    from app.config import load_settings
    from app.wiring import build_service
    from tasks import CeleryDispatcher, CeleryNotifier

    settings = load_settings()
    service = build_service(settings, CeleryDispatcher(settings.max_countdown), CeleryNotifier())
    # Each planner call answers after 90 s: far longer than the tool runs need, so
    # the order below says what blocks what, not how fast this machine is.
    noop = [{"description": "no-op", "tool": "noop", "args": {}}]
    # (Twice as many as runs: a call that timed out connecting may still arrive.)
    fake_anthropic.script(*[slow(plan_reply(noop), 90) for _ in range(2 * PLANNER_RUNS)])
    # As the Procfile runs them: tools on prefork, the planner on many threads.
    start_worker(name="tools", queues=QUEUE, env=claude_env)
    start_worker(
        name="planner", queues=PLAN_QUEUE, pool="threads", concurrency=64, beat=False,
        env=claude_env,
    )  # fmt: skip
    retries = {"retry_policy": {"max_retries": 10, "base": 1, "max_backoff": 4}}
    planned = [
        # The fake listens with a backlog of 128; a call refused all the same is retried.
        service.create_run(f"plan slowly #{i}#", config={"planner": "anthropic", **retries})
        for i in range(PLANNER_RUNS)
    ]
    # All fifty, unless the shared PostgreSQL refused a connection ("too many clients")
    # to a run between its claim and its call: that run waits out its lease.
    wait_until(
        lambda: len(waiting(fake_anthropic)) >= PLANNER_RUNS - 10,
        timeout=80,
        what="the planner calls to be waiting on the model at once",
    )
    tooled = [
        service.create_run("noop chain", config={"planner": "offline"}) for _ in range(TOOL_RUNS)
    ]
    try:
        for run_id in tooled:
            wait_until(
                lambda run_id=run_id: service.status(run_id).run.status == RunStatus.COMPLETED,
                timeout=60,
                what=f"tool run {run_id} to complete while the planner calls wait",
            )
        # Every tool step ran while the planner calls were all still unanswered.
        assert all(service.status(r).run.plan_version == 0 for r in planned)
        assert all(service.status(r).run.status == RunStatus.RUNNING for r in planned)
    finally:
        for run_id in planned:
            service.cancel(run_id, by="test")
        fake_anthropic.stop()  # the waiting calls end now; the cancelled runs discard them
        service.store.dispose()


# --- agentloop worker --queues, and health over the three queues ------------------------

AGENTLOOP = str(Path(sys.executable).with_name("agentloop"))
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # the test tools (tests.support.tools)


def agentloop(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AGENTLOOP, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=ENV
    )


def test_worker_refuses_a_queue_it_does_not_know(database_url, redis_db) -> None:
    done = agentloop("worker", "--queues=tools,planer")
    assert done.returncode == 2
    assert "unknown queue(s) planer: use tools, planner, notify" in done.stderr


@pytest.fixture
def planner_worker(database_url, redis_db, tmp_path: Path) -> Iterator[Path]:
    """`agentloop worker --queues=planner`, as the Procfile's planner line runs it."""
    log = tmp_path / "planner.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [AGENTLOOP, "worker", "--queues=planner", "--without-gossip", "--without-mingle",
             "--hostname=planner@%h"],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=ENV, preexec_fn=die_with_parent,
        )  # fmt: skip
    try:
        wait_until(
            lambda: "ready." in log.read_text() or process.poll() is not None,
            timeout=60,
            what="the planner's worker to be ready",
        )
        assert process.poll() is None, log.read_text()
        yield log
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_planner_worker_runs_threads_and_health_names_the_queues_nobody_consumes(
    planner_worker: Path,
) -> None:
    banner = planner_worker.read_text()
    assert "concurrency: 50 (thread)" in banner
    assert f".> {PLAN_QUEUE} " in banner and f".> {QUEUE} " not in banner
    done = agentloop("health", "--timeout", "5")
    assert done.returncode == 1
    assert f"no worker consumes the queue(s) {QUEUE}, {NOTIFY_QUEUE}" in done.stderr


def test_a_thread_pool_builds_one_service_however_many_threads_ask_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The planner's worker runs 64 threads: on a burst they all ask for the service at
    once, and each used to build one of its own, with connection pools of its own
    (84 connections to PostgreSQL from one worker; it ran out)."""
    import threading

    import app.wiring
    import tasks

    built: list[object] = []
    asked = threading.Barrier(16)

    def slow_build(*_: object) -> object:
        built.append(object())
        threading.Event().wait(0.05)  # long enough for every thread to be inside
        return built[-1]

    monkeypatch.setattr(app.wiring, "build_service", slow_build)
    tasks._built_service.cache_clear()
    got: list[object] = []

    def ask() -> None:
        asked.wait()
        got.append(tasks.service())

    threads = [threading.Thread(target=ask) for _ in range(16)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        tasks._built_service.cache_clear()  # the next user builds the real one
    assert len(built) == 1
    assert got == [built[0]] * 16
