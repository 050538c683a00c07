"""End to end with a real `celery worker`, PostgreSQL, Redis, a real SMTP server
and a Slack webhook on loopback: the approval email arrives, its link is
followed (GET changes nothing; POST approves), and the completion email arrives
with the report. A Slack outage is retried by the notify task with backoff."""

from __future__ import annotations

import re

import pytest

from app.engine.models import RunStatus
from app.web import create_app
from tests.support.fixtures import wait_until
from tests.support.web import Mailbox, Webhook, body_of, csrf_token

pytestmark = pytest.mark.e2e

APPROVER = "ops@example.com"
LINK = re.compile(r"https?://[^/\s]+(/approvals/[A-Za-z0-9_.\-]+)")


def test_approve_by_email_then_the_report_by_email(
    mailbox: Mailbox, slack: Webhook, start_worker, live_service
):
    slack.fail_next = 1  # Slack is down for the first notice: the task retries it
    start_worker()  # inherits the SMTP and Slack settings from this process
    run_id = live_service.create_run(
        "apply the idempotent effect holding 0s",
        config={"approval_required": ["idem_effect"], "approvers": [APPROVER]},
        created_by="e2e",
    )
    mail = wait_until(lambda: mailbox.to(APPROVER), timeout=60, what="the approval email")[0]
    assert "approval needed: idem_effect" in mail["Subject"]
    path = LINK.search(body_of(mail, "plain")).group(1)

    client = create_app({"AGENTLOOP_SERVICE": live_service}).test_client()
    before = live_service.status(run_id)
    page = client.get(path)
    assert page.status_code == 200 and "apply the idempotent effect" in page.text
    after = live_service.status(run_id)
    assert after.run.status == RunStatus.PAUSED and after.run.tick == before.run.tick
    assert after.pending_approval.status == "pending"

    # Slack's first answer was a 500: the notify task retries it after a countdown.
    wait_until(lambda: slack.payloads, timeout=30, what="the retried Slack message")
    assert "*Approval needed*" in slack.payloads[0]["text"]
    decided = client.post(path, data={"csrf_token": csrf_token(page.text), "action": "approve"})
    assert decided.status_code == 200

    done = wait_until(
        lambda: [m for m in mailbox.to(APPROVER) if "completed" in m["Subject"]],
        timeout=60,
        what="the completion email",
    )[0]
    view = live_service.status(run_id)
    assert view.run.status == RunStatus.COMPLETED and view.run.report
    assert view.run.report.strip().splitlines()[0] in body_of(done, "plain")
    assert len([m for m in mailbox.to(APPROVER) if "approval needed" in m["Subject"]]) == 1

    def slack_with(title: str) -> list[str]:
        return [p["text"] for p in list(slack.payloads) if p["text"].startswith(title)]

    # Read by content, not by position: each notice reaches Slack exactly once.
    wait_until(lambda: slack_with("*Run completed*"), timeout=30, what="the Slack completion")
    assert len(slack_with("*Approval needed*")) == 1
    assert len(slack_with("*Run completed*")) == 1
    errors = [e.message for e in view.events if e.kind == "error"]
    assert any("not delivered (attempt 1" in e for e in errors)  # recorded, then retried
