"""The demo tools working for real on examples/shop in a temporary workspace."""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from app.engine.actions import StepFailed, StepOutcome, StepSucceeded
from app.engine.models import ErrorClass
from app.planner.offline import RUNBOOKS_DIR, load_runbooks
from app.tools.builtin import set_env
from app.tools.demo import build, checkout_pr, deploy, report, run_tests
from app.tools.registry import Tool, ToolContext, run_tool

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TASK_ERROR = "missing env var STAGING_DATABASE_URL"


@dataclass
class Run:
    """A run's workspace and env, as the service would hand them to each tool call."""

    workspace: Path
    outbox: Path
    env: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def ctx(self) -> ToolContext:
        settings = {"examples_dir": str(EXAMPLES), "outbox_dir": str(self.outbox)}
        return ToolContext(
            run_id="run-42",
            step_id=1,
            idempotency_key="run-42:1",
            workspace=self.workspace,
            env=dict(self.env),
            settings={**settings, **self.settings},
        )

    def call(self, tool: Tool, args: dict[str, Any] | None = None) -> StepOutcome:
        outcome = run_tool(tool, args or {}, self.ctx(), timeout=tool.timeout)
        if isinstance(outcome, StepSucceeded):
            self.env.update(outcome.context_updates)
        return outcome

    def ok(self, tool: Tool, args: dict[str, Any] | None = None) -> StepSucceeded:
        outcome = self.call(tool, args)
        assert isinstance(outcome, StepSucceeded), outcome
        return outcome

    def fails(self, tool: Tool, args: dict[str, Any], error_class: ErrorClass) -> str:
        outcome = self.call(tool, args)
        assert isinstance(outcome, StepFailed), outcome
        assert outcome.error_class is error_class, outcome.error
        return outcome.error

    def deployed(self) -> None:
        """Check out PR 42, build it and deploy it to staging."""
        self.ok(checkout_pr, {"pr": 42})
        self.ok(build)
        self.env["STAGING_DATABASE_URL"] = "sqlite:///staging.db"
        self.ok(deploy, {"env": "staging"})


@pytest.fixture
def run(tmp_path: Path) -> Run:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    return Run(workspace=workspace, outbox=tmp_path / "outbox")


def test_the_whole_demo_sequence(run: Run) -> None:
    checkout = run.ok(checkout_pr, {"pr": 42}).result
    assert "shop/discounts.py" in checkout["files"]

    built = run.ok(build).result
    assert built["version"] == "1.1.0"
    artifact = run.workspace / built["artifact"]
    assert hashlib.sha256(artifact.read_bytes()).hexdigest() == built["sha256"]

    error = run.fails(deploy, {"env": "staging"}, ErrorClass.PERMANENT)
    assert TASK_ERROR in error
    assert not (run.workspace / "staging").exists()

    run.ok(set_env, {"name": "STAGING_DATABASE_URL", "value": "sqlite:///staging.db"})
    deployed = run.ok(deploy, {"env": "staging"})
    assert deployed.result["version"] == "1.1.0"
    manifest = json.loads((run.workspace / "staging/staging/DEPLOY_MANIFEST.json").read_text())
    assert manifest["artifact_sha256"] == built["sha256"]
    assert manifest["database_url"] == "sqlite:///staging.db"

    cold = run.fails(run_tests, {"env": "staging"}, ErrorClass.TRANSIENT)
    assert "fixture cache was cold and has been warmed; retry" in cold
    tested = run.ok(run_tests, {"env": "staging"}).result
    assert tested["tests"] >= 10 and tested["failures"] == 0 and tested["errors"] == 0
    assert tested["skipped"] == 0  # the fixture smoke tests ran against the warm cache
    assert (run.workspace / "staging/staging/staging.db").is_file()

    reported = run.ok(report, {"title": "PR #42 deployed to staging"})
    markdown = reported.result["report"]
    assert markdown.startswith("# PR #42 deployed to staging")
    assert "shop 1.1.0" in markdown and "passed" in markdown
    outbox_file = run.outbox / "slack-run-42.json"
    assert reported.result["posted_to"] == str(outbox_file)
    assert json.loads(outbox_file.read_text()) == {"text": markdown}
    assert (run.workspace / "report.md").read_text() == markdown


def test_the_deploy_error_matches_the_runbooks_recovery_rule(run: Run) -> None:
    run.ok(checkout_pr, {"pr": 42})
    run.ok(build)
    error = run.fails(deploy, {"env": "staging"}, ErrorClass.PERMANENT)
    (runbook,) = [r for r in load_runbooks(RUNBOOKS_DIR) if r.name == "deploy_pr"]
    found = [m for rule in runbook.recover if (m := rule.error.search(error))]
    assert found and found[0]["name"] == "STAGING_DATABASE_URL"
    assert runbook.env_defaults["STAGING_DATABASE_URL"] == "sqlite:///staging.db"


def test_deploy_is_flagged_for_approval_and_summarized() -> None:
    assert deploy.requires_approval and not deploy.idempotent
    assert deploy.describe_call({"env": "staging"}) == "deploy to staging"


def test_checkout_is_a_fresh_copy_each_time(run: Run) -> None:
    run.ok(checkout_pr, {"pr": 42})
    pricing = run.workspace / "src/shop/pricing.py"
    pricing.write_text("broken")
    (run.workspace / "src/leftover.txt").write_text("x")
    run.ok(checkout_pr, {"pr": 42})
    assert "discount_code" in pricing.read_text()
    assert not (run.workspace / "src/leftover.txt").exists()
    assert not (EXAMPLES / "shop/dist").exists(), "the example itself must stay pristine"


def test_checkout_applies_the_patch_inside_an_enclosing_git_repository(tmp_path: Path) -> None:
    # Without care, git apply resolves paths against the enclosing repository and
    # silently applies nothing.
    subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], check=True)
    workspace = tmp_path / "repo" / "workspaces" / "run"
    workspace.mkdir(parents=True)
    Run(workspace=workspace, outbox=tmp_path / "outbox").ok(checkout_pr, {"pr": 42})
    assert (workspace / "src/shop/discounts.py").is_file()
    assert '"1.1.0"' in (workspace / "src/shop/__init__.py").read_text()


def test_checkout_of_an_unknown_pr_is_permanent(run: Run) -> None:
    error = run.fails(checkout_pr, {"pr": 7}, ErrorClass.PERMANENT)
    assert "unknown PR #7" in error and "42" in error


def test_build_is_reproducible(run: Run) -> None:
    run.ok(checkout_pr, {"pr": 42})
    first = run.ok(build).result
    run.ok(checkout_pr, {"pr": 42})
    assert run.ok(build).result == first


def test_build_before_checkout_is_permanent(run: Run) -> None:
    assert "checkout_pr first" in run.fails(build, {}, ErrorClass.PERMANENT)


def test_deploy_refuses_an_artifact_changed_after_the_build(run: Run) -> None:
    run.ok(checkout_pr, {"pr": 42})
    artifact = run.workspace / run.ok(build).result["artifact"]
    artifact.write_bytes(artifact.read_bytes() + b"tampered")
    run.env["STAGING_DATABASE_URL"] = "sqlite:///staging.db"
    error = run.fails(deploy, {"env": "staging"}, ErrorClass.PERMANENT)
    assert "changed since it was built" in error


def test_run_tests_before_deploy_is_permanent(run: Run) -> None:
    assert "run deploy first" in run.fails(run_tests, {}, ErrorClass.PERMANENT)


def test_a_failing_test_is_permanent_and_quotes_the_output(run: Run) -> None:
    run.deployed()
    pricing = run.workspace / "staging/staging/shop/pricing.py"
    pricing.write_text(pricing.read_text().replace("return total", "return total + 1"))
    run.fails(run_tests, {}, ErrorClass.TRANSIENT)  # the cold cache first
    error = run.fails(run_tests, {}, ErrorClass.PERMANENT)
    assert "exited 1" in error and "FAIL" in error


def test_a_redeploy_makes_the_cache_cold_again(run: Run) -> None:
    run.deployed()
    run.fails(run_tests, {}, ErrorClass.TRANSIENT)
    run.ok(run_tests)
    run.ok(deploy, {"env": "staging"})
    run.fails(run_tests, {}, ErrorClass.TRANSIENT)


def test_report_of_an_empty_workspace_says_what_did_not_happen(run: Run) -> None:
    markdown = run.ok(report, {"title": "Nothing yet"}).result["report"]
    assert "not checked out" in markdown and "not deployed" in markdown


# --- posting to a Slack webhook -----------------------------------------------------


class Webhook(BaseHTTPRequestHandler):
    """Records each posted JSON body; answers `status`. Subclassed per test."""

    received: list[Any] = []
    status = 200
    url = ""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(type(self).status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[type[Webhook]]:
    handler: type[Webhook] = type("CapturingWebhook", (Webhook,), {"received": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{httpd.server_address[1]}/hooks/T0/B0/secret"
    try:
        yield handler
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_report_posts_to_the_slack_webhook(run: Run, webhook: type[Webhook]) -> None:
    run.deployed()
    run.settings["slack_webhook_url"] = webhook.url
    reported = run.ok(report, {"title": "PR #42 deployed to staging"})
    assert reported.result["posted_to"] == "slack"
    assert webhook.received == [{"text": reported.result["report"]}]
    assert "secret" not in reported.summary
    assert not run.outbox.exists()


def test_a_failing_webhook_is_transient(run: Run, webhook: type[Webhook]) -> None:
    webhook.status = 503
    run.settings["slack_webhook_url"] = webhook.url
    assert "503" in run.fails(report, {"title": "t"}, ErrorClass.TRANSIENT)
