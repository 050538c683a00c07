"""One transition semantics: the in-memory apply (app/engine/apply.py) and the
statements that write a transition (app/store/hot.py: one statement on PostgreSQL,
statement by statement on SQLite) follow one field map (app/engine/fields.py).

The property: for a generated run (with steps) and a generated Transition that sets
any mix of fields, the run re-read after `Store.apply` equals
`apply_transition(snapshot, transition)`, field by field, on both databases.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from secrets import token_hex
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, insert, select, update

from app.engine.actions import HumanRequest, NewEvent, StepUpdate, Transition
from app.engine.apply import apply_transition
from app.engine.fields import NOT_RUN_COLUMNS, RUN_WRITES, STEP_KEY, STEP_WRITES
from app.engine.models import (
    ACTIVE_STATUSES,
    ErrorClass,
    EventKind,
    PauseKind,
    PlannedStep,
    RunConfig,
    RunSnapshot,
    RunStatus,
    Step,
    StepStatus,
)
from app.store import hot
from app.store import transition as transition_sql
from app.store.migrate import upgrade
from app.store.repo import Guard, Store, make_engine, snapshot_from_row
from app.store.schema import events, runs, steps
from tests.support.private_services import PrivatePostgres

# --- the map covers every field, and the statements write what it says ---------------


def test_every_transition_field_is_in_the_map():
    assert {w.field for w in RUN_WRITES} | set(NOT_RUN_COLUMNS) == set(Transition.model_fields)
    assert not {w.field for w in RUN_WRITES} & set(NOT_RUN_COLUMNS)
    step_names = {name for w in STEP_WRITES for name in w.param_names}
    assert step_names | {STEP_KEY} == set(StepUpdate.model_fields)


def test_the_map_names_real_columns_and_snapshot_fields():
    for w in RUN_WRITES:
        assert w.column in runs.c
        assert w.in_snapshot == (w.column in RunSnapshot.model_fields), w
    for w in STEP_WRITES:
        assert w.column in steps.c and w.column in Step.model_fields, w


def test_the_statements_set_the_mapped_columns():
    mapped = {w.column for w in STEP_WRITES} | {"updated_at"}
    assert set(_set_columns(hot.SAVE_STEP)) == mapped
    assert set(_set_columns(hot.SAVE_RUN)) >= {w.column for w in RUN_WRITES}
    assert set(transition_sql.APPLY_STEP_SET) == mapped - {"updated_at"}
    params = {name for w in STEP_WRITES for name in w.param_names} | {STEP_KEY}
    assert set(transition_sql.apply_step_params([])) == {"s_" + name for name in params}


def _set_columns(statement: Any) -> list[str]:
    return [getattr(key, "key", key) for key in statement._values]


# --- generated runs and transitions --------------------------------------------------

# What the databases can hold: no NUL, no lone surrogates (the service rejects them
# before they reach the store), numbers JSON and jsonb both return as given.
TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=8)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(-1e15, 1e15, allow_nan=False, allow_infinity=False)
    | TEXT
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)
JSON_DICTS = st.dictionaries(TEXT, JSON_VALUES, max_size=3)
HASHES = st.text("0123456789abcdef", min_size=1, max_size=64)
CONTEXT = st.dictionaries(TEXT, TEXT, max_size=3)
STEP_STATUSES = st.sampled_from(StepStatus)
ERROR_CLASSES = st.sampled_from(ErrorClass)


@dataclass
class Case:
    run: dict[str, Any]  # the runs columns the map writes, as stored before
    steps: list[dict[str, Any]]  # the steps, as stored before
    claim: bool  # written by a worker claiming the run, rather than unguarded
    transition: Transition


@st.composite
def stored_steps(draw: st.DrawFn, plan_version: int) -> list[dict[str, Any]]:
    count = draw(st.integers(0, 4))
    return [
        {
            "plan_version": draw(st.integers(0, plan_version)),
            "position": position,
            "description": draw(TEXT),
            "tool": draw(st.sampled_from(["noop", "deploy", "flaky"])),
            "args": draw(JSON_DICTS),
            "status": draw(STEP_STATUSES),
            "attempts": draw(st.integers(0, 5)),
            "result": draw(JSON_VALUES),
            "error": draw(st.none() | TEXT),
            "error_class": draw(st.none() | ERROR_CLASSES),
            "approved_args_hash": draw(st.none() | HASHES),
            "idempotency_key": f"key-{position}",
            "context_updates": draw(st.none() | CONTEXT),
        }
        for position in range(1, count + 1)
    ]


@st.composite
def step_updates(draw: st.DrawFn, step_ids: list[int]) -> list[StepUpdate]:
    # Each step at most once (a transition never updates one step twice), and now and
    # then a step of no run: nothing is written for it.
    chosen = draw(st.lists(st.sampled_from([*step_ids, 0]), unique=True, max_size=4))
    return [
        StepUpdate(
            step_id=step_id,
            status=draw(st.none() | STEP_STATUSES),
            attempts=draw(st.none() | st.integers(0, 10)),
            result=draw(JSON_VALUES),
            set_result=draw(st.booleans()),
            error=draw(st.none() | TEXT),
            set_error=draw(st.booleans()),
            error_class=draw(st.none() | ERROR_CLASSES),
            args=draw(st.none() | JSON_DICTS),
            approved_args_hash=draw(st.none() | HASHES),
            context_updates=draw(st.none() | CONTEXT),
        )
        for step_id in chosen
    ]


@st.composite
def transitions(draw: st.DrawFn, step_ids: list[int]) -> Transition:
    new_plan_version = draw(st.none() | st.integers(1, 5))
    new_steps = (
        []
        if new_plan_version is None
        else draw(
            st.lists(
                st.builds(
                    PlannedStep,
                    description=st.text("abc xyz", min_size=1, max_size=10),
                    tool=st.sampled_from(["noop", "deploy"]),
                    args=JSON_DICTS,
                ),
                max_size=3,
            )
        )
    )
    return Transition(
        status=draw(st.none() | st.sampled_from(RunStatus)),
        step_updates=draw(step_updates(step_ids)),
        new_plan_version=new_plan_version,
        new_steps=new_steps,
        carried_approvals=draw(st.dictionaries(st.integers(0, 3), HASHES, max_size=2)),
        replans_delta=draw(st.integers(-2, 3)),
        planner_failures=draw(st.none() | st.integers(0, 5)),
        context_updates=draw(CONTEXT),
        events=draw(
            st.lists(
                st.builds(NewEvent, kind=st.sampled_from(EventKind), message=TEXT, data=JSON_DICTS),
                max_size=2,
            )
        ),
        human_request=draw(
            st.none()
            | st.builds(
                HumanRequest,
                step_id=st.sampled_from([*step_ids, 0]),
                kind=st.sampled_from(PauseKind),
                reason=TEXT,
                args_hash=HASHES,
            )
        ),
        report=draw(st.none() | TEXT),
        error=draw(st.none() | TEXT),
        tokens_delta=draw(st.integers(0, 10**6)),
        cost_delta=draw(st.floats(0, 10, allow_nan=False)),
    )


@st.composite
def cases(draw: st.DrawFn) -> Case:
    claim = draw(st.booleans())
    plan_version = draw(st.integers(0, 3))
    run = {
        "status": draw(st.sampled_from(ACTIVE_STATUSES if claim else tuple(RunStatus))),
        "plan_version": plan_version,
        "replans": draw(st.integers(0, 5)),
        "planner_failures": draw(st.integers(0, 5)),
        "context": draw(CONTEXT),
        "tokens_total": draw(st.integers(0, 10**12)),
        "cost_usd": draw(st.floats(0, 1000, allow_nan=False)),
        "report": draw(st.none() | TEXT),
        "error": draw(st.none() | TEXT),
    }
    stored = draw(stored_steps(plan_version))
    # Step ids are the database's; the transition names them by index, resolved later.
    placeholders = [-(i + 1) for i in range(len(stored))]
    return Case(run, stored, claim, draw(transitions(placeholders)))


# --- the property ---------------------------------------------------------------------

NOW = datetime(2025, 1, 1, 12, tzinfo=UTC)


def store_case(store: Store, case: Case) -> tuple[str, dict[int, int]]:
    """The case's run and steps written as rows; returns the run id and the step ids
    by placeholder."""
    run_id = token_hex(8)
    with store.transaction() as tx:
        tx.insert_run(
            run_id=run_id,
            task="t",
            planner="offline",
            config=RunConfig(),
            deadline=NOW + timedelta(hours=1),
            now=NOW,
            created_by=None,
        )
        tx.conn.execute(update(runs).where(runs.c.id == run_id).values(**case.run))
        ids = {}
        for i, row in enumerate(case.steps):
            ids[-(i + 1)] = tx.conn.execute(
                insert(steps)
                .values(run_id=run_id, created_at=NOW, updated_at=NOW, **row)
                .returning(steps.c.id)
            ).scalar_one()
    return run_id, ids


def with_ids(t: Transition, ids: dict[int, int]) -> Transition:
    def real(step_id: int) -> int:
        return ids.get(step_id, step_id)

    updates = [u.model_copy(update={"step_id": real(u.step_id)}) for u in t.step_updates]
    request = t.human_request
    if request is not None:
        request = request.model_copy(update={"step_id": real(request.step_id)})
    return t.model_copy(update={"step_updates": updates, "human_request": request})


def read_back(store: Store, run_id: str, *, claimed: bool = False) -> tuple[RunSnapshot, Any]:
    """The run as stored (or as a claim of it leaves it) with all its steps, and its row."""
    with store.transaction() as tx:
        stored = tx.read_for_claim(run_id)
        assert stored is not None
        snapshot = snapshot_from_row(stored.row, tx.all_steps(run_id), claimed=claimed)
        return snapshot, tx.get_run(run_id)


def check(store: Store, case: Case) -> None:
    run_id, ids = store_case(store, case)
    t = with_ids(case.transition, ids)
    before, before_row = read_back(store, run_id, claimed=case.claim)
    guard = Guard()
    if case.claim:
        with store.transaction() as tx:
            seen = tx.read_for_claim(run_id)
            assert seen is not None
            guard = Guard.claim("worker-1", seen.row)
    event("claim" if case.claim else "unguarded")
    event(f"{len(t.step_updates)} step updates, {len(t.new_steps)} new steps")

    tick = store.apply(before, t, guard=guard, now=NOW, next_run_at=None)
    assert tick is not None, "the guard held, so the transition was written"

    expected = apply_transition(before, t)
    actual, row = read_back(store, run_id)
    assert actual.steps[: len(before.steps)] == expected.steps[: len(before.steps)]
    for name in RunSnapshot.model_fields:
        if name != "steps":
            assert getattr(actual, name) == getattr(expected, name), name
    # New steps: the ids are the database's; every other field as in memory.
    new_actual = actual.steps[len(before.steps) :]
    new_expected = expected.steps[len(before.steps) :]
    assert len(new_actual) == len(new_expected)
    for got, want in zip(new_actual, new_expected, strict=True):
        assert got.model_dump(exclude={"id"}) == want.model_dump(exclude={"id"})
        assert got.id not in {s.id for s in before.steps}
    # The columns a RunSnapshot does not hold, by the same map.
    for w in RUN_WRITES:
        if not w.in_snapshot:
            want_value = w.new_value(t, getattr(before_row, w.column))
            assert getattr(row, w.column) == want_value, w.column
    # Derived and guard columns, written by hand.
    terminal = t.status is not None and t.status.is_terminal
    assert row.finished_at == (NOW if terminal else before_row.finished_at)
    assert row.lease_owner is None and row.lease_expires_at is None
    with store.transaction() as tx:
        logged = tx.conn.execute(
            select(func.count()).select_from(events).where(events.c.run_id == run_id)
        ).scalar_one()
    assert logged == len(t.events)


PROPERTY = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def pg_store(private_postgres: PrivatePostgres) -> Iterator[Store]:
    """A database of its own: the runs and approvals this test makes up (in any state,
    approvals of steps that do not exist) must not reach other tests' sweeps and
    expiries through the session's shared database."""
    private_postgres.ensure_running()
    store = Store(make_engine(private_postgres.create_database()))
    yield store
    store.dispose()


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    url = f"sqlite:///{tmp_path_factory.mktemp('transition') / 'agentloop.db'}"
    upgrade(url)
    store = Store(make_engine(url))
    yield store
    store.dispose()


@PROPERTY
@given(case=cases())
def test_postgresql_writes_a_transition_as_applied_in_memory(pg_store: Store, case: Case):
    check(pg_store, case)


@PROPERTY
@given(case=cases())
def test_sqlite_writes_a_transition_as_applied_in_memory(sqlite_store: Store, case: Case):
    check(sqlite_store, case)


def test_sqlite_path_is_the_one_tested(sqlite_store: Store, store: Store):
    assert sqlite_store.engine.dialect.name == "sqlite"
    assert store.engine.dialect.name == "postgresql"
