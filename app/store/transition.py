"""The transition field map (app/engine/fields.py) compiled into SQL.

`set_values` turns the map into an UPDATE's SET clauses, whatever the values come
from: bound parameters (SAVE_RUN and SAVE_STEP, app/store/hot.py) or the columns of
a JSON recordset (the step updates of PostgreSQL's one-statement APPLY). The
parameters for them come from the same map (`run_params`, `step_params`,
`step_rows`), so the in-memory apply, the PostgreSQL statement and the SQLite
statements cannot drift apart. The statements are built once, at import.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ColumnElement,
    String,
    Table,
    Text,
    bindparam,
    case,
    column,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql.elements import ColumnClause
from sqlalchemy.types import TypeEngine

from app.engine.actions import StepUpdate, Transition
from app.engine.fields import RUN_WRITES, STEP_KEY, STEP_WRITES, How, Write
from app.engine.models import RunSnapshot
from app.store.schema import runs, steps

# None must mean SQL NULL here (keep the column), not the JSON value null.
JsonOrNull = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")

PARAM_PREFIX = "p_"


def value_type(table: Table, write: Write, *, recordset: bool = False) -> TypeEngine[Any]:
    """The type a value for `write` travels as: the column's, unsized (a cast to
    VARCHAR(16) would silently truncate), JSON keeping None as SQL NULL."""
    column_type = table.c[write.column].type
    if isinstance(column_type, JSON):
        return JSONB() if recordset else JsonOrNull
    if isinstance(column_type, Text):
        return Text()
    if isinstance(column_type, String):
        return String()
    return type(column_type)()


def _param_types(table: Table, writes: Sequence[Write], **kw: bool) -> dict[str, TypeEngine[Any]]:
    types: dict[str, TypeEngine[Any]] = {}
    for w in writes:
        if w.flag is not None:
            types[w.flag] = Boolean()
        types[w.field] = value_type(table, w, **kw)
    return types


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


def bound(name: str, type_: TypeEngine[Any]) -> ColumnElement[Any]:
    """A value from the bound parameter `p_<name>`."""
    return bindparam(PARAM_PREFIX + name, type_=type_)


def step_set(value: Callable[[str, TypeEngine[Any]], ColumnElement[Any]]) -> dict[str, Any]:
    """The SET clauses of a step update, reading its values through `value`."""
    return set_values(steps, STEP_WRITES, value)


RUN_SET = set_values(runs, RUN_WRITES, bound)
STEP_SET = step_set(bound)

# The columns of a step update as a JSON recordset row (see step_rows).
STEP_RECORDSET_COLUMNS: list[ColumnClause[Any]] = [
    column(STEP_KEY, BigInteger()),
    *(
        column(name, type_)
        for name, type_ in _param_types(steps, STEP_WRITES, recordset=True).items()
    ),
]


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


def step_rows(updates: Sequence[StepUpdate]) -> list[dict[str, Any]]:
    """Step updates as rows of a JSON recordset with STEP_RECORDSET_COLUMNS."""
    return [{STEP_KEY: u.step_id, **_params(STEP_WRITES, u)} for u in updates]
