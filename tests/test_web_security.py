"""The pages against a pentester (issue 9): open redirects on sign-in, rate limits
on sign-in and the API, cache and transport headers, no server banner (a real
gunicorn), nothing internal on anonymous pages, no 5xx for any hostile input on
any page, and the admin page for user management."""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from secrets import token_hex
from urllib.parse import quote

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app.config import ConfigError, load_settings
from app.engine.models import RunStatus
from app.notify import approval_link
from app.store.accounts import Accounts, Role, User
from app.web import create_app, security
from tests.conftest import REDIS_URL, ROOT
from tests.support.fixtures import Harness
from tests.support.web import PASSWORD, csrf_token, free_port, paused_run, sign_in

# --- helpers ------------------------------------------------------------------------------


def make_app(harness: Harness, **config) -> Flask:
    return create_app(
        {
            "TESTING": True,
            "AGENTLOOP_SERVICE": harness.service,
            "RATELIMIT_STORAGE_URI": "memory://",
            **config,
        }
    )


@pytest.fixture
def app(harness: Harness) -> Flask:
    """The app with its rate limits in memory (its own counters)."""
    return make_app(harness)


@pytest.fixture
def web(app: Flask) -> FlaskClient:
    return app.test_client()


def attempt(client: FlaskClient, name: str, password: str, *, next_: str = "", **kw):
    token = csrf_token(client.get("/login", **kw).text)
    url = "/login" + (f"?next={quote(next_, safe='')}" if next_ else "")
    return client.post(url, data={"name": name, "password": password, "csrf_token": token}, **kw)


# --- 1. no open redirect after sign-in ------------------------------------------------------

HOSTILE_NEXT = [
    "//evil.example/x",
    "/\\evil.example/x",
    "\\\\evil.example/x",
    "https://evil.example/x",
    "http:evil.example",
    "javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    "/\t/evil.example/x",  # browsers drop the tab: //evil.example/x
    "/\n/evil.example/x",
    "/\r\n/evil.example/x",
    "\t//evil.example/x",
    " //evil.example/x",
    "/ /evil.example/x",
    "/\\/evil.example/x",
    "/\u3000/evil.example/x",
    "evil.example/x",
    "data:text/html,<script>alert(1)</script>",
    "/" + "a" * 3000,
]


@pytest.mark.parametrize("target", HOSTILE_NEXT)
def test_sign_in_never_redirects_off_site(web: FlaskClient, user: User, target: str):
    response = attempt(web, user.name, PASSWORD, next_=target)
    assert response.status_code == 302
    assert response.headers["Location"] == "/"


def test_the_tab_trick_from_the_issue_sent_raw(web: FlaskClient, user: User):
    token = csrf_token(web.get("/login").text)
    response = web.post(
        "/login?next=/%09/evil.example/x",
        data={"name": user.name, "password": PASSWORD, "csrf_token": token},
    )
    assert response.headers["Location"] == "/"


@pytest.mark.parametrize("target", ["/runs/new", "/runs/abc?after=3", "/?status=paused&page=2"])
def test_sign_in_still_returns_to_a_page_of_this_site(web: FlaskClient, user: User, target: str):
    response = attempt(web, user.name, PASSWORD, next_=target)
    assert response.headers["Location"] == target


# --- 2. rate limits -------------------------------------------------------------------------


def test_25_wrong_passwords_lock_the_account_until_the_window_passes(
    app: Flask, web: FlaskClient, user: User
):
    statuses = [attempt(web, user.name, "wrong password").status_code for _ in range(25)]
    assert statuses == [401] * 5 + [429] * 20
    refused = attempt(web, user.name, PASSWORD)  # the right one, too late
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert "Too many failed sign-ins" in refused.text and "text/html" in refused.content_type
    assert web.get("/").status_code == 302  # not signed in
    # Another address, another account name: a lock on one name is not a lock on all.
    security.limiter_of(app).reset()  # the window passes
    assert attempt(web, user.name, PASSWORD).status_code == 302


def test_the_account_limit_holds_from_every_address(web: FlaskClient, user: User):
    for i in range(5):
        address = {"environ_base": {"REMOTE_ADDR": f"198.51.100.{i}"}}
        assert attempt(web, user.name, "wrong", **address).status_code == 401
    other = {"environ_base": {"REMOTE_ADDR": "198.51.100.99"}}
    assert attempt(web, user.name, PASSWORD, **other).status_code == 429


def test_the_address_limit_holds_for_every_account(web: FlaskClient, make_user: Callable):
    people = [make_user("spray") for _ in range(2)]
    for i in range(20):
        assert attempt(web, f"nobody-{i}", "wrong").status_code == 401
    assert attempt(web, people[0].name, PASSWORD).status_code == 429
    elsewhere = {"environ_base": {"REMOTE_ADDR": "203.0.113.7"}}
    assert attempt(web, people[1].name, PASSWORD, **elsewhere).status_code == 302


def test_successful_sign_ins_do_not_count(harness: Harness, user: User):
    strict = make_app(harness, AGENTLOOP_LIMITS=security.LimitSettings(login_address="2/minute"))
    client = strict.test_client()
    for _ in range(4):
        assert attempt(client, user.name, PASSWORD).status_code == 302
        client.post("/logout", data={"csrf_token": csrf_token(client.get("/").text)})


def test_the_api_is_limited_per_token_with_json(
    harness: Harness, accounts: Accounts, make_user: Callable
):
    limited = make_app(harness, AGENTLOOP_LIMITS=security.LimitSettings(api="3/minute"))
    client = limited.test_client()
    first, second = (accounts.issue_token(make_user("api").id) for _ in range(2))
    bearer = {"Authorization": f"Bearer {first}"}
    assert [client.get("/api/runs", headers=bearer).status_code for _ in range(3)] == [200] * 3
    refused = client.get("/api/runs", headers=bearer)
    assert refused.status_code == 429
    assert refused.is_json and "rate limit exceeded" in refused.json["error"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert client.get("/api/runs", headers={"Authorization": f"Bearer {second}"}).status_code == 200
    # Guessing tokens is limited too (per address, no valid token needed).
    guesses = [
        client.get("/api/runs", headers={"Authorization": "Bearer al_guess"}).status_code
        for _ in range(4)
    ]
    assert guesses == [401, 401, 401, 429]


def test_the_counters_live_in_redis_when_the_broker_is_redis(harness: Harness, user: User):
    import redis

    prefix = f"agentloop-test-limits-{token_hex(4)}"
    shared = {"RATELIMIT_STORAGE_URI": REDIS_URL, "RATELIMIT_KEY_PREFIX": prefix}
    one, two = make_app(harness, **shared), make_app(harness, **shared)  # two workers
    for _ in range(5):
        assert attempt(one.test_client(), user.name, "wrong").status_code == 401
    assert attempt(two.test_client(), user.name, PASSWORD).status_code == 429
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"*{prefix}*"))
    try:
        assert keys
    finally:
        for key in keys:
            client.delete(key)
        client.close()


def test_where_the_counters_live():
    redis_broker = load_settings(broker_url="redis://127.0.0.1:6379/3")
    embedded = load_settings(broker_url="")
    assert security.LimitSettings().storage_for(redis_broker) == "redis://127.0.0.1:6379/3"
    assert security.LimitSettings().storage_for(embedded) == "memory://"
    explicit = security.LimitSettings(storage_url="redis://cache:6379/5")
    assert explicit.storage_for(embedded) == "redis://cache:6379/5"


def test_a_bad_limit_is_refused_at_start_up(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AGENTLOOP_RATELIMIT_LOGIN_ACCOUNT", "five a minute")
    with pytest.raises(ConfigError, match="AGENTLOOP_RATELIMIT_LOGIN_ACCOUNT"):
        create_app({"TESTING": True})


# --- 3. headers, the server banner, anonymous pages --------------------------------------------


def test_pages_about_runs_are_never_stored(
    harness: Harness, web: FlaskClient, make_user: Callable, accounts: Accounts
):
    admin = make_user("admin", role=Role.ADMIN)
    run_id = paused_run(harness)
    token = accounts.issue_token(admin.id)
    sign_in(web, admin)
    for path in ("/", f"/runs/{run_id}", f"/runs/{run_id}/live", "/runs/new", "/admin/users"):
        assert web.get(path).headers["Cache-Control"] == "no-store", path
    for path in ("/api/runs", f"/api/runs/{run_id}"):
        response = web.get(path, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200
        assert response.headers["Cache-Control"] == "no-store", path
    with web.get("/static/app.css") as static:
        assert "no-store" not in static.headers.get("Cache-Control", "")


def test_hsts_only_when_the_site_is_https(harness: Harness):
    plain = make_app(harness).test_client().get("/login")
    assert "Strict-Transport-Security" not in plain.headers
    https = load_settings(base_url="https://agentloop.example")
    secure = make_app(harness, AGENTLOOP_SETTINGS=https).test_client().get("/login")
    assert secure.headers["Strict-Transport-Security"].startswith("max-age=63072000")


def _headers_from(port: int) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/login")
        response = connection.getresponse()
        response.read()
        return response
    finally:
        connection.close()


def _gunicorn(*config: str) -> Iterator[int]:
    """A real gunicorn serving the app on a free port, until the caller moves on."""
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", *config, "--bind", f"127.0.0.1:{port}"]
    process = subprocess.Popen(
        [*argv, "--workers", "1", "app.web:create_app()"],
        cwd=ROOT,
        env={**os.environ, "AGENTLOOP_RATELIMIT_STORAGE_URL": "memory://"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, "gunicorn exited"
            try:
                _headers_from(port)
                break
            except OSError:
                assert time.monotonic() < deadline, "gunicorn did not answer in 30 s"
                time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_gunicorn_sends_no_server_banner_with_our_config():
    for port in _gunicorn():  # as it comes: the banner this fixes
        assert _headers_from(port).getheader("Server") == "gunicorn"
    for port in _gunicorn("--config", "python:app.web.gunicorn_conf"):
        response = _headers_from(port)
        assert response.status == 200
        assert response.getheader("Server") is None
        assert response.getheader("Cache-Control") == "no-store"
    assert "python:app.web.gunicorn_conf" in (ROOT / "Procfile").read_text()


def test_anonymous_pages_show_nothing_internal(harness: Harness, web: FlaskClient):
    settings = load_settings()
    paused = paused_run(harness, approvers=["carol@example.com"])
    pending = harness.service.status(paused).pending_approval
    link = approval_link(settings, pending.id, "carol@example.com", pending.args_hash)
    pages = {
        "sign-in": web.get("/login"),
        "approval": web.get(link.removeprefix(settings.base_url)),
        "bad approval": web.get("/approvals/not-a-token"),
        "error": web.get("/nope"),
        "a run, anonymously": web.get(f"/runs/{paused}", follow_redirects=True),
    }
    for what, response in pages.items():
        assert response.status_code < 500, what
        assert settings.flower_url not in response.text, what
        assert "Flower" not in response.text, what
        assert "Sign out" not in response.text, what


# --- 4. hostile input on every page: never a 5xx ----------------------------------------------


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("page=9223372036854775807", 400),
        ("page=99999999999999999999999", 400),
        ("page=-1", 400),
        ("page=0", 400),
        ("page=abc", 400),
        ("page=1&page=2", 400),
        ("page=%00", 400),
        ("status=%00", 400),
        ("status=paused&status=queued", 400),
        ("page=", 200),
        ("page=2", 200),
        ("page=1000000", 200),
    ],
)
def test_the_runs_list_bounds_its_parameters(signed_in: FlaskClient, query: str, status: int):
    response = signed_in.get(f"/?{query}")
    assert response.status_code == status, response.text


def test_the_live_endpoint_bounds_after(signed_in: FlaskClient, harness: Harness):
    run_id = harness.service.create_run("bounded")
    for after in ("9223372036854775808", "-1", "1e9", "%00"):
        assert signed_in.get(f"/runs/{run_id}/live?after={after}").status_code == 400
    assert signed_in.get(f"/runs/{run_id}/live?after=9223372036854775807").status_code == 200


@pytest.mark.parametrize(
    "run_id", ["%00", "a%00b", "%FF%FE", "..%2F..%2Fetc", "%E2%80%AE", "x" * 500, "1%27%20OR%201=1"]
)
def test_a_run_id_with_odd_bytes_is_a_404(signed_in: FlaskClient, run_id: str):
    for suffix in ("", "/live"):
        assert signed_in.get(f"/runs/{run_id}{suffix}").status_code == 404


def test_nul_in_a_form_field_is_refused_and_changes_nothing(signed_in: FlaskClient, harness):
    run_id = paused_run(harness)
    token = csrf_token(signed_in.get(f"/runs/{run_id}").text)
    pending = harness.service.status(run_id).pending_approval
    for data in (
        {"approval_id": pending.id + "\x00", "action": "approve"},
        {"approval_id": pending.id, "action": "reject", "reason": "no\x00"},
        {"approval_id": pending.id, "action": "approve", "args": '{"a": "\\u0000"}'},
    ):
        response = signed_in.post(f"/runs/{run_id}/decide", data={**data, "csrf_token": token})
        assert response.status_code in (302, 400), response.text
    assert harness.service.status(run_id).run.status == RunStatus.PAUSED
    task = signed_in.post("/runs/new", data={"task": "a\x00b", "csrf_token": token})
    assert task.status_code == 400 and "NUL" in task.text


def test_an_unknown_approval_id_is_a_404(signed_in: FlaskClient, harness):
    run_id = paused_run(harness)
    token = csrf_token(signed_in.get(f"/runs/{run_id}").text)
    response = signed_in.post(
        f"/runs/{run_id}/decide",
        data={"approval_id": "no-such-approval", "action": "approve", "csrf_token": token},
    )
    assert response.status_code in (302, 404, 409)
    assert harness.service.status(run_id).run.status == RunStatus.PAUSED


HOSTILE = [
    "%00",
    "a%00b",
    "%ED%A0%80",  # a lone surrogate, UTF-8 encoded
    "%FF%FE%FD",
    "9223372036854775807",
    "99999999999999d",
    "-9223372036854775809",
    "1e308",
    "NaN",
    "%27%20OR%201%3D1%20--",
    "..%2F..%2F..%2Fetc%2Fpasswd",
    "%3Cscript%3Ealert(1)%3C%2Fscript%3E",
    "%E2%80%AE",
    "%F0%9F%98%80",
    "%7B%22a%22%3A%5B%5B%5B%5D%5D%5D%7D",
    "x" * 4000,
    "",
]
PARAMS = ["page", "status", "after", "state", "next", "name", "password", "task", "planner",
          "approval_required", "approvers", "max_iterations", "timeout", "retry_base",
          "approval_id", "action", "args", "reason", "role", "q", "by", "since"]  # fmt: skip


def _page_routes(app: Flask) -> list[tuple[str, str, list[str]]]:
    routes = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.rule.startswith("/api"):
            continue
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            routes.append((rule.rule, method, sorted(rule.arguments)))
    return routes


def test_no_hostile_value_on_any_page_gets_a_5xx(harness: Harness, make_user: Callable):
    """Every page route (anonymous and as an admin), every method, each hostile value
    in each path segment, in the query string and in the form: never a 5xx."""
    # Thousands of failed sign-ins on purpose: no rate limit here.
    app = make_app(harness, RATELIMIT_ENABLED=False)
    run_id = paused_run(harness)
    admin = make_user("admin", role=Role.ADMIN)
    victim = make_user("victim", role=Role.VIEWER)
    routes = _page_routes(app)
    assert {"/", "/login", "/runs/<run_id>/decide"} <= {r for r, _, _ in routes}
    anonymous, signed = app.test_client(), app.test_client()
    sign_in(signed, admin)
    token = csrf_token(signed.get("/").text)
    fails: list[str] = []
    sent = 0
    for client in (anonymous, signed):
        for rule, method, arguments in routes:
            for value in HOSTILE:
                real = {"run_id": run_id, "token": "x", "name": victim.name}
                variants = [{**real, arg: value} for arg in arguments] or [real]
                for path_args in variants:
                    path = rule
                    for arg in arguments:
                        path = path.replace(f"<{arg}>", path_args[arg])
                    query = "&".join(f"{p}={value}" for p in PARAMS)
                    form = "&".join(f"{p}={value}" for p in PARAMS)
                    body = f"{form}&csrf_token={token}".encode()
                    response = client.open(
                        path,
                        method=method,
                        query_string=query,
                        data=body if method == "POST" else None,
                        content_type="application/x-www-form-urlencoded",
                    )
                    sent += 1
                    if response.status_code >= 500:
                        fails.append(f"{method} {path}?{query[:80]} -> {response.status_code}")
    assert fails == [], fails[:10]
    assert sent > 500
    # The admin's hostile posts named a real user: still there, still a viewer.
    assert Accounts(harness.service.store.engine).by_name(victim.name).role in set(Role)


# --- 5. the admin page ------------------------------------------------------------------------


@pytest.mark.parametrize("role", [Role.VIEWER, Role.OPERATOR, Role.APPROVER])
def test_only_admins_manage_users(web: FlaskClient, make_user: Callable, role: Role):
    someone, target = make_user("someone", role=role), make_user("target", role=Role.VIEWER)
    assert web.get("/admin/users").status_code == 302  # anonymous: sign in first
    sign_in(web, someone)
    assert web.get("/admin/users").status_code == 403
    assert "/admin/users" not in web.get("/").text  # no link to it either
    token = csrf_token(web.get("/").text)
    for action, data in (("role", {"role": "admin"}), ("disable", {}), ("revoke-tokens", {})):
        response = web.post(
            f"/admin/users/{target.name}/{action}", data={**data, "csrf_token": token}
        )
        assert response.status_code == 403
    mine = web.post(
        f"/admin/users/{someone.name}/role", data={"role": "admin", "csrf_token": token}
    )
    assert mine.status_code == 403


@pytest.fixture
def admin_client(web: FlaskClient, make_user: Callable) -> tuple[FlaskClient, User]:
    admin = make_user("admin", role=Role.ADMIN)
    sign_in(web, admin)
    return web, admin


def admin_post(client: FlaskClient, path: str, **data: str):
    return client.post(
        path, data={**data, "csrf_token": csrf_token(client.get("/admin/users").text)}
    )


def test_the_admin_page_lists_users_with_role_and_state(admin_client, make_user, accounts):
    client, admin = admin_client
    viewer = make_user("viewer", role=Role.VIEWER)
    accounts.set_disabled(viewer.name, True, by="tests")
    page = client.get("/admin/users")
    assert page.status_code == 200
    assert f'data-user="{viewer.name}" data-role="viewer" data-state="disabled"' in page.text
    assert f'data-user="{admin.name}" data-role="admin" data-state="enabled"' in page.text
    assert 'href="/admin/users"' in client.get("/").text  # linked in the top bar


def test_an_admin_changes_a_role_and_the_audit_log_says_who(admin_client, make_user, accounts):
    client, admin = admin_client
    bob = make_user("bob", role=Role.VIEWER)
    response = admin_post(client, f"/admin/users/{bob.name}/role", role="approver")
    assert response.status_code == 302
    assert accounts.by_name(bob.name).role == Role.APPROVER
    entry = accounts.audit_entries(subject=bob.name, limit=1)[0]
    assert (entry.actor, entry.action, entry.detail["role"]) == (
        admin.name,
        "user.role",
        "approver",
    )
    page = client.get("/admin/users").text
    assert "user.role" in page and f"{bob.name} is now approver" in page
    bad = admin_post(client, f"/admin/users/{bob.name}/role", role="superuser")
    assert bad.status_code == 400


def test_disabling_ends_sessions_and_tokens_at_once(admin_client, make_user, accounts, app):
    client, admin = admin_client
    carol = make_user("carol", role=Role.OPERATOR)
    token = accounts.issue_token(carol.id)
    hers = app.test_client()
    sign_in(hers, carol)
    assert hers.get("/").status_code == 200
    assert admin_post(client, f"/admin/users/{carol.name}/disable").status_code == 302
    assert hers.get("/").status_code == 302  # her session ended
    api = hers.get("/api/runs", headers={"Authorization": f"Bearer {token}"})
    assert api.status_code == 401
    assert accounts.audit_entries(subject=carol.name, limit=1)[0].actor == admin.name
    assert admin_post(client, f"/admin/users/{carol.name}/enable").status_code == 302
    assert not accounts.by_name(carol.name).disabled


def test_revoking_every_token(admin_client, make_user, accounts, app):
    client, admin = admin_client
    dave = make_user("dave", role=Role.OPERATOR)
    tokens = [accounts.issue_token(dave.id) for _ in range(2)]
    assert admin_post(client, f"/admin/users/{dave.name}/revoke-tokens").status_code == 302
    for token in tokens:
        assert (
            app.test_client()
            .get("/api/runs", headers={"Authorization": f"Bearer {token}"})
            .status_code
            == 401
        )
    entry = accounts.audit_entries(subject=dave.name, limit=1)[0]
    assert (entry.actor, entry.action, entry.detail["revoked"]) == (admin.name, "token.revoke", 2)


def test_admin_changes_need_the_csrf_token_and_a_real_user(admin_client, make_user, accounts):
    client, _ = admin_client
    erin = make_user("erin", role=Role.VIEWER)
    assert client.post(f"/admin/users/{erin.name}/role", data={"role": "admin"}).status_code == 400
    assert accounts.by_name(erin.name).role == Role.VIEWER
    assert admin_post(client, "/admin/users/nobody-at-all/disable").status_code == 404


def test_an_admin_cannot_lock_themselves_out(admin_client, accounts):
    client, admin = admin_client
    admin_post(client, f"/admin/users/{admin.name}/disable")
    admin_post(client, f"/admin/users/{admin.name}/role", role="viewer")
    me = accounts.by_name(admin.name)
    assert not me.disabled and me.role == Role.ADMIN
    assert "cannot change your own role" in client.get("/admin/users").text
