"""The daily commands: runs, follow, export, import, prune, and status --json."""

from __future__ import annotations

import json
from pathlib import Path
from uuid import uuid4

import pytest
from click.testing import CliRunner

from app.cli import main
from app.engine.models import RunStatus
from tests.support.fixtures import Harness, workspace
from tests.support.fixtures import steps as plan
from tests.support.web import paused_run
from tests.test_retention import age, comparable


@pytest.fixture
def cli(database_url, redis_db):
    return CliRunner()


def completed(harness: Harness, task: str) -> str:
    harness.planner.script = [plan("noop", "noop")]
    run_id = harness.service.create_run(task, config={}, created_by="tests")
    harness.drain()
    assert harness.service.status(run_id).run.status == RunStatus.COMPLETED
    return run_id


def ok(result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def test_runs_lists_newest_first_and_filters(cli, harness: Harness):
    tag = uuid4().hex
    first = completed(harness, f"first {tag}")
    harness.clock.advance(1)
    second = completed(harness, f"second {tag.upper()}")
    other = completed(harness, "unrelated")

    listed = ok(cli.invoke(main, ["runs", "--search", tag]))
    assert listed.index(second) < listed.index(first) and other not in listed
    assert "2 run(s)" in listed

    rows = json.loads(ok(cli.invoke(main, ["runs", "--search", tag, "--json"])))
    assert [r["id"] for r in rows] == [second, first]
    assert rows[0]["status"] == "completed" and rows[0]["task"] == f"second {tag.upper()}"

    assert first in ok(cli.invoke(main, ["runs", "--search", tag, "--since", "1h"]))
    assert first not in ok(cli.invoke(main, ["runs", "--search", tag, "--since", "2999-01-01"]))
    assert ok(cli.invoke(main, ["runs", "--search", tag, "--status", "failed"])).startswith(
        "0 run(s)"
    )
    assert (
        len(json.loads(ok(cli.invoke(main, ["runs", "--search", tag, "--limit", "1", "--json"]))))
        == 1
    )
    # A percent sign is matched literally, not as a wildcard.
    assert "0 run(s)" in ok(cli.invoke(main, ["runs", "--search", f"{tag[:4]}%{tag[-4:]}"]))

    bad = cli.invoke(main, ["runs", "--since", "yesterday"])
    assert bad.exit_code == 2 and "neither an age" in bad.output


def test_status_json(cli, harness: Harness):
    run_id = paused_run(harness)
    shown = json.loads(ok(cli.invoke(main, ["status", run_id, "--json"])))
    assert shown["run"]["id"] == run_id and shown["run"]["status"] == "paused"
    assert [s["tool"] for s in shown["steps"]] == ["noop", "noop"]
    assert any(e["kind"] == "approval" for e in shown["events"])
    assert shown["pending_approval"]["kind"] == "approval"


def test_follow_reattaches_and_returns_at_a_pause_with_the_command_to_decide(cli, harness: Harness):
    run_id = paused_run(harness)
    out = ok(cli.invoke(main, ["follow", run_id]))
    assert "HUMAN" in out and "needs approval" in out
    assert f"agentloop approve {run_id}" in out

    done = completed(harness, "followed to the end")
    out = ok(cli.invoke(main, ["follow", done]))
    assert f"run {done} completed" in out and "STATUS" in out

    missing = cli.invoke(main, ["follow", "no-such-run"])
    assert missing.exit_code == 2 and "no run with id 'no-such-run'" in missing.output


def test_export_then_import_round_trip(cli, harness: Harness, tmp_path: Path):
    harness.planner.script = [plan("noop", "noop")]
    original = harness.service.create_run(
        "export me", config={"approval_required": ["noop"]}, created_by="tests"
    )
    harness.drain()
    harness.service.approve(original, by="someone-else", comment="fine")
    harness.drain()
    harness.service.approve(original, by="someone-else")
    harness.drain()

    exported = tmp_path / "run.json"
    ok(cli.invoke(main, ["export", original, "-o", str(exported)]))
    document = json.loads(exported.read_text())
    assert document["format"] == "agentloop-run" and document["run"]["id"] == original
    assert {"config", "report"} <= set(document["run"])
    assert len(document["steps"]) == 2 and len(document["approvals"]) == 2
    to_stdout = json.loads(ok(cli.invoke(main, ["export", original])))
    assert {k: v for k, v in to_stdout.items() if k != "exported_at"} == {
        k: v for k, v in document.items() if k != "exported_at"
    }

    out = ok(cli.invoke(main, ["import", str(exported)]))
    new_id = out.split()[1]
    assert new_id != original and "status completed" in out
    before, after = comparable(harness, original), comparable(harness, new_id)
    assert after[0] == before[0]
    assert after[1][:-1] == before[1]
    assert after[2] == before[2]
    assert not harness.dispatcher.sent

    # A fork's lineage (its parent and the step it was forked from) goes along.
    fork = harness.service.fork_run(original, from_step=1, by="tests")
    forked = tmp_path / "fork.json"
    ok(cli.invoke(main, ["export", fork, "-o", str(forked)]))
    copy = ok(cli.invoke(main, ["import", str(forked)])).split()[1]
    shown = json.loads(ok(cli.invoke(main, ["status", copy, "--json"])))["run"]
    assert (shown["parent_run_id"], shown["forked_from_step"]) == (original, 1)

    readable = ok(cli.invoke(main, ["export", original, "--format", "md"]))
    assert readable.startswith(f"# Run {original}: export me")
    assert "## Steps" in readable and "## Timeline" in readable and "## Approvals" in readable

    not_json = tmp_path / "x.json"
    not_json.write_text("{nope")
    bad = cli.invoke(main, ["import", str(not_json)])
    assert bad.exit_code == 2 and "not valid JSON" in bad.output
    not_export = tmp_path / "y.json"
    not_export.write_text("{}")
    bad = cli.invoke(main, ["import", str(not_export)])
    assert bad.exit_code == 2 and "not an agentloop export" in bad.output


def test_prune_dry_run_then_for_real_and_never_a_paused_run(cli, harness: Harness):
    old = completed(harness, "old and done")
    paused = paused_run(harness)
    for run_id in (old, paused):
        age(harness, run_id, 40)
        workspace(run_id).mkdir(parents=True, exist_ok=True)
        (workspace(run_id) / "f").write_text("x")

    dry = ok(cli.invoke(main, ["prune", "--older-than", "30d", "--dry-run"]))
    assert f"would remove {old}" in dry and paused not in dry
    assert harness.service.status(old).run.status == RunStatus.COMPLETED
    assert workspace(old).exists()

    refused = cli.invoke(main, ["prune", "--older-than", "30d", "--status", "paused"])
    assert refused.exit_code == 2 and "never" in refused.output
    bad_age = cli.invoke(main, ["prune", "--older-than", "30"])
    assert bad_age.exit_code == 2 and "not an age" in bad_age.output

    done = ok(cli.invoke(main, ["prune", "--older-than", "30d", "--status", "completed,failed"]))
    assert f"removed {old}" in done and "workspace folder(s)" in done
    assert not workspace(old).exists()
    assert workspace(paused).exists()
    assert harness.service.status(paused).run.status == RunStatus.PAUSED
    gone = cli.invoke(main, ["status", old])
    assert gone.exit_code == 2 and "no run with id" in gone.output
