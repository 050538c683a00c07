"""Health endpoints for load balancers and orchestrators, open without sign-in.

`/healthz`: the process is alive and serving (touches nothing else).
`/readyz`: this process can do its work: the database answers with its schema at
the Alembic head, and the broker answers. 503 with the failing checks otherwise.
Neither says more than ok/not ok and a short reason: they are public.
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

from flask import Blueprint, Response, jsonify

from app.web.deps import service, settings

log = logging.getLogger(__name__)
bp = Blueprint("health", __name__)
BROKER_TIMEOUT = 3.0


def _no_store(response: Response, status: int = 200) -> Response:
    response.status_code = status
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/healthz")
def healthz() -> Response:
    return _no_store(jsonify(status="alive"))


@bp.get("/readyz")
def readyz() -> Response:
    checks = {"database": _database(), "broker": _broker()}
    failing = sorted(name for name, problem in checks.items() if problem)
    body: dict[str, Any] = {
        "status": "not ready" if failing else "ready",
        "checks": {name: problem or "ok" for name, problem in checks.items()},
    }
    if failing:
        body["not_ready"] = failing
    return _no_store(jsonify(body), 503 if failing else 200)


@cache
def schema_heads() -> frozenset[str]:
    """The revisions the code expects (Alembic heads), read once per process."""
    from alembic.script import ScriptDirectory

    from app.store.migrate import alembic_config

    return frozenset(ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads())


def _database() -> str | None:
    """None when the database answers and its schema is current; else why not."""
    from alembic.runtime.migration import MigrationContext

    try:
        with service().store.engine.connect() as conn:
            current = frozenset(MigrationContext.configure(conn).get_current_heads())
    except Exception as exc:
        log.warning("readyz: the database does not answer: %s", _first_line(exc))
        return f"unreachable ({type(exc).__name__})"
    expected = schema_heads()
    if current != expected:
        shown = ", ".join(sorted(current)) or "none"
        return (
            f"schema at {shown}, expected {', '.join(sorted(expected))}: run `agentloop db upgrade`"
        )
    return None


def _broker() -> str | None:
    from tasks import celery_app

    if settings().uses_filesystem_broker and not settings().broker_dir.is_dir():
        return "the broker folder is missing"
    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(
                max_retries=1, interval_start=0, interval_step=0, timeout=BROKER_TIMEOUT
            )
    except Exception as exc:
        log.warning("readyz: the broker does not answer: %s", _first_line(exc))
        return f"unreachable ({type(exc).__name__})"
    return None


def _first_line(exc: BaseException) -> str:
    cause = getattr(exc, "orig", None) or exc
    return (str(cause).strip().splitlines() or [type(exc).__name__])[0]
