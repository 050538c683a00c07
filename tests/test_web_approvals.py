"""Approval links from email, through Flask's test client over the real database:
GET changes nothing, POST decides once, and every bad link gets a clear page
and changes nothing. Also: concurrent approvals, and expiry by the beat task."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest
from flask import Flask
from flask.testing import FlaskClient
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from sqlalchemy import func, select

from app.config import load_settings
from app.engine.models import RunStatus, args_hash
from app.notify import approval_link
from app.notify.tokens import SALT, ApprovalClaim, sign_approval
from app.service import Notice
from app.store.schema import approvals, events, runs
from tests.support.fixtures import Harness, steps
from tests.support.web import csrf_token

APPROVER = "alice@example.com"
SECOND = "bob@example.com"


@dataclass
class Waiting:
    run_id: str
    approval_id: str
    args_hash: str
    token: str

    @property
    def url(self) -> str:
        return f"/approvals/{self.token}"


@pytest.fixture
def waiting(harness: Harness) -> Waiting:
    """A run paused for approval of its first step; APPROVER and SECOND approve it."""
    harness.planner.script = [steps("noop", "noop")]
    run_id = harness.service.create_run(
        "approve me by email",
        config={"approval_required": ["noop"], "approvers": [APPROVER, SECOND]},
    )
    harness.drain()
    pending = harness.service.status(run_id).pending_approval
    assert pending is not None
    return Waiting(run_id, pending.id, pending.args_hash, token_for(pending.id, pending.args_hash))


def token_for(approval_id: str, hashed: str, approver: str = APPROVER, secret: str = "") -> str:
    claim = ApprovalClaim(approval_id=approval_id, approver=approver, args_hash=hashed)
    return sign_approval(secret or load_settings().secret_key, claim)


def snapshot(store, run_id: str) -> tuple:
    """Everything a click could change: the run row, its approvals, its event count."""
    with store.engine.connect() as conn:
        run = conn.execute(select(runs).where(runs.c.id == run_id)).one()
        rows = conn.execute(select(approvals).where(approvals.c.run_id == run_id)).all()
        count = conn.execute(
            select(func.count()).select_from(events).where(events.c.run_id == run_id)
        ).scalar()
    return (tuple(run), sorted(tuple(r) for r in rows), count)


def post(client: FlaskClient, url: str, **fields: str):
    token = csrf_token(client.get(url).text)
    return client.post(url, data={"csrf_token": token, **fields})


def test_opening_the_link_shows_the_step_and_changes_nothing(client, store, waiting: Waiting):
    before = snapshot(store, waiting.run_id)
    for _ in range(3):  # a mail scanner, a preview, the person
        page = client.get(waiting.url)
        assert page.status_code == 200
    assert snapshot(store, waiting.run_id) == before
    text = page.text
    assert "approve me by email" in text and "run noop" in text and "this step" in text
    assert f"deciding as <strong>{APPROVER}</strong>" in text
    assert page.headers["Cache-Control"] == "no-store"
    assert page.headers["Referrer-Policy"] == "no-referrer"


def test_post_approves_once_with_who_and_how(client, harness: Harness, waiting: Waiting):
    response = post(client, waiting.url, action="approve", approval_id=waiting.approval_id)
    assert response.status_code == 200 and "approved" in response.text
    view = harness.service.status(waiting.run_id)
    assert view.run.status == RunStatus.RUNNING
    audit = [e for e in view.events if e.kind == "approval" and "decided" in e.message][-1]
    assert audit.data["by"] == APPROVER and audit.data["channel"] == "email"
    harness.drain()
    assert harness.service.status(waiting.run_id).run.status == RunStatus.PAUSED  # 2nd noop


def test_reject_with_a_reason_makes_the_agent_replan(client, harness: Harness, waiting):
    empty = post(client, waiting.url, action="reject", reason=" ", approval_id=waiting.approval_id)
    assert empty.status_code == 400 and "needs a reason" in empty.text
    assert harness.service.status(waiting.run_id).run.status == RunStatus.PAUSED
    response = post(client, waiting.url, action="reject", reason="freeze week")
    assert response.status_code == 200 and "rejected" in response.text
    harness.step()
    failure = harness.planner.requests[-1].failure
    assert failure is not None and "freeze week" in (failure.rejection_reason or "")


def test_edited_args_are_checked_against_the_tools_model(client, harness: Harness):
    from app.engine.actions import PlanProduced
    from app.engine.models import PlannedStep

    harness.planner.script = [
        PlanProduced(steps=[PlannedStep(description="hold", tool="idem_effect", args={"hold": 0})])
    ]
    run_id = harness.service.create_run(
        "edit by email", config={"approval_required": ["idem_effect"], "approvers": [APPROVER]}
    )
    harness.drain()
    pending = harness.service.status(run_id).pending_approval
    url = f"/approvals/{token_for(pending.id, pending.args_hash)}"
    bad = post(client, url, action="approve", args='{"hold": 1000}')
    assert bad.status_code == 400 and "edited args are invalid" in bad.text
    broken = post(client, url, action="approve", args="{not json")
    assert broken.status_code == 400 and "not valid JSON" in broken.text
    assert harness.service.status(run_id).run.status == RunStatus.PAUSED
    good = post(client, url, action="approve", args='{"hold": 2}')
    assert good.status_code == 200 and "approved with edited args" in good.text
    assert harness.service.status(run_id).steps[0].args == {"hold": 2}


def test_a_double_click_and_a_second_approver_are_told_it_is_decided(client, store, waiting):
    csrf = csrf_token(client.get(waiting.url).text)
    first = client.post(waiting.url, data={"csrf_token": csrf, "action": "approve"})
    assert first.status_code == 200
    before = snapshot(store, waiting.run_id)
    again = client.post(waiting.url, data={"csrf_token": csrf, "action": "approve"})
    assert again.status_code == 409 and "Already decided" in again.text
    assert f"approve by {APPROVER}" in again.text
    second = token_for(waiting.approval_id, waiting.args_hash, approver=SECOND)
    late = client.get(f"/approvals/{second}")
    assert late.status_code == 409 and f"approve by {APPROVER}" in late.text
    replay = client.post(
        f"/approvals/{second}", data={"csrf_token": csrf, "action": "reject", "reason": "x"}
    )
    assert replay.status_code == 409
    assert snapshot(store, waiting.run_id) == before


class _Backdated(TimestampSigner):
    def get_timestamp(self) -> int:
        return int(time.time()) - 10 * 24 * 3600


def bad_tokens(waiting: Waiting) -> dict[str, tuple[str, int, str]]:
    secret = load_settings().secret_key
    good = waiting.token
    payload = {"a": waiting.approval_id, "u": APPROVER, "h": waiting.args_hash}
    expired = URLSafeTimedSerializer(secret, salt=SALT, signer=_Backdated).dumps(payload)
    tampered = good[:5] + ("A" if good[5] != "A" else "B") + good[6:]
    other_claim = URLSafeTimedSerializer(secret, salt=SALT).dumps(
        {**payload, "u": "mallory@example.com"}
    )  # signed by us, for someone who is not an approver
    return {
        "expired": (expired, 410, "This link has expired"),
        "forged": (token_for(waiting.approval_id, waiting.args_hash, secret="x" * 16), 400,
                   "This link is not valid"),
        "tampered": (tampered, 400, "This link is not valid"),
        "truncated": (good[:-6], 400, "This link is not valid"),
        "garbage": ("not-a-token", 400, "This link is not valid"),
        "other salt": (URLSafeTimedSerializer(secret).dumps(payload), 400, "not valid"),
        "not an approver": (other_claim, 403, "Not your approval"),
        "args changed": (token_for(waiting.approval_id, args_hash({"x": 1})), 409,
                         "The step changed"),
        "no such approval": (token_for("0" * 32, waiting.args_hash), 404, "No such approval"),
    }  # fmt: skip


@pytest.mark.parametrize(
    "case",
    ["expired", "forged", "tampered", "truncated", "garbage", "other salt", "not an approver",
     "args changed", "no such approval"],
)  # fmt: skip
def test_a_bad_link_gets_a_clear_page_and_changes_nothing(client, store, waiting, case: str):
    token, status, title = bad_tokens(waiting)[case]
    before = snapshot(store, waiting.run_id)
    shown = client.get(f"/approvals/{token}")
    assert shown.status_code == status and title in shown.text
    csrf = csrf_token(client.get(waiting.url).text)
    tried = client.post(f"/approvals/{token}", data={"csrf_token": csrf, "action": "approve"})
    assert tried.status_code == status and title in tried.text
    assert snapshot(store, waiting.run_id) == before
    assert "Nothing was changed" in shown.text or status == 404


def test_a_post_without_the_pages_csrf_token_changes_nothing(client, store, waiting: Waiting):
    before = snapshot(store, waiting.run_id)
    response = client.post(waiting.url, data={"action": "approve"})
    assert response.status_code == 400 and "could not be verified" in response.text
    assert snapshot(store, waiting.run_id) == before


def test_a_link_to_an_approval_decided_elsewhere_says_by_whom(client, harness, waiting):
    # Decided on the run page (or by the CLI) before the email was opened.
    harness.service.reject(waiting.run_id, by="someone", reason="no")
    response = client.get(waiting.url)
    assert response.status_code == 409 and "reject by someone" in response.text


def test_two_concurrent_approvals_resume_the_run_exactly_once(web_app: Flask, harness, waiting):
    clients = [web_app.test_client() for _ in range(2)]
    tokens = [csrf_token(c.get(waiting.url).text) for c in clients]
    harness.dispatcher.sent.clear()
    barrier = threading.Barrier(2)
    statuses: list[int] = []

    def approve(client: FlaskClient, csrf: str) -> None:
        barrier.wait()
        response = client.post(waiting.url, data={"csrf_token": csrf, "action": "approve"})
        statuses.append(response.status_code)

    threads = [
        threading.Thread(target=approve, args=pair) for pair in zip(clients, tokens, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [200, 409]
    assert [m[0] for m in harness.dispatcher.sent] == [waiting.run_id]  # resumed once
    decided = [
        e for e in harness.service.status(waiting.run_id).events
        if e.kind == "approval" and "decided approve" in e.message
    ]  # fmt: skip
    assert len(decided) == 1


# --- expiry (the beat task's service call) ------------------------------------------------


def test_an_expired_approval_is_rejected_and_the_agent_replans(client, harness, waiting):
    harness.service.expire_approvals(ttl=300, policy="reject")
    assert harness.service.status(waiting.run_id).run.status == RunStatus.PAUSED
    harness.clock.advance(301)  # within the run's own timeout (600 s)
    # The database is shared by the session: other tests' approvals may expire too.
    assert harness.service.expire_approvals(ttl=300, policy="reject") >= 1
    view = harness.service.status(waiting.run_id)
    assert view.run.status == RunStatus.RUNNING
    assert any("expired" in e.message for e in view.events if e.kind == "approval")
    response = client.get(waiting.url)
    assert response.status_code == 410 and "This approval expired" in response.text
    ours = next(m for m in harness.dispatcher.sent if m[0] == waiting.run_id)
    harness.service.advance(ours[0], ours[1])
    assert harness.planner.requests[-1].purpose == "replan"


def test_an_expired_approval_fails_the_run_when_so_configured(harness: Harness, waiting):
    harness.notifier.sent.clear()
    harness.clock.advance(10)
    assert harness.service.expire_approvals(ttl=5, policy="fail") >= 1
    view = harness.service.status(waiting.run_id)
    assert view.run.status == RunStatus.FAILED and "approval expired" in view.run.error
    ours = [n for n in harness.notifier.sent if n[1] == waiting.run_id]
    assert ours == [(str(Notice.FAILED), waiting.run_id)]
    assert harness.service.expire_approvals(ttl=5, policy="fail") == 0  # once


def test_the_link_in_the_notifier_matches_the_web_route(client, waiting: Waiting):
    link = approval_link(load_settings(), waiting.approval_id, APPROVER, waiting.args_hash)
    path = link.split("://", 1)[1].split("/", 1)[1]
    assert client.get("/" + path).status_code == 200
