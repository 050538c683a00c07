"""Time travel on the run page: "Fork from here" on a completed step, and the run's
lineage (where it was forked from, and its forks). The service does the work
(app/service/fork.py); this turns a form into a call and back into a page."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, flash, redirect, url_for
from flask.typing import ResponseReturnValue
from flask_wtf import FlaskForm
from wtforms import IntegerField, TextAreaField
from wtforms.validators import InputRequired, Length, NumberRange

from app.errors import NotFound
from app.service import Conflict, Forbidden, InvalidInput, Lineage
from app.service.fork import MAX_INSTRUCTION_CHARS
from app.service.permissions import Actor
from app.store.accounts import Role
from app.web import deps
from app.web.auth import current_user, login_required

bp = Blueprint("forks", __name__)


class ForkForm(FlaskForm):  # type: ignore[misc]
    # The step is the button pressed: one form, one "Fork from here" button per step.
    from_step = IntegerField(validators=[InputRequired(), NumberRange(min=1, max=2**31 - 1)])
    instruction = TextAreaField(
        "Instruction for the fork (optional)", validators=[Length(max=MAX_INSTRUCTION_CHARS)]
    )


@bp.post("/runs/<run_id>/fork")
@login_required
def fork(run_id: str) -> ResponseReturnValue:
    form = ForkForm()
    back = redirect(url_for("runs.show", run_id=run_id))
    if not form.validate_on_submit():
        flash("The fork could not be read; nothing was made.", "error")
        return back
    user = current_user()
    assert user is not None  # login_required ran first
    try:
        fork_id = deps.service().fork_run(
            run_id,
            from_step=int(form.from_step.data),
            by=Actor.of(user),
            instruction=form.instruction.data or None,
        )
    except Forbidden as exc:
        abort(403, str(exc))
    except NotFound:
        abort(404, f"There is no run {run_id}.")
    except (InvalidInput, Conflict) as exc:
        flash(f"Not forked: {exc}", "error")
        return back
    flash(f"Forked from step {form.from_step.data} of run {run_id}: this run goes on from there.")
    return redirect(url_for("runs.show", run_id=fork_id))


@bp.app_context_processor
def time_travel() -> dict[str, Any]:
    """What runs/_lineage.html and runs/_fork.html call, when they are rendered."""
    return {"run_lineage": run_lineage, "may_fork": may_fork, "fork_form": ForkForm}


def run_lineage(run_id: str) -> Lineage:
    return deps.service().lineage(run_id)


def may_fork() -> bool:
    """Whether the signed-in person may fork (it takes what creating a run takes; the
    service enforces it)."""
    user = current_user()
    return user is not None and user.role.includes(Role.OPERATOR)
