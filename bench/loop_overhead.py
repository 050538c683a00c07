"""Loop overhead: agentloop iterations/s against the floor of one durable hop.

Both sides run on the same real services (PostgreSQL and Redis on loopback),
each with one solo-pool Celery worker, timed by the worker's own timestamps:

- floor:  a bare Celery task that runs one PostgreSQL transaction and re-enqueues
          itself, N times in one chain;
- engine: `agentloop.advance` iterations of a no-op tool, in runs of a 50-step
          runbook (plan, 50 steps, verify), one run at a time so it is one chain.

A shared machine's speed drifts by tens of percent within a minute, so the two
are measured in alternating rounds, both workers up throughout, and each round's
ratio compares neighbours in time; the median round is the result.

Usage: python bench/loop_overhead.py [--iterations N] [--rounds R]   (make bench)
Target: engine >= 0.5x the floor. Reported, never asserted.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: import the project and its test tools
PG = "postgresql+psycopg2://postgres@127.0.0.1:5432"
# The floor worker imports this module: it must find the same database and folder.
DB = os.environ.setdefault("AGENTLOOP_BENCH_DB", f"agentloop_bench_{os.getpid()}")
REDIS = "redis://127.0.0.1:6379/14"  # the benchmark's own Redis database
STEPS_PER_RUN = 50
TARGET = 0.5

# Set before the Celery apps (floor and agentloop) read their configuration.
DATA = Path(os.environ.get("AGENTLOOP_BENCH_DATA") or tempfile.mkdtemp(prefix="agentloop-bench-"))
os.environ["AGENTLOOP_BENCH_DATA"] = str(DATA)
os.environ.update(
    DATABASE_URL=f"{PG}/{DB}",
    CELERY_BROKER_URL=REDIS,
    AGENTLOOP_DATA_DIR=str(DATA),
    AGENTLOOP_TOOL_MODULES="tests.support.tools",
    AGENTLOOP_RUNBOOKS_DIR=str(DATA / "runbooks"),
)

from celery import Celery  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from app.config import load_settings  # noqa: E402
from app.service import AgentService  # noqa: E402

floor_app = Celery("floor", broker=REDIS)
floor_app.conf.update(task_acks_late=True, worker_prefetch_multiplier=1, task_ignore_result=True,
                      task_default_queue="floor")  # fmt: skip
_engine = None


@floor_app.task(name="floor.hop")
def hop(chain: int, remaining: int) -> None:
    """One durable hop: one PostgreSQL transaction, then publish the next."""
    global _engine
    if _engine is None:
        _engine = create_engine(f"{PG}/{DB}")
    with _engine.begin() as conn:
        conn.execute(text(
            "UPDATE floor SET hops = hops + 1, first_at = COALESCE(first_at, now()), "
            "last_at = now() WHERE id = :chain"
        ), {"chain": chain})  # fmt: skip
    if remaining > 1:
        hop.apply_async(args=(chain, remaining - 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=520, help="per side and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    runs = max(1, round(args.iterations / (STEPS_PER_RUN + 2)))
    setup()
    floor_worker = worker("bench.loop_overhead:floor_app", "floor")
    engine_worker = worker("tasks", load_settings().queue)
    floors, engines = [], []
    try:
        for n in range(1, args.rounds + 1):
            floors.append(measure_floor(n, runs * (STEPS_PER_RUN + 2)))
            engines.append(measure_engine(runs))
            print(f"round {n}: floor {floors[-1]:6.1f} hops/s, engine {engines[-1]:6.1f} "
                  f"iterations/s, ratio {engines[-1] / floors[-1]:.2f}x", flush=True)  # fmt: skip
    finally:
        stop(floor_worker)
        stop(engine_worker)
        teardown()
    ratios = sorted(e / f for e, f in zip(engines, floors, strict=True))
    ratio = statistics.median(ratios)
    verdict = "meets" if ratio >= TARGET else "MISSES"
    print(f"floor  (bare Celery hop + 1 PostgreSQL transaction): "
          f"{statistics.median(floors):8.1f} hops/s (median)")  # fmt: skip
    print(f"engine (agentloop.advance, no-op tool)             : "
          f"{statistics.median(engines):8.1f} iterations/s (median)")  # fmt: skip
    print(f"ratio engine/floor: {ratio:.2f}x median of {len(ratios)} rounds "
          f"({ratios[0]:.2f}-{ratios[-1]:.2f}x); {verdict} the {TARGET}x target")  # fmt: skip
    return 0


def setup() -> None:
    import redis

    admin = create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{DB}"'))
    admin.dispose()
    from app.store.migrate import upgrade

    upgrade(f"{PG}/{DB}")
    with create_engine(f"{PG}/{DB}").begin() as conn:
        conn.execute(text("CREATE TABLE floor (id int primary key, hops int, "
                          "first_at timestamptz, last_at timestamptz)"))  # fmt: skip
    redis.Redis.from_url(REDIS).flushdb()
    runbooks = DATA / "runbooks"
    runbooks.mkdir()
    steps = "".join(
        f'\n[[steps]]\ndescription = "no-op {i}"\ntool = "noop"\n' for i in range(STEPS_PER_RUN)
    )
    (runbooks / "bench.toml").write_text(
        'name = "bench"\ndescription = "no-op steps"\nmatch = "^bench"\n' + steps
    )


def teardown() -> None:
    import redis

    redis.Redis.from_url(REDIS).flushdb()
    admin = create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)'))
    admin.dispose()


def worker(app: str, queue: str) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "--pool=solo",
        "-Q",
        queue,
        "--loglevel=WARNING",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    return subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(timeout=30)


def poll(query: str, done: object, timeout: float = 120) -> tuple[object, ...]:
    engine = create_engine(f"{PG}/{DB}")
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                row = conn.execute(text(query)).first()
            if row is not None and row[0] == done:
                return tuple(row)
            time.sleep(0.2)
    finally:
        engine.dispose()
    raise TimeoutError(f"benchmark did not finish: {query}")


def measure_floor(chain: int, hops: int) -> float:
    with create_engine(f"{PG}/{DB}").begin() as conn:
        conn.execute(text("INSERT INTO floor VALUES (:chain, 0, NULL, NULL)"), {"chain": chain})
    hop.apply_async(args=(chain, hops))
    _, first, last = poll(f"SELECT hops, first_at, last_at FROM floor WHERE id = {chain}", hops)
    return (hops - 1) / seconds(first, last)


def measure_engine(runs: int) -> float:
    service = engine_service()
    iterations, elapsed = 0, 0.0
    for n in range(runs):
        run_id = service.create_run(
            f"bench {n}", config={"planner": "offline", "max_iterations": 1000}
        )
        _, iteration, started, finished = poll(
            f"SELECT status, iteration, started_at, finished_at FROM runs "
            f"WHERE id = '{run_id}'", "completed")  # fmt: skip
        # started_at is set as iteration 1 claims the run, finished_at as the last one
        # saves: the span holds all of them but one message delivery and one save
        # (under 2 ms of ~250), so it is counted as `iteration` iterations, where the
        # floor's first_at..last_at (both transaction starts) is exactly hops - 1.
        iterations += int(iteration)
        elapsed += seconds(started, finished)
    return iterations / elapsed


@functools.cache
def engine_service() -> AgentService:
    """The service that creates the benchmark's runs, as the web app would."""
    from app.wiring import build_service
    from tasks import CeleryDispatcher, CeleryNotifier

    settings = load_settings()
    return build_service(settings, CeleryDispatcher(settings.max_countdown), CeleryNotifier())


def seconds(start: object, end: object) -> float:
    assert isinstance(start, datetime) and isinstance(end, datetime)
    return (end - start).total_seconds()


if __name__ == "__main__":
    sys.exit(main())
