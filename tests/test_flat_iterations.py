"""A long run costs per iteration what a short one does: the run's row is updated in
place (HOT) with autovacuum off, its table does not grow, and an iteration runs as
many statements and reads as many rows at iteration 1,000 as at iteration 10."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from sqlalchemy import Connection, event, text

from app.store.repo import Store, make_engine
from tests.support.fixtures import Harness, steps, wait_until
from tests.support.private_services import PrivatePostgres


@dataclass(frozen=True)
class TableStats:
    updates: int
    hot_updates: int
    heap_bytes: int


@pytest.fixture(scope="module")
def store(private_postgres: PrivatePostgres) -> Iterator[Store]:
    """A database on a server of its own (the harness takes it): the counters read
    here are the whole server's and cluster-wide pruning waits for its oldest
    transaction, so another test's worker, web app or DROP DATABASE on the shared
    server would leak into them."""
    private_postgres.ensure_running()
    store = Store(make_engine(private_postgres.create_database()))
    yield store
    store.dispose()


@contextmanager
def all_counted(store: Store) -> Iterator[Connection]:
    """A connection from which the counters of every statement the store ran so far
    are visible: a backend reports its counters when it exits, so the store's
    connections are closed first."""
    store.dispose()
    with store.engine.connect() as conn:
        wait_until(
            lambda: conn.execute(
                text(
                    "SELECT count(*) = 0 FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar_one(),
            what="the store's connections to close",
        )
        conn.execute(text("SELECT pg_stat_clear_snapshot()"))
        yield conn


def table_stats(store: Store, table: str) -> TableStats:
    """The table's update counters and heap size."""
    with all_counted(store) as conn:
        row = conn.execute(
            text(
                "SELECT n_tup_upd, n_tup_hot_upd, pg_relation_size(relid) "
                "FROM pg_stat_user_tables WHERE relname = :table"
            ),
            {"table": table},
        ).one()
    return TableStats(int(row[0]), int(row[1]), int(row[2]))


@pytest.fixture
def autovacuum_off(store: Store) -> Iterator[None]:
    """As on the test machines, where nothing cleans up behind the iterations."""
    with store.engine.begin() as conn:
        conn.execute(text("ALTER TABLE runs SET (autovacuum_enabled = off)"))
    yield
    with store.engine.begin() as conn:
        conn.execute(text("ALTER TABLE runs RESET (autovacuum_enabled)"))


def iterate(harness: Harness, run_id: str, count: int) -> None:
    for _ in range(count):
        harness.step()


WINDOW = 200  # iterations
WINDOWS = 4


def test_the_run_row_is_updated_in_place_and_its_table_stays_small(
    harness: Harness, store: Store, autovacuum_off: None
):
    """With autovacuum off, nearly every write of the run row is a HOT update, whose
    old version is pruned on its own page: the table does not grow.

    PostgreSQL prunes only versions older than the oldest transaction in the whole
    cluster, so a long transaction in another database (another test session's DROP
    DATABASE, say) holds pruning back while it lasts, and then updates stop being
    HOT. Windows of iterations are measured until one ran undisturbed; before
    migration 0006 none could: no update was HOT and each window added ~10 pages."""
    harness.planner.script = [steps(*["noop"] * 1100)]
    run_id = harness.service.create_run("long", config={"max_iterations": 2000})
    iterate(harness, run_id, 100)
    seen = []
    for _ in range(WINDOWS):
        before = table_stats(store, "runs")
        iterate(harness, run_id, WINDOW)
        after = table_stats(store, "runs")
        updates = after.updates - before.updates
        not_hot = updates - (after.hot_updates - before.hot_updates)
        assert updates >= 2 * WINDOW  # the claim and the outcome, each iteration
        seen.append((not_hot, updates, after.heap_bytes - before.heap_bytes))
        if not_hot <= 0.1 * updates and after.heap_bytes - before.heap_bytes <= 8192:
            return
    pytest.fail(f"(not HOT, updates, heap growth) in each window: {seen}")


TABLES = ("runs", "steps", "events", "approvals")


def rows_read(store: Store) -> dict[str, int]:
    """Rows each table has given to scans so far: read by sequential scans, and index
    entries returned by index scans (a dead entry a scan must step over counts too)."""
    with all_counted(store) as conn:
        rows = conn.execute(
            text(
                "SELECT t.relname, t.seq_tup_read + coalesce(sum(i.idx_tup_read), 0) "
                "FROM pg_stat_user_tables t "
                "LEFT JOIN pg_stat_user_indexes i ON i.relid = t.relid "
                "WHERE t.relname = ANY(:tables) GROUP BY t.relname, t.seq_tup_read"
            ),
            {"tables": list(TABLES)},
        ).all()
    return {name: int(count) for name, count in rows}


def cost_of_one_iteration(harness: Harness, store: Store) -> dict[str, int]:
    """Rows read from each table by the next iteration, and its SQL statements."""
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    before = rows_read(store)
    for engine in store.engines:
        event.listen(engine, "before_cursor_execute", count)
    try:
        harness.step()
    finally:
        for engine in store.engines:
            event.remove(engine, "before_cursor_execute", count)
    after = rows_read(store)
    return {"statements": len(statements), **{t: after[t] - before[t] for t in TABLES}}


PLANS = {
    # Every iteration but the first runs a step of one long plan.
    "one long plan": lambda: [steps(*["noop"] * 1100)],
    # Odd iterations ask the planner (its context: recent steps and events), even ones
    # run the one step it planned.
    "a step at a time": lambda: [steps("noop") for _ in range(600)],
}


@pytest.mark.parametrize("plans", PLANS)
def test_an_iteration_reads_as_many_rows_at_iteration_1000_as_at_120(
    harness: Harness, store: Store, autovacuum_off: None, plans: str
):
    """Whatever the planner knows of the tables (nothing: autovacuum is off), an
    iteration reaches the rows it needs through keys, never by reading the run's
    steps or events; counted as index entries and rows the scans returned."""
    harness.planner.script = PLANS[plans]()
    run_id = harness.service.create_run("long", config={"max_iterations": 2000})
    iterate(harness, run_id, 119)  # past the 50 completed steps a planner is shown
    early = [cost_of_one_iteration(harness, store) for _ in range(2)]
    iterate(harness, run_id, 878)  # even: like is compared with like
    late = [cost_of_one_iteration(harness, store) for _ in range(2)]
    for at_120, at_1000 in zip(early, late, strict=True):
        assert at_1000["statements"] == at_120["statements"], (early, late)
        for table in TABLES:
            assert at_1000[table] <= at_120[table] + 2, (table, early, late)
