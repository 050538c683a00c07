"""Plug-ins: tools and runbooks from entry points and AGENTLOOP_TOOL_MODULES, the
demo tools only when asked for, `agentloop tools`, the documented examples, and
one-line errors for malformed URLs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from app.cli import main
from app.config import DEMO_TOOL_MODULE, load_settings
from app.engine.actions import Failure, PlanProduced, StepFailed, StepSucceeded
from app.engine.models import ErrorClass, PlannedStep, RunConfig
from app.planner.base import PlanRequest, StepView, ToolSpec
from app.planner.factory import runbook_dirs
from app.planner.offline import RUNBOOKS_DIR, OfflinePlanner, RunbookError, load_runbooks
from app.tools.registry import ToolContext, load_registry, run_tool
from app.wiring import build_registry
from tests.conftest import PG_SERVER, ROOT
from tests.support.fixtures import require

DEMO_TOOLS = {"checkout_pr", "build", "deploy", "run_tests", "report"}
EXAMPLE = ROOT / "docs" / "examples" / "agentloop-notes"
PLUGIN_PACKAGE = EXAMPLE / "agentloop_notes"


# --- the demo tools only for the demo ------------------------------------------------


def test_the_production_registry_has_no_demo_tools(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("AGENTLOOP_TOOL_MODULES", raising=False)
    settings = load_settings()
    registry = build_registry(settings)
    names = {t.name for t in registry}
    assert not names & DEMO_TOOLS, names
    assert {"shell", "http_request", "set_env"} <= names
    assert registry.source("shell") == "builtin"


def test_the_demo_and_the_suite_ask_for_the_demo_tools(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("AGENTLOOP_TOOL_MODULES", raising=False)
    demo = load_settings().with_demo_tools()
    assert DEMO_TOOL_MODULE in demo.all_tool_modules
    assert demo.with_demo_tools().all_tool_modules == demo.all_tool_modules
    registry = build_registry(demo)
    assert {t.name for t in registry} >= DEMO_TOOLS
    assert registry.source("deploy") == f"module {DEMO_TOOL_MODULE}"
    # Asked for twice (the suite's env, then the demo): still registered once.
    monkeypatch.setenv("AGENTLOOP_TOOL_MODULES", "app.tools.demo,app.tools.demo")
    assert build_registry(load_settings().with_demo_tools()).source("build")


# --- entry points ------------------------------------------------------------------------


def install_fake_distribution(
    site: Path, name: str, entry_points: dict[str, dict[str, str]], packages: list[Path]
) -> None:
    """What pip leaves behind for a package: its code and a dist-info directory with
    entry_points.txt, in a directory on sys.path."""
    for package in packages:
        shutil.copytree(package, site / package.name, ignore=shutil.ignore_patterns("__pycache__"))
    dist_info = site / f"{name.replace('-', '_')}-0.1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    lines = []
    for group, entries in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{key} = {value}" for key, value in entries.items()]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def notes_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The documented example plug-in, installed as pip would (entry points from its
    own pyproject.toml)."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    site = tmp_path / "site"
    site.mkdir()
    install_fake_distribution(
        site, project["name"], project["entry-points"], packages=[PLUGIN_PACKAGE]
    )
    monkeypatch.syspath_prepend(str(site))
    return site


def test_tools_and_runbooks_come_from_entry_points(notes_plugin: Path):
    settings = load_settings()
    registry = build_registry(settings)
    assert {"write_note", "publish_note"} <= {t.name for t in registry}
    assert registry.source("write_note") == (
        "entry point notes = agentloop_notes.tools (package agentloop-notes)"
    )
    dirs = runbook_dirs(settings)
    assert notes_plugin / "agentloop_notes" / "runbooks" in dirs
    # Added to the shipped runbooks and to AGENTLOOP_RUNBOOKS_DIR, not instead of them.
    assert dirs[0] == settings.runbooks_dir.resolve() and dirs[-1] == RUNBOOKS_DIR.resolve()
    names = [r.name for r in OfflinePlanner(dirs).runbooks]
    assert {"publish_note", "deploy_pr", "noop_chain"} <= set(names)


def test_entry_points_can_be_turned_off(notes_plugin: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AGENTLOOP_ENTRY_POINTS", "false")
    settings = load_settings()
    assert "write_note" not in build_registry(settings)
    assert notes_plugin / "agentloop_notes" / "runbooks" not in runbook_dirs(settings)


def test_a_module_named_twice_is_loaded_once(notes_plugin: Path):
    registry = load_registry(["app.tools.builtin", "agentloop_notes.tools"], entry_points=True)
    assert registry.source("write_note") == "module agentloop_notes.tools"


def test_a_tool_registered_twice_names_both_sources(tmp_path: Path, monkeypatch):
    site = tmp_path / "site"
    (site / "rival").mkdir(parents=True)
    (site / "rival" / "__init__.py").write_text(
        "from app.tools.builtin import TOOLS as BUILTIN\n"
        "TOOLS = [t for t in BUILTIN if t.name == 'shell']\n"
    )
    install_fake_distribution(site, "rival-tools", {"agentloop.tools": {"rival": "rival"}}, [])
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(ValueError) as caught:
        load_registry(["app.tools.builtin"], entry_points=True)
    assert str(caught.value) == (
        "tool 'shell' is registered twice: by builtin and by entry point rival = rival "
        "(package rival-tools)"
    )
    # The same message from the CLI, one line, no traceback.
    result = CliRunner().invoke(main, ["tools"])
    assert result.exit_code == 2
    assert "registered twice: by builtin and by entry point rival" in result.output
    assert "Traceback" not in result.output


def test_a_broken_entry_point_is_named(tmp_path: Path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    install_fake_distribution(
        site,
        "broken-plugin",
        {"agentloop.tools": {"gone": "no_such_module"}, "agentloop.runbooks": {"x": "json"}},
        [],
    )
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(ValueError, match="cannot load tool entry point gone = no_such_module"):
        load_registry([], entry_points=True)
    # json is a module but its directory holds no runbooks of this plug-in: still a
    # directory, so it loads (and holds no *.toml).
    from app.tools.registry import runbook_dirs_from_entry_points

    assert runbook_dirs_from_entry_points()[0].name == "json"


def test_runbook_names_are_unique_across_directories(tmp_path: Path):
    shutil.copy(RUNBOOKS_DIR / "deploy_pr.toml", tmp_path / "mine.toml")
    with pytest.raises(RunbookError) as caught:
        load_runbooks(tmp_path, RUNBOOKS_DIR)
    message = str(caught.value)
    assert "a runbook named 'deploy_pr' already exists" in message
    assert "mine.toml" in message and "runbooks/deploy_pr.toml" in message


def test_agentloop_tools_lists_every_tool_with_its_source(notes_plugin: Path):
    result = CliRunner().invoke(main, ["tools", "--json"])
    assert result.exit_code == 0, result.output
    listed = {t["name"]: t for t in json.loads(result.output)}
    assert listed["shell"]["source"] == "builtin"
    assert listed["deploy"]["source"] == "module app.tools.demo"  # the suite asks for them
    publish = listed["publish_note"]
    assert publish["source"].startswith("entry point notes")
    assert publish["requires_approval"] is True and publish["idempotent"] is False
    assert publish["timeout"] == 30
    assert publish["schema"]["required"] == ["name"]
    text_out = CliRunner().invoke(main, ["tools"]).output
    assert "publish_note  [entry point notes = agentloop_notes.tools (package" in text_out
    assert "needs approval, not idempotent, timeout 30 s" in text_out
    assert "    - name: string" in text_out


# --- the documented examples --------------------------------------------------------------


def fenced(doc: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", doc.read_text(), flags=re.S)


def test_the_tools_doc_shows_the_tested_example():
    blocks = fenced(ROOT / "docs" / "tools.md", "python")
    assert (PLUGIN_PACKAGE / "tools.py").read_text() in blocks
    assert (EXAMPLE / "pyproject.toml").read_text() in fenced(ROOT / "docs" / "tools.md", "toml")


def test_the_runbooks_doc_shows_the_tested_example():
    runbook = (PLUGIN_PACKAGE / "runbooks" / "publish_note.toml").read_text()
    assert runbook in fenced(ROOT / "docs" / "runbooks.md", "toml")


def context(tmp_path: Path, **env: str) -> ToolContext:
    return ToolContext(
        run_id="run-1", step_id=1, idempotency_key="k", workspace=tmp_path / "ws", env=env
    )


def test_the_example_tools_run_and_fail_as_documented(notes_plugin: Path, tmp_path: Path):
    registry = load_registry(["agentloop_notes.tools"])
    write, publish = registry.get("write_note"), registry.get("publish_note")
    board = tmp_path / "board"

    outcome = run_tool(publish, {"name": "hello"}, context(tmp_path), timeout=5)
    assert isinstance(outcome, StepFailed) and outcome.error_class is ErrorClass.PERMANENT
    assert "no note named hello" in outcome.error

    ok = run_tool(write, {"name": "hello", "text": "Hi!"}, context(tmp_path), timeout=5)
    assert isinstance(ok, StepSucceeded) and ok.summary == "wrote note hello (3 characters)"

    missing = run_tool(publish, {"name": "hello"}, context(tmp_path), timeout=5)
    assert isinstance(missing, StepFailed)
    assert missing.error.startswith("missing env var NOTICE_BOARD")

    unmounted = run_tool(
        publish, {"name": "hello"}, context(tmp_path, NOTICE_BOARD=str(board)), timeout=5
    )
    assert isinstance(unmounted, StepFailed)
    assert unmounted.error_class is ErrorClass.TRANSIENT and unmounted.not_applied

    board.mkdir()
    done = run_tool(
        publish, {"name": "hello"}, context(tmp_path, NOTICE_BOARD=str(board)), timeout=5
    )
    assert isinstance(done, StepSucceeded), done
    assert (board / "hello.md").read_text() == "Hi!\n"

    invalid = run_tool(write, {"name": "../x", "text": "t"}, context(tmp_path), timeout=5)
    assert isinstance(invalid, StepFailed) and "invalid arguments for write_note" in invalid.error
    assert publish.describe_call({"name": "hello"}) == "publish note hello to the notice board"


def test_the_example_runbook_plans_and_recovers(notes_plugin: Path):
    registry = load_registry(["app.tools.builtin", "agentloop_notes.tools"])
    specs = [
        ToolSpec(**t.spec(), requires_approval=t.requires_approval, idempotent=t.idempotent)
        for t in registry
    ]

    def check(steps: list[PlannedStep]) -> list[str]:
        return [p for s in steps for p in registry.check_args(s.tool, s.args)]

    planner = OfflinePlanner(PLUGIN_PACKAGE / "runbooks")
    task = "publish a note release-7 saying Version 7 is out"

    def ask(purpose: str, **fields) -> PlanProduced:
        request = PlanRequest(
            run_id="r", task=task, purpose=purpose, config=RunConfig(), tools=specs, **fields
        )
        outcome = planner.plan(request, check=check)
        assert isinstance(outcome, PlanProduced), outcome
        return outcome

    initial = ask("initial")
    assert [(s.tool, s.args) for s in initial.steps] == [
        ("write_note", {"name": "release-7", "text": "Version 7 is out"}),
        ("publish_note", {"name": "release-7"}),
    ]
    failure = Failure(
        step_id=2,
        description="Publish the note release-7",
        tool="publish_note",
        args={"name": "release-7"},
        error="missing env var NOTICE_BOARD: where notes are published",
        error_class=ErrorClass.PERMANENT,
        attempts=1,
    )
    plan = [
        StepView(position=1, plan_version=1, description="w", tool="write_note",
                 args={"name": "release-7", "text": "Version 7 is out"}, status="completed"),
        StepView(position=2, plan_version=1, description="p", tool="publish_note",
                 args={"name": "release-7"}, status="failed"),
    ]  # fmt: skip
    replan = ask("replan", failure=failure, current_plan=plan)
    assert [(s.tool, s.args) for s in replan.steps] == [
        ("set_env", {"name": "NOTICE_BOARD", "value": "/srv/notice-board"}),
        ("publish_note", {"name": "release-7"}),
    ]


# --- malformed settings ----------------------------------------------------------------


@pytest.mark.parametrize("variable", ["DATABASE_URL", "CELERY_BROKER_URL"])
@pytest.mark.parametrize("value", ["notaurl", "mysql://", "foo://"])
def test_a_malformed_url_is_one_line_naming_the_variable(variable: str, value: str):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "db", "upgrade"],
        env={**env, variable: value, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"agentloop: invalid configuration: {variable}={value!r}")
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_a_url_error_hides_the_password():
    result = CliRunner().invoke(
        main, ["db", "upgrade"], env={"DATABASE_URL": "mysql://ann:hunter2@db/x"}
    )
    assert result.exit_code == 2
    assert "DATABASE_URL='mysql://ann:***@db/x'" in result.output
    assert "hunter2" not in result.output


def test_db_upgrade_of_a_missing_database_says_how_to_create_it():
    admin = create_engine(f"{PG_SERVER}/postgres")
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        require("PostgreSQL", exc)
    finally:
        admin.dispose()
    missing = f"agentloop_missing_{os.getpid()}"
    result = CliRunner().invoke(
        main,
        ["db", "upgrade"],
        env={"DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/{missing}"},
    )
    assert result.exit_code == 2
    assert f"createdb -h 127.0.0.1 -p 5432 -U postgres {missing}" in result.output
    assert "Traceback" not in result.output
