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
     ("POST", "/api/runs/x/reject"), ("POST", "/api/runs/x/cancel"),
     ("POST", "/api/runs/x/fork")],
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


def test_the_list_filters_by_creator_time_and_text(api, harness: Harness, user: User):
    """The filters of the list page and `agentloop runs`, over the API."""
    mine = api("POST", "/api/runs", {"task": "api filter Needle one"}).json["id"]
    theirs = harness.service.create_run("api filter needle two", created_by="someone-else")

    def listed(query: str) -> set[str]:
        response = api("GET", f"/api/runs?limit=200&{query}")
        assert response.status_code == 200, response.json
        return {r["id"] for r in response.json["runs"]}

    assert {mine, theirs} <= listed("search=NEEDLE")
    assert listed(f"search=needle&created_by={user.name}") & {mine, theirs} == {mine}
    assert {mine, theirs} <= listed("search=needle&since=2000-01-01T00:00:00Z")
    assert not listed("search=needle&since=2999-01-01T00:00") & {mine, theirs}  # naive: UTC
    # An age back from now, as the list page and `agentloop runs --since` take it.
    assert {mine, theirs} <= listed("search=needle&since=1h")
    assert {mine, theirs} <= listed("search=needle&since=%202D%20")
    too_old = api("GET", "/api/runs?since=999999d")  # before the year 1: no age
    assert too_old.status_code == 400 and "since" in too_old.json["error"]
    assert not listed("search=needle%25")  # taken literally, not as a pattern
    refused = api("GET", "/api/runs?since=yesterday")
    assert refused.status_code == 400 and "since" in refused.json["error"]


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
    assert bad.status_code == 400 and "Idempotency-Key header" in bad.json["error"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"task": ""}, "task: String should have at least 1 character"),
        ({"task": "x", "config": {"max_iterations": 0}}, "config.max_iterations"),
        ({"task": "x", "config": {"surprise": 1}}, "config.surprise: unknown field"),
        ({"task": "x", "config": []}, "config: Input should be an object"),
        ({"task": 5}, "task: Input should be a valid string"),
        ({"task": "x", "surprise": 1}, "surprise: unknown field"),
        ({"task": "x", "config": {"max_iterations": "7"}}, "config.max_iterations"),
        ({"task": "x", "config": {"approval_required": "deploy"}}, "approval_required"),
        ({"task": "a\x00b"}, "task: must not contain a NUL character"),
        ({"task": "x", "config": {"approvers": ["bo\x00b"]}}, "config.approvers.0"),
        ({"task": "x", "config": {"budget_tokens": 10**13}}, "config.budget_tokens"),
    ],
)
def test_a_body_that_breaks_the_document_is_a_400_naming_the_field(api, body, message):
    response = api("POST", "/api/runs", body)
    assert response.status_code == 400, response.json
    assert message in response.json["error"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"task": "   "}, "the task is empty"),
        ({"task": "x", "config": {"approval_required": ["nope"]}}, "unknown tools: nope"),
        ({"task": "x", "config": {"approvers": ["nobody-at-all"]}}, "names no user"),
        ({"task": "x", "config": {"retry_policy": {"base": 10, "max_backoff": 1}}}, "max_backoff"),
    ],
)
def test_a_body_the_service_refuses_is_a_422_with_the_reason(api, body, message):
    response = api("POST", "/api/runs", body)
    assert response.status_code == 422, response.json
    assert message in response.json["error"]


def test_a_body_that_is_not_json_is_a_400(api):
    response = api("POST", "/api/runs", data="task=x", content_type="text/plain")
    assert response.status_code == 400 and "JSON object" in response.json["error"]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"task": "x", "config": {"timeout": Infinity}}',
        b'{"task": "x", "config": {"timeout": NaN}}',
        b'{"task": "x", "config": {"timeout": 1e400}}',
        b'{"task": "\\ud800"}',  # a lone surrogate
        b'{"task": "x"',
        b'{"task": "x", "config": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001,  # was a 500
        b'{"task": "x"}' + b" " * 10 + b'{"task": "y"}',
    ],
)
def test_hostile_json_is_a_400_never_a_500(api, raw):
    response = api("POST", "/api/runs", data=raw, content_type="application/json")
    assert response.status_code == 400, response.json
    assert response.json["error"]


def test_deep_json_on_approve_is_a_400(api, harness: Harness):
    run_id = paused(harness)
    deep = b'{"args": ' + b"[" * 5000 + b"]" * 5000 + b"}"  # RecursionError, a 500, before
    response = api("POST", f"/api/runs/{run_id}/approve", data=deep,
                   content_type="application/json")  # fmt: skip
    assert response.status_code == 400 and "JSON" in response.json["error"]
    nested: dict = {}
    for _ in range(100):  # within the parser's limit, past the args' depth limit
        nested = {"k": nested}
    response = api("POST", f"/api/runs/{run_id}/approve", {"args": nested})
    assert response.status_code == 400 and "nested deeper" in response.json["error"]
    assert harness.service.status(run_id).run.status == RunStatus.PAUSED


def test_a_body_over_the_limit_is_a_413(api):
    response = api("POST", "/api/runs", {"task": "x" * (300 * 1024)})
    assert response.status_code == 413 and response.json["error"]


def test_nul_and_surrogates_in_decisions_are_400s(api, harness: Harness):
    run_id = paused(harness)
    for path, body in [
        ("approve", {"comment": "ok\x00"}),
        ("approve", {"approval_id": "a\x00"}),
        ("reject", {"reason": "no\x00"}),
        ("reject", {"reason": "no", "approval_id": "\x00"}),
    ]:
        response = api("POST", f"/api/runs/{run_id}/{path}", body)
        assert response.status_code == 400, (path, body, response.json)
        field = list(body)[-1]
        assert f"{field}: must not contain a NUL" in response.json["error"]
    lone = b'{"reason": "\\udc00"}'
    response = api("POST", f"/api/runs/{run_id}/reject", data=lone,
                   content_type="application/json")  # fmt: skip
    assert response.status_code == 400
    assert harness.service.status(run_id).run.status == RunStatus.PAUSED


@pytest.mark.parametrize("run_id", ["%00", "%ED%A0%80", "x" * 40, "%FF%FE", "a%0Ab", "..%2F.."])
def test_odd_run_ids_are_404s(api, run_id):
    for method, suffix in [("GET", ""), ("GET", "/events"), ("POST", "/cancel"),
                           ("POST", "/approve"), ("POST", "/reject")]:  # fmt: skip
        body = {"reason": "r"} if suffix == "/reject" else None
        response = api(method, f"/api/runs/{run_id}{suffix}", body)
        assert response.status_code == 404, (method, suffix, response.status_code)
        assert response.is_json


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("status=nope", "status: Input should be"),
        ("limit=0", "limit: Input should be greater than or equal to 1"),
        ("limit=201", "limit"),
        ("offset=x", "offset: Value error, must be an integer"),
        ("offset=-1", "offset"),
        ("offset=1000000001", "offset"),
        ("limit=1.0", "limit: Value error, must be an integer"),
        ("limit=%201", "limit"),
        ("limit=" + "9" * 5000, "limit"),
        ("status=", "status: empty"),  # was silently every status
        ("limit=", "limit: empty"),  # was silently 50
        ("limit=1&limit=2", "limit: given 2 times"),  # was silently 1
        ("page=2", "page: unknown field"),  # was silently ignored
    ],
)
def test_bad_query_parameters_are_a_400_naming_them(api, query, message):
    response = api("GET", f"/api/runs?{query}")
    assert response.status_code == 400, response.json
    assert message in response.json["error"]


def test_event_ids_are_bounded(api, harness: Harness):
    run_id = api("POST", "/api/runs", {"task": "bounded"}).json["id"]
    assert api("GET", f"/api/runs/{run_id}/events?after={2**53 - 1}").status_code == 200
    for after in (str(2**53), "9223372036854775808", "-1", "1e3", ""):
        response = api("GET", f"/api/runs/{run_id}/events?after={after}")
        assert response.status_code == 400 and "after" in response.json["error"]
    assert api("GET", f"/api/runs/{run_id}?verbose=1").status_code == 400


def test_methods_not_allowed_are_405s_with_allow(api):
    for method in ("TRACE", "DELETE", "PUT", "PATCH"):
        response = api(method, "/api/runs")
        assert response.status_code == 405
        assert set(response.headers["Allow"].split(", ")) >= {"GET", "POST"}
    response = api("DELETE", "/api/runs/x/cancel")
    assert response.status_code == 405 and "POST" in response.headers["Allow"]


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


def test_approve_with_invalid_edited_args_is_a_422(api, harness: Harness):
    run_id = paused(harness, tool="idem_effect")
    response = api("POST", f"/api/runs/{run_id}/approve", {"args": {"hold": 1000}})
    assert response.status_code == 422 and "edited args are invalid" in response.json["error"]
    response = api("POST", f"/api/runs/{run_id}/approve", {"args": [1]})
    assert (
        response.status_code == 400 and "args: Input should be an object" in response.json["error"]
    )
    response = api("POST", f"/api/runs/{run_id}/approve", {"args": {}, "surprise": 1})
    assert response.status_code == 400 and "surprise: unknown field" in response.json["error"]
    assert harness.service.status(run_id).run.status == RunStatus.PAUSED


def test_reject_needs_a_reason(api, harness: Harness):
    run_id = paused(harness)
    assert "reason: Field required" in api("POST", f"/api/runs/{run_id}/reject", {}).json["error"]
    assert api("POST", f"/api/runs/{run_id}/reject", {"reason": ""}).status_code == 400
    assert api("POST", f"/api/runs/{run_id}/reject", {"reason": "  "}).status_code == 422
    assert api("POST", f"/api/runs/{run_id}/reject").status_code == 400
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
        "/api/runs/{run_id}/fork",
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


def _statuses(doc, path, method) -> set[int]:
    return {int(code) for code in doc["paths"][path][method]["responses"]}


def _schema(doc, ref_or_schema):
    ref = ref_or_schema.get("$ref")
    return doc["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else ref_or_schema


def test_the_document_states_the_bounds_the_server_enforces(client: FlaskClient):
    doc = client.get("/api/openapi.json").json
    assert doc["openapi"] == "3.1.0"
    listing = {p["name"]: p["schema"] for p in doc["paths"]["/api/runs"]["get"]["parameters"]}
    assert listing["limit"]["minimum"] == 1 and listing["limit"]["maximum"] == 200
    assert listing["offset"]["minimum"] == 0 and listing["offset"]["maximum"] == 10**9
    assert _schema(doc, listing["status"])["enum"] == [s.value for s in RunStatus]
    events = doc["paths"]["/api/runs/{run_id}/events"]["get"]["parameters"]
    after = next(p for p in events if p["name"] == "after")["schema"]
    assert after["minimum"] == 0 and after["maximum"] == 2**53 - 1
    schemas = doc["components"]["schemas"]
    for name in ("NewRun", "RunConfig", "RetryPolicy", "Approve", "Reject"):
        assert schemas[name]["additionalProperties"] is False, name
    assert schemas["Reject"]["properties"]["reason"]["minLength"] == 1
    assert "reason" in schemas["Reject"]["required"]
    assert schemas["NewRun"]["properties"]["task"]["maxLength"] == 10_000
    # The config's fields are RunConfig's, no more, no fewer.
    from app.engine.models import RunConfig

    assert set(schemas["RunConfig"]["properties"]) == set(RunConfig.model_fields)
    create = doc["paths"]["/api/runs"]["post"]
    key = next(p for p in create["parameters"] if p["name"] == "Idempotency-Key")
    assert key["in"] == "header" and key["schema"]["maxLength"] == 200


def test_the_document_lists_the_statuses_each_operation_returns(client: FlaskClient):
    doc = client.get("/api/openapi.json").json
    everywhere = {400, 401}
    assert _statuses(doc, "/api/runs", "get") >= everywhere | {200}
    assert _statuses(doc, "/api/runs", "post") >= everywhere | {201, 403, 409, 413, 422}
    assert _statuses(doc, "/api/runs/{run_id}", "get") >= everywhere | {200, 404}
    for action in ("approve", "reject"):
        assert _statuses(doc, f"/api/runs/{{run_id}}/{action}", "post") >= everywhere | {
            200, 403, 404, 409, 413, 422,
        }  # fmt: skip
    assert _statuses(doc, "/api/runs/{run_id}/cancel", "post") >= everywhere | {200, 403, 404, 409}
    # Nothing a read can never answer.
    assert not _statuses(doc, "/api/runs", "get") & {403, 404, 409, 413, 422}
    assert not _statuses(doc, "/api/runs/{run_id}/cancel", "post") & {413, 422}
