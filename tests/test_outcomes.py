"""A run a person's decision ended reads as that decision, not as a crash (issue 12,
item 2): a rejection the planner has no way around ends the run `rejected`, a
cancel `cancelled`, each with who and why — in the engine, on the run page and the
runs list, in the JSON API, the CLI and the email and Slack notices."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner

from app.cli import main
from app.engine.actions import NoAlternative, Plan, PlannerFatal
from app.engine.apply import apply_transition
from app.engine.machine import decide, fold_decision, fold_plan, stop
from app.engine.models import (
    Decision,
    PauseKind,
    RunConfig,
    RunSnapshot,
    RunStatus,
    Step,
)
from app.notify import deliver
from app.service import Notice
from app.service.export import export_markdown
from app.store.accounts import User
from tests.support.fixtures import Harness
from tests.support.web import Mailbox, Webhook, body_of, csrf_token, paused_run
from tests.test_web_api import api  # noqa: F401 - the API client fixture
from tests.test_web_approvals import post, waiting  # noqa: F401 - the link and its page

NOW = datetime(2026, 1, 1, tzinfo=UTC)
REASON = "not on a friday"
NO_WAY = "runbook deploy_pr has no alternative to noop after: rejected by ann: not on a friday"


# --- the engine ----------------------------------------------------------------------


def waiting_run(**config: object) -> RunSnapshot:
    step = Step(id=1, plan_version=1, position=1, description="deploy", tool="deploy")
    return RunSnapshot(
        id="r1",
        task="deploy it",
        status=RunStatus.PAUSED,
        config=RunConfig.model_validate(config),
        iteration=3,
        tick=3,
        plan_version=1,
        deadline=NOW + timedelta(hours=1),
        steps=[step],
    )


def rejected(run: RunSnapshot) -> RunSnapshot:
    decided = fold_decision(
        run.steps[0], PauseKind.APPROVAL, Decision.REJECT, by="ann", context={}, reason=REASON
    )
    return apply_transition(run, decided)


def test_a_rejection_keeps_who_and_why_with_the_step_for_the_replan():
    action = decide(rejected(waiting_run()), now=NOW, tools={})
    assert isinstance(action, Plan) and action.failure is not None
    assert action.failure.rejection is not None
    assert (action.failure.rejection.by, action.failure.rejection.reason) == ("ann", REASON)


def test_no_alternative_after_a_rejection_ends_the_run_rejected_not_failed():
    run = rejected(waiting_run())
    action = decide(run, now=NOW, tools={})
    assert isinstance(action, Plan)
    ended = fold_plan(run, action, NoAlternative(reason=NO_WAY), jitter_sample=0)
    assert ended.status is RunStatus.REJECTED
    assert (ended.ended_by, ended.end_reason, ended.error) == ("ann", REASON, None)
    messages = [e.message for e in ended.events]
    assert f"run rejected by ann: {REASON}" in messages
    assert any(NO_WAY in m for m in messages)  # the planner's account, as a decision


def test_a_planner_error_after_a_rejection_is_still_a_failure():
    run = rejected(waiting_run())
    action = decide(run, now=NOW, tools={})
    assert isinstance(action, Plan)
    ended = fold_plan(run, action, PlannerFatal(error="key refused"), jitter_sample=0)
    assert ended.status is RunStatus.FAILED and ended.ended_by is None


def test_replans_used_up_on_a_rejection_end_the_run_rejected():
    run = rejected(waiting_run(max_replans=0))
    action = decide(run, now=NOW, tools={})
    ended = stop(action)  # type: ignore[arg-type]
    assert ended.status is RunStatus.REJECTED and ended.ended_by == "ann"


def test_rejected_and_cancelled_are_terminal_decisions():
    for status in (RunStatus.REJECTED, RunStatus.CANCELLED):
        assert status.is_terminal and status.is_decision
    assert not RunStatus.FAILED.is_decision


# --- the service and what people see --------------------------------------------------


def rejected_run(harness: Harness, **config: object) -> str:
    run_id = paused_run(harness, **config)
    harness.service.reject(run_id, by="ann", reason=REASON)
    harness.planner.script = [NoAlternative(reason=NO_WAY)]
    harness.drain()
    return run_id


def test_a_rejected_run_keeps_who_and_why_and_no_error(harness: Harness):
    run_id = rejected_run(harness)
    run = harness.service.status(run_id).run
    assert (run.status, run.ended_by, run.end_reason, run.error) == (
        "rejected",
        "ann",
        REASON,
        None,
    )
    assert run.finished_at is not None
    assert ("rejected", run_id) in harness.notifier.sent


def test_a_cancel_keeps_who_and_why_and_tells_people(harness: Harness):
    run_id = paused_run(harness)
    harness.service.cancel(run_id, by="bob", reason="wrong PR")
    run = harness.service.status(run_id).run
    assert (run.status, run.ended_by, run.end_reason, run.error) == (
        "cancelled", "bob", "wrong PR", None,
    )  # fmt: skip
    assert ("cancelled", run_id) in harness.notifier.sent
    assert harness.service.list_runs(status="cancelled", limit=500, offset=0).total >= 1


def test_the_run_page_and_list_show_a_rejection_as_a_decision(signed_in, harness: Harness):
    run_id = rejected_run(harness)
    page = signed_in.get(f"/runs/{run_id}").text
    assert "Rejected by ann</strong> at step 1 (<code>noop</code>): not on a friday." in page
    assert "decision, not an error" in page
    assert "Error:" not in page
    assert 'class="badge status-rejected"' in page
    listing = signed_in.get("/?status=rejected").text
    assert run_id in listing and "status-rejected" in listing


def test_the_run_page_shows_a_cancel_as_a_decision(signed_in, harness: Harness):
    run_id = paused_run(harness)
    harness.service.cancel(run_id, by="bob")
    page = signed_in.get(f"/runs/{run_id}").text
    assert "Cancelled by bob</strong>: no reason given." in page
    assert "Error:" not in page


def test_the_reject_flash_says_what_happens_not_that_the_run_resumes(
    signed_in, harness: Harness, user: User
):
    run_id = paused_run(harness, approvers=[user.name])
    page = signed_in.get(f"/runs/{run_id}").text
    approval = harness.service.status(run_id).pending_approval
    assert approval is not None
    answer = signed_in.post(
        f"/runs/{run_id}/decide",
        data={
            "csrf_token": csrf_token(page),
            "approval_id": approval.id,
            "action": "reject",
            "reason": REASON,
        },
        follow_redirects=True,
    )
    assert "The run resumes" not in answer.text
    # The harness's runs plan offline, whose runbooks have no way around a rejection.
    assert "no other way to do the task, so the run ends as rejected" in answer.text


def test_the_api_answers_the_outcome_and_cancels_with_a_reason(
    api,  # noqa: F811 - the fixture imported above
    harness: Harness,
    user: User,
):
    run_id = rejected_run(harness)
    shown = api("GET", f"/api/runs/{run_id}").json
    assert (shown["status"], shown["ended_by"], shown["end_reason"], shown["error"]) == (
        "rejected", "ann", REASON, None,
    )  # fmt: skip
    listed = api("GET", "/api/runs?status=rejected&limit=200").json["runs"]
    assert run_id in [r["id"] for r in listed]
    other = paused_run(harness, created_by=user.name)
    cancelled = api("POST", f"/api/runs/{other}/cancel", {"reason": "wrong PR"}).json
    assert (cancelled["status"], cancelled["end_reason"]) == ("cancelled", "wrong PR")
    assert cancelled["ended_by"] and cancelled["error"] is None


@pytest.fixture
def cli(database_url, redis_db) -> CliRunner:
    return CliRunner()


def test_the_cli_reads_the_outcome_as_a_decision(cli, harness: Harness):
    run_id = rejected_run(harness)
    status = cli.invoke(main, ["status", run_id])
    assert status.exit_code == 0, status.output
    assert f"rejected by ann: {REASON} (a decision, not a failure)" in status.output
    assert "error:" not in status.output.split("steps:")[0]
    listed = cli.invoke(main, ["runs", "--status", "rejected", "--limit", "500"])
    assert run_id in listed.output and "(by ann)" in listed.output
    followed = cli.invoke(main, ["follow", run_id])
    assert followed.exit_code == 1  # the task was not done
    assert f"run {run_id} rejected by ann: {REASON} (a decision" in followed.output
    other = paused_run(harness)
    assert cli.invoke(main, ["cancel", other, "--reason", "wrong PR"]).exit_code == 0
    shown = cli.invoke(main, ["status", other]).output
    assert "cancelled by " in shown and ": wrong PR (a decision, not a failure)" in shown


def test_the_emails_and_slack_tell_a_decision(mailbox: Mailbox, slack: Webhook, harness: Harness):
    approver = "carol@example.com"
    run_id = rejected_run(harness, approvers=[approver])
    deliver(harness.service, Notice.REJECTED, run_id, attempt=1)
    mail = mailbox.to(approver)[0]
    assert "rejected by ann" in mail["Subject"] and "failed" not in mail["Subject"]
    text = body_of(mail, "plain")
    assert f"Their reason: {REASON}" in text and "Rejected step: 1. " in text
    assert "not a failure" in text and "Run rejected by ann" in body_of(mail, "html")
    assert slack.payloads[-1]["text"].startswith("*Run rejected* by ann")

    other = paused_run(harness, approvers=[approver])
    harness.service.cancel(other, by="bob", reason="wrong PR")
    deliver(harness.service, Notice.CANCELLED, other, attempt=1)
    mail = next(m for m in mailbox.to(approver) if "cancelled" in m["Subject"])
    assert "cancelled by bob" in mail["Subject"]
    assert "Their reason: wrong PR" in body_of(mail, "plain")
    assert "Reason: wrong PR" in slack.payloads[-1]["text"]


def test_export_and_import_keep_the_outcome(harness: Harness):
    run_id = rejected_run(harness)
    document = harness.service.export_run(run_id)
    assert (document["run"]["ended_by"], document["run"]["end_reason"]) == ("ann", REASON)
    assert f"**Rejected by ann:** {REASON}" in export_markdown(document)
    made = harness.service.import_run(document, by="tests")
    copy = harness.service.status(made.run_id).run
    assert (copy.status, copy.ended_by, copy.end_reason, copy.error) == (
        "rejected", "ann", REASON, None,
    )  # fmt: skip


def test_a_cancel_from_the_run_page_keeps_the_reason(signed_in, harness: Harness, user: User):
    run_id = paused_run(harness, created_by=user.name)
    page = signed_in.get(f"/runs/{run_id}").text
    assert f'id="cancel-reason-{run_id}"' in page
    shown = signed_in.post(
        f"/runs/{run_id}/cancel",
        data={"csrf_token": csrf_token(page), "reason": "wrong PR"},
        follow_redirects=True,
    ).text
    assert f"Cancelled by {user.name}</strong>: wrong PR." in shown
    run = harness.service.status(run_id).run
    assert (run.status, run.ended_by, run.end_reason) == ("cancelled", user.name, "wrong PR")


def test_the_email_link_page_after_a_reject_does_not_say_the_run_resumes(
    client,
    harness: Harness,
    waiting,  # noqa: F811 - the fixture imported above
):
    answer = post(client, waiting.url, action="reject", reason="freeze week")
    assert answer.status_code == 200
    assert "resumes" not in answer.text
    assert "if it has no other way to do the task, the run ends as rejected" in answer.text
