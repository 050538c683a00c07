"""Table definitions. JSONB on PostgreSQL, JSON on SQLite; timestamps are UTC.

The schema itself is created by Alembic migrations (app/store/migrations);
these Table objects are what the queries in app/store/repo.py are written against.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect

metadata = MetaData()

Json = JSON().with_variant(JSONB(), "postgresql")
# SQLite only autoincrements an INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use UTC-aware datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        result: datetime = value
        return result.replace(tzinfo=UTC) if result.tzinfo is None else result.astimezone(UTC)


runs = Table(
    "runs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("task", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("planner", String(40), nullable=False),
    Column("config", Json, nullable=False),
    Column("context", Json, nullable=False),
    Column("iteration", Integer, nullable=False, default=0),
    Column("tick", Integer, nullable=False, default=0),
    Column("plan_version", Integer, nullable=False, default=0),
    Column("replans", Integer, nullable=False, default=0),
    Column("planner_failures", Integer, nullable=False, default=0),
    Column("lease_owner", String(120)),
    Column("lease_expires_at", UTCDateTime),
    Column("next_run_at", UTCDateTime),
    Column("deadline", UTCDateTime, nullable=False),
    Column("tokens_total", BigInteger, nullable=False, default=0),
    Column("cost_usd", Float, nullable=False, default=0.0),
    Column("memory_summary", Text, nullable=False, default=""),
    Column("summarized_through", BigInteger, nullable=False, default=0),
    Column("report", Text),
    Column("error", Text),
    Column("created_by", String(120)),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    # When the sweep last published a nudge; a claim clears it (migration 0003).
    Column("nudged_at", UTCDateTime),
    # The creator's key for a create request, scoped by creator, and a hash of the
    # request it came with: a retried create returns the run it made (migration 0003).
    Column("idempotency_key", String(300)),
    Column("request_hash", String(64)),
    # Lineage of a fork: the run it was forked from and the step number (as the run
    # page shows it) its history was kept through (migration 0005). No foreign key:
    # a fork outlives a pruned parent and imports without it.
    Column("parent_run_id", String(32)),
    Column("forked_from_step", Integer),
    # Who ended a run by a decision (rejected, cancelled) and why, in their words
    # (migration 0007). A decision is not an error: `error` stays empty then.
    Column("ended_by", String(120)),
    Column("end_reason", Text),
    # No column an iteration writes is in an index, so its updates are HOT (0006):
    # next_run_at, leases, nudged_at, tick and counters stay out of every index.
    Index("ix_runs_status_created_at", "status", "created_at"),
    Index("ix_runs_created_at", "created_at"),
    Index("ux_runs_idempotency_key", "idempotency_key", unique=True),
    Index("ix_runs_parent_run_id", "parent_run_id"),
)

steps = Table(
    "steps",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("run_id", String(32), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("plan_version", Integer, nullable=False),
    Column("position", Integer, nullable=False),
    Column("description", Text, nullable=False),
    Column("tool", String(100), nullable=False),
    Column("args", Json, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("result", Json),
    Column("error", Text),
    Column("error_class", String(20)),
    Column("approved_args_hash", String(64)),
    Column("idempotency_key", String(100), nullable=False),
    # What the step set in the run context when it completed; the context is the
    # merge of these in step order, which a fork replays up to its step (0005).
    Column("context_updates", Json),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Index("ix_steps_run_plan", "run_id", "plan_version", "position"),
    Index("ix_steps_run_status_position", "run_id", "status", "position"),
)

events = Table(
    "events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("run_id", String(32), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("iteration", Integer, nullable=False),
    Column("step_id", BigInteger),
    Column("kind", String(20), nullable=False),
    Column("message", Text, nullable=False),
    Column("data", Json, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Index("ix_events_run_id_id", "run_id", "id"),
)

approvals = Table(
    "approvals",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("run_id", String(32), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("step_id", BigInteger, nullable=False),
    Column("kind", String(20), nullable=False),
    Column("status", String(16), nullable=False),  # pending | decided | expired | cancelled
    Column("reason", Text, nullable=False),
    Column("args_hash", String(64), nullable=False),
    Column("expires_at", UTCDateTime),
    Column("decision", String(16)),
    Column("decided_by", String(120)),
    Column("decided_at", UTCDateTime),
    Column("comment", Text),
    Column("edited_args", Json),
    Column("created_at", UTCDateTime, nullable=False),
    Index("ix_approvals_run_status", "run_id", "status"),
)

# --- people (app/store/accounts.py); created by migration 0002 ----------------------

users = Table(
    "users",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("name", String(80), nullable=False, unique=True),
    Column("email", String(254)),
    Column("password_hash", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    # viewer | operator | approver | admin (migration 0004).
    Column("role", String(16), nullable=False, server_default="operator"),
    Column("disabled_at", UTCDateTime),
    # In every session cookie; bumped to end every session signed in before.
    Column("session_version", Integer, nullable=False, server_default="1"),
)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    # Only a SHA-256 of the token is kept: a leaked table grants nothing.
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("label", String(120), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("last_used_at", UTCDateTime),
)

# Who changed whom: roles, passwords, tokens, accounts (migration 0004). Decisions
# and cancels are in each run's own timeline, with who made them.
audit_log = Table(
    "audit_log",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("actor", String(120), nullable=False),
    Column("action", String(40), nullable=False),
    Column("subject", String(120), nullable=False),
    Column("detail", Json, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Index("ix_audit_log_subject", "subject", "id"),
)
