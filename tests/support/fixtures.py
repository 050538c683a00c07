"""Fixtures over real services: PostgreSQL, Redis and Celery worker processes."""

from __future__ import annotations

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
from tests.conftest import DATA_DIR, PG_SERVER, QUEUE, REDIS_DB, ROOT, TEST_DB

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
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
    try:
        client.ping()
    except Exception as exc:
        require("Redis", exc)
    yield REDIS_DB
    drop_queue(client)
    client.close()


def drop_queue(client: Any) -> None:
    """Delete the session's queues (and their priority lists): what a broker loses."""
    for queue in (QUEUE, f"{QUEUE}.plan", f"{QUEUE}.notify"):
        client.delete(queue)
        for key in client.scan_iter(f"{queue}\x06\x16*"):  # kombu's priority lists
            client.delete(key)


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
    database_url: str, redis_db: int, tmp_path: Path
) -> Iterator[Callable[..., Worker]]:
    """Start `celery worker` processes (prefork, one child each, beat optional).

    The session's queue is emptied first: messages left by an earlier test (a
    notification for its run, say) must not reach this test's workers.
    """
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379, db=redis_db)
    drop_queue(client)
    client.close()
    started: list[Worker] = []

    def start(
        *,
        beat: bool = True,
        env: dict[str, str] | None = None,
        name: str = "w",
        queues: str | None = None,
        pool: str = "prefork",
        concurrency: int = 1,
    ) -> Worker:
        """`queues`: comma-separated queue names (default: all the session's)."""
        log = tmp_path / f"worker-{name}-{len(started)}.log"
        argv = [
            sys.executable, "-m", "celery", "-A", "tasks", "worker",
            f"--pool={pool}", f"--concurrency={concurrency}", "--loglevel=INFO",
            "--without-gossip", "--without-mingle", f"--hostname={name}{len(started)}@%h",
        ]  # fmt: skip
        if queues is not None:
            argv.append(f"--queues={queues}")
        if beat:
            argv += ["--beat", f"--schedule={tmp_path / f'beat-{len(started)}'}"]
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                env={**os.environ, **(env or {})}, preexec_fn=die_with_parent,
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
def live_service(database_url: str, redis_db: int) -> AgentService:
    """A service as the web app and CLI build it: publishing to the real broker."""
    from app.wiring import build_service
    from tasks import CeleryDispatcher, CeleryNotifier

    settings = load_settings()
    return build_service(settings, CeleryDispatcher(settings.max_countdown), CeleryNotifier())


def workspace(run_id: str) -> Path:
    return DATA_DIR / "workspaces" / run_id
