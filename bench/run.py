"""make bench: what an agentloop iteration costs, against floors measured beside it.

Every figure is measured on the real services (PostgreSQL and Redis on loopback)
with real `celery worker` processes, timed by the database's own timestamps, and
printed with the load average at the time: a shared machine's speed drifts by
tens of percent within a minute, so ratios compare neighbours in time
(alternating rounds, the median round is the result) and absolute numbers are
only for this machine.

Scenarios (each runs alone with --only NAME; all of them by default):

  noop        a no-op step's iteration ÷ the bare floor and ÷ the fair floor
  effect      the same for a non-idempotent step (two durable commits)
  concurrent  many runs at once (12 iterations each) on a prefork-2 worker ÷ the
              fair floor with 100 chains on a prefork-2 worker
  long        iterations near the 5,000th of one long run ÷ those near the 10th
  paused      many runs paused for approval: messages held, worker CPU at rest
  approve     approve -> the step's iteration begins (p50, p99)
  writes      rows and bytes written per iteration

The floors are in bench/floors.py. The bench uses a database, queues and a data
folder of its own (bench/env.py) and removes only what it created.

Usage: python bench/run.py [--only NAME,...] [--rounds R] [--runs N] [--long N]
                           [--paused N]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script
import bench.env as env  # before anything reads a setting
from bench import floors

NOOP_RUN_STEPS = 50  # a run of the noop and effect scenarios: plan, 50 steps, verify
CONCURRENT_STEPS = 10  # plan, 10 steps, verify: 12 iterations
FAIR_CHAINS = 100


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"[load {one:.1f} {five:.1f} {fifteen:.1f}]"


def say(line: str) -> None:
    print(f"{line}  {load()}", flush=True)


# --- the world ---------------------------------------------------------------------


@functools.cache
def db() -> Engine:
    return create_engine(f"{env.PG}/{env.DB}")


def sql(query: str, **params: Any) -> list[Any]:
    with db().begin() as conn:
        return list(conn.execute(text(query), params))


def setup() -> None:
    from app.store.migrate import upgrade

    admin = create_engine(f"{env.PG}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{env.DB}"'))
    admin.dispose()
    upgrade(f"{env.PG}/{env.DB}")
    with db().begin() as conn:
        for statement in floors.SCHEMA.split(";"):
            if statement.strip():
                conn.execute(text(statement))
    env.RUNBOOKS.mkdir(parents=True, exist_ok=True)
    runbook("bench noop", ["noop"] * NOOP_RUN_STEPS)
    runbook("bench effect", ["effect"] * NOOP_RUN_STEPS)
    runbook("bench twelve", ["noop"] * CONCURRENT_STEPS)
    runbook("bench approve", ["delete"], args='{ path = "nothing" }')


def runbook(task: str, tools: list[str], args: str = "{}") -> None:
    """A runbook the offline planner follows for runs whose task is `task`."""
    name = task.replace(" ", "_")
    steps = "".join(
        f'\n[[steps]]\ndescription = "{tool} {i}"\ntool = "{tool}"\nargs = {args}\n'
        for i, tool in enumerate(tools)
    )
    (env.RUNBOOKS / f"{name}.toml").write_text(
        f'name = "{name}"\ndescription = "{task}"\nmatch = "^{task}( |$)"\n' + steps
    )


def teardown() -> None:
    import redis

    client = redis.Redis.from_url(env.REDIS)
    # The queues this process named, and kombu's bindings of their exchanges (one per
    # queue, named after it, the floor's included): Redis keeps them after the bench.
    for prefix in ("", "_kombu.binding.", "_kombu.binding_permanent."):
        for key in client.scan_iter(f"{prefix}{env.QUEUE}*"):
            client.delete(key)
    client.close()
    db().dispose()
    admin = create_engine(f"{env.PG}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{env.DB}" WITH (FORCE)'))
    admin.dispose()


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    log: Path

    def cpu_seconds(self) -> float:
        """User and system CPU of the worker and its pool processes so far."""
        return cpu_of([self.process.pid, *children(self.process.pid)])


def cpu_of(pids: list[int]) -> float:
    """User and system CPU seconds of processes `pids` so far (gone ones count 0)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def database_cpu() -> float:
    """CPU seconds of the PostgreSQL backends serving the bench database so far."""
    pids = sql(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid()"
    )
    return cpu_of([row[0] for row in pids])


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@contextmanager
def worker(
    app: str, *, pool: str = "solo", concurrency: int = 1, queues: str = ""
) -> Iterator[Worker]:
    """A `celery worker` for the length of the block, ready before it is used."""
    log = env.DATA / f"worker-{time.monotonic_ns()}.log"
    argv = [
        sys.executable, "-m", "celery", "-A", app, "worker", f"--pool={pool}",
        f"--concurrency={concurrency}", "--loglevel=INFO", "--without-gossip",
        "--without-mingle", "--without-heartbeat", f"--hostname=bench{time.monotonic_ns()}@%h",
    ]  # fmt: skip
    if queues:
        argv.append(f"--queues={queues}")
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, cwd=env.ROOT, env={**os.environ, "PYTHONPATH": str(env.ROOT)},
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    running = Worker(process, log)
    try:
        until(lambda: "ready." in log.read_text(errors="replace"), what=f"{app} worker ready")
        yield running
    finally:
        process.terminate()
        process.wait(timeout=60)


def floor_worker(**kw: Any) -> Any:
    return worker("bench.floors:floor_app", queues=env.FLOOR_QUEUE, **kw)


def engine_worker(**kw: Any) -> Any:
    return worker("tasks", **kw)  # without --queues: all three of the bench's queues


def until(predicate: Callable[[], Any], *, timeout: float = 900, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"benchmark gave up waiting for {what}")


@functools.cache
def service() -> Any:
    """The service that creates and decides runs, as the web app would."""
    from app.config import load_settings
    from app.wiring import build_service
    from tasks import CeleryDispatcher, CeleryNotifier

    settings = load_settings()
    return build_service(settings, CeleryDispatcher(settings.max_countdown), CeleryNotifier())


def seconds(start: datetime, end: datetime) -> float:
    return (end - start).total_seconds()


def median_range(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


# --- floors and runs, timed by the database ----------------------------------------

_chains = iter(range(1, 10**9))


def run_floor(task: Any, chains: int, hops: int) -> float:
    """Hops per second of `chains` chains of `hops` hops each."""
    ids = [next(_chains) for _ in range(chains)]
    with db().begin() as conn:
        for chain in ids:
            conn.execute(text("INSERT INTO floor (id) VALUES (:id)"), {"id": chain})
    for chain in ids:
        task.apply_async(args=(chain, hops))
    query = "SELECT sum(hops), min(first_at), max(last_at) FROM floor WHERE id = ANY(:ids)"
    done = until(
        lambda: (row := sql(query, ids=ids)[0])[0] == chains * hops and row,
        what="the floor's hops",
    )
    return (done[0] - chains) / seconds(done[1], done[2])


def create_runs(task: str, count: int, **config: Any) -> list[str]:
    config = {"planner": "offline", "max_iterations": 10_000, **config}
    return [service().create_run(f"{task} {n}", config=config) for n in range(count)]


def wait_runs(run_ids: list[str], status: str = "completed") -> list[Any]:
    query = (
        "SELECT count(*) FILTER (WHERE status = :status), count(*), sum(iteration), "
        "min(started_at), max(finished_at) FROM runs WHERE id = ANY(:ids)"
    )
    row = until(
        lambda: (r := sql(query, ids=run_ids, status=status)[0])[0] == len(run_ids) and r,
        what=f"{len(run_ids)} runs to be {status}",
    )
    return list(row)


def run_rate(run_ids: list[str]) -> float:
    """Iterations per second of runs `run_ids`, advanced at once, once they all ended.

    started_at is set as iteration 1 claims a run and finished_at as the last one
    saves: the span holds all of them but one delivery and one save, so it counts as
    `iteration` iterations (the floor's first_at..last_at is exactly hops - 1)."""
    _, _, iterations, started, finished = wait_runs(run_ids)
    return float(iterations) / seconds(started, finished)


def step_rate(task: str, tool: str) -> tuple[float, float]:
    """Iterations per second of one run of `task`: over its `tool` steps alone, and over
    the whole run.

    The steps' rate is what an iteration of such a step costs: from the first step's
    outcome to the last one's, `count - 1` iterations (as the floor's first_at..last_at
    spans hops - 1). The whole run's also holds its two planner iterations (the plan
    and the verification), which cost several times a step's."""
    (run_id,) = create_runs(task, 1)
    _, _, iterations, started, finished = wait_runs([run_id])
    count, first, last = sql(
        "SELECT count(*), min(updated_at), max(updated_at) FROM steps "
        "WHERE run_id = :id AND tool = :tool AND status = 'completed'",
        id=run_id,
        tool=tool,
    )[0]
    return (count - 1) / seconds(first, last), float(iterations) / seconds(started, finished)


# --- scenarios -----------------------------------------------------------------------


def iteration_vs_floors(kind: str, rounds: int) -> None:
    """Alternating rounds of the bare floor, the fair floor and a run of `kind` steps."""
    hops = NOOP_RUN_STEPS + 2
    bares, fairs, engines, wholes = [], [], [], []
    with floor_worker(), engine_worker():
        for n in range(1, rounds + 1):
            bares.append(run_floor(floors.bare, 1, hops))
            fairs.append(run_floor(floors.fair, 1, hops))
            steps, whole = step_rate(f"bench {kind}", kind)
            engines.append(steps)
            wholes.append(whole)
            say(
                f"  round {n}: bare {bares[-1]:.0f} hops/s, fair {fairs[-1]:.0f} hops/s, "
                f"{kind} steps {engines[-1]:.0f} iterations/s (whole run {whole:.0f}/s)"
            )
    say(
        f"{kind} step iteration: {statistics.median(engines):.0f}/s; "
        f"÷ bare floor {median_range([e / b for e, b in zip(engines, bares, strict=True)])}, "
        f"÷ fair floor {median_range([e / f for e, f in zip(engines, fairs, strict=True)])}; "
        f"whole runs (with the plan and the verification) {statistics.median(wholes):.0f}/s, "
        f"÷ fair floor {median_range([w / f for w, f in zip(wholes, fairs, strict=True)])} "
        f"(median of {rounds} rounds)"
    )


def noop(args: argparse.Namespace) -> None:
    iteration_vs_floors("noop", args.rounds)


def effect(args: argparse.Namespace) -> None:
    iteration_vs_floors("effect", args.rounds)


def concurrent(args: argparse.Namespace) -> None:
    iterations = args.runs * (CONCURRENT_STEPS + 2)
    hops = max(2, iterations // FAIR_CHAINS)
    with floor_worker(pool="prefork", concurrency=2) as f:
        cpu, database = f.cpu_seconds(), database_cpu()
        fair = run_floor(floors.fair, FAIR_CHAINS, hops)
        cpu, database = f.cpu_seconds() - cpu, database_cpu() - database
    per = 1000 / (FAIR_CHAINS * hops)
    say(f"  fair floor, {FAIR_CHAINS} chains, prefork 2: {fair:.0f} hops/s; CPU per hop: "
        f"worker {cpu * per:.2f} ms, PostgreSQL {database * per:.2f} ms")  # fmt: skip
    # Created before the worker starts: creating a thousand runs takes this process
    # seconds of CPU, which would compete with the worker measured (the floor's 100
    # chains are published in milliseconds).
    run_ids = create_runs("bench twelve", args.runs)
    with engine_worker(pool="prefork", concurrency=2) as w:
        cpu, database = w.cpu_seconds(), database_cpu()
        engine = run_rate(run_ids)
        cpu, database = w.cpu_seconds() - cpu, database_cpu() - database
    per = 1000 / iterations
    say(f"  {args.runs} runs at once, prefork 2: {engine:.0f} iterations/s; CPU per "
        f"iteration: worker {cpu * per:.2f} ms, PostgreSQL {database * per:.2f} ms")  # fmt: skip
    say(f"concurrent: {args.runs} runs x 12 iterations ÷ fair floor at 100 chains: "
        f"{engine / fair:.2f}x")  # fmt: skip


@dataclass
class Inbox:
    """The queue boundary of an in-process service: the message each run has next."""

    next: dict[str, int]

    def enqueue(self, run_id: str, tick: int, delay: float, kind: Any = None) -> None:
        self.next[run_id] = tick

    def queue_depth(self) -> int | None:
        return len(self.next)


class Notices:
    def notify(self, notice: Any, run_id: str) -> None:
        pass


def long(args: argparse.Namespace) -> None:
    """A run driven in process (no broker) to `--long` iterations, with plans of 50
    no-op steps one after another (a runbook holds 50 steps at most); then its next
    100 iterations alternate with iterations 10-110 of a new run, each timed alone,
    so the two medians are neighbours in time. The runs table's heap size after
    (autovacuum as the server is configured)."""
    from app.config import load_settings
    from app.engine.actions import PlanProduced
    from app.engine.models import PlannedStep
    from app.service import AgentService
    from app.store.repo import Store, make_engine
    from app.tools.registry import load_registry

    plan = PlanProduced(steps=[PlannedStep(description="no-op", tool="noop")] * 50)
    planner = type("Planner", (), {"name": "bench", "plan": lambda self, r, *, check: plan})()
    inbox = Inbox({})
    store = Store(make_engine(f"{env.PG}/{env.DB}"))
    service = AgentService(
        store=store,
        tools=load_registry(load_settings().all_tool_modules),
        dispatcher=inbox,
        notifier=Notices(),
        planners=lambda kind: planner,
        default_planner="offline",
        workspaces=env.DATA / "workspaces",
        tool_settings={},
        jitter=lambda: 0.0,
    )

    def iterate(run_id: str) -> float:
        started = time.perf_counter()
        service.advance(run_id, inbox.next.pop(run_id))
        return (time.perf_counter() - started) * 1000

    config = {"max_iterations": args.long + 200}
    old = service.create_run("bench long", config=config)
    for _ in range(args.long - 100):
        iterate(old)
    new = service.create_run("bench long", config=config)
    for _ in range(10):
        iterate(new)
    early, late = [], []
    for _ in range(100):
        early.append(iterate(new))
        late.append(iterate(old))
    store.dispose()
    ratio = statistics.median(late) / statistics.median(early)
    size = sql("SELECT pg_relation_size('runs')")[0][0]
    say(
        f"long: iterations {args.long - 100}-{args.long} {statistics.median(late):.2f} ms ÷ "
        f"iterations 10-110 {statistics.median(early):.2f} ms = {ratio:.2f}x (medians, "
        f"alternating, in process); runs heap {size // 1024} KB"
    )


def pause_runs(count: int) -> list[str]:
    run_ids = create_runs("bench approve", count)
    wait_runs(run_ids, status="paused")
    return run_ids


def queued_messages() -> dict[str, int]:
    """Messages waiting in each of the bench's queues, and unacknowledged ones."""
    import redis

    from app.config import load_settings
    from app.queues import Queues

    client = redis.Redis.from_url(env.REDIS)
    try:
        waiting = {name: int(client.llen(name)) for name in Queues.of(load_settings()).all}
        return {**waiting, "unacked (whole db)": int(client.hlen("unacked"))}
    finally:
        client.close()


def paused(args: argparse.Namespace) -> None:
    with engine_worker(pool="prefork", concurrency=2) as w:
        started = time.monotonic()
        pause_runs(args.paused)
        took = time.monotonic() - started
        cpu = w.cpu_seconds()
        say(f"  {args.paused} runs paused in {took:.0f} s; worker CPU {cpu:.1f} s "
            f"({cpu / args.paused * 1000:.1f} ms a run, 2 iterations each)")  # fmt: skip
        before = w.cpu_seconds()
        time.sleep(10)  # at rest: what holding paused runs costs a worker
        idle = (w.cpu_seconds() - before) / 10
    say(f"paused: {args.paused} runs; messages held {queued_messages()}; "
        f"worker CPU at rest {idle * 100:.1f}% of a core")  # fmt: skip


def approve(args: argparse.Namespace) -> None:
    """One approval at a time, each timed from just before the call to when the
    approved step's iteration wrote its tool_call event (both the database's clock)."""
    latencies = []
    with engine_worker(pool="prefork", concurrency=2):
        for run_id in pause_runs(args.approvals):
            asked = service().store.database_now()
            service().approve(run_id, by="bench")
            began = until(
                lambda r=run_id: sql(
                    "SELECT min(created_at) FROM events WHERE run_id = :id AND kind = 'tool_call'",
                    id=r,
                )[0][0],
                what="the approved step to begin",
            )
            latencies.append(seconds(asked, began) * 1000)
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    say(f"approve -> running: p50 {statistics.median(latencies):.1f} ms, p99 {p99:.1f} ms "
        f"({len(latencies)} approvals)")  # fmt: skip


TABLES = ("runs", "steps", "events")


def table_writes() -> tuple[int, int]:
    """Rows inserted, updated or deleted in the run tables so far, and their size
    (heap, indexes and TOAST). A backend reports its counters when it exits: every
    other connection to the database is closed first (the workers are stopped)."""
    service().store.dispose()
    db().dispose()
    until(
        lambda: sql(
            "SELECT count(*) = 0 FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )[0][0],
        what="the other connections to close",
    )
    rows, size = sql(
        "SELECT sum(n_tup_ins + n_tup_upd + n_tup_del), sum(pg_total_relation_size(relid)) "
        "FROM pg_stat_user_tables WHERE relname = ANY(:tables)",
        tables=list(TABLES),
    )[0]
    return int(rows), int(size)


def writes(args: argparse.Namespace) -> None:
    """A worker's counters reach pg_stat when its connections close: it is stopped
    before each reading."""
    with engine_worker():
        wait_runs(create_runs("bench noop", 1))  # warm: the tables have their first pages
    rows_before, size_before = table_writes()
    with engine_worker():
        _, _, iterations, _, _ = wait_runs(create_runs("bench noop", args.writes_runs))
    rows_after, size_after = table_writes()
    say(f"writes: {(rows_after - rows_before) / iterations:.1f} rows and "
        f"{(size_after - size_before) / iterations:.0f} bytes (tables, indexes, TOAST) "
        f"per iteration, over {iterations} iterations of no-op runs")  # fmt: skip


SCENARIOS: dict[str, Callable[[argparse.Namespace], None]] = {
    "noop": noop,
    "effect": effect,
    "concurrent": concurrent,
    "long": long,
    "paused": paused,
    "approve": approve,
    "writes": writes,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SCENARIOS), help="scenarios, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="noop and effect rounds")
    parser.add_argument("--runs", type=int, default=1000, help="concurrent runs")
    parser.add_argument("--long", type=int, default=5000, help="iterations of the long run")
    parser.add_argument("--paused", type=int, default=10_000, help="runs paused at once")
    parser.add_argument("--approvals", type=int, default=30)
    parser.add_argument("--writes-runs", type=int, default=10)
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; known: {', '.join(SCENARIOS)}")
    setup()
    try:
        for name in chosen:
            say(f"--- {name}")
            SCENARIOS[name](args)
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
