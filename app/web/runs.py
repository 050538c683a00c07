"""The pages people use: the runs list, a new run, a run's live page, decisions."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)
from flask.typing import ResponseReturnValue

from app import stall, timeline
from app.engine.models import Decision, PauseKind, RunStatus
from app.errors import NotFound
from app.planner.factory import OFFLINE
from app.service import Conflict, Forbidden, InvalidInput, RunView
from app.service.inputs import Problems
from app.service.permissions import Actor
from app.service.retention import parse_since
from app.store.accounts import User
from app.web import deps, present
from app.web.auth import current_user, login_required
from app.web.forms import CancelForm, DecisionForm, NewRunForm, edited_args

bp = Blueprint("runs", __name__)

STATUSES = [s.value for s in RunStatus]
# Far beyond any real list (a million pages of runs), far below a 64-bit offset.
MAX_PAGE = 1_000_000
# Event ids are 64-bit integers in the database.
MAX_EVENT_ID = 2**63 - 1
# The live runs list re-renders at least this often, so ages and durations move.
LIST_AGE_SECONDS = 10


def _int_arg(name: str, *, default: int, low: int, high: int) -> int:
    """A query parameter that must be a whole number in [low, high]: 400 otherwise
    (never a silent default, never an overflow in the database)."""
    values = request.args.getlist(name)
    if not values:
        return default
    if len(values) > 1:
        abort(400, f"{name} is given {len(values)} times; give it once")
    raw = values[0].strip()
    if not raw:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 20 or not low <= int(raw) <= high:
        abort(400, f"{name} must be a whole number from {low} to {high}, not {values[0][:40]!r}")
    return int(raw)


@dataclass(frozen=True)
class ListFilters:
    """The runs list's filters as the person typed them (the page's query string)."""

    status: str | None = None
    search: str = ""
    created_by: str = ""
    since: str = ""

    def args(self, **more: Any) -> dict[str, Any]:
        """Query arguments for a link that keeps these filters (empty ones left out)."""
        given = {"status": self.status, "q": self.search, "by": self.created_by}
        given |= {"since": self.since, **more}
        return {name: value for name, value in given.items() if value}


def _one_arg(name: str, *, limit: int = 200) -> str:
    """A query parameter given at most once, stripped; 400 when repeated or too long."""
    values = request.args.getlist(name)
    if len(values) > 1:
        abort(400, f"{name} is given {len(values)} times; give it once")
    value = (values[0] if values else "").strip()
    if len(value) > limit:
        abort(400, f"{name} is longer than {limit} characters")
    return value


def _list_filters() -> ListFilters:
    status = _one_arg("status") or None
    if status is not None and status not in STATUSES:
        abort(400, f"unknown status {status[:40]!r}; one of {', '.join(STATUSES)}")
    return ListFilters(
        status=status, search=_one_arg("q"), created_by=_one_arg("by"), since=_one_arg("since")
    )


def _list_context() -> dict[str, Any]:
    """Everything the runs list shows: one page of runs under the filters, the
    status counts, and whether a run waits for a worker that never comes."""
    filters = _list_filters()
    service = deps.service()
    since_error = None
    since = None
    if filters.since:
        try:
            since = parse_since(filters.since, service.clock())
        except InvalidInput as exc:
            since_error = str(exc)
    per_page = int(current_app.config["RUNS_PER_PAGE"])
    page_no = _int_arg("page", default=1, low=1, high=MAX_PAGE)
    page = service.list_runs(
        status=filters.status, since=since, search=filters.search or None,
        created_by=filters.created_by or None, limit=per_page, offset=(page_no - 1) * per_page,
    )  # fmt: skip
    stalled = _stalled_run()
    context = {
        "runs": page.rows,
        "total": page.total,
        "by_status": page.by_status,
        "filters": filters,
        "since_error": since_error,
        "statuses": STATUSES,
        "page": page_no,
        "pages": max(1, -(-page.total // per_page)),
        "stalled": stalled,
    }
    context["list_state"] = _list_state(context)
    return context


def _stalled_run() -> tuple[Any, str] | None:
    """The run that has waited longest for a worker, with the warning (app/stall.py),
    when one has waited too long; None while workers keep up."""
    interval = deps.settings().sweep_interval
    service = deps.service()
    for run in service.overdue_runs(waited=stall.stall_after(interval)):
        warning = stall.warning(run, service.clock(), interval)
        if warning:
            return run, warning
    return None


def _list_state(context: dict[str, Any]) -> str:
    """Changes when a row, a count or the warning does, and every LIST_AGE_SECONDS
    (so ages and running durations stay current): the live list re-renders then."""
    seen = [present.state_key(run) for run in context["runs"]]
    seen += [str(sorted(context["by_status"].items())), str(context["stalled"] is not None)]
    seen.append(str(int(deps.service().clock().timestamp() // LIST_AGE_SECONDS)))
    return hashlib.sha256("|".join(seen).encode()).hexdigest()[:16]


@bp.get("/")
@login_required
def index() -> ResponseReturnValue:
    context = _list_context()
    status = 400 if context["since_error"] else 200
    return render_template("runs/list.html", **context), status


@bp.get("/runs/list/live")
@login_required
def index_live() -> ResponseReturnValue:
    """The runs list again (as HTML rendered by the server) when it changed since
    `state`; only the new state otherwise."""
    context = _list_context()
    body: dict[str, Any] = {"state": context["list_state"]}
    if context["list_state"] != request.args.get("state", ""):
        body["html"] = render_template("runs/_list.html", **context)
    return jsonify(body)


@bp.route("/runs/new", methods=["GET", "POST"])
@login_required
def new() -> ResponseReturnValue:
    """The new-run form. A submit is checked whole by the service: every problem is
    shown at once, each next to its field and all in a list above the form."""
    form = NewRunForm()
    if not form.is_submitted():
        return render_template("runs/new.html", form=form, problems=[])
    service = deps.service()
    task, config = form.task.data or "", form.config()
    try:
        if form.validate():
            run_id = service.create_run(task, config=config, created_by=_actor())
            return redirect(url_for("runs.show", run_id=run_id))
        form.show(service.run_problems(task, config))  # besides the form's own
    except Forbidden as exc:
        abort(403, str(exc))
    except Problems as exc:
        form.show(exc.problems)
    except InvalidInput as exc:
        form.task.errors.append(str(exc))
    return render_template("runs/new.html", form=form, problems=form.problems()), 400


@bp.get("/runs/<run_id>")
@login_required
def show(run_id: str) -> ResponseReturnValue:
    """The run page; `before` shows the stretch of the timeline before that event."""
    before = _int_arg("before", default=0, low=1, high=MAX_EVENT_ID) or None
    view = _status(run_id, after_event=MAX_EVENT_ID)  # the row and steps: events come bounded
    events = timeline.read_page(deps.service().store, run_id, before=before)
    return render_template("runs/show.html", **_page_context(view, events), before=before)


@bp.get("/runs/<run_id>/live")
@login_required
def live(run_id: str) -> ResponseReturnValue:
    """What changed since the page last looked: new events (as HTML list items),
    and every section again when the run itself changed."""
    after = _int_arg("after", default=0, low=0, high=MAX_EVENT_ID)
    seen = request.args.get("state", "")
    # The row first, then the events: a run seen ending has written its last events.
    fresh = _status(run_id, after_event=MAX_EVENT_ID)
    store = deps.service().store
    # At most LIVE_EVENTS new events (`more` says to ask again at once), so a
    # watched page costs the same at event 50 as at event 5,000.
    new = timeline.read_new(store, run_id, after=after)
    state = _state(fresh.run)
    body: dict[str, Any] = {
        "state": state,
        "status": fresh.run.status,
        "terminal": RunStatus(fresh.run.status).is_terminal,
        "last_event": new.last,
        "more": new.more,
        "events": render_template(
            "runs/_events.html", run=fresh.run, groups=new.groups, **_time_context(fresh)
        ),
    }
    if state != seen:
        context = _page_context(fresh, timeline.read_page(store, run_id))
        body["sections"] = {
            name: render_template(f"runs/_{name}.html", **context)
            for name in ("summary", "actions", "plans", "steps", "waterfall")
        }
    return jsonify(body)


@bp.post("/runs/<run_id>/decide")
@login_required
def decide(run_id: str) -> ResponseReturnValue:
    form = DecisionForm()
    view = _status(run_id)
    back = redirect(url_for("runs.show", run_id=run_id))
    if not form.validate_on_submit():
        flash("The decision could not be read; nothing was changed.", "error")
        return back
    try:
        _apply_decision(run_id, form, view)
    except Forbidden as exc:
        abort(403, str(exc))
    except (InvalidInput, ValueError) as exc:
        flash(f"Nothing was decided: {exc}", "error")
    except Conflict as exc:
        flash(f"Nothing was decided: {exc}", "error")
    except NotFound:
        abort(404, "There is no such approval waiting on this run.")
    else:
        flash(_what_happens(form.action.data or "", view.run.planner))
    return back


def _what_happens(action: str, planner: str) -> str:
    """The flash after a decision: what was recorded, and what the run does next."""
    if action == "reject":
        if planner == OFFLINE:  # a runbook has no way around a rejected step
            return (
                "Decision recorded: rejected. The offline planner's runbook has no other way "
                "to do the task, so the run ends as rejected."
            )
        return (
            "Decision recorded: rejected. The agent re-plans around your reason; if it finds "
            "no other way, the run ends as rejected."
        )
    next_step = {
        "approve": "the step runs",
        "retry": "the step runs again",
        "skip": "the run goes on without the step",
        "mark_done": "the run goes on as if the step had completed",
    }
    return f"Decision recorded: {action}; {next_step.get(action, 'the run goes on')}."


def _apply_decision(run_id: str, form: DecisionForm, view: RunView) -> None:
    service, who = deps.service(), _actor()
    approval_id = form.approval_id.data or None
    action = form.action.data or ""
    if action == "approve":
        step = _pending_step(view)
        args = edited_args(form.args.data, step.args if step is not None else {})
        service.approve(
            run_id, by=who, args=args, approval_id=approval_id, channel="web",
            comment=(form.reason.data or "").strip(),
        )  # fmt: skip
    elif action == "reject":
        service.reject(
            run_id, by=who, reason=form.reason.data or "", approval_id=approval_id, channel="web"
        )
    elif action in {d.value for d in Decision}:
        service.decide(
            run_id, Decision(action), by=who, comment=(form.reason.data or "").strip(),
            approval_id=approval_id, channel="web",
        )  # fmt: skip
    else:
        raise InvalidInput(f"unknown decision {action!r}")


@bp.post("/runs/<run_id>/cancel")
@login_required
def cancel(run_id: str) -> ResponseReturnValue:
    form = CancelForm()
    if form.validate_on_submit():
        try:
            deps.service().cancel(run_id, by=_actor(), reason=form.reason.data or "")
        except Forbidden as exc:
            abort(403, str(exc))
        except (Conflict, InvalidInput) as exc:
            flash(f"Not cancelled: {exc}", "error")
        except NotFound:
            abort(404, f"There is no run {run_id}.")
        else:
            flash("The run is cancelled.")
    return redirect(url_for("runs.show", run_id=run_id))


# --- helpers ------------------------------------------------------------------------


def _user() -> User:
    user = current_user()
    assert user is not None  # login_required ran first
    return user


def _actor() -> Actor:
    return Actor.of(_user())


def _status(run_id: str, *, after_event: int = 0) -> RunView:
    try:
        return deps.service().status(run_id, after_event=after_event)
    except NotFound:
        abort(404, f"There is no run {run_id}.")


def _pending_step(view: RunView) -> Any:
    pending = view.pending_approval
    if pending is None:
        return None
    return next((s for s in view.steps if s.id == pending.step_id), None)


def may_decide(user: User, run: Any) -> bool:
    """Whether `user` may decide on `run` (the service decides, and enforces it)."""
    return deps.service().may_decide(Actor.of(user), run)


def _worker_warning(run: Any) -> str | None:
    """Set when the run has been due for a while and no worker claimed it (app/stall.py)."""
    return stall.warning(run, deps.service().clock(), deps.settings().sweep_interval)


def _state(run: Any) -> str:
    """The row's state, and whether the warning shows: a live page picks it up."""
    return present.state_key(run) + ("-no-worker" if _worker_warning(run) else "")


def _time_context(view: RunView) -> dict[str, Any]:
    """What the timeline's and the waterfall's templates need to say when."""
    start = view.run.created_at
    return {
        "since": lambda when: present.since(when, start),
        "step_of": {step.id: step for step in view.steps},
    }


def _page_context(view: RunView, events: timeline.PageEvents) -> dict[str, Any]:
    pending = view.pending_approval
    step = _pending_step(view)
    user = _user()
    end = view.run.finished_at or deps.service().clock()
    return {
        **_time_context(view),
        "run": view.run,
        "steps": view.steps,
        "groups": events.groups,
        "earlier": events.earlier,
        "waterfall": timeline.waterfall(
            view.steps, events.step_events, start=view.run.created_at, end=end
        ),
        "pending": pending,
        "pending_step": step,
        "pause_kind": PauseKind(pending.kind) if pending is not None else None,
        "approvers": deps.service().approvers_of(view.run),
        "can_decide": may_decide(user, view.run),
        "can_cancel": deps.service().may_cancel(Actor.of(user), view.run),
        "plans": present.plan_history(events.plans, view.steps),
        "history": present.step_history(events.step_events),
        "state": _state(view.run),
        "worker_warning": _worker_warning(view.run),
        "last_event": events.latest,
        "active": not RunStatus(view.run.status).is_terminal,
        "decision_form": DecisionForm(formdata=None),
        "cancel_form": CancelForm(formdata=None),
    }
