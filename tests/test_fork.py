"""Time travel (issue 11 item 8): `fork RUN --from-step N` and `replay RUN`.

A fork keeps its parent's history through step N (the step numbers the run page
and `agentloop status` show), re-executes only what follows, and asks every
approval again; its lineage is in the database, on the page and in the API.
Driven message by message over real PostgreSQL (only the queue boundary is
replaced), like tests/test_service.py; one case runs through a real worker.
"""

from __future__ import annotations

import json
import os
import re
from datetime import timedelta

import pytest
from click.testing import CliRunner
from flask.testing import FlaskClient

from app.cli import main
from app.engine.actions import PlanProduced
from app.engine.models import PlannedStep, RunStatus, StepStatus
from app.errors import NotFound
from app.service import Conflict, Forbidden, InvalidInput
from app.service.permissions import Actor
from app.store.accounts import Role
from tests.support.fixtures import Harness, workspace
from tests.support.web import csrf_token, sign_in
from tests.test_browser import served, shoot, sign_in_with  # noqa: F401 (served: the fixture)
from tests.test_claude_e2e import claude_env, service, worker  # noqa: F401 (fixtures)
from tests.test_web_api import api  # noqa: F401  (the bearer-token client fixture)


def plan(*planned: tuple[str, str, dict]) -> PlanProduced:
    return PlanProduced(
        steps=[PlannedStep(description=d, tool=t, args=a) for d, t, a in planned],
        reasoning="scripted: " + ", ".join(d for d, _, _ in planned),
    )


PARENT_PLAN = (
    ("first effect", "effect", {}),
    ("second effect", "effect", {}),
    ("remove the old build", "delete", {"path": "build/old"}),
    ("third effect", "effect", {}),
)


def effects(harness: Harness, run_id: str, *, by: str | None = None) -> list[str]:
    """What the test tools really did, as the run's workspace records it, in order;
    with `by`, only what that run did (its idempotency keys name it)."""
    log = harness.service.workspaces / run_id / "effects.log"
    if not log.exists():
        return []
    done = [line for line in log.read_text().splitlines() if not line.startswith("start")]
    return [line for line in done if by is None or f" {by}:" in line]


def finished_parent(harness: Harness) -> str:
    """A run of four steps whose third (delete) a person approved; completed."""
    harness.planner.script = [plan(*PARENT_PLAN)]
    run_id = harness.service.create_run("time travel parent", created_by="tests")
    harness.drain()
    assert harness.service.status(run_id).run.status == RunStatus.PAUSED
    harness.service.approve(run_id, by="ann")
    harness.drain()
    assert harness.service.status(run_id).run.status == RunStatus.COMPLETED
    return run_id


def test_a_fork_re_executes_only_the_steps_after_n_and_asks_every_approval_again(
    harness: Harness,
):
    parent = finished_parent(harness)
    parent_effects = effects(harness, parent)
    assert parent_effects == [
        f"effect {parent}:v1:p1",
        f"effect {parent}:v1:p2",
        f"delete build/old {parent}:v1:p3",
        f"effect {parent}:v1:p4",
    ]

    harness.planner.script = [plan(*PARENT_PLAN[2:])]
    harness.planner.requests.clear()
    fork = harness.service.fork_run(parent, from_step=2, by="tests")
    harness.drain()

    # The planner was asked what follows step 2, knowing steps 1 and 2 are done.
    asked = harness.planner.requests[0]
    assert asked.run_id == fork and asked.purpose == "verify"
    assert [s.position for s in asked.completed] == [1, 2]
    # The delete after step 2 waits for a person, though one approved it in the parent.
    view = harness.service.status(fork)
    assert view.run.status == RunStatus.PAUSED
    assert view.pending_approval is not None
    waiting = next(s for s in view.steps if s.id == view.pending_approval.step_id)
    assert (waiting.position, waiting.tool) == (3, "delete")
    assert effects(harness, fork, by=fork) == []  # nothing of steps 1-2 ran again
    assert effects(harness, fork) == parent_effects  # the parent's workspace, copied

    harness.service.approve(fork, by="ann")
    harness.drain()
    view = harness.service.status(fork)
    assert view.run.status == RunStatus.COMPLETED
    assert effects(harness, fork, by=fork) == [
        f"delete build/old {fork}:v2:p3",
        f"effect {fork}:v2:p4",
    ]
    assert effects(harness, parent) == parent_effects  # the parent untouched
    calls = [e for e in view.events if e.kind == "tool_call"]
    kept, new = calls[:2], calls[2:]
    assert [e.message.split(":")[0] for e in kept] == ["step 1", "step 2"]  # history
    assert [e.message.split(":")[0] for e in new] == ["step 3", "step 4"]  # executed
    assert [(s.position, s.status) for s in view.steps] == [
        (1, StepStatus.COMPLETED),
        (2, StepStatus.COMPLETED),
        (3, StepStatus.COMPLETED),
        (4, StepStatus.COMPLETED),
    ]


def test_a_fork_keeps_history_and_context_as_they_were_at_step_n(harness: Harness):
    harness.planner.script = [
        plan(
            ("set A", "set_env", {"name": "A", "value": "one"}),
            ("set the token", "set_env", {"name": "DEPLOY_TOKEN", "value": "s3cret"}),
            ("change A", "set_env", {"name": "A", "value": "two"}),
            ("set B", "set_env", {"name": "B", "value": "bee"}),
        )
    ]
    parent = harness.service.create_run("context parent", config={"budget_tokens": 10**9})
    harness.drain()
    parent_row = harness.service.status(parent).run
    assert parent_row.context == {"A": "two", "DEPLOY_TOKEN": "s3cret", "B": "bee"}

    fork = harness.service.fork_run(parent, from_step=2, by="tests")
    with harness.service.store.transaction() as tx:
        row = tx.get_run(fork)
        kept = tx.all_steps(fork)
    assert row.context == {"A": "one", "DEPLOY_TOKEN": "s3cret"}
    assert (row.parent_run_id, row.forked_from_step) == (parent, 2)
    assert row.status == RunStatus.QUEUED and row.created_by == "tests"
    assert [(s.position, s.tool, s.status) for s in kept] == [
        (1, "set_env", StepStatus.COMPLETED),
        (2, "set_env", StepStatus.COMPLETED),
    ]
    assert all(s.idempotency_key.startswith(f"{fork}:") for s in kept)
    assert all(s.approved_args_hash is None for s in kept)
    # The timeline is the parent's up to step 2's outcome, then the fork's own note.
    parent_events = harness.service.status(parent).events
    fork_events = harness.service.status(fork).events
    last_kept = max(i for i, e in enumerate(parent_events) if "step 2 (set_env)" in e.message)
    copied = [(e.kind, e.message) for e in fork_events[:-1]]
    assert copied == [(e.kind, e.message) for e in parent_events[: last_kept + 1]]
    assert fork_events[-1].message.startswith(f"forked by tests from run {parent} at step 2")
    assert fork_events[-1].data["context_keys"] == ["A", "DEPLOY_TOKEN"]
    assert "s3cret" not in json.dumps([e.data for e in fork_events])
    # The parent's timeline says where it was forked.
    assert f"into run {fork}" in harness.service.status(parent).events[-1].message
    # The fork is queued to plan: the message is published after the commit.
    assert harness.dispatcher.sent[-1][:3] == (fork, 0, 0)


def test_a_fork_counts_what_the_parent_had_spent_by_step_n(harness: Harness):
    from tests.support.fixtures import PLANNER_USAGE

    first = plan(("one", "noop", {}), ("two", "noop", {}))
    first = first.model_copy(update={"usage": [PLANNER_USAGE]})
    harness.planner.script = [first]
    parent = harness.service.create_run("spending parent")
    harness.drain()
    harness.clock.advance(60)
    fork = harness.service.fork_run(parent, from_step=1, by="tests")
    with harness.service.store.transaction() as tx:
        row = tx.get_run(fork)
        parent_row = tx.get_run(parent)
    assert row.tokens_total == PLANNER_USAGE.total_tokens
    assert row.cost_usd == pytest.approx(PLANNER_USAGE.cost_usd)
    assert 0 < row.iteration < parent_row.iteration
    assert row.deadline > parent_row.deadline  # the timeout starts again


def test_a_fork_is_refused_clearly(harness: Harness):
    parent = finished_parent(harness)
    agent = harness.service
    with pytest.raises(NotFound, match="no run with id 'nope'"):
        agent.fork_run("nope", from_step=1, by="tests")
    for n in (0, 5, -1):
        with pytest.raises(InvalidInput, match=f"no step {n}: its steps are numbered 1 to 4"):
            agent.fork_run(parent, from_step=n, by="tests")
    with pytest.raises(Forbidden, match="fork runs"):
        agent.fork_run(parent, from_step=1, by=Actor(name="vic", role=Role.VIEWER))

    # A step that failed, and one still waiting for approval, did not complete.
    harness.planner.script = [plan(("flaky", "flaky", {"failures": 9}), ("after", "noop", {}))]
    failing = agent.create_run("a step that fails", config={"retry_policy": {"max_retries": 0}})
    harness.drain()
    assert agent.status(failing).steps[0].status == StepStatus.FAILED
    with pytest.raises(Conflict, match=r"step 1 \(flaky\) did not complete \(it is failed\)"):
        agent.fork_run(failing, from_step=1, by="tests")
    harness.planner.script = [plan(*PARENT_PLAN)]
    paused = agent.create_run("paused at the delete")
    harness.drain()
    with pytest.raises(Conflict, match=r"step 3 \(delete\) did not complete \(it is pending\)"):
        agent.fork_run(paused, from_step=3, by="tests")
    assert agent.lineage(paused).forks == []

    def no_planner(kind: str):
        raise ValueError(f"the {kind} planner is not available here")

    agent.planners = no_planner  # a deployment without the parent's planner
    with pytest.raises(InvalidInput, match="the offline planner is not available here"):
        agent.fork_run(parent, from_step=1, by="tests")
    assert not agent.lineage(parent).forks
    with pytest.raises(InvalidInput, match="instruction"):
        agent.fork_run(parent, from_step=1, by="tests", instruction="x" * 2001)
    assert not agent.lineage(parent).forks  # nothing was made


def test_the_instruction_goes_to_the_planner_with_the_task(harness: Harness):
    parent = finished_parent(harness)
    harness.planner.requests.clear()
    fork = harness.service.fork_run(
        parent, from_step=4, by="tests", instruction="also tag the release"
    )
    harness.drain()
    asked = harness.planner.requests[0]
    assert asked.task == (
        "time travel parent\n\nInstruction for this fork (from step 4): also tag the release"
    )
    assert harness.service.status(fork).run.status == RunStatus.COMPLETED
    assert effects(harness, fork, by=fork) == []  # step 4 was the last: nothing to run


def test_lineage_links_parent_and_forks(harness: Harness):
    parent = finished_parent(harness)
    a = harness.service.fork_run(parent, from_step=1, by="tests")
    harness.clock.advance(1)  # forks are listed oldest first
    b = harness.service.fork_run(parent, from_step=3, by="tests")
    grandchild = harness.service.fork_run(b, from_step=2, by="tests")
    lineage = harness.service.lineage(parent)
    assert lineage.parent_id is None and [f.id for f in lineage.forks] == [a, b]
    of_b = harness.service.lineage(b)
    assert (of_b.parent_id, of_b.forked_from_step) == (parent, 3)
    assert of_b.parent is not None and of_b.parent.id == parent
    assert [f.id for f in of_b.forks] == [grandchild]


def test_a_fork_outlives_its_pruned_parent(signed_in: FlaskClient, harness: Harness):
    parent = finished_parent(harness)
    fork = harness.service.fork_run(parent, from_step=2, by="tests")
    harness.clock.advance(3 * 86400)
    report = harness.service.prune(older_than=timedelta(days=1))
    assert parent in {r.id for r in report.runs} and fork not in {r.id for r in report.runs}
    lineage = harness.service.lineage(fork)
    assert (lineage.parent_id, lineage.forked_from_step, lineage.parent) == (parent, 2, None)
    shown = signed_in.get(f"/runs/{fork}").text
    found = re.search(r'<section id="lineage".*?</section>', shown, re.S)
    assert found is not None
    assert f"run {parent} (no longer here) at step 2" in " ".join(found.group(0).split())


def test_a_workspace_that_cannot_be_copied_leaves_no_fork(harness: Harness):
    parent = finished_parent(harness)
    (harness.service.workspaces / parent / "checkout").mkdir()
    (harness.service.workspaces / parent / "checkout" / "file").write_text("kept")
    fork = harness.service.fork_run(parent, from_step=1, by="tests")
    assert (harness.service.workspaces / fork / "checkout" / "file").read_text() == "kept"

    os.mkfifo(harness.service.workspaces / parent / "a-pipe")  # cannot be copied
    before = set(harness.service.workspaces.iterdir())
    with pytest.raises(Conflict, match=r"could not copy run \w+'s workspace: a-pipe"):
        harness.service.fork_run(parent, from_step=1, by="tests")
    assert set(harness.service.workspaces.iterdir()) == before  # no half-copied folder
    assert [f.id for f in harness.service.lineage(parent).forks] == [fork]


def test_export_and_import_keep_a_forks_lineage(harness: Harness):
    parent = finished_parent(harness)
    fork = harness.service.fork_run(parent, from_step=2, by="tests")
    document = harness.service.export_run(fork)
    assert document["run"]["parent_run_id"] == parent
    assert document["run"]["forked_from_step"] == 2
    imported = harness.service.import_run(document, by="tests")
    with harness.service.store.transaction() as tx:
        row = tx.get_run(imported.run_id)
    assert (row.parent_run_id, row.forked_from_step) == (parent, 2)


# --- the CLI ------------------------------------------------------------------------------


@pytest.fixture
def cli(database_url: str, redis_db: int) -> CliRunner:
    return CliRunner()


def test_cli_fork_and_its_refusals(cli: CliRunner, harness: Harness):
    parent = finished_parent(harness)
    made = cli.invoke(main, ["fork", parent, "--from-step", "2", "--instruction", "go on"])
    assert made.exit_code == 0, made.output
    fork = re.search(r"run (\w+) forked from run", made.output)
    assert fork is not None
    with harness.service.store.transaction() as tx:
        row = tx.get_run(fork.group(1))
    assert (row.parent_run_id, row.forked_from_step) == (parent, 2)
    assert row.task.endswith("Instruction for this fork (from step 2): go on")

    fork_status = cli.invoke(main, ["status", fork.group(1)])
    assert f"forked from run {parent} at step 2" in fork_status.output
    parent_status = cli.invoke(main, ["status", parent])
    assert f"fork: run {fork.group(1)} from step 2 (queued)" in parent_status.output

    for argv, says in (
        (["fork", parent, "--from-step", "9"], "the run has no step 9"),
        (["fork", "missing", "--from-step", "1"], "no run with id 'missing'"),
    ):
        refused = cli.invoke(main, argv)
        assert refused.exit_code == 2, refused.output
        assert says in refused.output and "Traceback" not in refused.output


def test_cli_replay_prints_each_iterations_decisions(cli: CliRunner, harness: Harness):
    parent = finished_parent(harness)
    shown = cli.invoke(main, ["replay", parent])
    assert shown.exit_code == 0, shown.output
    blocks = shown.output.split("\n\n")
    planning = next(b for b in blocks if "plan v1 (initial)" in b)
    assert "why:" in planning and "scripted: first effect, second effect" in planning
    deploy = next(b for b in blocks if "calling delete" in b)
    assert 'with args {"path": "build/old"}' in deploy
    asked = next(b for b in blocks if "paused for a person" in b)
    assert "people:" in asked
    decided = next(b for b in blocks if "ann decided approve on step 3" in b)
    assert "people:" in decided
    assert any("saw:" in b and "step 4 (effect) succeeded" in b for b in blocks)

    as_json = cli.invoke(main, ["replay", parent, "--json"])
    assert as_json.exit_code == 0, as_json.output
    document = json.loads(as_json.output)
    assert document["run"]["id"] == parent and document["run"]["parent_run_id"] is None
    iterations = document["iterations"]
    assert [i["iteration"] for i in iterations] == sorted(i["iteration"] for i in iterations)
    chose = [line for i in iterations for line in i["chose"]]
    assert any("calling delete" in line for line in chose)
    assert sum(len(i["event_ids"]) for i in iterations) == len(
        harness.service.status(parent).events
    )

    missing = cli.invoke(main, ["replay", "missing"])
    assert missing.exit_code == 2 and "no run with id 'missing'" in missing.output


# --- the run page and the API ----------------------------------------------------------


def test_the_page_forks_from_a_completed_step_and_shows_the_lineage(
    signed_in: FlaskClient, harness: Harness
):
    parent = finished_parent(harness)
    page = signed_in.get(f"/runs/{parent}").text
    buttons = re.findall(r'name="from_step" value="(\d+)"[^>]*>Fork from here', page)
    assert buttons == ["1", "2", "3", "4"]  # one per completed step
    assert 'id="lineage"' not in page  # neither forked nor forked from

    token = csrf_token(page)
    refused = signed_in.post(f"/runs/{parent}/fork", data={"from_step": "2"})  # no CSRF token
    assert refused.status_code in (302, 400)
    assert harness.service.lineage(parent).forks == []

    made = signed_in.post(
        f"/runs/{parent}/fork",
        data={"csrf_token": token, "from_step": "2", "instruction": "try again"},
    )
    assert made.status_code == 302
    fork = made.headers["Location"].rsplit("/", 1)[-1]
    assert harness.service.lineage(parent).forks[0].id == fork
    shown = signed_in.get(f"/runs/{fork}").text
    assert "Forked from step 2 of run" in shown  # the flash
    lineage = re.search(r'<section id="lineage".*?</section>', shown, re.S)
    assert lineage is not None
    assert f'href="/runs/{parent}"' in lineage.group(0) and "at step 2" in lineage.group(0)
    back = re.search(
        r'<section id="lineage".*?</section>', signed_in.get(f"/runs/{parent}").text, re.S
    )
    assert back is not None and f'href="/runs/{fork}"' in back.group(0)
    assert "(from step 2, queued)" in " ".join(back.group(0).split())

    out_of_range = signed_in.post(
        f"/runs/{parent}/fork", data={"csrf_token": token, "from_step": "7"}
    )
    assert out_of_range.status_code == 302
    assert "Not forked: the run has no step 7" in signed_in.get(f"/runs/{parent}").text
    assert (
        signed_in.post("/runs/nope/fork", data={"csrf_token": token, "from_step": "1"}).status_code
        == 404
    )


def test_a_viewer_sees_no_fork_button_and_may_not_fork(
    client: FlaskClient, harness: Harness, make_user
):
    parent = finished_parent(harness)
    viewer = make_user("viewer", role=Role.VIEWER)
    sign_in(client, viewer)
    page = client.get(f"/runs/{parent}").text
    assert "Fork from here" not in page
    response = client.post(
        f"/runs/{parent}/fork", data={"csrf_token": csrf_token(page), "from_step": "1"}
    )
    assert response.status_code == 403
    assert harness.service.lineage(parent).forks == []


def test_the_api_forks_and_shows_lineage(api, harness: Harness, user):  # noqa: F811
    parent = finished_parent(harness)
    harness.planner.script = [plan(*PARENT_PLAN)]
    paused = harness.service.create_run("paused for the api")
    harness.drain()
    made = api("POST", f"/api/runs/{parent}/fork", {"from_step": 3, "instruction": "again"})
    assert made.status_code == 201, made.json
    fork = made.json
    assert (fork["parent_run_id"], fork["forked_from_step"]) == (parent, 3)
    assert fork["status"] == "queued" and fork["created_by"] == user.name
    assert made.headers["Location"] == f"/api/runs/{fork['id']}"
    shown = api("GET", f"/api/runs/{parent}").json
    assert shown["forks"] == [fork["id"]] and shown["parent_run_id"] is None
    assert [s["position"] for s in api("GET", f"/api/runs/{fork['id']}").json["steps"]] == [1, 2, 3]

    for body, status, says in (
        ({"from_step": 9}, 422, "the run has no step 9"),
        ({"from_step": 0}, 400, "from_step"),
        ({"from_step": "2"}, 400, "from_step"),
        ({}, 400, "from_step"),
        ({"from_step": 1, "extra": 1}, 400, "extra: unknown field"),
    ):
        answer = api("POST", f"/api/runs/{parent}/fork", body)
        assert answer.status_code == status, (body, answer.json)
        assert says in answer.json["error"]
    missing = api("POST", "/api/runs/nope/fork", {"from_step": 1})
    assert missing.status_code == 404

    conflict = api("POST", f"/api/runs/{paused}/fork", {"from_step": 3})
    assert conflict.status_code == 409 and "did not complete" in conflict.json["error"]
    document = api("GET", "/api/openapi.json").json
    assert "forkRun" in json.dumps(document["paths"]["/api/runs/{run_id}/fork"])


# --- end to end: a real worker --------------------------------------------------------------


@pytest.mark.e2e
def test_a_fork_of_the_deploy_scenario_through_a_real_worker(start_worker, live_service):
    """The demo's deploy (PR 42, a missing env var set by set_env, approvals) forked
    right after set_env: checkout and build never run again, the context keeps the
    variable, and the deploy asks for approval again before it runs."""
    from app.demo import DEMO_CONFIG, DEMO_TASK
    from tests.support.fixtures import wait_until

    def settled(run_id: str):
        wait_until(
            lambda: live_service.status(run_id).run.status in ("paused", "completed", "failed"),
            timeout=90,
            what=f"run {run_id} to pause or end",
        )
        return live_service.status(run_id)

    start_worker(env={"AGENTLOOP_RUNBOOKS_DIR": ""})
    parent = live_service.create_run(DEMO_TASK, config=DEMO_CONFIG, created_by="e2e")
    while (view := settled(parent)).run.status == RunStatus.PAUSED:
        live_service.approve(parent, by="e2e")
    assert view.run.status == RunStatus.COMPLETED, view.run.error
    set_env = next(s for s in view.steps if s.tool == "set_env")

    fork = live_service.fork_run(parent, from_step=set_env.position, by="e2e")
    paused = settled(fork)
    assert paused.run.status == RunStatus.PAUSED
    waiting = next(s for s in paused.steps if s.id == paused.pending_approval.step_id)
    assert waiting.tool == "deploy" and waiting.position > set_env.position
    assert "STAGING_DATABASE_URL" in paused.run.context
    live_service.approve(fork, by="e2e")
    done = settled(fork)
    assert done.run.status == RunStatus.COMPLETED, done.run.error
    mark = next(i for i, e in enumerate(done.events) if e.message.startswith("forked by e2e"))
    ran = [e.data["tool"] for e in done.events[mark:] if e.kind == "tool_call"]
    # Only what follows set_env (run_tests may take a retry: its fixture cache is cold).
    assert list(dict.fromkeys(ran)) == ["deploy", "run_tests", "report"]
    assert done.run.report and "PR #42" in done.run.report


@pytest.mark.e2e
def test_a_person_forks_from_the_run_page_in_a_browser(
    browser,
    served: str,  # noqa: F811 (the fixture)
    harness: Harness,
    make_user,
):
    """Chromium: open the time travel panel, press "Fork from here" on step 2, land
    on the fork's page with its lineage; the parent's page then links the fork."""
    parent = finished_parent(harness)
    operator = make_user("forker", role=Role.OPERATOR)
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    sign_in_with(page, served, operator.name)
    page.goto(f"{served}/runs/{parent}")
    page.click("#fork summary")
    page.fill("#fork-instruction", "tag it this time")
    page.click('button[data-action="fork"][value="2"]')
    page.wait_for_selector("#lineage .forked-from")
    fork = page.url.rsplit("/", 1)[-1]
    assert fork != parent
    lineage = " ".join(page.inner_text("#lineage").split())
    assert lineage == f"Forked from run {parent} at step 2."
    shoot(page, "fork-lineage")
    with harness.service.store.transaction() as tx:
        row = tx.get_run(fork)
    assert (row.parent_run_id, row.forked_from_step, row.created_by) == (parent, 2, operator.name)
    page.click(f'#lineage a[href="/runs/{parent}"]')
    page.wait_for_selector(f'#lineage a[href="/runs/{fork}"]')


CLAUDE_TASK = "release the widget (fork e2e with claude)"


@pytest.mark.e2e
def test_claude_plans_a_forks_rest_with_its_instruction_through_a_real_worker(
    fake_anthropic,
    service,  # noqa: F811 (the fixture: a service with the fake's key)
    worker,  # noqa: F811 (the fixture: a real worker whose SDK talks to the fake)
):
    """The real SDK against the fake Messages API: the fork's first call is a verify
    whose prompt carries the instruction and the kept step; Claude answers with the
    steps still needed, and the delete among them asks for approval again."""
    from tests.fake_anthropic import finish_reply, more_steps_reply, plan_reply
    from tests.test_claude_e2e import answer_tool, for_task, step, user_text, wait_for_status

    fake_anthropic.script(
        plan_reply(
            [
                step("noop", "Prepare the release"),
                step("delete", "Remove the old build", path="old-build"),
                step("noop", "Announce the release"),
            ]
        ),
        finish_reply("# Released"),
        more_steps_reply(
            [step("delete", "Remove the cache", path="cache"), step("noop", "Announce it")],
            reasoning="the fork asks to remove the cache instead",
        ),
        finish_reply("# Released, cache removed"),
    )
    parent = service.create_run(CLAUDE_TASK, config={"planner": "anthropic"}, created_by="e2e")
    assert wait_for_status(service, parent, "paused", "failed").run.status == RunStatus.PAUSED
    service.approve(parent, by="e2e")
    assert wait_for_status(service, parent, "completed", "failed").run.status == "completed"

    fork = service.fork_run(parent, from_step=1, by="e2e", instruction="remove the cache instead")
    paused = wait_for_status(service, fork, "paused", "completed", "failed")
    assert paused.run.status == RunStatus.PAUSED, paused.run.error
    waiting = next(s for s in paused.steps if s.id == paused.pending_approval.step_id)
    assert (waiting.tool, waiting.args, waiting.position) == ("delete", {"path": "cache"}, 2)
    sent = for_task(fake_anthropic, CLAUDE_TASK)
    assert [answer_tool(r) for r in sent] == ["submit_plan", "finish", "finish"]
    asked = user_text(sent[2])
    assert "Instruction for this fork (from step 1): remove the cache instead" in asked
    assert "Prepare the release" in asked

    service.approve(fork, by="e2e")
    done = wait_for_status(service, fork, "completed", "failed")
    assert done.run.status == RunStatus.COMPLETED, done.run.error
    assert done.run.report == "# Released, cache removed"
    log = (workspace(fork) / "effects.log").read_text().splitlines()
    assert [line for line in log if f" {fork}:" in line] == [f"delete cache {fork}:v2:p2"]
