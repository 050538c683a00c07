"""The pages, through Flask's test client over the real database (only the queue
boundary is replaced): sign-in, the new-run form, the runs list, the run page
and its live updates, decisions, CSRF, escaping and security headers."""

from __future__ import annotations

import html
import re

import pytest
from flask.testing import FlaskClient

from app.engine.actions import PlanProduced
from app.engine.models import PlannedStep, RunStatus
from app.store.accounts import User
from tests.support.fixtures import Harness, steps
from tests.support.web import PASSWORD, csrf_token, paused_run

XSS = '<script>alert("pwned")</script><img src=x onerror=alert(1)>'

FORM = {
    "task": "noop chain",
    "planner": "offline",
    "approval_required": "deploy",
    "approvers": "",
    "max_iterations": "20",
    "timeout": "120",
    "max_retries": "2",
    "retry_base": "1",
    "retry_factor": "2",
    "retry_max_backoff": "10",
}


def post_form(client: FlaskClient, url: str, data: dict[str, str], page: str | None = None):
    token = csrf_token(client.get(page or url).text)
    return client.post(url, data={**data, "csrf_token": token})


def field_error(page: str, field: str) -> str:
    found = re.search(rf'<p class="error" id="{field}-error">([^<]*)</p>', page)
    assert found, f"no error shown next to {field}"
    return html.unescape(found.group(1))


# --- signing in -----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/runs/new", "/runs/abc", "/runs/abc/live"])
def test_pages_need_a_signed_in_user(client: FlaskClient, path: str):
    response = client.get(path)
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/login?next=")


def test_a_wrong_password_is_refused(client: FlaskClient, user: User):
    response = post_form(client, "/login", {"name": user.name, "password": "wrong password"})
    assert response.status_code == 401
    assert "do not match" in response.text
    assert client.get("/").status_code == 302


def test_sign_in_returns_to_the_page_asked_for_but_never_off_site(client, user: User):
    token = csrf_token(client.get("/login").text)
    response = client.post(
        "/login?next=/runs/new", data={"name": user.name, "password": PASSWORD, "csrf_token": token}
    )
    assert response.headers["Location"] == "/runs/new"
    client.post("/logout", data={"csrf_token": csrf_token(client.get("/").text)})
    token = csrf_token(client.get("/login").text)
    evil = client.post(
        "/login?next=//evil.example/x",
        data={"name": user.name, "password": PASSWORD, "csrf_token": token},
    )
    assert evil.headers["Location"] == "/"


def test_sign_out_needs_the_form(signed_in: FlaskClient):
    assert signed_in.post("/logout").status_code == 400  # no CSRF token: refused
    assert signed_in.get("/").status_code == 200
    signed_in.post("/logout", data={"csrf_token": csrf_token(signed_in.get("/").text)})
    assert signed_in.get("/").status_code == 302


# --- a new run ------------------------------------------------------------------------


def test_the_form_starts_a_run_with_its_options(
    signed_in: FlaskClient, harness: Harness, user, make_user
):
    bob = make_user("bob")
    response = post_form(
        signed_in, "/runs/new", {**FORM, "approvers": f"{bob.name}, carol@example.com"}
    )
    assert response.status_code == 302
    run_id = response.headers["Location"].rsplit("/", 1)[-1]
    run = harness.service.status(run_id).run
    assert run.created_by == user.name
    assert run.config["max_iterations"] == 20
    assert run.config["retry_policy"]["max_retries"] == 2
    assert run.config["approvers"] == [bob.name, "carol@example.com"]
    assert run.config["approval_required"] == ["deploy"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_iterations", "0", "greater than or equal to 1"),
        ("max_iterations", "many", "valid integer"),
        ("timeout", "-5", "greater than 0"),
        ("retry_base", "abc", "valid number"),
        ("max_retries", "99", "less than or equal to 20"),
        ("approval_required", "deploy, no_such_tool", "unknown tools: no_such_tool"),
        ("task", "   ", "the task is empty"),
    ],
)
def test_a_bad_value_is_explained_next_to_its_field(signed_in, harness, field, value, message):
    response = post_form(signed_in, "/runs/new", {**FORM, field: value})
    assert response.status_code == 400
    assert message in field_error(response.text, field)
    assert harness.dispatcher.sent == []  # nothing was started


def test_a_check_across_fields_lands_on_the_last_of_them(signed_in: FlaskClient):
    response = post_form(signed_in, "/runs/new", {**FORM, "retry_base": "30"})
    assert "max_backoff must be at least base" in field_error(response.text, "retry_max_backoff")


def test_the_form_refuses_a_post_without_its_csrf_token(signed_in: FlaskClient, harness):
    response = signed_in.post("/runs/new", data=FORM)
    assert response.status_code == 400
    assert "could not be verified" in response.text
    assert harness.dispatcher.sent == []


# --- the runs list --------------------------------------------------------------------


def test_the_list_filters_by_status_and_pages(signed_in: FlaskClient, harness: Harness, web_app):
    web_app.config["RUNS_PER_PAGE"] = 2
    # Three queued runs after the cancel: more than a page of two even when alone.
    ids = [harness.service.create_run(f"list me {i}") for i in range(4)]
    harness.service.cancel(ids[0], by="tests")
    cancelled = signed_in.get("/?status=cancelled").text
    assert "list me 0" in cancelled and "list me 1" not in cancelled
    first = signed_in.get("/?status=queued").text
    assert "page 1 of" in first and 'rel="next"' in first
    assert signed_in.get("/?status=bogus").status_code == 400


def test_the_list_shows_status_age_duration_and_cost(signed_in, harness: Harness):
    harness.planner.script = [steps("noop")]
    run_id = harness.service.create_run("a finished run")
    harness.drain()
    page = signed_in.get("/?status=completed").text
    row = page[page.index(f"/runs/{run_id}") - 200 :]
    assert "completed" in row and " ago" in row and "$0.0000" in row


# --- the run page ---------------------------------------------------------------------


def test_the_run_page_shows_plans_with_why_they_changed(signed_in, harness: Harness):
    harness.planner.script = [
        PlanProduced(
            steps=[PlannedStep(description="break", tool="shell", args={"argv": ["false"]})],
            reasoning="try the obvious thing",
        ),
        PlanProduced(
            steps=[PlannedStep(description="instead", tool="noop")], reasoning="go around"
        ),
    ]
    harness.service.tools.declare_safe("shell", [("argv", ("false",))])
    run_id = harness.service.create_run("replan please")
    harness.drain()
    page = signed_in.get(f"/runs/{run_id}").text
    assert 'id="plan-v1"' in page and 'id="plan-v2"' in page
    v2 = page[page.index('id="plan-v2"') : page.index('id="plan-v1"')]
    assert "replan" in v2 and "go around" in v2
    assert "failed [permanent]" in v2  # why: the failure of v1's step
    assert "+ instead [noop]" in v2 and "\u2212 break [shell]" in v2
    assert 'data-status="completed"' in page  # the step list
    assert "kind-llm_call" in page or "kind-plan" in page  # the timeline


def test_retries_show_their_delay_in_the_timeline(signed_in, harness: Harness):
    harness.planner.script = [steps("flaky")]
    run_id = harness.service.create_run("flaky", config={"planner": "offline"})
    harness.drain()
    page = signed_in.get(f"/runs/{run_id}").text
    assert "backoff 2.00 s" in page
    assert "attempts" in page


def test_the_live_endpoint_sends_only_new_events_and_sections_on_change(signed_in, harness):
    harness.planner.script = [steps("noop", "noop")]
    run_id = harness.service.create_run("live")
    first = signed_in.get(f"/runs/{run_id}/live?after=0").json
    assert set(first["sections"]) == {"summary", "actions", "plans", "steps", "waterfall"}
    assert first["status"] == "queued" and not first["terminal"]
    quiet = signed_in.get(f"/runs/{run_id}/live?after={first['last_event']}&state={first['state']}")
    assert "sections" not in quiet.json and quiet.json["events"].strip() == ""
    harness.step()  # the plan
    moved = signed_in.get(
        f"/runs/{run_id}/live?after={first['last_event']}&state={first['state']}"
    ).json
    assert "sections" in moved and 'data-kind="plan"' in moved["events"]
    assert f'id="event-{first["last_event"]}"' not in moved["events"]
    harness.drain()
    done = signed_in.get(f"/runs/{run_id}/live?after=0&state={moved['state']}").json
    assert done["terminal"] and done["status"] == "completed"
    assert "scripted report" in done["sections"]["summary"]


def test_an_unknown_run_is_a_404(signed_in: FlaskClient):
    response = signed_in.get("/runs/nope")
    assert response.status_code == 404 and "There is no run nope" in response.text


# --- deciding from the run page ---------------------------------------------------------


def decide(client: FlaskClient, run_id: str, harness: Harness, **fields: str):
    pending = harness.service.status(run_id).pending_approval
    data = {"approval_id": pending.id, **fields}
    return post_form(client, f"/runs/{run_id}/decide", data, page=f"/runs/{run_id}")


def test_approve_from_the_run_page_resumes_the_run(signed_in, harness: Harness, user):
    run_id = paused_run(harness)
    page = signed_in.get(f"/runs/{run_id}").text
    assert 'data-action="approve"' in page and 'data-action="reject"' in page
    response = decide(signed_in, run_id, harness, action="approve", args="{}")
    assert response.status_code == 302
    view = harness.service.status(run_id)
    assert view.run.status == RunStatus.RUNNING
    audit = [e for e in view.events if e.kind == "approval" and "decided" in e.message][-1]
    assert audit.data["by"] == user.name and audit.data["channel"] == "web"
    assert "(via web)" in audit.message


def test_reject_needs_a_reason_and_then_the_agent_replans(signed_in, harness: Harness):
    run_id = paused_run(harness)
    decide(signed_in, run_id, harness, action="reject", reason="  ")
    assert harness.service.status(run_id).run.status == RunStatus.PAUSED
    assert "needs a reason" in signed_in.get(f"/runs/{run_id}").text  # flashed
    decide(signed_in, run_id, harness, action="reject", reason="not today")
    harness.step()  # the re-plan
    request = harness.planner.requests[-1]
    assert request.purpose == "replan" and request.failure.rejection_reason
    assert "not today" in request.failure.rejection_reason


def test_approving_with_edited_args_checks_them_against_the_tool(signed_in, harness: Harness):
    harness.planner.script = [
        PlanProduced(steps=[PlannedStep(description="hold", tool="idem_effect", args={"hold": 0})])
    ]
    run_id = harness.service.create_run("edit", config={"approval_required": ["idem_effect"]})
    harness.drain()
    decide(signed_in, run_id, harness, action="approve", args='{"hold": 999}')
    assert harness.service.status(run_id).run.status == RunStatus.PAUSED
    assert "edited args are invalid" in signed_in.get(f"/runs/{run_id}").text
    decide(signed_in, run_id, harness, action="approve", args="not json")
    assert harness.service.status(run_id).run.status == RunStatus.PAUSED
    decide(signed_in, run_id, harness, action="approve", args='{"hold": 1}')
    view = harness.service.status(run_id)
    assert view.run.status == RunStatus.RUNNING and view.steps[0].args == {"hold": 1}


def test_a_decision_without_the_csrf_token_changes_nothing(signed_in, harness: Harness):
    run_id = paused_run(harness)
    pending = harness.service.status(run_id).pending_approval
    response = signed_in.post(
        f"/runs/{run_id}/decide", data={"approval_id": pending.id, "action": "approve"}
    )
    assert response.status_code == 400
    assert harness.service.status(run_id).run.status == RunStatus.PAUSED


def test_only_the_named_approvers_may_decide(signed_in, harness: Harness, make_user):
    run_id = paused_run(harness, approvers=[make_user("somebody-else").name])
    assert "Only the run's approvers may decide" in signed_in.get(f"/runs/{run_id}").text
    assert decide(signed_in, run_id, harness, action="approve").status_code == 403
    assert harness.service.status(run_id).run.status == RunStatus.PAUSED


def test_cancel_from_the_run_page(signed_in, harness: Harness, user):
    run_id = harness.service.create_run("cancel me", created_by=user.name)
    response = post_form(signed_in, f"/runs/{run_id}/cancel", {}, page=f"/runs/{run_id}")
    assert response.status_code == 302
    assert harness.service.status(run_id).run.status == RunStatus.CANCELLED
    assert "cancelled by" in signed_in.get(f"/runs/{run_id}").text


# --- escaping and headers -----------------------------------------------------------------


def test_script_in_the_task_and_in_tool_output_renders_inert(signed_in, harness: Harness):
    harness.planner.script = [
        PlanProduced(
            steps=[
                PlannedStep(description=XSS, tool="shell", args={"argv": ["printf", "%s", XSS]}),
                PlannedStep(
                    description="fail loudly",
                    tool="shell",
                    args={"argv": ["sh", "-c", f"echo '{XSS}'; exit 3"]},
                ),
            ]
        ),
        PlanProduced(steps=[PlannedStep(description="done", tool="noop")]),
    ]
    harness.service.tools.declare_safe("shell", [("argv", ("printf",)), ("argv", ("sh",))])
    run_id = harness.service.create_run(f"task {XSS}")
    harness.drain()
    view = harness.service.status(run_id)
    assert view.steps[0].result["output"] == XSS  # the payload really is in the output
    assert XSS in (view.steps[1].error or "")
    pages = [
        signed_in.get(f"/runs/{run_id}").text,
        signed_in.get(f"/runs/{run_id}/live?after=0").json["events"],
        *signed_in.get(f"/runs/{run_id}/live?after=0").json["sections"].values(),
        signed_in.get("/").text,
    ]
    for page in pages:
        assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt;" in pages[0]


def test_every_response_carries_the_security_headers(signed_in: FlaskClient):
    for response in (signed_in.get("/"), signed_in.get("/login"), signed_in.get("/nope")):
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        csp = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp


def test_pages_have_no_inline_script_and_link_to_flower(signed_in, harness: Harness):
    run_id = paused_run(harness)
    page = signed_in.get(f"/runs/{run_id}").text
    assert re.findall(r"<script[^>]*>", page) == ['<script src="/static/app.js" defer>']
    assert not re.search(r"<[^>]+\son\w+=", page)  # no inline event handlers
    assert 'href="http://127.0.0.1:5555"' in page
    with signed_in.get("/static/app.js") as script:
        assert script.status_code == 200
