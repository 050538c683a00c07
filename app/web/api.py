"""The JSON API for scripts and CI, under /api, authenticated by bearer tokens.

Errors are {"error": message} with 400 (invalid input), 401 (no or unknown
token), 403 (not an approver), 404 (no such run), 409 (the run's state does not
allow it). The OpenAPI document is at /api/openapi.json.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, g, jsonify, request, url_for
from flask.typing import ResponseReturnValue
from sqlalchemy import Row

from app.engine.models import RunStatus
from app.errors import NotFound
from app.service import Conflict, Forbidden, InvalidInput, RunView
from app.service.permissions import Actor
from app.store.accounts import User
from app.web import deps
from app.web.auth import bearer_user
from app.web.openapi import openapi_document

bp = Blueprint("api", __name__, url_prefix="/api")

PUBLIC = {"api.openapi"}
MAX_LIMIT = 200


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@bp.before_request
def authenticate() -> ResponseReturnValue | None:
    if request.endpoint in PUBLIC:
        return None
    user = bearer_user()
    if user is None:
        response = jsonify(error="authentication required: send 'Authorization: Bearer TOKEN' "
                           "(create a token with `agentloop user add NAME --token`)")  # fmt: skip
        response.status_code = 401
        response.headers["WWW-Authenticate"] = 'Bearer realm="agentloop"'
        return response
    g.api_user = user
    return None


@bp.errorhandler(ApiError)
def api_error(error: ApiError) -> ResponseReturnValue:
    return jsonify(error=str(error)), error.status


@bp.errorhandler(InvalidInput)
def invalid_input(error: InvalidInput) -> ResponseReturnValue:
    return jsonify(error=str(error)), 400


@bp.errorhandler(NotFound)
def not_found(error: NotFound) -> ResponseReturnValue:
    return jsonify(error=str(error.args[0]) if error.args else "not found"), 404


@bp.errorhandler(Forbidden)
def forbidden(error: Forbidden) -> ResponseReturnValue:
    return jsonify(error=str(error)), 403


@bp.errorhandler(Conflict)
def conflict(error: Conflict) -> ResponseReturnValue:
    return jsonify(error=str(error)), 409


@bp.get("/openapi.json")
def openapi() -> ResponseReturnValue:
    return jsonify(openapi_document(request.host_url.rstrip("/")))


@bp.post("/runs")
def create() -> ResponseReturnValue:
    body = _body()
    config = body.get("config")
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise ApiError(400, "config must be a JSON object")
    run_id = deps.service().create_run(
        _text(body, "task", required=True),
        config=config,
        created_by=_actor(),
        # A client that retries after a lost answer gets the run it created.
        idempotency_key=request.headers.get("Idempotency-Key"),
    )
    return _created(run_id)


@bp.get("/runs")
def index() -> ResponseReturnValue:
    status = request.args.get("status") or None
    if status is not None and status not in {s.value for s in RunStatus}:
        raise ApiError(400, f"unknown status {status!r}")
    limit = _int_arg("limit", 50, 1, MAX_LIMIT)
    offset = _int_arg("offset", 0, 0, 10**9)
    page = deps.service().list_runs(status=status, limit=limit, offset=offset)
    return jsonify(runs=[run_json(r) for r in page.rows], total=page.total, limit=limit,
                   offset=offset)  # fmt: skip


@bp.get("/runs/<run_id>")
def show(run_id: str) -> ResponseReturnValue:
    return jsonify(view_json(deps.service().status(run_id)))


@bp.get("/runs/<run_id>/events")
def events(run_id: str) -> ResponseReturnValue:
    after = _int_arg("after", 0, 0, 2**62)
    view = deps.service().status(run_id, after_event=after)
    items = [event_json(e) for e in view.events]
    return jsonify(events=items, last_event=items[-1]["id"] if items else after,
                   status=view.run.status)  # fmt: skip


@bp.post("/runs/<run_id>/approve")
def approve(run_id: str) -> ResponseReturnValue:
    body = _body(optional=True)
    args = body.get("args")
    if args is not None and not isinstance(args, dict):
        raise ApiError(400, "args must be a JSON object")
    deps.service().approve(
        run_id, by=_actor(), args=args, comment=_text(body, "comment"),
        approval_id=_text(body, "approval_id") or None, channel="api",
    )  # fmt: skip
    return _state(run_id)


@bp.post("/runs/<run_id>/reject")
def reject(run_id: str) -> ResponseReturnValue:
    body = _body()
    deps.service().reject(
        run_id, by=_actor(), reason=_text(body, "reason", required=True),
        approval_id=_text(body, "approval_id") or None, channel="api",
    )  # fmt: skip
    return _state(run_id)


@bp.post("/runs/<run_id>/cancel")
def cancel(run_id: str) -> ResponseReturnValue:
    deps.service().cancel(run_id, by=_actor())
    return _state(run_id)


# --- helpers ------------------------------------------------------------------------


def _user() -> User:
    user: User = g.api_user
    return user


def _actor() -> Actor:
    return Actor.of(_user())


def _body(*, optional: bool = False) -> dict[str, Any]:
    if optional and not request.get_data():
        return {}
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object (Content-Type: "
                       "application/json)")  # fmt: skip
    return body


def _text(body: dict[str, Any], key: str, *, required: bool = False) -> str:
    value = body.get(key, "")
    if not isinstance(value, str):
        raise ApiError(400, f"{key} must be a string")
    if required and not value.strip():
        raise ApiError(400, f"{key} is required")
    return value


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer") from None
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low} and {high}")
    return value


def _created(run_id: str) -> ResponseReturnValue:
    response: Response = jsonify(run_json(deps.service().status(run_id).run))
    response.status_code = 201
    response.headers["Location"] = url_for("api.show", run_id=run_id)
    return response


def _state(run_id: str) -> ResponseReturnValue:
    return jsonify(run_json(deps.service().status(run_id).run))


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def run_json(run: Row[Any]) -> dict[str, Any]:
    return {
        "id": run.id,
        "task": run.task,
        "status": run.status,
        "planner": run.planner,
        "config": run.config,
        "iteration": run.iteration,
        "plan_version": run.plan_version,
        "tokens_total": run.tokens_total,
        "cost_usd": run.cost_usd,
        "created_by": run.created_by,
        "created_at": _iso(run.created_at),
        "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at),
        "report": run.report,
        "error": run.error,
        "url": url_for("runs.show", run_id=run.id, _external=True),
    }


def event_json(event: Row[Any]) -> dict[str, Any]:
    return {
        "id": event.id,
        "iteration": event.iteration,
        "step_id": event.step_id,
        "kind": event.kind,
        "message": event.message,
        "data": event.data,
        "created_at": _iso(event.created_at),
    }


def view_json(view: RunView) -> dict[str, Any]:
    pending = view.pending_approval
    return {
        **run_json(view.run),
        "steps": [s.model_dump(mode="json") for s in view.steps],
        "pending_approval": None
        if pending is None
        else {
            "id": pending.id,
            "kind": pending.kind,
            "step_id": pending.step_id,
            "reason": pending.reason,
            "created_at": _iso(pending.created_at),
        },
        "last_event": view.events[-1].id if view.events else 0,
    }
