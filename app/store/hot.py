"""The statements every iteration runs, built once with bound parameters.

Building a SQLAlchemy statement costs more Python time than running it on a
loopback database, so the hot path uses fixed-shape statements: a value that a
transition leaves alone is passed as NULL and kept by COALESCE / CASE.

On PostgreSQL an iteration is three statements: READ_FOR_CLAIM, then APPLY
twice (claiming the run and marking the step begun; saving the outcome). APPLY
writes a transition's run changes, its one step update (an iteration's
transitions have at most one) and its events at once; events travel as a JSON
array, so it keeps one shape whatever their number. Both are prepared once per
connection (see Prepared), so PostgreSQL does not parse and plan them again on
every iteration. SQLite, and PostgreSQL for a transition that updates several
steps (a re-plan, in a transaction anyway), run the same changes statement by
statement (READ_RUN, DECISION_STEPS, SAVE_RUN, SAVE_STEP, INSERT_EVENTS).

Each reaches the rows it writes through a unique key, so it costs the same at
iteration 5,000 as at 10 whatever the planner believes about the tables (with
autovacuum off it has no statistics at all): a step is updated by its primary
key alone, never joined against the run's steps, which PostgreSQL would read in
full to build a hash table.

The columns a transition's own fields write (SAVE_RUN's, SAVE_STEP's and APPLY's
step update) are generated from one field map (app/engine/fields.py, compiled by
app/store/transition.py), the map app/engine/apply.py follows in memory. The guard,
claim, lease, tick and timestamp columns are no transition field: written here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    ColumnElement,
    Integer,
    Select,
    String,
    Text,
    and_,
    bindparam,
    case,
    column,
    exists,
    func,
    insert,
    literal_column,
    null,
    or_,
    select,
    text,
    true,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.sql.selectable import CompoundSelect, TextualSelect

from app.engine.models import ACTIVE_STATUSES, RunSnapshot, RunStatus, Step, StepStatus
from app.store import transition
from app.store.schema import UTCDateTime, events, runs, steps

NOW = bindparam("p_now", type_=UTCDateTime())


def one_of(column: ColumnElement[Any], values: Iterable[object]) -> ColumnElement[bool]:
    """`column IN (values)` spelt as ORs: SQLAlchemy expands an IN list anew at every
    execution, and a statement prepared once cannot be."""
    return or_(*(column == value for value in values))


def same(column: ColumnElement[Any], value: Any) -> ColumnElement[bool]:
    """`column = value` for a NOT NULL column, spelt so that it is no index condition.

    A hot write reaches its row by the primary key alone, and checks the rest on that
    row. Were `steps.run_id = :run` or `runs.status = 'running'` an index condition,
    a planner without statistics (autovacuum off: none are ever gathered) may well
    take that index instead: every step of the run, or every running run, read to
    write one row."""
    return column.is_not_distinct_from(value)


STEP_COLUMNS = [steps.c[name] for name in Step.model_fields]


def decision_steps(run_id: Any, plan_version: Any) -> CompoundSelect[Any]:
    """The steps of a plan that `decide` looks at: every running, failed or rejected
    one and the first two pending ones — a handful, however long the plan is, ordered
    by position. (The second pending one tells whether the first is the plan's last:
    the iteration after it verifies, and its message goes to the planner's queue.)

    Each is reached through (run_id, status) or the primary key, so the query reads
    only those: the plan's own index would read the whole plan, step by step, and so
    the plan version is compared with `same`, which no index can take."""

    def nth_pending(offset: int) -> Any:
        pending = steps.alias(f"pending_{offset + 1}")
        return (
            select(pending.c.id)
            .where(
                pending.c.run_id == run_id,
                pending.c.status == StepStatus.PENDING,
                same(pending.c.plan_version, plan_version),
            )
            .order_by(pending.c.position)
            .offset(offset)
            .limit(1)
            .correlate_except(pending)  # run_id may come from an enclosing query
            .scalar_subquery()
        )

    with_status = [
        select(*STEP_COLUMNS).where(
            steps.c.run_id == run_id,
            steps.c.status == status,
            same(steps.c.plan_version, plan_version),
        )
        for status in (StepStatus.RUNNING, StepStatus.FAILED, StepStatus.REJECTED)
    ]
    pending = [select(*STEP_COLUMNS).where(steps.c.id == nth_pending(n)) for n in (0, 1)]
    found = union_all(*with_status, *pending)
    return found.order_by(found.selected_columns.position)


DECISION_STEPS = decision_steps(
    bindparam("p_run_id", type_=String()), bindparam("p_plan_version", type_=Integer())
)

# What a claim reads: what a RunSnapshot holds, what the iteration needs besides,
# and the lease and due time the claim is conditional on. Only these: fewer columns
# are less for PostgreSQL to send and for Python to convert.
CLAIM_COLUMNS = [
    runs.c[name]
    for name in [
        *RunSnapshot.model_fields,
        *("planner", "memory_summary", "summarized_through"),
        *("lease_owner", "lease_expires_at", "next_run_at"),
    ]
    if name != "steps"
]
READ_RUN = select(*CLAIM_COLUMNS).where(runs.c.id == bindparam("p_id", type_=String()))

# PostgreSQL: the run and the steps it decides on, in one statement (one snapshot).
_step = decision_steps(runs.c.id, runs.c.plan_version).lateral("step")
STEP_PREFIX = "step_"
READ_FOR_CLAIM = (
    select(*CLAIM_COLUMNS, *[column.label(STEP_PREFIX + column.name) for column in _step.c])
    .select_from(runs.outerjoin(_step, true()))
    .where(runs.c.id == bindparam("p_id", type_=String()))
    .order_by(_step.c.position)
)

_RELEASE = bindparam("p_release", type_=Boolean())
_OWNER = bindparam("g_owner", type_=String())
_TICK = bindparam("g_tick", type_=Integer())
_STATUS = bindparam("g_status", type_=String())
_CLAIM = bindparam("g_claim", type_=Boolean())
_CLAIMANT = bindparam("p_claimant", type_=String())

SAVE_RUN = (
    update(runs)
    .where(
        runs.c.id == bindparam("p_id", type_=String()),
        # The guard: the lease holder's iteration, or a decision on a paused run...
        or_(
            _OWNER.is_(None),
            and_(runs.c.lease_owner == _OWNER, same(runs.c.status, RunStatus.RUNNING)),
        ),
        or_(_TICK.is_(None), runs.c.tick == _TICK),
        or_(_STATUS.is_(None), same(runs.c.status, _STATUS)),
        # ... or a claim: the run is still as the claimant read it (same tick, same
        # lapsed or absent lease holder), active, due, and not leased to anyone alive.
        or_(
            _CLAIM.is_not(True),
            and_(
                or_(*(same(runs.c.status, status) for status in ACTIVE_STATUSES)),
                runs.c.lease_owner.is_not_distinct_from(bindparam("g_seen_owner", type_=String())),
                or_(runs.c.lease_expires_at.is_(None), runs.c.lease_expires_at < NOW),
                or_(runs.c.next_run_at.is_(None), runs.c.next_run_at <= NOW),
            ),
        ),
    )
    .values(
        updated_at=NOW,
        iteration=runs.c.iteration + case((_CLAIM, 1), else_=0),
        started_at=func.coalesce(runs.c.started_at, case((_CLAIM, NOW), else_=null())),
        next_run_at=bindparam("p_next_run_at", type_=UTCDateTime()),
        # What the transition itself changes: generated from its field map (a claim
        # passes RUNNING for a status the transition leaves alone: Tx._run_params).
        **transition.RUN_SET,
        # Derived from it, or the guard's and the lease's: written here.
        finished_at=func.coalesce(
            bindparam("p_finished_at", type_=UTCDateTime()), runs.c.finished_at
        ),
        lease_owner=case((_RELEASE, null()), else_=func.coalesce(_CLAIMANT, runs.c.lease_owner)),
        # NULL when the lease is released, else the (possibly extended) expiry.
        lease_expires_at=bindparam("p_lease_until", type_=UTCDateTime()),
        tick=runs.c.tick + bindparam("p_tick_delta", type_=Integer()),
        # A claim consumes the sweep's nudge: the run may be nudged again when overdue.
        nudged_at=case((_CLAIM, null()), else_=runs.c.nudged_at),
    )
    .returning(runs.c.tick)
)

SAVE_STEP = (
    update(steps)
    .where(
        steps.c.id == bindparam("p_step_id", type_=BigInteger()),
        same(steps.c.run_id, bindparam("p_run_id", type_=String())),
    )
    .values(
        updated_at=NOW,
        **transition.STEP_SET,  # generated from the transition's field map
    )
)

INSERT_EVENTS = insert(events)


def _json_rows(name: str, *columns: Any) -> Any:
    """`jsonb_to_recordset(:name) AS name(columns...)`: a JSON array as rows."""
    rows = func.jsonb_to_recordset(bindparam(name, type_=JSONB()))
    return rows.table_valued(*columns).render_derived(name, with_types=True)


_saved = SAVE_RUN.cte("saved_run")
_new_events = _json_rows(
    "p_events",
    column("step_id", BigInteger()),
    column("kind", String()),
    column("message", Text()),
    column("data", JSONB()),
)
_saved_step = (
    update(steps)
    .where(
        # NULL when the transition updates no step: then no row matches.
        steps.c.id == bindparam(transition.APPLY_STEP_KEY, type_=BigInteger()),
        same(steps.c.run_id, bindparam("p_id", type_=String())),
        exists(select(_saved.c.tick)),  # only when the run's guard held
    )
    .values(
        updated_at=NOW,
        # The same SET clauses as SAVE_STEP's, with parameters named apart from the run's.
        **transition.APPLY_STEP_SET,
    )
    .cte("saved_step")
)
_logged = (
    insert(events)
    .from_select(
        ["run_id", "iteration", "step_id", "kind", "message", "data", "created_at"],
        select(
            bindparam("p_id", type_=String()),
            bindparam("p_iteration", type_=Integer()),
            _new_events.c.step_id,
            _new_events.c.kind,
            _new_events.c.message,
            _new_events.c.data,
            NOW,
        ).select_from(_saved.join(_new_events, true())),
    )
    .cte("logged_events")
)
# The transaction may commit without waiting for its WAL flush ('off'): see Tx.apply.
_commit_mode = func.set_config(
    literal_column("'synchronous_commit'"),
    bindparam("p_synchronous_commit", type_=String()),
    true(),
)
APPLY = select(_saved.c.tick, _commit_mode.label("synchronous_commit")).add_cte(
    _saved_step, _logged
)


# --- prepared once per PostgreSQL connection ---------------------------------------

# Numbered parameters with their types cast, as PREPARE needs them. Only the compiler
# is used: no psycopg (3) is imported.
_NUMBERED = PGDialect_psycopg(paramstyle="numeric_dollar")  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class Prepared:
    """A hot statement that PostgreSQL parses and plans once per connection.

    Parsing and planning these statements took longer than running them; `run`
    (EXECUTE name(...)) keeps the statement's parameter and column types, so values
    go in and come out exactly as with the statement itself.
    """

    name: str
    prepare: str
    run: TextualSelect
    constants: dict[str, Any]  # values the statement binds itself (status literals)


def prepared(name: str, statement: Select[Any]) -> Prepared:
    compiled = statement.compile(dialect=_NUMBERED)
    order = compiled.positiontup or []
    run = (
        text(f"EXECUTE {name}({', '.join(':' + key for key in order)})")
        .bindparams(*(bindparam(key, type_=compiled.binds[key].type) for key in order))
        .columns(*statement.selected_columns)
    )
    constants = {key: value for key, value in compiled.params.items() if value is not None}
    return Prepared(name, f"PREPARE {name} AS {compiled}", run, constants)


PREPARED_READ = prepared("agentloop_read_for_claim", READ_FOR_CLAIM)
PREPARED_APPLY = prepared("agentloop_apply", APPLY)


# --- a planner iteration's new steps (Tx._insert_steps) --------------------------------


def last_position(run_id: Any) -> Select[Any]:
    """The run's last step position (0 before its first plan), as the greatest of the
    last position in each status: one entry at the end of each (run_id, status) range
    of ix_steps_run_status_position, not every step the run ever had."""
    last_by_status = union_all(
        *(
            select(
                select(steps.c.position)
                .where(steps.c.run_id == run_id, steps.c.status == status)
                .order_by(steps.c.position.desc())
                .limit(1)
                .subquery()
            )
            for status in StepStatus
        )
    ).subquery()
    # 0 as SQL text: a bound parameter here would be both one of Prepared.run's
    # parameters and part of the result column it declares, which SQLAlchemy refuses.
    none = literal_column("0", Integer())
    return select(func.coalesce(func.max(last_by_status.c.position), none).label("position"))


LAST_POSITION = last_position(bindparam("p_run_id", type_=String()))
INSERT_STEPS = insert(steps)  # SQLite: the rows as parameter sets

# PostgreSQL: a plan's new steps as one JSON array (the columns new_step_columns
# gives), one statement whatever their number: as parameter sets, SQLAlchemy and
# psycopg2 spent more time on a 50-step plan's 650 values than PostgreSQL did.
NEW_STEP_FIELDS = (
    column("plan_version", Integer()),
    column("position", Integer()),
    column("description", Text()),
    column("tool", String()),
    column("args", JSONB()),
    column("status", String()),
    column("attempts", Integer()),
    column("approved_args_hash", String()),
    column("idempotency_key", String()),
)
_new_steps = _json_rows("p_steps", *NEW_STEP_FIELDS)
_inserted_steps = (
    insert(steps)
    .from_select(
        ["run_id", *(c.name for c in NEW_STEP_FIELDS), "created_at", "updated_at"],
        select(
            bindparam("p_run_id", type_=String()),
            *(_new_steps.c[c.name] for c in NEW_STEP_FIELDS),
            NOW,
            NOW,
        ),
    )
    .returning(steps.c.id)
    .cte("inserted_steps")
)
# A SELECT (what `prepared` takes), the INSERT its WITH clause: it returns how many.
INSERT_NEW_STEPS = select(func.count()).select_from(_inserted_steps)
# Planning the last position's six-way UNION cost PostgreSQL more than running it.
PREPARED_LAST_POSITION = prepared("agentloop_last_position", LAST_POSITION)
PREPARED_INSERT_STEPS = prepared("agentloop_insert_steps", INSERT_NEW_STEPS)
