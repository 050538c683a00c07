"""The JSON API through Flask's test client over the real database: bearer
tokens, status codes, JSON errors, and the OpenAPI document."""

from __future__ import annotations

import pytest
from flask.testing import FlaskClient

from app.engine.models import RunStatus
from app.store.accounts import Accounts, User
from tests.support.fixtures import Harness, steps
from tests.support.web import sign_in


@pytest.fixture
def api(client: FlaskClient, api_token: str):
    bearer = {"Authorization": f"Bearer {api_token}"}

    def call(method: str, path: str, json=None, headers=None, **kwargs):
        sent = {**bearer, **(headers or {})}
        return client.open(path, method=method, json=json, headers=sent, **kwargs)

    return call


def paused(harness: Harness, tool: str = "noop", **config) -> str:
    harness.planner.script = [steps(tool)]
    run_id = harness.service.create_run(
        "api approval", config={"approval_required": [tool], **config}
    )
    harness.drain()
    return run_id


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/api/runs"), ("POST", "/api/runs"), ("GET", "/api/runs/x"),
     ("GET", "/api/runs/x/events"), ("POST", "/api/runs/x/approve"),
     ("POST", "/api/runs/x/reject"), ("POST", "/api/runs/x/cancel")],
)  # fmt: skip
def test_every_endpoint_needs_a_bearer_token(client: FlaskClient, method: str, path: str):
    for headers in ({}, {"Authorization": "Bearer al_wrong"}, {"Authorization": "Basic eDp5"}):
        response = client.open(path, method=method, headers=headers, json={})
        assert response.status_code == 401
        assert "Bearer" in response.json["error"]
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_session_cookie_does_not_authenticate_the_api(client: FlaskClient, user: User):
    sign_in(client, user)
    assert client.get("/").status_code == 200
    assert client.get("/api/runs").status_code == 401


def test_create_show_and_list(api, harness: Harness, user: User):
    created = api("POST", "/api/runs", {"task": "api run", "config": {"max_iterations": 7}})
    assert created.status_code == 201
    run = created.json
    assert run["status"] == "queued" and run["created_by"] == user.name
    assert created.headers["Location"] == f"/api/runs/{run['id']}"
    assert run["url"].endswith(f"/runs/{run['id']}")
    shown = api("GET", f"/api/runs/{run['id']}").json
    assert shown["config"]["max_iterations"] == 7 and shown["steps"] == []
    listed = api("GET", "/api/runs?status=queued&limit=200").json
    assert run["id"] in [r["id"] for r in listed["runs"]] and listed["total"] >= 1
    assert harness.dispatcher.sent[-1][0] == run["id"]


def test_a_create_retried_with_its_idempotency_key_returns_the_same_run(api):
    """A client whose first answer was lost retries: one run, not two."""
    body = {"task": "api run", "config": {"max_iterations": 7}}
    first = api("POST", "/api/runs", body, headers={"Idempotency-Key": "deploy-42-try"})
    again = api("POST", "/api/runs", body, headers={"Idempotency-Key": "deploy-42-try"})
    assert first.status_code == again.status_code == 201
    assert again.json["id"] == first.json["id"]
    other = api(
        "POST", "/api/runs", {"task": "other"}, headers={"Idempotency-Key": "deploy-42-try"}
    )
    assert other.status_code == 409 and "different request" in other.json["error"]
    bad = api("POST", "/api/runs", body, headers={"Idempotency-Key": "x" * 201})
    assert bad.status_code == 400 and "idempotency key" in bad.json["error"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"task": ""}, "task is required"),
        ({"task": "x", "config": {"max_iterations": 0}}, "max_iterations"),
        ({"task": "x", "config": {"approval_required": ["nope"]}}, "unknown tools: nope"),
        ({"task": "x", "config": {"surprise": 1}}, "surprise"),
        ({"task": "x", "config": []}, "config must be a JSON object"),
        ({"task": 5}, "task must be a string"),
    ],
)
def test_invalid_input_is_a_400_with_the_reason(api, body, message):
    response = api("POST", "/api/runs", body)
    assert response.status_code == 400
    assert message in response.json["error"]


def test_a_body_that_is_not_json_is_a_400(api):
    response = api("POST", "/api/runs", data="task=x", content_type="text/plain")
    assert response.status_code == 400 and "JSON object" in response.json["error"]


def test_bad_query_parameters_are_a_400(api):
    assert api("GET", "/api/runs?status=nope").status_code == 400
    assert api("GET", "/api/runs?limit=0").status_code == 400
    assert "integer" in api("GET", "/api/runs?offset=x").json["error"]


def test_unknown_runs_and_routes_are_json_404s(api):
    for path in ("/api/runs/nope", "/api/runs/nope/events", "/api/nothing-here"):
        response = api("GET", path)
        assert response.status_code == 404 and response.json["error"]
    assert api("DELETE", "/api/runs").status_code == 405


def test_events_after_an_id(api, harness: Harness):
    harness.planner.script = [steps("noop")]
    run_id = harness.service.create_run("events")
    harness.drain()
    everything = api("GET", f"/api/runs/{run_id}/events").json
    kinds = [e["kind"] for e in everything["events"]]
    assert "plan" in kinds and "observation" in kinds and everything["status"] == "completed"
    middle = everything["events"][2]["id"]
    later = api("GET", f"/api/runs/{run_id}/events?after={middle}").json
    assert [e["id"] for e in later["events"]] == [
        e["id"] for e in everything["events"] if e["id"] > middle
    ]
    assert later["last_event"] == everything["last_event"]


def test_approve_resumes_and_a_second_approve_is_a_409(api, harness: Harness):
    run_id = paused(harness)
    approved = api("POST", f"/api/runs/{run_id}/approve", {"comment": "ship it"})
    assert approved.status_code == 200 and approved.json["status"] == RunStatus.RUNNING
    again = api("POST", f"/api/runs/{run_id}/approve")
    assert again.status_code == 409 and "not waiting for a decision" in again.json["error"]
    audit = [e for e in harness.service.status(run_id).events if "decided approve" in e.message]
    assert audit[0].data["channel"] == "api"


def test_approve_with_invalid_edited_args_is_a_400(api, harness: Harness):
    run_id = paused(harness, tool="idem_effect")
    response = api("POST", f"/api/runs/{run_id}/approve", {"args": {"hold": 1000}})
    assert response.status_code == 400 and "edited args are invalid" in response.json["error"]
    assert api("POST", f"/api/runs/{run_id}/approve", {"args": [1]}).status_code == 400
    assert harness.service.status(run_id).run.status == RunStatus.PAUSED


def test_reject_needs_a_reason(api, harness: Harness):
    run_id = paused(harness)
    assert api("POST", f"/api/runs/{run_id}/reject", {}).status_code == 400
    rejected = api("POST", f"/api/runs/{run_id}/reject", {"reason": "not now"})
    assert rejected.status_code == 200
    assert harness.service.status(run_id).steps[0].status == "rejected"


def test_only_approvers_may_decide_a_run_that_names_them(
    api, client: FlaskClient, harness: Harness, accounts: Accounts, make_user
):
    boss = make_user("boss")
    run_id = paused(harness, approvers=[boss.name])
    response = api("POST", f"/api/runs/{run_id}/approve")
    assert (
        response.status_code == 403 and "not one of this run's approvers" in response.json["error"]
    )
    run_id = paused(harness, approvers=[boss.email])  # named by email, signs in by name
    token = accounts.issue_token(boss.id)
    response = client.post(
        f"/api/runs/{run_id}/approve", headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200


def test_cancel_then_cancel_again_is_a_409(api, harness: Harness):
    run_id = api("POST", "/api/runs", {"task": "cancel via api"}).json["id"]
    cancelled = api("POST", f"/api/runs/{run_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json["status"] == "cancelled"
    again = api("POST", f"/api/runs/{run_id}/cancel")
    assert again.status_code == 409 and "only an active run" in again.json["error"]


def test_no_csrf_token_is_needed_with_a_bearer_token(api):
    assert api("POST", "/api/runs", {"task": "no csrf here"}).status_code == 201


def test_the_openapi_document_describes_every_endpoint(client: FlaskClient):
    response = client.get("/api/openapi.json")
    assert response.status_code == 200
    doc = response.json
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {
        "/api/runs", "/api/runs/{run_id}", "/api/runs/{run_id}/events",
        "/api/runs/{run_id}/approve", "/api/runs/{run_id}/reject", "/api/runs/{run_id}/cancel",
    }  # fmt: skip
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    refs = _refs(doc)
    for ref in refs:
        section, name = ref.removeprefix("#/components/").split("/")
        assert name in doc["components"][section], ref


def _refs(node) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"]} if "$ref" in node else set()
        for value in node.values():
            found |= _refs(value)
        return found
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node)) if node else set()
    return set()
