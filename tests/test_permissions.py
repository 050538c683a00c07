"""Who may do what (issue 9): roles checked in the service, so the pages, the API
and the CLI agree; four eyes by default; sessions that sign-out really ends."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from click.testing import CliRunner
from flask.testing import FlaskClient

from app.cli import main
from app.engine.models import RunStatus
from app.service import Forbidden, InvalidInput
from app.service.permissions import Actor, ApprovalPolicy
from app.store.accounts import Accounts, Role, User
from tests.support.fixtures import Harness
from tests.support.web import PASSWORD, csrf_token, paused_run, sign_in


def actor(user: User) -> Actor:
    return Actor.of(user)


# --- 1. cancel: the creator (an operator) or an admin --------------------------------------


def test_only_the_creator_or_an_admin_cancels_a_run(harness: Harness, make_user: Callable):
    owner, stranger = make_user("owner", role=Role.OPERATOR), make_user("stranger")
    admin = make_user("admin", role=Role.ADMIN)
    run_id = harness.service.create_run("mine", created_by=actor(owner))
    with pytest.raises(Forbidden, match="may cancel only runs they started"):
        harness.service.cancel(run_id, by=actor(stranger))
    assert harness.service.status(run_id).run.status == RunStatus.QUEUED
    harness.service.cancel(run_id, by=actor(owner))
    other = harness.service.create_run("theirs", created_by=actor(owner))
    harness.service.cancel(other, by=actor(admin))
    assert harness.service.status(other).run.status == RunStatus.CANCELLED


def test_a_stranger_cannot_cancel_through_the_api_or_the_page(
    harness: Harness, client: FlaskClient, accounts: Accounts, make_user: Callable
):
    owner, stranger = make_user("owner", role=Role.OPERATOR), make_user("stranger")
    run_id = harness.service.create_run("mine", created_by=actor(owner))
    token = accounts.issue_token(stranger.id)
    api = client.post(f"/api/runs/{run_id}/cancel", headers={"Authorization": f"Bearer {token}"})
    assert api.status_code == 403 and "may cancel only runs they started" in api.json["error"]
    sign_in(client, stranger)
    page = client.get(f"/runs/{run_id}")
    assert 'data-action="cancel"' not in page.text  # no button it cannot use
    posted = client.post(f"/runs/{run_id}/cancel", data={"csrf_token": csrf_token(page.text)})
    assert posted.status_code == 403
    assert harness.service.status(run_id).run.status == RunStatus.QUEUED


# --- 3. four eyes: the deployment's approvers are a floor; no self-approval -----------------


def test_a_run_adds_approvers_but_cannot_replace_the_deployments(
    harness: Harness, make_user: Callable
):
    ops, friend = make_user("ops"), make_user("friend")
    harness.service.policy = ApprovalPolicy(approvers=(ops.name,))
    run_id = paused_run(harness, approvers=[friend.name])
    view = harness.service.status(run_id)
    assert harness.service.approvers_of(view.run) == (ops.name, friend.name)
    harness.service.approve(run_id, by=actor(ops))  # the deployment's approver still decides


def test_the_creator_does_not_approve_their_own_run(harness: Harness, make_user: Callable):
    me = make_user("me")
    run_id = paused_run(harness, created_by=actor(me), approvers=[me.name])
    with pytest.raises(Forbidden, match="four eyes"):
        harness.service.approve(run_id, by=actor(me))
    harness.service.policy = ApprovalPolicy(allow_self_approval=True)
    harness.service.approve(run_id, by=actor(me))  # a deployment may allow it


def test_deciding_takes_the_approver_role(harness: Harness, make_user: Callable):
    run_id = paused_run(harness)
    for role in (Role.VIEWER, Role.OPERATOR):
        with pytest.raises(Forbidden, match="takes the approver role"):
            harness.service.approve(run_id, by=actor(make_user(role.value, role=role)))


def test_an_approver_that_does_not_exist_is_refused_when_the_run_is_created(
    harness: Harness,
):
    with pytest.raises(InvalidInput, match=r"config\.approvers: names no user: alcie"):
        harness.service.create_run("typo", config={"approvers": ["alcie"]})
    harness.service.create_run("by email", config={"approvers": ["oncall@example.com"]})


def test_a_viewer_creates_nothing(harness: Harness, make_user: Callable):
    with pytest.raises(Forbidden, match="viewer and may not create runs"):
        harness.service.create_run("no", created_by=actor(make_user("v", role=Role.VIEWER)))


def test_a_viewer_sees_no_buttons_it_cannot_use(
    harness: Harness, client: FlaskClient, make_user: Callable
):
    viewer = make_user("viewer", role=Role.VIEWER)
    run_id = paused_run(harness)
    sign_in(client, viewer)
    page = client.get(f"/runs/{run_id}").text
    for button in ('data-action="approve"', 'data-action="cancel"', ">New run<"):
        assert button not in page
    assert client.get("/runs/new").status_code == 200  # the form shows; creating is refused


# --- 6. sign-out ends the session; a disabled user is out at once -------------------------


def test_a_cookie_captured_before_sign_out_no_longer_works(
    web_app, user: User, make_user: Callable
):
    client = web_app.test_client()
    sign_in(client, user)
    stolen = client.get_cookie("session").value
    client.post("/logout", data={"csrf_token": csrf_token(client.get("/").text)})
    thief = web_app.test_client()
    thief.set_cookie("session", stolen)
    assert thief.get("/").status_code == 302  # back to sign-in


def test_disabling_a_user_ends_their_sessions_and_tokens_at_once(
    web_app, accounts: Accounts, make_user: Callable
):
    user = make_user("leaver")
    token = accounts.issue_token(user.id)
    client = web_app.test_client()
    sign_in(client, user)
    accounts.set_disabled(user.name, True, by="admin")
    assert client.get("/").status_code == 302
    assert client.get("/api/runs", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    accounts.set_disabled(user.name, False, by="admin")
    assert client.get("/").status_code == 302  # enabled again, but signs in anew
    sign_in(client, user)
    assert client.get("/").status_code == 200


def test_user_management_from_the_cli_is_audited(database_url, accounts: Accounts):
    cli = CliRunner()
    env = {"AGENTLOOP_NEW_PASSWORD": PASSWORD, "USER": "root-at-terminal"}
    name = f"cli-{id(cli):x}"
    assert cli.invoke(main, ["user", "add", name, "--role", "viewer"], env=env).exit_code == 0
    assert cli.invoke(main, ["user", "role", name, "approver"], env=env).exit_code == 0
    assert cli.invoke(main, ["user", "disable", name], env=env).exit_code == 0
    listed = cli.invoke(main, ["user", "list"], env=env).output
    assert any(
        name in line and "approver" in line and "disabled" in line for line in listed.splitlines()
    )
    created = cli.invoke(main, ["user", "token", "create", name], env=env)
    assert accounts.user_for_token(created.output.strip()) is None  # disabled: refused
    cli.invoke(main, ["user", "enable", name], env=env)
    assert accounts.user_for_token(created.output.strip()) is not None
    revoked = cli.invoke(main, ["user", "token", "revoke", name, "--all"], env=env)
    assert "1 token(s)" in revoked.output
    assert accounts.user_for_token(created.output.strip()) is None
    actions = [e.action for e in accounts.audit_entries(subject=name)]
    assert actions == [
        "token.revoke", "user.enable", "token.issue", "user.disable", "user.role", "user.add",
    ]  # fmt: skip
    assert {e.actor for e in accounts.audit_entries(subject=name)} == {"root-at-terminal"}


# --- 7. a command runs only with a person's approval, unless the deployment says so -------


def test_shell_and_writing_http_requests_need_approval_unless_declared_safe():
    from app.engine.machine import needs_approval
    from app.engine.models import RunConfig, Step
    from app.tools.builtin import TOOLS
    from app.tools.registry import ToolRegistry

    tools = ToolRegistry(TOOLS)
    config = RunConfig(approval_required=())

    def asks(tool: str, **args) -> bool:
        step = Step(id=1, plan_version=1, position=1, description="d", tool=tool, args=args)
        return needs_approval(config, step, tools.policies()[tool])

    assert asks("shell", argv=["rm", "-rf", "/"]) and asks("shell", argv=["pytest"])
    assert asks("http_request", url="https://x.example", method="POST")
    assert not asks("http_request", url="https://x.example")  # GET by default
    assert not asks("http_request", url="https://x.example", method="HEAD")
    tools.declare_safe("shell", [("argv", ("pytest",)), ("argv", ("git", "status"))])
    assert not asks("shell", argv=["pytest", "-q"]) and not asks("shell", argv=["git", "status"])
    assert asks("shell", argv=["pytestx"]) and asks("shell", argv=["git", "push"])


def test_the_deployment_lists_its_safe_commands(monkeypatch: pytest.MonkeyPatch, tmp_path):
    from app.config import load_settings
    from app.wiring import build_service
    from tests.support.fixtures import RecordingDispatcher, RecordingNotifier

    monkeypatch.setenv("AGENTLOOP_SAFE_COMMANDS", "pytest -q; git status")
    monkeypatch.setenv("AGENTLOOP_DATA_DIR", str(tmp_path))
    service = build_service(load_settings(), RecordingDispatcher(), RecordingNotifier())
    policy = service.tools.policies()["shell"]
    assert policy.requires_approval
    assert policy.is_safe_call({"argv": ["pytest", "-q", "tests"]})
    assert not policy.is_safe_call({"argv": ["pytest"]})  # the whole listed prefix
    service.store.dispose()
