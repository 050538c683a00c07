"""Fixtures over real services: PostgreSQL, Redis and Celery worker processes."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, text

from app.config import load_settings
from app.engine.actions import LlmUsage, PlanFinished, PlanOutcome, PlanProduced
from app.engine.models import PlannedStep
from app.engine.routing import WorkKind
from app.planner.base import PlanCheck, PlanRequest
from app.service import AgentService, Notice
from app.store.migrate import upgrade
from app.store.repo import Store, make_engine
from app.tools.registry import load_registry
from tests.conftest import DATA_DIR, PG_SERVER, QUEUE, REDIS_DB, REDIS_URL, ROOT, TEST_DB

CI = os.environ.get("CI") == "true"


def require(service: str, error: Exception) -> None:
    message = f"{service} is not reachable on 127.0.0.1: {error}"
    if CI:
        pytest.fail(message + " (CI=true: a missing service is a failure)")
    pytest.skip(message)


def wait_until(
    predicate: Callable[[], Any], *, timeout: float = 30.0, what: str = "condition"
) -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def die_with_parent() -> None:
    """In a child process before exec: be killed when the test process dies, even by a
    signal no finalizer sees (a timeout's SIGKILL). Linux only, as this suite is."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


# --- services -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A database of the suite's own, migrated with Alembic, dropped at the end."""
    admin = create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{TEST_DB}"'))
            conn.execute(text(f'CREATE DATABASE "{TEST_DB}"'))
    except Exception as exc:
        admin.dispose()
        require("PostgreSQL", exc)
    url = f"{PG_SERVER}/{TEST_DB}"
    upgrade(url)
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{TEST_DB}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def redis_db() -> Iterator[int]:
    """The suite's own Redis database number; the session's queue is removed after."""
    client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
    try:
        client.ping()
    except Exception as exc:
        require("Redis", exc)
    yield REDIS_DB
    drop_queue(client)
    forget_exchanges(client)
    client.close()


SESSION_QUEUES = (QUEUE, f"{QUEUE}.plan", f"{QUEUE}.notify")


def forget_exchanges(client: Any) -> None:
    """Delete kombu's bindings of the session's exchanges (one per queue, named after
    it): kept by Redis after the session, they piled up run after run. Only at the
    end: a test that loses its queues keeps the bindings, as a broker would."""
    for queue in SESSION_QUEUES:
        client.delete(f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")


def drop_queue(client: Any) -> None:
    """Delete the session's queues (and their priority lists): what a broker loses."""
    for queue in SESSION_QUEUES:
        client.delete(queue)
        for key in client.scan_iter(f"{queue}\x06\x16*"):  # kombu's priority lists
            client.delete(key)


RABBITMQ_SERVER = "amqp://guest:guest@127.0.0.1:5672"
RABBITMQ_VHOST = f"agentloop-test-{os.getpid()}"


def rabbitmqctl(*args: str) -> None:
    """Raises CalledProcessError (with what rabbitmqctl said) when it fails."""
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    """A RabbitMQ virtual host of the suite's own, created here and deleted at the end
    with all that the tests declared in it (queues, delayed-delivery exchanges); the
    server's other vhosts are never touched."""
    try:
        rabbitmqctl("add_vhost", RABBITMQ_VHOST)
        rabbitmqctl("set_permissions", "-p", RABBITMQ_VHOST, "guest", ".*", ".*", ".*")
    except (OSError, subprocess.SubprocessError) as exc:
        require("RabbitMQ", exc)
    yield f"{RABBITMQ_SERVER}/{RABBITMQ_VHOST}"
    rabbitmqctl("delete_vhost", RABBITMQ_VHOST)


class ClientDispatcher:
    """Publishes `agentloop.advance` to the broker of `settings`, as tasks.CeleryDispatcher
    does to the configured one: a Celery app of the test's own, with the broker and
    queue settings workers get from the same settings (app/queues.py), so the suite's
    global app keeps pointing at the shared Redis."""

    def __init__(self, settings: Any) -> None:
        from celery import Celery

        from app.queues import Queues, celery_broker_settings

        self.settings = settings
        self.queues = Queues.of(settings)
        self.app = Celery("agentloop-test-client", set_as_current=False)
        url = settings.resolved_broker_url
        self.app.conf.update(
            celery_broker_settings(settings),
            # Celery prefers the environment's CELERY_BROKER_URL (the suite's Redis) to
            # broker_url; these two it does not.
            broker_read_url=url,
            broker_write_url=url,
            task_serializer="json",
            accept_content=["json"],
            broker_connection_retry_on_startup=True,
        )

    def enqueue(self, run_id: str, tick: int, delay: float, kind: WorkKind) -> None:
        from app.queues import countdown

        self.publish(run_id, tick, countdown=countdown(self.settings, delay), kind=kind)

    def queue_depth(self) -> int | None:
        from tasks import queue_depth

        depths = [queue_depth(self.app, queue) for queue in self.queues.iterations]
        return None if None in depths else sum(d or 0 for d in depths)

    def publish(
        self, run_id: str, tick: int, *, countdown: float | None = None, kind: Any = None
    ) -> None:
        """An iteration message; without `kind`, as published before queues were split."""
        if kind is None:
            self.app.send_task("agentloop.advance", args=(run_id, tick), countdown=countdown)
            return
        self.app.send_task(
            "agentloop.advance",
            args=(run_id, tick),
            kwargs={"kind": str(kind)},
            queue=self.queues.for_work(kind),
            countdown=countdown,
        )

    def notify(self, notice: Any, run_id: str) -> None:
        self.app.send_task("agentloop.notify", args=(str(notice), run_id))

    def purge(self) -> None:
        """Empty every queue of these settings, and RabbitMQ's delayed-delivery queues
        (in the vhost of the test's own): what a broker that restarts loses."""
        from app.queues import uses_amqp

        names = list(self.queues.all)
        if uses_amqp(self.settings):
            names += [f"celery_delayed_{level}" for level in range(28)]
        with self.app.connection_for_write() as conn:
            for name in names:
                with contextlib.suppress(Exception), conn.channel() as channel:
                    channel.queue_purge(name)

    def close(self) -> None:
        """Close its connections and forget its pools. Celery's close() does neither:
        kombu keeps one pool per broker for the life of the process, shared by every
        app of that broker (left alone when the suite's own app uses it too)."""
        from kombu import pools
        from kombu.utils.collections import eqhash

        from tasks import celery_app

        if self.app.conf.broker_write_url != celery_app.conf.broker_write_url:
            with self.app.connection_for_write() as key:
                for group in (pools.producers, pools.connections):
                    pool = dict.pop(group, eqhash(key), None)
                    if pool is not None:
                        pool.force_close_all()
        self.app.close()


@dataclass
class Broker:
    """The broker an end-to-end test runs on, and a client of its own to publish with."""

    name: str
    url: str
    client: ClientDispatcher

    def drop_queues(self) -> None:
        """What a broker loses: every message waiting, or waiting for its countdown."""
        if self.name == "redis":
            client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
            drop_queue(client)
            client.close()
        else:
            self.client.purge()


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    """Redis, or RabbitMQ when a test is parametrized with `broker` "rabbitmq"
    (indirectly): workers and the test's own publishes then go there."""
    name = getattr(request, "param", "redis")
    if name == "rabbitmq":
        url = request.getfixturevalue("rabbitmq_url")
    else:
        request.getfixturevalue("redis_db")
        url = REDIS_URL
    client = ClientDispatcher(load_settings(broker_url=url))
    yield Broker(name=name, url=url, client=client)
    client.close()


@pytest.fixture(scope="session")
def store(database_url: str) -> Iterator[Store]:
    store = Store(make_engine(database_url))
    yield store
    store.dispose()


# --- an in-process service: only the queue boundary is replaced ---------------------


@dataclass
class RecordingDispatcher:
    """The queue boundary for in-process tests: records what would be published (and,
    beside it, the kind of work each message was published for)."""

    sent: list[tuple[str, int, float]] = field(default_factory=list)
    kinds: dict[tuple[str, int], WorkKind] = field(default_factory=dict)

    def enqueue(self, run_id: str, tick: int, delay: float, kind: WorkKind) -> None:
        self.sent.append((run_id, tick, delay))
        self.kinds[(run_id, tick)] = kind

    def pop(self) -> tuple[str, int, float]:
        return self.sent.pop(0)

    def queue_depth(self) -> int | None:
        return len(self.sent)


@dataclass
class RecordingNotifier:
    """The notification boundary for in-process tests."""

    sent: list[tuple[str, str]] = field(default_factory=list)

    def notify(self, notice: Notice, run_id: str) -> None:
        self.sent.append((str(notice), run_id))


@dataclass
class ManualClock:
    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class ScriptedPlanner:
    """A Planner that answers from a script: one outcome per call, in order.

    When the script runs out it verifies by finishing, so simple runs complete.
    """

    script: list[PlanOutcome] = field(default_factory=list)
    requests: list[PlanRequest] = field(default_factory=list)
    name: str = "scripted"

    def plan(self, request: PlanRequest, *, check: PlanCheck) -> PlanOutcome:
        self.requests.append(request)
        if self.script:
            return self.script.pop(0)
        return PlanFinished(report="# scripted report")


# One planner call's usage, and a plan that runs a step and retries a flaky one: what
# the metrics and tracing tests watch a run do.
PLANNER_USAGE = LlmUsage(
    model="test-model", input_tokens=120, output_tokens=30, cost_usd=0.25, purpose="plan"
)


def noop_then_flaky() -> PlanProduced:
    return PlanProduced(
        steps=[
            PlannedStep(description="noop", tool="noop"),
            PlannedStep(description="flaky", tool="flaky", args={"failures": 1}),
        ],
        usage=[PLANNER_USAGE],
    )


def steps(*tools: str) -> PlanProduced:
    return PlanProduced(steps=[PlannedStep(description=f"run {t}", tool=t) for t in tools])


@dataclass
class Harness:
    """An AgentService on the real database, driven message by message."""

    service: AgentService
    dispatcher: RecordingDispatcher
    notifier: RecordingNotifier
    clock: ManualClock
    planner: ScriptedPlanner

    def step(self) -> tuple[str, int, float]:
        """Deliver the oldest published message, after its countdown has passed."""
        run_id, tick, delay = self.dispatcher.pop()
        self.clock.advance(delay)
        self.service.advance(run_id, tick)
        return run_id, tick, delay

    def drain(self, limit: int = 200) -> int:
        delivered = 0
        while self.dispatcher.sent and delivered < limit:
            self.step()
            delivered += 1
        return delivered


@pytest.fixture
def harness(store: Store, tmp_path: Path) -> Harness:
    return make_harness(store, tmp_path)


def make_harness(store: Store, tmp_path: Path, worker_id: str = "test-worker") -> Harness:
    settings = load_settings()
    dispatcher = RecordingDispatcher()
    notifier = RecordingNotifier()
    clock = ManualClock()
    planner = ScriptedPlanner()
    service = AgentService(
        store=store,
        tools=load_registry(settings.all_tool_modules),
        dispatcher=dispatcher,
        notifier=notifier,
        planners=lambda kind: planner,
        default_planner="offline",
        workspaces=tmp_path / "workspaces",
        tool_settings={
            "examples_dir": str(ROOT / "examples"),
            "outbox_dir": str(tmp_path),
            "slack_webhook_url": "",
        },
        clock=clock,
        jitter=lambda: 0.0,
        worker_id=worker_id,
        lease_grace=5.0,
        sweep_grace=1.0,
    )
    return Harness(
        service=service, dispatcher=dispatcher, notifier=notifier, clock=clock, planner=planner
    )


# --- real worker processes ------------------------------------------------------------


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def child_pids(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(p) for p in children.read_text().split()] if children.exists() else []

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def start_worker(
    database_url: str, broker: Broker, tmp_path: Path
) -> Iterator[Callable[..., Worker]]:
    """Start `celery worker` processes (prefork, one child each, beat optional) on the
    test's broker.

    The session's queues are emptied first: messages left by an earlier test (a
    notification for its run, say) must not reach this test's workers.
    """
    broker.drop_queues()
    started: list[Worker] = []

    def start(
        *,
        beat: bool = True,
        env: dict[str, str] | None = None,
        name: str = "w",
        queues: str | None = None,
        pool: str = "prefork",
        concurrency: int = 1,
        hostname: str | None = None,
    ) -> Worker:
        """`queues`: comma-separated queue names (default: all the session's);
        `hostname`: the node name, `name@host` (default: `<name><n>@` this host)."""
        log = tmp_path / f"worker-{name}-{len(started)}.log"
        argv = [
            sys.executable, "-m", "celery", "-A", "tasks", "worker",
            f"--pool={pool}", f"--concurrency={concurrency}", "--loglevel=INFO",
            "--without-gossip", "--without-mingle",
            f"--hostname={hostname or f'{name}{len(started)}@%h'}",
        ]  # fmt: skip
        if queues is not None:
            argv.append(f"--queues={queues}")
        if beat:
            argv += ["--beat", f"--schedule={tmp_path / f'beat-{len(started)}'}"]
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                env={**os.environ, "CELERY_BROKER_URL": broker.url, **(env or {})},
                preexec_fn=die_with_parent,
            )  # fmt: skip
        worker = Worker(process=process, log=log)
        started.append(worker)
        wait_until(
            lambda: "ready." in worker.output() or process.poll() is not None,
            timeout=60,
            what="the worker to be ready",
        )
        assert process.poll() is None, worker.output()
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def live_service(database_url: str, broker: Broker) -> Iterator[AgentService]:
    """A service as the web app and CLI build it: publishing to the real broker (on
    RabbitMQ, through the test's client of it)."""
    from app.wiring import build_service
    from tasks import CeleryDispatcher, CeleryNotifier

    settings = load_settings(broker_url=broker.url)
    if broker.name == "redis":
        service = build_service(
            settings, CeleryDispatcher(settings.max_countdown), CeleryNotifier()
        )
    else:
        service = build_service(settings, broker.client, broker.client)
    yield service
    service.store.dispose()


def workspace(run_id: str) -> Path:
    return DATA_DIR / "workspaces" / run_id
