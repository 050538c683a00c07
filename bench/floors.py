"""The floors an agentloop iteration is compared with: Celery hops that do about what
an iteration must do at the least, on a worker of their own (acks_late, prefetch 1).

- bare: one UPDATE of a one-row table, then publish the next hop;
- fair: one transaction that locks a run row, rewrites a 2 KB JSONB state and
  inserts an event, then publish the next hop: a naive single-transaction
  durable step, with no lease, no claim and no plan.

A chain is one sequence of hops; its row records when its first and last hop ran.
"""

from __future__ import annotations

import json

from celery import Celery
from sqlalchemy import Engine, create_engine, text

import bench.env as env

floor_app = Celery("floor", broker=env.REDIS)
floor_app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    task_default_queue=env.FLOOR_QUEUE,
)
STATE = json.dumps({"notes": "x" * 2000})  # the 2 KB state the fair floor rewrites
_engine: Engine | None = None

SCHEMA = """
CREATE TABLE floor (id int PRIMARY KEY, hops int NOT NULL DEFAULT 0,
                    first_at timestamptz, last_at timestamptz, state jsonb);
CREATE TABLE floor_events (id bigserial PRIMARY KEY, chain int NOT NULL, data jsonb);
"""


def engine() -> Engine:
    global _engine
    if _engine is None:
        _engine = create_engine(f"{env.PG}/{env.DB}")
    return _engine


RECORD_HOP = (
    "UPDATE floor SET hops = hops + 1, first_at = COALESCE(first_at, now()), "
    "last_at = now() {state} WHERE id = :chain"
)


@floor_app.task(name="floor.bare")
def bare(chain: int, remaining: int) -> None:
    with engine().begin() as conn:
        conn.execute(text(RECORD_HOP.format(state="")), {"chain": chain})
    if remaining > 1:
        bare.apply_async(args=(chain, remaining - 1))


@floor_app.task(name="floor.fair")
def fair(chain: int, remaining: int) -> None:
    with engine().begin() as conn:
        conn.execute(text("SELECT id FROM floor WHERE id = :chain FOR UPDATE"), {"chain": chain})
        conn.execute(
            text(RECORD_HOP.format(state=", state = CAST(:state AS jsonb)")),
            {"chain": chain, "state": STATE},
        )
        conn.execute(
            text("INSERT INTO floor_events (chain, data) VALUES (:chain, CAST(:data AS jsonb))"),
            {"chain": chain, "data": json.dumps({"hop": remaining})},
        )
    if remaining > 1:
        fair.apply_async(args=(chain, remaining - 1))
