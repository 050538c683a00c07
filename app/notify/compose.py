"""What a notification says: subject, plain text and HTML for email, text for Slack.

HTML is rendered by Jinja with autoescape on, so a task or a tool's output can
never add markup to an email. Slack's own control characters are escaped too,
so a task cannot mention @channel or forge a link.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from app.engine.models import Step, StepStatus
from app.markdown_html import markdown_html
from app.service import ApprovalView, Notice, RunView

SUBJECT_TASK_CHARS = 60
SLACK_TEXT_CHARS = 3500
REPORT_CHARS = 20_000


@dataclass(frozen=True)
class Mail:
    subject: str
    text: str
    html: str


@dataclass(frozen=True)
class Links:
    """Where a person acts: the run page, and (for an approver) a decision link."""

    run: str
    decide: str | None = None
    expires: datetime | None = None


@cache
def _env() -> Environment:
    return Environment(
        loader=PackageLoader("app.notify", "templates"),
        autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str, ensure_ascii=False)


def one_line(text: str, limit: int = SUBJECT_TASK_CHARS) -> str:
    """Fit for a header: no line breaks (header injection), bounded length."""
    flat = re.sub(r"\s+", " ", text).strip()
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _render(name: str, **context: Any) -> tuple[str, str]:
    env = _env()
    context = {"pretty": pretty, **context}
    return (
        env.get_template(f"{name}.txt").render(**context),
        env.get_template(f"{name}.html").render(**context),
    )


def approval_mail(view: ApprovalView, links: Links) -> Mail:
    step: Step = view.step
    text, html = _render("approval", view=view, step=step, plan=view.plan, links=links)
    subject = f"[agentloop] approval needed: {step.tool} — {one_line(view.run.task)}"
    return Mail(subject=subject, text=text, html=html)


def run_mail(notice: Notice, view: RunView, links: Links) -> Mail:
    """The mail for a run that completed, failed, or waits on an unknown outcome."""
    run = view.run
    report = (run.report or "")[:REPORT_CHARS]
    pending = view.pending_approval
    step = _step(view, pending.step_id) if pending is not None else rejected_step(view)
    text, html = _render(
        str(notice), run=run, report=report, report_html=markdown_html(report),
        pending=pending, step=step, links=links,
    )  # fmt: skip
    headline = {
        Notice.COMPLETED: "completed",
        Notice.FAILED: "failed",
        Notice.OUTCOME_UNKNOWN: "needs a decision (outcome unknown)",
        Notice.APPROVAL_NEEDED: "needs approval",
        Notice.REJECTED: f"rejected by {run.ended_by or 'a person'}",
        Notice.CANCELLED: f"cancelled by {run.ended_by or 'a person'}",
    }[notice]
    return Mail(subject=f"[agentloop] {headline}: {one_line(run.task)}", text=text, html=html)


def _step(view: RunView, step_id: int) -> Step | None:
    return next((s for s in view.steps if s.id == step_id), None)


def rejected_step(view: RunView) -> Step | None:
    """The step whose rejection ended the run (the last one rejected), if any."""
    return next((s for s in reversed(view.steps) if s.status == StepStatus.REJECTED), None)


def _decided(notice: Notice, run: Any, step: Step | None) -> str:
    """A person's decision that ended the run, in one line: why, and what it means."""
    why = f"Reason: {run.end_reason}" if run.end_reason else "No reason given"
    if notice is Notice.CANCELLED:
        return f"{why}. A decision, not a failure: nothing more runs."
    what = f"step {step.position} ({step.tool})" if step is not None else "a step"
    return (
        f"{why}. {what[0].upper()}{what[1:]} was not run and the planner had no other way "
        "to do the task, so the run ended there: a decision, not a failure."
    )


def slack_escape(text: str) -> str:
    """Slack's mrkdwn control characters (https://api.slack.com/reference/surfaces/formatting)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_text(notice: Notice, view: RunView, links: Links) -> str:
    """One Slack message. Approval links are never posted to a shared channel: the
    message points to the run page, where a signed-in approver decides."""
    run = view.run
    head = f"<{links.run}|run {run.id}>: {slack_escape(one_line(run.task, 200))}"
    match notice:
        case Notice.APPROVAL_NEEDED | Notice.OUTCOME_UNKNOWN:
            pending = view.pending_approval
            step = _step(view, pending.step_id) if pending is not None else None
            what = (
                f"step {step.position} `{slack_escape(step.tool)}` "
                f"{slack_escape(json.dumps(step.args, default=str))}"
                if step is not None
                else "a step"
            )
            why = slack_escape(pending.reason) if pending is not None else ""
            title = "Approval needed" if notice is Notice.APPROVAL_NEEDED else "Outcome unknown"
            body = f"*{title}* for {head}\n{what}\n{why}\nDecide on the run page."
        case Notice.COMPLETED:
            report = slack_escape((run.report or "(no report)")[:SLACK_TEXT_CHARS])
            body = f"*Run completed* {head}\n```{report}```"
        case Notice.FAILED:
            reason = slack_escape((run.error or "no reason recorded")[:SLACK_TEXT_CHARS])
            body = f"*Run failed* {head}\nReason: {reason}"
        case Notice.REJECTED | Notice.CANCELLED:
            body = f"*Run {notice}* by {slack_escape(run.ended_by or 'a person')}: {head}\n"
            body += slack_escape(_decided(notice, run, rejected_step(view)))[:SLACK_TEXT_CHARS]
    return body
