"""The JSON API for scripts and CI, under /api, authenticated by bearer tokens.

Each view is declared with `operation(...)`: the pydantic models that validate its
query string and body (app/web/schemas.py), what it answers and which statuses it
returns. The views receive the validated models, and /api/openapi.json is built
from the same declarations (app/web/openapi.py): the document cannot say one
thing while the server does another.

Errors are {"error": message}: 400 (the request breaks the document: an unknown or
repeated or empty parameter, a value out of range, a body that is not a JSON
object, too deep, holds NUL/Infinity/NaN), 401 (no or unknown token), 403 (the
role or the run does not allow it), 404 (no such run), 409 (the run's state does
not allow it), 413 (body over 256 KiB), 422 (the request fits the document but the
service refuses it: an unknown tool, an approver no user answers to, edited args
the tool does not take), 429 when rate limits are on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC
from functools import wraps
from typing import Any, TypeVar, cast

from flask import Blueprint, Response, current_app, g, jsonify, request, url_for
from flask.typing import ResponseReturnValue
from pydantic import BaseModel, TypeAdapter, ValidationError

from app.engine import sanitize
from app.errors import NotFound
from app.service import Conflict, Forbidden, InvalidInput, RunView
from app.service.inputs import Problem, Problems
from app.service.permissions import Actor
from app.service.retention import parse_since
from app.store.accounts import User
from app.store.records import RunRecord
from app.web import deps, schemas
from app.web.auth import bearer_user

bp = Blueprint("api", __name__, url_prefix="/api")

PUBLIC = {"api.openapi"}
MAX_LIMIT = schemas.MAX_LIMIT
M = TypeVar("M", bound=BaseModel)
_IDEMPOTENCY_KEY = TypeAdapter(schemas.IdempotencyKey)


class ApiError(Exception):
    def __init__(self, status: int, message: str, problems: Sequence[Problem] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.problems = list(problems)


# --- declared operations ------------------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    """What /api/openapi.json says about one view, and what the view is given."""

    endpoint: str
    operation_id: str
    summary: str
    ok: tuple[int, type[BaseModel], str]  # status, model, description
    query: type[BaseModel] = schemas.NoQuery
    body: type[BaseModel] | None = None
    body_required: bool = True
    # Statuses besides ok, 400 and 401 (every operation has those), with why.
    errors: dict[int, str] = field(default_factory=dict)
    headers: tuple[dict[str, Any], ...] = ()
    links: dict[str, dict[str, Any]] = field(default_factory=dict)
    # For a body that breaks the document: what the service would refuse besides,
    # given the body as parsed, so that one answer lists every problem.
    also_refused: Callable[[dict[str, Any]], list[Problem]] | None = None


OPERATIONS: dict[str, Operation] = {}
ViewFn = Callable[..., ResponseReturnValue]


def operation(op: Operation) -> Callable[[ViewFn], ViewFn]:
    """Register `op` and give the view `query=` and (with a body model) `body=`,
    validated by exactly the models the document is generated from."""
    OPERATIONS[op.endpoint] = op

    def decorate(view: ViewFn) -> ViewFn:
        @wraps(view)
        def wrapped(**kwargs: Any) -> ResponseReturnValue:
            kwargs["query"] = _query(op.query)
            if op.body is not None:
                kwargs["body"] = _body(op.body, required=op.body_required, also=op.also_refused)
            return view(**kwargs)

        return wrapped

    return decorate


RUN_ERRORS = {404: "No such run"}
DECISION_ERRORS = {
    **RUN_ERRORS,
    403: "Not an approver of this run (or its creator, under four eyes)",
    409: "The run waits for no decision (or not this approval)",
    413: "The body is over 256 KiB",
    422: "The decision does not fit the pause (e.g. edited args the tool does not take)",
}


# --- requests -----------------------------------------------------------------------------


@bp.before_request
def authenticate() -> ResponseReturnValue | None:
    # Bodies past the API's limit are refused (413) before anything reads them.
    request.max_content_length = schemas.MAX_BODY_BYTES
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
    return _error(str(error), error.problems), error.status


@bp.errorhandler(InvalidInput)
def invalid_input(error: InvalidInput) -> ResponseReturnValue:
    # The request fits the document; the service refuses what it says.
    return _error(str(error), error.problems if isinstance(error, Problems) else []), 422


def _error(message: str, problems: Sequence[Problem]) -> Response:
    """{"error": message}, and {"problems": [{"field", "message"}, …]} when listed."""
    if not problems:
        return jsonify(error=message)
    return jsonify(error=message, problems=[asdict(p) for p in problems])


@bp.errorhandler(NotFound)
def not_found(error: NotFound) -> ResponseReturnValue:
    return jsonify(error=str(error.args[0]) if error.args else "not found"), 404


@bp.errorhandler(Forbidden)
def forbidden(error: Forbidden) -> ResponseReturnValue:
    return jsonify(error=str(error)), 403


@bp.errorhandler(Conflict)
def conflict(error: Conflict) -> ResponseReturnValue:
    return jsonify(error=str(error)), 409


def _query(model: type[M]) -> M:
    """The query string through `model`: a parameter given twice or empty is refused
    (never silently the default), and so is one the model does not have."""
    data: dict[str, str] = {}
    for name in request.args:
        values = request.args.getlist(name)
        shown = sanitize.scrub_text(name)[:80]
        if len(values) > 1:
            raise ApiError(400, f"{shown}: given {len(values)} times; give it once")
        if values[0] == "":
            raise ApiError(400, f"{shown}: empty; leave it out to get the default")
        data[name] = values[0]
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, schemas.describe(exc, what="query")) from None


def _body(
    model: type[M],
    *,
    required: bool,
    also: Callable[[dict[str, Any]], list[Problem]] | None = None,
) -> M:
    """The body through `model` (strict; JSON parsed by pydantic, which refuses lone
    surrogates, Infinity and NaN, and nesting past its recursion limit). When it
    breaks the document, `also` adds what else is wrong with it (see Operation)."""
    raw = request.get_data(cache=True)  # 413 past MAX_BODY_BYTES
    if not raw.strip() and not required:
        raw = b"{}"
    elif not request.is_json:
        raise ApiError(400, "the request body must be a JSON object (Content-Type: "
                       "application/json)")  # fmt: skip
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        found = schemas.problems(exc)
        if also is not None and isinstance(parsed := _parsed(raw), dict):
            flagged = {p.field for p in found}
            found += [p for p in also(parsed) if p.field not in flagged]
        raise ApiError(400, "; ".join(str(p) for p in found), found) from None


def _parsed(raw: bytes) -> Any:
    """`raw` as JSON, or None (too deep, not JSON: the document's problems say so)."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def _user() -> User:
    user: User = g.api_user
    return user


def _actor() -> Actor:
    return Actor.of(_user())


def _idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    try:
        return _IDEMPOTENCY_KEY.validate_python(key)
    except ValidationError as exc:
        raise ApiError(400, schemas.describe(exc, what="Idempotency-Key header")) from None


# --- views --------------------------------------------------------------------------------


@bp.get("/openapi.json")
def openapi() -> ResponseReturnValue:
    from app.web.openapi import openapi_document

    return jsonify(openapi_document(current_app, request.host_url.rstrip("/")))


def _new_run_problems(body: dict[str, Any]) -> list[Problem]:
    """What the service would refuse in a new-run body that breaks the document."""
    task, config = body.get("task"), body.get("config")
    return deps.service().run_problems(
        task if isinstance(task, str) else "", config if isinstance(config, dict) else None
    )


@bp.post("/runs")
@operation(
    Operation(
        "api.create",
        "createRun",
        "Create a run",
        (201, schemas.Run, "The new run (or, for a repeated Idempotency-Key, the first one)"),
        body=schemas.NewRun,
        errors={
            403: "Creating runs takes the operator role",
            409: "The Idempotency-Key was used for a different request",
            413: "The body is over 256 KiB",
            422: "The service refuses the run (e.g. an unknown tool in approval_required, "
            "an approver no user answers to, a planner this deployment lacks, a task no "
            "runbook of the offline planner handles); `problems` lists every one. A 400 "
            "for the body's shape lists these too",
        },
        also_refused=_new_run_problems,
        headers=(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "Retrying with the same key returns the run the first "
                "request created (409 if the request differs).",
                "schema": TypeAdapter(schemas.IdempotencyKey).json_schema(),
            },
        ),
        links={
            "GetRun": {"operationId": "getRun", "parameters": {"run_id": "$response.body#/id"}},
            "GetRunEvents": {
                "operationId": "getRunEvents",
                "parameters": {"run_id": "$response.body#/id"},
            },
            "CancelRun": {
                "operationId": "cancelRun",
                "parameters": {"run_id": "$response.body#/id"},
            },
        },
    )
)
def create(*, query: schemas.NoQuery, body: schemas.NewRun) -> ResponseReturnValue:
    run_id = deps.service().create_run(
        body.task,
        config=cast(BaseModel, body.config).model_dump(exclude_unset=True),
        created_by=_actor(),
        # A client that retries after a lost answer gets the run it created.
        idempotency_key=_idempotency_key(),
    )
    response: Response = jsonify(_run(deps.service().status(run_id).run))
    response.status_code = 201
    response.headers["Location"] = url_for("api.show", run_id=run_id)
    return response


@bp.get("/runs")
@operation(
    Operation(
        "api.index",
        "listRuns",
        "List runs, newest first",
        (200, schemas.RunPage, "A page of runs"),
        query=schemas.RunsQuery,
    )
)
def index(*, query: schemas.RunsQuery) -> ResponseReturnValue:
    """The runs list's filters, as `agentloop runs` and the list page have them."""
    service = deps.service()
    status = query.status.value if query.status is not None else None
    since = query.since
    if isinstance(since, str):  # an age
        since = parse_since(since, service.clock())
    elif since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    page = service.list_runs(
        status=status, since=since, search=query.search, created_by=query.created_by,
        limit=query.limit, offset=query.offset,
    )  # fmt: skip
    return _json(schemas.RunPage(runs=[_run_model(r) for r in page.rows], total=page.total,
                                 limit=query.limit, offset=query.offset))  # fmt: skip


@bp.get("/runs/<run_id>")
@operation(
    Operation(
        "api.show",
        "getRun",
        "A run with its steps and pending approval",
        (200, schemas.RunDetail, "The run"),
        errors=RUN_ERRORS,
    )
)
def show(run_id: str, *, query: schemas.NoQuery) -> ResponseReturnValue:
    service = deps.service()
    view = service.status(run_id)
    return jsonify(view_json(view, forks=[f.id for f in service.lineage(run_id).forks]))


@bp.get("/runs/<run_id>/events")
@operation(
    Operation(
        "api.events",
        "getRunEvents",
        "The run's timeline after an event id",
        (200, schemas.EventPage, "Events, oldest first"),
        query=schemas.EventsQuery,
        errors=RUN_ERRORS,
    )
)
def events(run_id: str, *, query: schemas.EventsQuery) -> ResponseReturnValue:
    view = deps.service().status(run_id, after_event=query.after)
    items = [schemas.Event.model_validate(e, from_attributes=True) for e in view.events]
    return _json(schemas.EventPage(events=items, last_event=items[-1].id if items else query.after,
                                   status=view.run.status))  # fmt: skip


@bp.post("/runs/<run_id>/approve")
@operation(
    Operation(
        "api.approve",
        "approveRun",
        "Approve the waiting step",
        (200, schemas.Run, "The run, resumed"),
        body=schemas.Approve,
        body_required=False,
        errors=DECISION_ERRORS,
    )
)
def approve(run_id: str, *, query: schemas.NoQuery, body: schemas.Approve) -> ResponseReturnValue:
    if body.args is not None and schemas.depth(body.args) > schemas.MAX_ARGS_DEPTH:
        raise ApiError(400, f"args: nested deeper than {schemas.MAX_ARGS_DEPTH} levels")
    deps.service().approve(
        run_id, by=_actor(), args=body.args, comment=body.comment,
        approval_id=body.approval_id, channel="api",
    )  # fmt: skip
    return _state(run_id)


@bp.post("/runs/<run_id>/reject")
@operation(
    Operation(
        "api.reject",
        "rejectRun",
        "Reject the waiting step",
        (
            200,
            schemas.Run,
            "The run: re-planning around the reason, or rejected when the "
            "planner has no other way (ended_by, end_reason)",
        ),
        body=schemas.Reject,
        errors=DECISION_ERRORS,
    )
)
def reject(run_id: str, *, query: schemas.NoQuery, body: schemas.Reject) -> ResponseReturnValue:
    deps.service().reject(
        run_id, by=_actor(), reason=body.reason, approval_id=body.approval_id, channel="api"
    )
    return _state(run_id)


@bp.post("/runs/<run_id>/cancel")
@operation(
    Operation(
        "api.cancel",
        "cancelRun",
        "Cancel an active run",
        (200, schemas.Run, "The cancelled run"),
        body=schemas.Cancel,
        body_required=False,
        errors={
            **RUN_ERRORS,
            403: "Only the run's creator (an operator) or an admin may cancel it",
            409: "The run is not active",
        },
    )
)
def cancel(run_id: str, *, query: schemas.NoQuery, body: schemas.Cancel) -> ResponseReturnValue:
    deps.service().cancel(run_id, by=_actor(), reason=body.reason)
    return _state(run_id)


@bp.post("/runs/<run_id>/fork")
@operation(
    Operation(
        "api.fork",
        "forkRun",
        "Fork the run from a completed step (time travel)",
        (201, schemas.Run, "The new run, queued to plan what follows step N"),
        body=schemas.ForkRun,
        errors={
            **RUN_ERRORS,
            403: "Forking takes the operator role, as creating a run does",
            409: "Step N did not complete (or the parent's workspace could not be copied)",
            413: "The body is over 256 KiB",
            422: "The run has no step N, the instruction makes the task too long, or "
            "this deployment lacks the parent's planner",
        },
        links={
            "GetFork": {"operationId": "getRun", "parameters": {"run_id": "$response.body#/id"}},
        },
    )
)
def fork(run_id: str, *, query: schemas.NoQuery, body: schemas.ForkRun) -> ResponseReturnValue:
    fork_id = deps.service().fork_run(
        run_id, from_step=body.from_step, by=_actor(), instruction=body.instruction
    )
    response: Response = jsonify(_run(deps.service().status(fork_id).run))
    response.status_code = 201
    response.headers["Location"] = url_for("api.show", run_id=fork_id)
    return response


# --- responses ----------------------------------------------------------------------------


def _json(model: BaseModel) -> Response:
    return jsonify(model.model_dump(mode="json"))


def _state(run_id: str) -> ResponseReturnValue:
    return jsonify(_run(deps.service().status(run_id).run))


def _fields(run: RunRecord) -> dict[str, Any]:
    return {**asdict(run), "url": url_for("runs.show", run_id=run.id, _external=True)}


def _run_model(run: RunRecord) -> schemas.Run:
    return schemas.Run.model_validate(_fields(run))


def _run(run: RunRecord) -> dict[str, Any]:
    return _run_model(run).model_dump(mode="json")


def view_json(view: RunView, *, forks: list[str]) -> dict[str, Any]:
    pending = view.pending_approval
    detail = schemas.RunDetail.model_validate(
        {
            **_fields(view.run),
            "steps": view.steps,
            "pending_approval": None
            if pending is None
            else schemas.PendingApproval.model_validate(pending, from_attributes=True),
            "last_event": view.events[-1].id if view.events else 0,
            "forks": forks,
        }
    )
    return detail.model_dump(mode="json")
