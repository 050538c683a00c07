"""The transition field map (app/engine/fields.py) compiled into SQL.

`set_values` turns the map into an UPDATE's SET clauses, reading the values from
bound parameters: `p_<field>` (SAVE_RUN and SAVE_STEP, app/store/hot.py), or
`s_<field>` for the step update of PostgreSQL's one-statement APPLY, whose run
fields already take the `p_` names. The parameters for them come from the same map
(`run_params`, `step_params`, `apply_step_params`), so the in-memory apply, the
PostgreSQL statement and the SQLite statements cannot drift apart. The statements
are built once, at import.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    ColumnElement,
    String,
    Table,
    Text,
    bindparam,
    case,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeEngine

from app.engine.actions import StepUpdate, Transition
from app.engine.fields import RUN_WRITES, STEP_WRITES, How, Write
from app.engine.models import RunSnapshot
from app.store.schema import runs, steps

# None must mean SQL NULL here (keep the column), not the JSON value null.
JsonOrNull = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")

PARAM_PREFIX = "p_"
APPLY_STEP_PREFIX = "s_"
APPLY_STEP_KEY = APPLY_STEP_PREFIX + "step_id"  # which step APPLY updates (NULL: none)


def value_type(table: Table, write: Write) -> TypeEngine[Any]:
    """The type a value for `write` travels as: the column's, unsized (a cast to
    VARCHAR(16) would silently truncate), JSON keeping None as SQL NULL."""
    column_type = table.c[write.column].type
    if isinstance(column_type, JSON):
        return JsonOrNull
    if isinstance(column_type, Text):
        return Text()
    if isinstance(column_type, String):
        return String()
    return type(column_type)()


def set_values(
    table: Table,
    writes: Sequence[Write],
    value: Callable[[str, TypeEngine[Any]], ColumnElement[Any]],
) -> dict[str, ColumnElement[Any]]:
    """SET clauses for `writes`: `value(name, type)` is where the statement reads the
    parameter `name` (a field or a flag, see Write.params)."""
    clauses: dict[str, ColumnElement[Any]] = {}
    for w in writes:
        target = table.c[w.column]
        given = value(w.field, value_type(table, w))
        if w.how is How.ADD:
            clauses[w.column] = target + given
        elif w.how is How.FLAGGED:
            clauses[w.column] = case((value(str(w.flag), Boolean()), given), else_=target)
        else:  # REPLACE, and MERGE (given the merged value, see Write.params)
            clauses[w.column] = func.coalesce(given, target)
    return clauses


def bound(prefix: str) -> Callable[[str, TypeEngine[Any]], ColumnElement[Any]]:
    """Values from the bound parameters `<prefix><name>`."""
    return lambda name, type_: bindparam(prefix + name, type_=type_)


RUN_SET = set_values(runs, RUN_WRITES, bound(PARAM_PREFIX))
STEP_SET = set_values(steps, STEP_WRITES, bound(PARAM_PREFIX))
APPLY_STEP_SET = set_values(steps, STEP_WRITES, bound(APPLY_STEP_PREFIX))


def _params(writes: Sequence[Write], source: Any, old: Any = None) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for w in writes:
        before = getattr(old, w.column) if old is not None and w.in_snapshot else None
        values.update(w.params(source, before))
    return values


def run_params(run: RunSnapshot, t: Transition) -> dict[str, Any]:
    """RUN_SET's parameters for `t` written over `run` (as read under the guard)."""
    return {PARAM_PREFIX + k: v for k, v in _params(RUN_WRITES, t, run).items()}


def step_params(u: StepUpdate) -> dict[str, Any]:
    """STEP_SET's parameters for `u`."""
    return {PARAM_PREFIX + k: v for k, v in _params(STEP_WRITES, u).items()}


def apply_step_params(updates: Sequence[StepUpdate]) -> dict[str, Any]:
    """APPLY_STEP_SET's parameters for the one step update in `updates` (at most one),
    or for none: a NULL step id, and every field keeping its column."""
    if len(updates) > 1:
        raise ValueError("APPLY writes one step update; several are written one by one")
    update = updates[0] if updates else None
    values = _params(STEP_WRITES, update) if update else _kept(STEP_WRITES)
    return {
        APPLY_STEP_KEY: update.step_id if update else None,
        **{APPLY_STEP_PREFIX + k: v for k, v in values.items()},
    }


def _kept(writes: Sequence[Write]) -> dict[str, Any]:
    """Parameters that keep every column (no row is written: only their types count)."""
    return {name: None for w in writes for name in w.param_names}
