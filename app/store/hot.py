"""The statements every iteration runs, built once with bound parameters.

Building a SQLAlchemy statement costs more Python time than running it on a
loopback database, so the hot path (claim, load the open steps, save the run,
save a step, append events) uses fixed-shape statements: a value that a
transition leaves alone is passed as NULL and kept by COALESCE / CASE.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    Integer,
    String,
    Text,
    and_,
    bindparam,
    case,
    func,
    insert,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB

from app.engine.models import ACTIVE_STATUSES, RunStatus, StepStatus
from app.store.schema import UTCDateTime, events, runs, steps

# None must mean SQL NULL here (keep the column), not the JSON value null.
JsonOrNull = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")

OPEN_STEP_STATUSES = (
    StepStatus.PENDING,
    StepStatus.RUNNING,
    StepStatus.FAILED,
    StepStatus.REJECTED,
)


NOW = bindparam("p_now", type_=UTCDateTime())

CLAIM = (
    update(runs)
    .where(
        runs.c.id == bindparam("p_id", type_=String()),
        runs.c.tick == bindparam("p_tick", type_=Integer()),
        runs.c.status.in_(ACTIVE_STATUSES),
        or_(runs.c.lease_expires_at.is_(None), runs.c.lease_expires_at < NOW),
        or_(runs.c.next_run_at.is_(None), runs.c.next_run_at <= NOW),
    )
    .values(
        tick=runs.c.tick + 1,
        iteration=runs.c.iteration + 1,
        status=RunStatus.RUNNING,
        lease_owner=bindparam("p_owner", type_=String()),
        lease_expires_at=bindparam("p_lease_until", type_=UTCDateTime()),
        started_at=func.coalesce(runs.c.started_at, NOW),
        updated_at=NOW,
    )
    .returning(*runs.c)
)

OPEN_STEPS = (
    select(steps)
    .where(
        steps.c.run_id == bindparam("p_run_id", type_=String()),
        steps.c.plan_version == bindparam("p_plan_version", type_=Integer()),
        steps.c.status.in_(OPEN_STEP_STATUSES),
    )
    .order_by(steps.c.position)
)

_RELEASE = bindparam("p_release", type_=Boolean())
_OWNER = bindparam("g_owner", type_=String())
_TICK = bindparam("g_tick", type_=Integer())
_STATUS = bindparam("g_status", type_=String())

SAVE_RUN = (
    update(runs)
    .where(
        runs.c.id == bindparam("p_id", type_=String()),
        # The guard: the lease holder's iteration, or a decision on a paused run.
        or_(
            _OWNER.is_(None), and_(runs.c.lease_owner == _OWNER, runs.c.status == RunStatus.RUNNING)
        ),
        or_(_TICK.is_(None), runs.c.tick == _TICK),
        or_(_STATUS.is_(None), runs.c.status == _STATUS),
    )
    .values(
        updated_at=NOW,
        next_run_at=bindparam("p_next_run_at", type_=UTCDateTime()),
        status=func.coalesce(bindparam("p_status", type_=String()), runs.c.status),
        finished_at=func.coalesce(
            bindparam("p_finished_at", type_=UTCDateTime()), runs.c.finished_at
        ),
        plan_version=func.coalesce(
            bindparam("p_plan_version", type_=Integer()), runs.c.plan_version
        ),
        replans=runs.c.replans + bindparam("p_replans_delta", type_=Integer()),
        planner_failures=func.coalesce(
            bindparam("p_planner_failures", type_=Integer()), runs.c.planner_failures
        ),
        context=func.coalesce(bindparam("p_context", type_=JsonOrNull), runs.c.context),
        tokens_total=runs.c.tokens_total + bindparam("p_tokens_delta", type_=BigInteger()),
        cost_usd=runs.c.cost_usd + bindparam("p_cost_delta", type_=Float()),
        report=func.coalesce(bindparam("p_report", type_=Text()), runs.c.report),
        error=func.coalesce(bindparam("p_error", type_=Text()), runs.c.error),
        lease_owner=case((_RELEASE, null()), else_=runs.c.lease_owner),
        # NULL when the lease is released, else the (possibly extended) expiry.
        lease_expires_at=bindparam("p_lease_until", type_=UTCDateTime()),
        tick=runs.c.tick + bindparam("p_tick_delta", type_=Integer()),
    )
    .returning(runs.c.tick)
)

SAVE_STEP = (
    update(steps)
    .where(
        steps.c.id == bindparam("p_step_id", type_=BigInteger()),
        steps.c.run_id == bindparam("p_run_id", type_=String()),
    )
    .values(
        updated_at=NOW,
        status=func.coalesce(bindparam("p_status", type_=String()), steps.c.status),
        attempts=func.coalesce(bindparam("p_attempts", type_=Integer()), steps.c.attempts),
        error_class=func.coalesce(bindparam("p_error_class", type_=String()), steps.c.error_class),
        args=func.coalesce(bindparam("p_args", type_=JsonOrNull), steps.c.args),
        approved_args_hash=func.coalesce(
            bindparam("p_approved_args_hash", type_=String()), steps.c.approved_args_hash
        ),
        result=case(
            (bindparam("p_set_result", type_=Boolean()), bindparam("p_result", type_=JsonOrNull)),
            else_=steps.c.result,
        ),
        error=case(
            (bindparam("p_set_error", type_=Boolean()), bindparam("p_error", type_=Text())),
            else_=steps.c.error,
        ),
    )
)

INSERT_EVENTS = insert(events)
