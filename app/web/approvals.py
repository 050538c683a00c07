"""Approval links from email: GET shows what is asked and changes nothing (mail
scanners open links); POST decides, once.

The link's token (app/notify/tokens.py) says which approval, which approver and
which exact args; every way it can be unusable gets its own page, and nothing
is changed by any of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import Blueprint, make_response, render_template
from flask.typing import ResponseReturnValue

from app.engine.models import PauseKind, RunStatus
from app.errors import NotFound
from app.notify.tokens import ApprovalClaim, ExpiredToken, InvalidToken, read_approval
from app.service import ApprovalView, Conflict, Forbidden, InvalidInput
from app.service.permissions import Actor
from app.store.accounts import Role
from app.web import deps
from app.web.forms import DecisionForm, edited_args

bp = Blueprint("approvals", __name__, url_prefix="/approvals")


@dataclass(frozen=True)
class Problem:
    status: int
    title: str
    message: str


@bp.get("/<token>")
def confirm(token: str) -> ResponseReturnValue:
    found = _resolve(token)
    if isinstance(found, Problem):
        return _problem(found)
    claim, view = found
    return _page(claim, view, DecisionForm(formdata=None), 200)


@bp.post("/<token>")
def decide(token: str) -> ResponseReturnValue:
    found = _resolve(token)
    if isinstance(found, Problem):
        return _problem(found)
    claim, view = found
    form = DecisionForm()
    if not form.validate_on_submit():
        return _page(claim, view, form, 400)
    try:
        action = _decide(claim, view, form)
    except (InvalidInput, ValueError) as exc:
        form.form_errors.append(f"Nothing was decided: {exc}")
        return _page(claim, view, form, 400)
    except Conflict as exc:
        return _problem(Problem(409, "Already decided", f"Nothing was changed: {exc}."))
    except Forbidden as exc:
        return _problem(Problem(403, "Not yours to decide", f"Nothing was changed: {exc}."))
    return _no_store(
        make_response(render_template("approvals/done.html", view=view, action=action), 200)
    )


def _decide(claim: ApprovalClaim, view: ApprovalView, form: DecisionForm) -> str:
    service, run_id = deps.service(), view.run.id
    # The signed link names the approver it was sent to; the service still checks
    # that they may decide (still an approver, and not the run's creator).
    by = Actor(name=claim.approver, role=Role.APPROVER, email=_email_of(claim.approver))
    if form.action.data == "approve":
        args = edited_args(form.args.data, view.step.args)
        service.approve(
            run_id, by=by, args=args, approval_id=claim.approval_id,
            comment=(form.reason.data or "").strip(), channel="email",
        )  # fmt: skip
        return "approved with edited args" if args is not None else "approved"
    if form.action.data == "reject":
        service.reject(
            run_id, by=by, reason=form.reason.data or "",
            approval_id=claim.approval_id, channel="email",
        )  # fmt: skip
        return "rejected"
    raise InvalidInput("choose approve or reject")


def _email_of(approver: str) -> str | None:
    if "@" in approver:
        return approver
    found = deps.accounts().by_name(approver)
    return found.email if found is not None else None


EXPIRED = Problem(
    410,
    "This link has expired",
    "Approval links are valid for a limited time. Nothing was changed; open the run in "
    "agentloop to decide there.",
)
FORGED = Problem(
    400,
    "This link is not valid",
    "It was altered, cut short or not sent by this agentloop. Nothing was changed.",
)
LAPSED = Problem(
    410,
    "This approval expired",
    "Nobody decided in time, so agentloop settled it as configured. Nothing was changed.",
)
NOT_YOURS = Problem(
    403,
    "Not your approval",
    "This link was sent to someone who is no longer an approver of this run. Nothing was changed.",
)
CHANGED = Problem(
    409,
    "The step changed",
    "Its arguments are not the ones in your email, so this link cannot decide about them. "
    "Nothing was changed.",
)


def _resolve(token: str) -> tuple[ApprovalClaim, ApprovalView] | Problem:
    """The claim and what it is about, or the reason the link cannot be used."""
    settings = deps.settings()
    try:
        claim = read_approval(settings.secret_key, token, max_age=settings.approval_ttl)
    except ExpiredToken:
        return EXPIRED
    except InvalidToken:
        return FORGED
    try:
        view = deps.service().approval(claim.approval_id)
    except NotFound:
        return Problem(404, "No such approval", "This approval no longer exists.")
    return _check(claim, view) or (claim, view)


def _check(claim: ApprovalClaim, view: ApprovalView) -> Problem | None:
    approval, run = view.approval, view.run
    if approval.status == "decided":
        when = f"{approval.decided_at:%Y-%m-%d %H:%M:%S} UTC"
        return Problem(
            409,
            "Already decided",
            f"This step was already decided: {approval.decision} by {approval.decided_by} "
            f"at {when}. Nothing was changed.",
        )
    if approval.status == "expired":
        return LAPSED
    if approval.status != "pending" or run.status != RunStatus.PAUSED:
        return Problem(
            409,
            "Nothing to decide",
            f"The run is {run.status} and this approval is {approval.status}. Nothing was changed.",
        )
    if approval.kind != PauseKind.APPROVAL:
        return Problem(409, "Not an approval", "Decide about this step on the run's page.")
    if claim.approver not in deps.service().approvers_of(run):
        return NOT_YOURS
    # Bound to the exact args the email showed: the approval row's, and the step's now.
    if claim.args_hash != approval.args_hash or view.step.args_hash != claim.args_hash:
        return CHANGED
    return None


def _page(
    claim: ApprovalClaim, view: ApprovalView, form: DecisionForm, status: int
) -> ResponseReturnValue:
    form.approval_id.data = claim.approval_id
    if not form.args.data:
        from app.web.present import pretty

        form.args.data = pretty(view.step.args)
    body = render_template("approvals/confirm.html", view=view, claim=claim, form=form)
    return _no_store(make_response(body, status))


def _problem(problem: Problem) -> ResponseReturnValue:
    body = render_template("approvals/problem.html", problem=problem)
    return _no_store(make_response(body, problem.status))


def _no_store(response: ResponseReturnValue) -> ResponseReturnValue:
    response.headers["Cache-Control"] = "no-store"  # type: ignore[union-attr]
    response.headers["X-Robots-Tag"] = "noindex"  # type: ignore[union-attr]
    return response
