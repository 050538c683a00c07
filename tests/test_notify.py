"""Notifications over real transports on loopback: SMTP (aiosmtpd) and a Slack
incoming webhook (http.server). Runs are driven in-process on the real database;
`deliver` is what the `agentloop.notify` Celery task calls."""

from __future__ import annotations

import re

import pytest
from flask.testing import FlaskClient

from app.engine.models import RunStatus
from app.notify import DeliveryFailed, deliver
from app.service import Notice
from app.store.accounts import User
from tests.support.fixtures import Harness, steps
from tests.support.web import Mailbox, Webhook, body_of, csrf_token, free_port

APPROVER = "alice@example.com"
LINK = re.compile(r"https?://[^/\s]+(/approvals/[A-Za-z0-9_.\-]+)")
XSS = "<script>alert(1)</script>"


def paused(harness: Harness, task: str = "deploy it", **config) -> str:
    harness.planner.script = [steps("noop", "noop")]
    run_id = harness.service.create_run(
        task,
        config={"approval_required": ["noop"], "approvers": [APPROVER], **config},
        created_by="tests",
    )
    harness.drain()
    assert harness.service.status(run_id).run.status == RunStatus.PAUSED
    return run_id


def notices(harness: Harness, run_id: str) -> list[str]:
    return [n for n, r in harness.notifier.sent if r == run_id]


def events_of(harness: Harness, run_id: str, kind: str) -> list[str]:
    return [e.message for e in harness.service.status(run_id).events if e.kind == kind]


def test_the_approval_email_has_the_step_the_plan_and_a_link_that_works(
    mailbox: Mailbox, harness: Harness, client: FlaskClient, make_user
):
    named = make_user("approver")  # an approver named by user name: their email is used
    run_id = paused(harness, approvers=[APPROVER, named.name])
    assert notices(harness, run_id) == ["approval_needed"]
    deliver(harness.service, Notice.APPROVAL_NEEDED, run_id, attempt=1)
    assert sorted(m["To"] for m in mailbox.messages) == sorted([APPROVER, named.email])
    mail = mailbox.to(APPROVER)[0]
    assert mail["Subject"].startswith("[agentloop] approval needed: noop")
    text, html = body_of(mail, "plain"), body_of(mail, "html")
    for body in (text, html):
        assert "deploy it" in body and "run noop" in body and "noop" in body
        assert "this step" in body  # the plan around it
    assert "Args:" in text and "{}" in text
    link = LINK.search(text)
    assert link is not None and link.group(1) in html
    assert LINK.search(body_of(mailbox.to(named.email)[0], "plain")).group(1) != link.group(1)

    before = harness.service.status(run_id)
    assert client.get(link.group(1)).status_code == 200  # a scanner, or the person looking
    after = harness.service.status(run_id)
    assert (after.run.status, len(after.events)) == (before.run.status, len(before.events))
    page = client.get(link.group(1))
    response = client.post(
        link.group(1), data={"csrf_token": csrf_token(page.text), "action": "approve"}
    )
    assert response.status_code == 200
    assert harness.service.status(run_id).run.status == RunStatus.RUNNING


def test_each_delivery_is_recorded_and_a_retry_does_not_send_it_again(
    mailbox: Mailbox, slack: Webhook, harness: Harness
):
    run_id = paused(harness)
    slack.fail_next = 1
    with pytest.raises(DeliveryFailed, match="slack"):
        deliver(harness.service, Notice.APPROVAL_NEEDED, run_id, attempt=1)
    assert len(mailbox.messages) == 1 and slack.payloads == []
    errors = events_of(harness, run_id, "error")
    assert any("not delivered (attempt 1" in e and "HTTP Error 500" in e for e in errors)
    assert harness.service.status(run_id).run.status == RunStatus.PAUSED  # never the run's fault
    deliver(harness.service, Notice.APPROVAL_NEEDED, run_id, attempt=2)
    assert len(mailbox.messages) == 1  # the email already went out on attempt 1
    assert len(slack.payloads) == 1
    sent = [m for m in events_of(harness, run_id, "status") if m.startswith("notified")]
    assert sent == [f"notified {APPROVER} by email: approval_needed",
                    "notified Slack by slack: approval_needed"]  # fmt: skip


def test_a_duplicate_notice_delivered_while_the_first_is_sending_does_not_send_twice(
    mailbox: Mailbox, slack: Webhook, harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 8, defect 18: the notify message redelivered (or published twice) while a
    worker is still posting to Slack. The second delivery must not post again."""
    import app.notify
    from app.notify.slack import post_slack as real_post

    run_id = paused(harness)
    second: list[BaseException | None] = []
    calls: list[str] = []

    def post_while_another_worker_delivers(url: str, text: str) -> None:
        calls.append(text)
        if len(calls) == 1:  # the first worker is mid-send: a second one takes the notice
            try:
                deliver(harness.service, Notice.APPROVAL_NEEDED, run_id, attempt=1)
                second.append(None)
            except DeliveryFailed as exc:
                second.append(exc)
        real_post(url, text)

    monkeypatch.setattr(app.notify, "post_slack", post_while_another_worker_delivers)
    deliver(harness.service, Notice.APPROVAL_NEEDED, run_id, attempt=1)
    assert len(slack.payloads) == 1, [p["text"][:40] for p in slack.payloads]
    assert len(mailbox.to(APPROVER)) == 1
    assert isinstance(second[0], DeliveryFailed)  # it retries later, and then finds it sent
    deliver(harness.service, Notice.APPROVAL_NEEDED, run_id, attempt=2)
    assert (len(slack.payloads), len(mailbox.to(APPROVER))) == (1, 1)


def test_an_smtp_server_that_is_down_is_a_delivery_failure_not_a_run_failure(
    monkeypatch: pytest.MonkeyPatch, harness: Harness
):
    monkeypatch.setenv("AGENTLOOP_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("AGENTLOOP_SMTP_PORT", str(free_port()))  # nobody listens
    run_id = paused(harness)
    with pytest.raises(DeliveryFailed, match=r"email to alice@example\.com"):
        deliver(harness.service, Notice.APPROVAL_NEEDED, run_id, attempt=3)
    assert any("attempt 3" in e for e in events_of(harness, run_id, "error"))
    assert harness.service.status(run_id).run.status == RunStatus.PAUSED


def test_the_completion_email_and_slack_message_carry_the_report(
    mailbox: Mailbox, slack: Webhook, harness: Harness, user: User
):
    harness.planner.script = [steps("noop")]
    run_id = harness.service.create_run(
        "finish", config={"approvers": [APPROVER]}, created_by=user.name
    )
    harness.drain()
    assert notices(harness, run_id) == ["completed"]
    deliver(harness.service, Notice.COMPLETED, run_id, attempt=1)
    assert sorted(m["To"] for m in mailbox.messages) == sorted([APPROVER, user.email])
    mail = mailbox.to(APPROVER)[0]
    assert "completed" in mail["Subject"]
    assert "# scripted report" in body_of(mail, "plain")
    assert "<h1>scripted report</h1>" in body_of(mail, "html")  # rendered Markdown
    assert "*Run completed*" in slack.payloads[0]["text"]
    assert "# scripted report" in slack.payloads[0]["text"]


def test_the_failure_email_carries_the_reason(mailbox: Mailbox, slack: Webhook, harness):
    from app.engine.actions import PlannerFatal

    harness.planner.script = [PlannerFatal(error="the API key was refused")]
    run_id = harness.service.create_run("doomed", config={"approvers": [APPROVER]})
    harness.drain()
    assert notices(harness, run_id) == ["failed"]
    deliver(harness.service, Notice.FAILED, run_id, attempt=1)
    mail = mailbox.to(APPROVER)[0]
    assert "failed" in mail["Subject"]
    assert "the API key was refused" in body_of(mail, "plain")
    assert "Reason: planner error: the API key was refused" in slack.payloads[0]["text"]


def test_an_unknown_outcome_after_a_crash_asks_a_person(mailbox: Mailbox, slack, harness):
    harness.planner.script = [steps("effect")]
    run_id = harness.service.create_run("crash mid-step", config={"approvers": [APPROVER]})
    harness.step()  # the plan

    def worker_dies(*args, **kwargs):
        # The process ends here: no handler of the service runs (a RuntimeError would be
        # a bug in this worker, recorded as an internal error while it holds the lease).
        raise SystemExit("the worker died mid-tool")

    harness.service._execute = worker_dies  # the step is marked running, then nothing
    with pytest.raises(SystemExit):
        harness.step()
    del harness.service._execute
    harness.clock.advance(60)  # the lease runs out
    harness.service.sweep()
    harness.drain()
    assert notices(harness, run_id) == ["outcome_unknown"]
    deliver(harness.service, Notice.OUTCOME_UNKNOWN, run_id, attempt=1)
    text = body_of(mailbox.to(APPROVER)[0], "plain")
    assert "outcome is unknown" in text and "(effect)" in text
    assert f"/runs/{run_id}" in text and "/approvals/" not in text  # decided on the run page
    assert "*Outcome unknown*" in slack.payloads[0]["text"]


def test_slack_gets_no_approval_link_and_cannot_be_made_to_ping(slack: Webhook, harness):
    run_id = paused(harness, task=f"<!channel> & <http://evil.example|click> {XSS}")
    deliver(harness.service, Notice.APPROVAL_NEEDED, run_id, attempt=1)
    text = slack.payloads[0]["text"]
    assert "*Approval needed*" in text and f"/runs/{run_id}|run {run_id}>" in text
    assert "/approvals/" not in text
    assert "&lt;!channel&gt; &amp; &lt;http://evil.example|click&gt;" in text
    assert "<!channel>" not in text


def test_task_text_in_the_html_email_is_escaped(mailbox: Mailbox, harness: Harness):
    run_id = paused(harness, task=f"deploy {XSS}")
    deliver(harness.service, Notice.APPROVAL_NEEDED, run_id, attempt=1)
    mail = mailbox.messages[0]
    assert XSS not in body_of(mail, "html")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body_of(mail, "html")
    assert "\n" not in mail["Subject"]


def test_an_approver_without_an_address_is_reported(mailbox: Mailbox, harness: Harness, make_user):
    silent = make_user("no-address", email=False)
    run_id = paused(harness, approvers=[APPROVER, silent.name])
    deliver(harness.service, Notice.APPROVAL_NEEDED, run_id, attempt=1)
    assert [m["To"] for m in mailbox.messages] == [APPROVER]
    assert any(f"no email address for approver(s) {silent.name}" in e
               for e in events_of(harness, run_id, "error"))  # fmt: skip


def test_an_approval_decided_before_the_notice_runs_sends_nothing(mailbox: Mailbox, harness):
    run_id = paused(harness)
    harness.service.approve(run_id, by="quick")
    deliver(harness.service, Notice.APPROVAL_NEEDED, run_id, attempt=1)
    assert mailbox.messages == []


def test_without_smtp_or_slack_nothing_is_sent_or_recorded(harness: Harness):
    run_id = paused(harness)
    before = len(harness.service.status(run_id).events)
    deliver(harness.service, Notice.APPROVAL_NEEDED, run_id, attempt=1)
    assert len(harness.service.status(run_id).events) == before
