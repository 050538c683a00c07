"""Every SQL statement agentloop runs, and its transaction boundaries.

Concurrency rests on three conditional UPDATEs, portable to SQLite:
- claim: a worker reads the run, decides, and writes the first step of its
  iteration only if the run is still as read: the message's tick, the same
  lease holder (none, or one whose lease lapsed), active and due. The claim
  bumps the tick, so a duplicate message is stale. "Still as read" holds because
  every other write to an active run comes from the lease holder or bumps the
  tick itself.
- save: an iteration's result is written only while its lease is held.
- decide: an approval row leaves `pending` exactly once.
"""

from __future__ import annotations

import logging
import select as select_module
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from secrets import token_hex
from typing import Any

from sqlalchemy import (
    URL,
    BigInteger,
    ColumnElement,
    Connection,
    Engine,
    Executable,
    Integer,
    Result,
    Row,
    Select,
    String,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)

from app.engine.actions import HumanRequest, NewEvent, StepUpdate, Transition
from app.engine.fields import new_step_columns
from app.engine.models import (
    ACTIVE_STATUSES,
    RunConfig,
    RunSnapshot,
    RunStatus,
    Step,
    StepStatus,
)
from app.errors import NotFound
from app.store import hot
from app.store import transition as transition_sql
from app.store.records import ApprovalRecord, EventRecord, RunRecord
from app.store.schema import approvals, events, runs, steps

log = logging.getLogger(__name__)


class StoreUnavailable(Exception):
    """The database cannot be reached; the message names the URL and what to do."""


def database_away(exc: DBAPIError) -> bool:
    """Whether `exc` means the database could not be reached or dropped the
    connection (worth waiting for), rather than refusing a statement."""
    return isinstance(exc, OperationalError | InterfaceError) or exc.connection_invalidated


def make_engine(url: str) -> Engine:
    """An Engine for `url`; SQLite gets WAL and a busy timeout so a worker and a
    reader (the demo, the web app) can share the file."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return _postgresql_engine(url)


def _postgresql_engine(url: str | URL, **options: Any) -> Engine:
    engine = create_engine(url, pool_size=5, max_overflow=5, pool_recycle=3600, **options)
    event.listen(engine, "checkout", _replace_if_closed_by_server)
    return engine


def _replace_if_closed_by_server(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """A pooled connection that a database restart (or pg_terminate_backend) closed is
    replaced before use, instead of failing the first statement after the restart.

    An idle connection receives nothing; a server that ends it sends its last words
    or closes the socket, either of which leaves the socket readable. Looking costs
    no round trip (SQLAlchemy's pool_pre_ping costs one per checkout: three per
    iteration). Anything unexpected waiting means the same: take a new connection.
    """
    if dbapi_connection.closed or _readable(dbapi_connection.fileno()):
        raise DisconnectionError("the database closed this pooled connection")


def _readable(fd: int) -> bool:
    poller = select_module.poll()
    poller.register(fd, select_module.POLLIN | select_module.POLLERR | select_module.POLLHUP)
    return bool(poller.poll(0))


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class DatabaseClock:
    """The database server's time, for every decision about ownership (leases, due
    times, nudges): workers whose own clocks disagree still agree on who holds a run.

    Read from the server once per `resync` seconds and carried forward in between
    with this process's monotonic clock (which no clock step or skew moves), so it
    costs no round trip per call. If a resync fails, the last reading carries on.
    """

    def __init__(self, store: Store, *, resync: float = 60.0) -> None:
        self._store = store
        self._resync = resync
        self._base: datetime | None = None
        self._at = 0.0  # monotonic time of the reading

    def __call__(self) -> datetime:
        if self._base is None or time.monotonic() - self._at > self._resync:
            self._read()
        assert self._base is not None
        return self._base + timedelta(seconds=time.monotonic() - self._at)

    def _read(self) -> None:
        before = time.monotonic()
        try:
            server = self._store.database_now()
        except SQLAlchemyError:
            if self._base is None:
                raise
            log.warning("cannot read the database's clock; carrying the last reading on")
            return
        after = time.monotonic()
        self._base, self._at = server, (before + after) / 2


@dataclass(frozen=True)
class StoredRun:
    """A run as a claim reads it: its row, and the steps `decide` needs
    (see hot.decision_steps)."""

    row: Row[Any]
    steps: list[Step]

    def as_claimed(self) -> RunSnapshot:
        """The snapshot as a claim of this run leaves it (see hot.SAVE_RUN)."""
        return snapshot_from_row(self.row, self.steps, claimed=True)


@dataclass(frozen=True)
class Guard:
    """The condition under which a transition may be written to a run."""

    owner: str | None = None  # the lease holder, for a worker's iteration
    tick: int | None = None
    status: RunStatus | None = None  # for decisions on a paused run
    # A claim: `claimant` takes the lease if the run is still at `tick` with the
    # lease holder it was read with (`seen_owner`: none, or one whose lease lapsed).
    claimant: str | None = None
    seen_owner: str | None = None

    @classmethod
    def claim(cls, claimant: str, seen: Row[Any]) -> Guard:
        return cls(tick=seen.tick, claimant=claimant, seen_owner=seen.lease_owner)


class Store:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # On PostgreSQL, a lone statement runs on a connection in autocommit mode: no
        # BEGIN and COMMIT round trips. Those connections have a pool of their own, as
        # switching a pooled connection's mode and back costs a round trip each time.
        self._autocommit_engine = (
            _postgresql_engine(engine.url, isolation_level="AUTOCOMMIT")
            if engine.dialect.name == "postgresql"
            else None
        )

    @property
    def engines(self) -> list[Engine]:
        """Every engine statements go through (to listen to them all)."""
        return [e for e in (self.engine, self._autocommit_engine) if e is not None]

    def dispose(self) -> None:
        """Close every pooled connection (new ones are opened on demand)."""
        for engine in self.engines:
            engine.dispose()

    def check(self, shown_url: str) -> None:
        """Raise StoreUnavailable unless the database answers and has the schema."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
                conn.execute(select(runs.c.id).limit(1))
        except SQLAlchemyError as exc:
            cause = getattr(exc, "orig", None) or exc
            reason = (str(cause).strip().splitlines() or [type(exc).__name__])[0]
            raise StoreUnavailable(
                f"cannot use the database at {shown_url}: {reason}. Start it, set "
                "DATABASE_URL, or run `agentloop db upgrade` to create the schema."
            ) from None

    def database_now(self) -> datetime:
        """The database server's clock (SQLite: this machine's, it is the same one)."""
        if self.engine.dialect.name != "postgresql":
            return datetime.now(UTC)
        with self._autocommit() as tx:
            value = tx.conn.execute(select(func.clock_timestamp())).scalar_one()
        moment: datetime = value
        return moment.astimezone(UTC)

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        with self.engine.begin() as conn:
            yield Tx(conn)

    @contextmanager
    def snapshot(self) -> Iterator[Tx]:
        """A read-only transaction whose statements all see the same moment. Under
        READ COMMITTED each statement sees its own: a view read as a pause commits
        showed the run still running beside the approval that pause made."""
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
            yield Tx(conn)

    def apply(
        self,
        run: RunSnapshot,
        transition: Transition,
        *,
        guard: Guard,
        now: datetime,
        next_run_at: datetime | None,
        lease_until: datetime | None = None,
        durable: bool = True,
    ) -> int | None:
        """Tx.apply in a transaction of its own. On PostgreSQL a transition that one
        statement writes runs as that statement alone, in autocommit mode: it is
        atomic by itself, and the BEGIN and COMMIT round trips are saved."""
        alone = (
            not transition.new_steps
            and transition.human_request is None
            and len(transition.step_updates) <= 1  # else written statement by statement
        )
        with self._autocommit() if alone else self.transaction() as tx:
            return tx.apply(
                run,
                transition,
                guard=guard,
                now=now,
                next_run_at=next_run_at,
                lease_until=lease_until,
                durable=durable,
            )

    def read_for_claim(self, run_id: str) -> StoredRun | None:
        with self._autocommit() as tx:
            return tx.read_for_claim(run_id)

    @contextmanager
    def _autocommit(self) -> Iterator[Tx]:
        """Each statement its own transaction, on PostgreSQL; SQLite writes a transition
        statement by statement, so it keeps a transaction."""
        if self._autocommit_engine is None:
            with self.transaction() as tx:
                yield tx
            return
        with self._autocommit_engine.connect() as conn:
            yield Tx(conn)


class Tx:
    """One open transaction. Methods are the statements; the caller commits by leaving."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    # --- runs -----------------------------------------------------------------------

    def insert_run(
        self,
        *,
        run_id: str,
        task: str,
        planner: str,
        config: RunConfig,
        deadline: datetime,
        now: datetime,
        created_by: str | None,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
    ) -> None:
        self.conn.execute(
            insert(runs).values(
                idempotency_key=idempotency_key,
                request_hash=request_hash,
                id=run_id,
                task=task,
                status=RunStatus.QUEUED,
                planner=planner,
                config=config.model_dump(mode="json"),
                context={},
                iteration=0,
                tick=0,
                plan_version=0,
                replans=0,
                planner_failures=0,
                deadline=deadline,
                next_run_at=now,
                tokens_total=0,
                cost_usd=0.0,
                memory_summary="",
                summarized_through=0,
                created_by=created_by,
                created_at=now,
                updated_at=now,
            )
        )

    def read_for_claim(self, run_id: str) -> StoredRun | None:
        """The run and the steps `decide` needs, from one snapshot; None if no such run."""
        params = {"p_id": run_id}
        if self.conn.dialect.name != "postgresql":
            row = self.conn.execute(hot.READ_RUN, params).first()
            if row is None:
                return None
            plan = self.conn.execute(
                hot.DECISION_STEPS, {"p_run_id": run_id, "p_plan_version": row.plan_version}
            )
            return StoredRun(row, [step_from_row(r) for r in plan])
        rows = self._run_prepared(hot.PREPARED_READ, params).all()
        if not rows:
            return None
        prefix = hot.STEP_PREFIX
        return StoredRun(rows[0], [step_from_row(r, prefix) for r in rows if r.step_id is not None])

    def _run_prepared(self, statement: hot.Prepared, params: dict[str, Any]) -> Result[Any]:
        """Run a hot statement, preparing it first on a connection that has not yet.
        (A prepared statement belongs to the session: a rollback keeps it.)"""
        done = self.conn.connection.info.setdefault("agentloop_prepared", set())
        if statement.name not in done:
            self.conn.exec_driver_sql(statement.prepare)
            done.add(statement.name)
        return self.conn.execute(statement.run, {**statement.constants, **params})

    def lock_run(self, run_id: str) -> RunRecord:
        """The run, locked until the transaction ends. Every transaction that writes
        to a run and its approvals or steps locks the run row first: one lock order,
        no deadlocks. (SQLite has one writer at a time; FOR UPDATE is left out there.)"""
        row = self.conn.execute(select(runs).where(runs.c.id == run_id).with_for_update()).first()
        if row is None:
            raise NotFound(f"no run with id {run_id!r}")
        return RunRecord.of(row)

    def run_by_idempotency_key(self, key: str) -> RunRecord | None:
        row = self.conn.execute(select(runs).where(runs.c.idempotency_key == key)).first()
        return None if row is None else RunRecord.of(row)

    def get_run(self, run_id: str) -> RunRecord:
        row = self.conn.execute(select(runs).where(runs.c.id == run_id)).first()
        if row is None:
            raise NotFound(f"no run with id {run_id!r}")
        return RunRecord.of(row)

    def count_runs(self, *, status: str | None = None) -> int:
        query = select(func.count()).select_from(runs)
        if status:
            query = query.where(runs.c.status == status)
        return int(self.conn.execute(query).scalar_one())

    def count_nudged(self, *, before: datetime, now: datetime) -> int:
        """Overdue, unleased active runs with a nudge outstanding (see claim_nudges)."""
        return int(
            self.conn.execute(
                select(func.count())
                .select_from(runs)
                .where(*_overdue(before, now), runs.c.nudged_at.is_not(None))
            ).scalar_one()
        )

    def claim_nudges(
        self, *, before: datetime, renudge_before: datetime, now: datetime, limit: int = 500
    ) -> list[Row[Any]]:
        """Claim a nudge for each active, unleased run that should have been advanced
        before `before` (its message was lost: a broker restart, a crash between commit
        and publish) and has no nudge outstanding: none since its last claim, or one
        sent before `renudge_before` (that nudge was lost too). Returns (id, tick) of
        each; two sweeps never claim the same run."""
        overdue = (
            select(runs.c.id)
            .where(
                *_overdue(before, now),
                or_(runs.c.nudged_at.is_(None), runs.c.nudged_at < renudge_before),
            )
            .order_by(runs.c.next_run_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return list(
            self.conn.execute(
                update(runs)
                .where(runs.c.id.in_(overdue))
                .values(nudged_at=now)
                .returning(runs.c.id, runs.c.tick)
            )
        )

    def apply(
        self,
        run: RunSnapshot,
        transition: Transition,
        *,
        guard: Guard,
        now: datetime,
        next_run_at: datetime | None,
        lease_until: datetime | None = None,
        durable: bool = True,
    ) -> int | None:
        """Write `transition`; returns the run's tick, or None (nothing written) when
        the guard no longer holds — the lease was lost or the run changed state.

        `durable=False` lets PostgreSQL acknowledge the commit before its WAL is on
        disk (synchronous_commit off, for this transaction only): a crash of the
        database server itself within a fraction of a second can then lose it, which
        is fine only for writes whose loss means the same work is simply done again.
        """
        params = self._run_params(run, transition, guard, now, next_run_at, lease_until)
        if self.conn.dialect.name == "postgresql" and len(transition.step_updates) <= 1:
            params["p_synchronous_commit"] = "on" if durable else "off"
            tick = self._apply_in_one_statement(run, transition, params)
        else:
            tick = self._apply_statement_by_statement(run, transition, params, now)
        if tick is None:
            return None
        if transition.new_steps:
            self._insert_steps(run, transition, now)
        if transition.human_request is not None:
            self.open_approval(run.id, transition.human_request, now)
        return tick

    def _apply_in_one_statement(
        self, run: RunSnapshot, t: Transition, params: dict[str, Any]
    ) -> int | None:
        tick = self._run_prepared(
            hot.PREPARED_APPLY,
            {
                **params,
                "p_iteration": run.iteration,
                **transition_sql.apply_step_params(t.step_updates),
                "p_events": [e.model_dump() for e in t.events],
            },
        ).scalar()
        return None if tick is None else int(tick)

    def _apply_statement_by_statement(
        self, run: RunSnapshot, t: Transition, params: dict[str, Any], now: datetime
    ) -> int | None:
        tick = self.conn.execute(hot.SAVE_RUN, params).scalar_one_or_none()
        if tick is None:
            return None
        for step_update in t.step_updates:
            self._update_step(run.id, step_update, now)
        self.insert_events(run.id, run.iteration, t.events, now)
        return int(tick)

    @staticmethod
    def _run_params(
        run: RunSnapshot,
        t: Transition,
        guard: Guard,
        now: datetime,
        next_run_at: datetime | None,
        lease_until: datetime | None,
    ) -> dict[str, Any]:
        """SAVE_RUN's parameters: what `t` changes on the run, under `guard`."""
        resuming = t.status is RunStatus.RUNNING and guard.status is RunStatus.PAUSED
        claiming = guard.claimant is not None
        return {
            "p_id": run.id,
            "g_owner": guard.owner,
            "g_tick": guard.tick,
            "g_status": guard.status,
            "g_claim": claiming,
            "g_seen_owner": guard.seen_owner,
            "p_claimant": guard.claimant,
            "p_now": now,
            "p_next_run_at": next_run_at,
            # What `t` changes, by its field map; a claim sets a run running unless `t`
            # says otherwise (as StoredRun.as_claimed does in memory).
            **transition_sql.run_params(run, t),
            "p_status": t.status or (RunStatus.RUNNING if claiming else None),
            "p_finished_at": now if t.status is not None and t.status.is_terminal else None,
            "p_release": lease_until is None,
            "p_lease_until": lease_until,
            # A claim, or resuming a paused run: a new tick makes any message still in
            # flight stale.
            "p_tick_delta": 1 if claiming or resuming else 0,
        }

    def set_status(
        self,
        run_id: str,
        status: RunStatus,
        *,
        error: str | None,
        now: datetime,
        only_from: Sequence[RunStatus],
        ended_by: str | None = None,
        end_reason: str | None = None,
    ) -> int | None:
        """Force a status (cancel, internal failure); returns the new tick or None.
        A cancel says who (`ended_by`) and, if they gave one, why (`end_reason`)."""
        values: dict[str, Any] = {
            "status": status,
            "tick": runs.c.tick + 1,
            "updated_at": now,
            "lease_owner": None,
            "lease_expires_at": None,
        }
        if status.is_terminal:
            values["finished_at"] = now
        if error is not None:
            values["error"] = error
        if ended_by is not None:
            values["ended_by"] = ended_by
        if end_reason is not None:
            values["end_reason"] = end_reason
        tick = self.conn.execute(
            update(runs)
            .where(runs.c.id == run_id, runs.c.status.in_(only_from))
            .values(**values)
            .returning(runs.c.tick)
        ).scalar_one_or_none()
        return None if tick is None else int(tick)

    def record_spending(
        self,
        run_id: str,
        iteration: int,
        spent: Transition,
        notes: Sequence[NewEvent],
        now: datetime,
    ) -> None:
        """Add what a discarded iteration spent (tokens, cost) and its notes to the run,
        whoever advances it now. Deliberately unguarded: an increment commutes with
        every other write, and a budget must never undercount."""
        if spent.tokens_delta or spent.cost_delta:
            self.conn.execute(
                update(runs)
                .where(runs.c.id == run_id)
                .values(
                    tokens_total=runs.c.tokens_total + spent.tokens_delta,
                    cost_usd=runs.c.cost_usd + spent.cost_delta,
                )
            )
        self.insert_events(run_id, iteration, [*spent.events, *notes], now)

    def save_memory_summary(self, run_id: str, summary: str, through: int) -> None:
        self.conn.execute(
            update(runs)
            .where(runs.c.id == run_id)
            .values(memory_summary=summary, summarized_through=through)
        )

    # --- steps ----------------------------------------------------------------------

    def plan_steps(self, run_id: str, plan_version: int) -> list[Step]:
        rows = self.conn.execute(PLAN_STEPS, {"p_run_id": run_id, "p_plan_version": plan_version})
        return [step_from_row(row) for row in rows]

    def all_steps(self, run_id: str) -> list[Step]:
        rows = self.conn.execute(ALL_STEPS, {"p_run_id": run_id})
        return [step_from_row(row) for row in rows]

    def completed_and_rejected_steps(
        self, run_id: str, *, completed: int, rejected: int
    ) -> tuple[list[Step], list[Step]]:
        """The latest `completed` completed steps and the latest `rejected` steps a
        person rejected, each oldest first: one statement."""
        params = {"p_run_id": run_id, "p_completed": completed, "p_rejected": rejected}
        rows = (
            self._run_prepared(PREPARED_COMPLETED_AND_REJECTED, params)
            if self.conn.dialect.name == "postgresql"
            else self.conn.execute(COMPLETED_AND_REJECTED, params)
        )
        found: dict[str, list[Step]] = {StepStatus.COMPLETED: [], StepStatus.REJECTED: []}
        for row in rows:
            found[row.status].append(step_from_row(row))
        return found[StepStatus.COMPLETED], found[StepStatus.REJECTED]

    def step_results(self, run_id: str, positions: set[int]) -> dict[int, Any]:
        """Results of the run's completed steps at `positions`, by position."""
        rows = self.conn.execute(
            STEP_RESULTS, {"p_run_id": run_id, "p_positions": sorted(positions)}
        )
        return {row.position: row.result for row in rows}

    def get_step(self, step_id: int) -> Step:
        row = self.conn.execute(select(*hot.STEP_COLUMNS).where(steps.c.id == step_id)).first()
        if row is None:
            raise NotFound(f"no step with id {step_id}")
        return step_from_row(row)

    def _update_step(self, run_id: str, u: StepUpdate, now: datetime) -> None:
        self.conn.execute(
            hot.SAVE_STEP,
            {
                "p_step_id": u.step_id,
                "p_run_id": run_id,
                "p_now": now,
                **transition_sql.step_params(u),
            },
        )

    def _insert_steps(self, run: RunSnapshot, t: Transition, now: datetime) -> None:
        assert t.new_plan_version is not None
        on_postgresql = self.conn.dialect.name == "postgresql"
        last = (
            self._run_prepared(hot.PREPARED_LAST_POSITION, {"p_run_id": run.id})
            if on_postgresql
            else self.conn.execute(hot.LAST_POSITION, {"p_run_id": run.id})
        ).scalar_one()
        new = [
            new_step_columns(
                run.id, t.new_plan_version, last + i, planned, t.carried_approvals.get(i - 1)
            )
            for i, planned in enumerate(t.new_steps, 1)
        ]
        if on_postgresql:
            params = {"p_run_id": run.id, "p_now": now, "p_steps": new}
            self._run_prepared(hot.PREPARED_INSERT_STEPS, params)
            return
        rows = [{"run_id": run.id, **n, "created_at": now, "updated_at": now} for n in new]
        self.conn.execute(hot.INSERT_STEPS, rows)

    # --- events ---------------------------------------------------------------------

    def insert_events(
        self, run_id: str, iteration: int, new_events: Sequence[NewEvent], now: datetime
    ) -> None:
        if not new_events:
            return
        self.conn.execute(
            hot.INSERT_EVENTS,
            [
                {
                    "run_id": run_id,
                    "iteration": iteration,
                    "step_id": e.step_id,
                    "kind": e.kind,
                    "message": e.message,
                    "data": e.data,
                    "created_at": now,
                }
                for e in new_events
            ],
        )

    def events_after(self, run_id: str, after_id: int = 0, limit: int = 500) -> list[EventRecord]:
        return self._events(
            EVENTS_AFTER, {"p_run_id": run_id, "p_after_id": after_id, "p_limit": limit}
        )

    def recent_events(self, run_id: str, limit: int, *, after_id: int = 0) -> list[EventRecord]:
        """The run's last `limit` events (of those after `after_id`), oldest first.
        `after_id` bounds what is read whatever plan PostgreSQL picks: without
        statistics it may read every event of the run to sort them."""
        newest_first = self._events(
            RECENT_EVENTS, {"p_run_id": run_id, "p_after_id": after_id, "p_limit": limit}
        )
        return list(reversed(newest_first))

    def recent_events_with_positions(
        self, run_id: str, limit: int, *, after_id: int
    ) -> list[tuple[EventRecord, int | None]]:
        """recent_events, each with its step's position (None without one), looked up
        by the step's primary key row by row: joined, or as `id IN (...)`, a planner
        without statistics may read every step to find them."""
        params = {"p_run_id": run_id, "p_after_id": after_id, "p_limit": limit}
        rows = self.conn.execute(RECENT_EVENTS_WITH_POSITIONS, params).all()
        return [(EventRecord.of(row), row.step_position) for row in reversed(rows)]

    def events_between(
        self, run_id: str, *, after_id: int, before_id: int, limit: int
    ) -> list[EventRecord]:
        return self._events(
            EVENTS_BETWEEN,
            {
                "p_run_id": run_id,
                "p_after_id": after_id,
                "p_before_id": before_id,
                "p_limit": limit,
            },
        )

    def _events(self, query: Executable, params: dict[str, Any] | None = None) -> list[EventRecord]:
        return [EventRecord.of(row) for row in self.conn.execute(query, params)]

    # --- approvals ------------------------------------------------------------------

    def open_approval(self, run_id: str, request: HumanRequest, now: datetime) -> None:
        self.conn.execute(
            insert(approvals).values(
                id=token_hex(16),
                run_id=run_id,
                step_id=request.step_id,
                kind=request.kind,
                status="pending",
                reason=request.reason,
                args_hash=request.args_hash,
                created_at=now,
            )
        )

    def pending_approval(self, run_id: str) -> ApprovalRecord | None:
        return _approval(
            self.conn.execute(
                select(approvals).where(
                    approvals.c.run_id == run_id, approvals.c.status == "pending"
                )
            ).first()
        )

    def get_approval(self, approval_id: str) -> ApprovalRecord | None:
        return _approval(
            self.conn.execute(select(approvals).where(approvals.c.id == approval_id)).first()
        )

    def decide_approval(
        self,
        approval_id: str,
        *,
        decision: str,
        by: str,
        comment: str,
        edited_args: dict[str, Any] | None,
        now: datetime,
    ) -> ApprovalRecord | None:
        """Move a pending approval to decided, exactly once; None if it was not pending."""
        found = self.conn.execute(
            update(approvals)
            .where(approvals.c.id == approval_id, approvals.c.status == "pending")
            .values(
                status="decided",
                decision=decision,
                decided_by=by,
                decided_at=now,
                comment=comment,
                edited_args=edited_args,
            )
            .returning(*approvals.c)
        ).first()
        return _approval(found)

    def close_approvals(self, run_id: str, status: str) -> None:
        self.conn.execute(
            update(approvals)
            .where(approvals.c.run_id == run_id, approvals.c.status == "pending")
            .values(status=status)
        )

    def overdue_approvals(
        self, *, kind: str, opened_before: datetime, now: datetime, limit: int = 100
    ) -> list[ApprovalRecord]:
        """Pending approvals of `kind` past their own expires_at, or, without one,
        opened before `opened_before` (the configured time to live)."""
        rows = self.conn.execute(
            select(approvals)
            .where(
                approvals.c.status == "pending",
                approvals.c.kind == kind,
                or_(
                    approvals.c.expires_at < now,
                    approvals.c.expires_at.is_(None) & (approvals.c.created_at < opened_before),
                ),
            )
            .order_by(approvals.c.created_at)
            .limit(limit)
        )
        return [ApprovalRecord.of(row) for row in rows]

    def expire_approval(self, approval_id: str, *, now: datetime) -> ApprovalRecord | None:
        """Move a pending approval to expired, exactly once; None if it was not pending."""
        return _approval(
            self.conn.execute(
                update(approvals)
                .where(approvals.c.id == approval_id, approvals.c.status == "pending")
                .values(status="expired", decided_at=now)
                .returning(*approvals.c)
            ).first()
        )

    # --- retention, search, export and import (app/service/retention.py, export.py) ---

    def find_runs(
        self,
        *,
        status: str | None = None,
        since: datetime | None = None,
        search: str | None = None,
        created_by: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[RunRecord]:
        """Newest first: runs with `status`, created at or after `since`, whose task
        contains `search` (case-insensitive, taken literally), started by `created_by`."""
        query = (
            select(runs)
            .where(*_run_filters(since=since, search=search, created_by=created_by))
            .order_by(runs.c.created_at.desc(), runs.c.id)
            .limit(limit)
            .offset(offset)
        )
        if status:
            query = query.where(runs.c.status == status)
        return [RunRecord.of(row) for row in self.conn.execute(query)]

    def count_by_status(
        self,
        *,
        since: datetime | None = None,
        search: str | None = None,
        created_by: str | None = None,
    ) -> dict[str, int]:
        """How many runs find_runs would find with each status (the other filters
        applied), in one GROUP BY; statuses without runs are absent."""
        query = (
            select(runs.c.status, func.count())
            .where(*_run_filters(since=since, search=search, created_by=created_by))
            .group_by(runs.c.status)
        )
        return {str(status): int(n) for status, n in self.conn.execute(query)}

    def overdue_runs(self, *, before: datetime, now: datetime, limit: int) -> list[RunRecord]:
        """Active runs no live worker holds that were due before `before`, longest
        waiting first (app/stall.py tells which of them mean no worker)."""
        query = (
            select(runs)
            .where(*_overdue(before, now))
            .order_by(runs.c.next_run_at.asc().nulls_first(), runs.c.id)
            .limit(limit)
        )
        return [RunRecord.of(row) for row in self.conn.execute(query)]

    def prunable_runs(
        self, *, statuses: Sequence[str], finished_before: datetime, limit: int | None = None
    ) -> list[RunRecord]:
        """Runs with one of `statuses` that finished before `finished_before`, oldest first
        (a finished run without finished_at counts from its last update)."""
        finished = func.coalesce(runs.c.finished_at, runs.c.updated_at)
        query = (
            select(runs)
            .where(runs.c.status.in_(statuses), finished < finished_before)
            .order_by(finished, runs.c.id)
            .limit(limit)
        )
        return [RunRecord.of(row) for row in self.conn.execute(query)]

    def count_run_children(self, run_ids: Sequence[str]) -> dict[str, int]:
        """How many steps, events and approvals the runs `run_ids` have."""
        counts = {}
        for name, table in (("steps", steps), ("events", events), ("approvals", approvals)):
            counts[name] = (
                int(
                    self.conn.execute(
                        select(func.count())
                        .select_from(table)
                        .where(table.c.run_id.in_(list(run_ids)))
                    ).scalar_one()
                )
                if run_ids
                else 0
            )
        return counts

    def delete_finished_runs(
        self, run_ids: Sequence[str], *, statuses: Sequence[str], finished_before: datetime
    ) -> list[str]:
        """Delete those of `run_ids` that still have one of `statuses` and finished before
        `finished_before` (checked again here, so a run resumed meanwhile stays); their
        steps, events and approvals go with them (ON DELETE CASCADE). Returns the ids."""
        if not run_ids:
            return []
        from sqlalchemy import delete

        finished = func.coalesce(runs.c.finished_at, runs.c.updated_at)
        gone = self.conn.execute(
            delete(runs)
            .where(
                runs.c.id.in_(list(run_ids)),
                runs.c.status.in_(statuses),
                finished < finished_before,
            )
            .returning(runs.c.id)
        )
        return [row.id for row in gone]

    def step_rows(self, run_id: str) -> list[dict[str, Any]]:
        """Every step of the run, every column, in plan order."""
        rows = self.conn.execute(
            select(steps).where(steps.c.run_id == run_id).order_by(steps.c.position, steps.c.id)
        )
        return [dict(row._mapping) for row in rows]

    def all_events(self, run_id: str) -> list[EventRecord]:
        return self._events(select(events).where(events.c.run_id == run_id).order_by(events.c.id))

    def run_approvals(self, run_id: str) -> list[ApprovalRecord]:
        rows = self.conn.execute(
            select(approvals)
            .where(approvals.c.run_id == run_id)
            .order_by(approvals.c.created_at, approvals.c.step_id, approvals.c.id)
        )
        return [ApprovalRecord.of(row) for row in rows]

    def insert_run_row(self, values: dict[str, Any]) -> None:
        """A run as given, column by column (an import)."""
        self.conn.execute(insert(runs).values(**values))

    def insert_step_row(self, values: dict[str, Any]) -> int:
        """A step as given, column by column (an import); returns its new id."""
        return int(
            self.conn.execute(insert(steps).values(**values).returning(steps.c.id)).scalar_one()
        )

    def insert_event_rows(self, rows: Sequence[dict[str, Any]]) -> None:
        """Events as given, in order (an import, a fork's copy of its history): one
        batched statement, not a round trip per event."""
        if rows:
            self.conn.execute(insert(events), list(rows))

    def insert_approval_rows(self, rows: Sequence[dict[str, Any]]) -> None:
        """Approvals as given (an import)."""
        for row in rows:
            self.conn.execute(insert(approvals).values(**row))

    # --- the run page's bounded reads (a page costs the same at event 50 as at 5,000) --

    def events_before(self, run_id: str, before_id: int, limit: int) -> list[EventRecord]:
        """The `limit` events just before `before_id`, oldest first."""
        newest_first = self._events(
            select(events)
            .where(events.c.run_id == run_id, events.c.id < before_id)
            .order_by(events.c.id.desc())
            .limit(limit)
        )
        return list(reversed(newest_first))

    def events_of_kind(self, run_id: str, kind: str, limit: int) -> list[EventRecord]:
        """The run's last `limit` events of one kind, oldest first (its plans, say)."""
        newest_first = self._events(
            select(events)
            .where(events.c.run_id == run_id, events.c.kind == kind)
            .order_by(events.c.id.desc())
            .limit(limit)
        )
        return list(reversed(newest_first))

    def recent_step_events(self, run_id: str, per_step: int) -> list[EventRecord]:
        """Each step's last `per_step` events, in the order they happened."""
        newest = func.row_number().over(partition_by=events.c.step_id, order_by=events.c.id.desc())
        ranked = (
            select(events, newest.label("newest"))
            .where(events.c.run_id == run_id, events.c.step_id.is_not(None))
            .subquery()
        )
        columns = [ranked.c[column.name] for column in events.c]
        return self._events(
            select(*columns).where(ranked.c.newest <= per_step).order_by(ranked.c.id)
        )

    # --- lineage: forks (app/service/fork.py) ---------------------------------------

    def forks_of(self, run_id: str, *, limit: int = 100) -> list[RunRecord]:
        """The runs forked from `run_id`, oldest first."""
        rows = self.conn.execute(
            select(runs)
            .where(runs.c.parent_run_id == run_id)
            .order_by(runs.c.created_at, runs.c.id)
            .limit(limit)
        )
        return [RunRecord.of(row) for row in rows]

    def events_through(self, run_id: str, last_id: int) -> list[EventRecord]:
        """The run's events up to and including `last_id`, in order."""
        return self._events(
            select(events)
            .where(events.c.run_id == run_id, events.c.id <= last_id)
            .order_by(events.c.id)
        )

    def last_event_of_step(self, run_id: str, step_id: int) -> int | None:
        """The id of the newest event about the step; None when it has none."""
        found = self.conn.execute(
            select(func.max(events.c.id)).where(
                events.c.run_id == run_id, events.c.step_id == step_id
            )
        ).scalar_one()
        return None if found is None else int(found)


# --- a planner iteration's statements (and their kin), built once --------------------
# Building a statement costs more Python time than running it (see app/store/hot.py):
# these are built at import, with bound parameters.

_RUN_ID = bindparam("p_run_id", type_=String())
_LIMIT = bindparam("p_limit", type_=Integer())
_AFTER_ID = bindparam("p_after_id", type_=BigInteger())

PLAN_STEPS = (
    select(*hot.STEP_COLUMNS)
    .where(
        steps.c.run_id == _RUN_ID,
        steps.c.plan_version == bindparam("p_plan_version", type_=Integer()),
    )
    .order_by(steps.c.position)
)
ALL_STEPS = select(*hot.STEP_COLUMNS).where(steps.c.run_id == _RUN_ID).order_by(steps.c.position)


def _latest_steps(status: StepStatus, how_many: str) -> Select[Any]:
    """The run's latest steps with `status` (as many as parameter `how_many` says),
    read backwards through the end of their (run_id, status) range of the index."""
    latest = (
        select(*hot.STEP_COLUMNS)
        .where(steps.c.run_id == _RUN_ID, steps.c.status == status)
        .order_by(steps.c.position.desc())
        .limit(bindparam(how_many, type_=Integer()))
        .subquery()
    )
    return select(latest)


_either = union_all(
    _latest_steps(StepStatus.COMPLETED, "p_completed"),
    _latest_steps(StepStatus.REJECTED, "p_rejected"),
).subquery()
COMPLETED_AND_REJECTED = select(_either).order_by(_either.c.position)
# Planning the UNION cost PostgreSQL more than running it (and than two statements).
PREPARED_COMPLETED_AND_REJECTED = hot.prepared(
    "agentloop_completed_and_rejected", COMPLETED_AND_REJECTED
)

STEP_RESULTS = select(steps.c.position, steps.c.result).where(
    steps.c.run_id == _RUN_ID,
    steps.c.position.in_(bindparam("p_positions", expanding=True)),
    steps.c.status == StepStatus.COMPLETED,
)

_EVENTS_OF_RUN = select(events).where(events.c.run_id == _RUN_ID, events.c.id > _AFTER_ID)
EVENTS_AFTER = _EVENTS_OF_RUN.order_by(events.c.id).limit(_LIMIT)
RECENT_EVENTS = _EVENTS_OF_RUN.order_by(events.c.id.desc()).limit(_LIMIT)
_step_position = select(steps.c.position).where(steps.c.id == events.c.step_id).scalar_subquery()
RECENT_EVENTS_WITH_POSITIONS = RECENT_EVENTS.add_columns(_step_position.label("step_position"))
EVENTS_BETWEEN = (
    _EVENTS_OF_RUN.where(events.c.id < bindparam("p_before_id", type_=BigInteger()))
    .order_by(events.c.id)
    .limit(_LIMIT)
)


def _approval(row: Row[Any] | None) -> ApprovalRecord | None:
    return None if row is None else ApprovalRecord.of(row)


def _run_filters(
    *, since: datetime | None, search: str | None, created_by: str | None
) -> list[ColumnElement[bool]]:
    """The runs list's and `agentloop runs`'s filters other than the status."""
    found: list[ColumnElement[bool]] = []
    if since is not None:
        found.append(runs.c.created_at >= since)
    if search:
        found.append(runs.c.task.icontains(search, autoescape=True))
    if created_by:
        found.append(runs.c.created_by == created_by)
    return found


def _overdue(before: datetime, now: datetime) -> list[ColumnElement[bool]]:
    """Active runs that no live worker holds and that were due before `before`."""
    return [
        runs.c.status.in_(ACTIVE_STATUSES),
        or_(runs.c.lease_expires_at.is_(None), runs.c.lease_expires_at < now),
        or_(runs.c.next_run_at.is_(None), runs.c.next_run_at < before),
    ]


def step_from_row(row: Row[Any], prefix: str = "") -> Step:
    """A Step from a steps row, or from a joined row whose step columns are prefixed."""
    values = row._mapping
    return Step.model_validate({field: values[prefix + field] for field in Step.model_fields})


def snapshot_from_row(
    row: Row[Any] | RunRecord, plan: list[Step], *, claimed: bool = False
) -> RunSnapshot:
    """The run as stored, or (`claimed`) as a claim of it leaves it: the claim bumps
    the tick and the iteration and sets the run running."""
    bump = 1 if claimed else 0
    return RunSnapshot(
        id=row.id,
        task=row.task,
        status=RunStatus.RUNNING if claimed else RunStatus(row.status),
        config=RunConfig.from_stored(row.config),
        iteration=row.iteration + bump,
        tick=row.tick + bump,
        plan_version=row.plan_version,
        replans=row.replans,
        planner_failures=row.planner_failures,
        context=row.context or {},
        deadline=row.deadline,
        tokens_total=row.tokens_total,
        cost_usd=row.cost_usd,
        steps=plan,
    )
