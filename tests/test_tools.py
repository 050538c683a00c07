"""The built-in tools, doing real work: subprocesses, a local HTTP server, tmp files."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from app.engine.actions import StepFailed, StepOutcome, StepSucceeded
from app.engine.models import ErrorClass
from app.tools import builtin
from app.tools.builtin import OUTPUT_LIMIT, http_request, set_env, shell
from app.tools.registry import Tool, ToolContext, load_registry, run_tool


def make_ctx(workspace: Path, env: dict[str, str] | None = None) -> ToolContext:
    return ToolContext(
        run_id="run-1", step_id=1, idempotency_key="run-1:1", workspace=workspace, env=env or {}
    )


def call(tool: Tool, args: dict[str, Any], ctx: ToolContext) -> StepOutcome:
    return run_tool(tool, args, ctx, timeout=tool.timeout)


def succeeded(outcome: StepOutcome) -> StepSucceeded:
    assert isinstance(outcome, StepSucceeded), outcome
    return outcome


def failed(outcome: StepOutcome, error_class: ErrorClass) -> StepFailed:
    assert isinstance(outcome, StepFailed), outcome
    assert outcome.error_class is error_class, outcome.error
    return outcome


# --- shell ------------------------------------------------------------------------


def test_shell_success_combines_stdout_and_stderr(tmp_path: Path) -> None:
    outcome = call(shell, {"argv": ["sh", "-c", "echo hello; echo oops >&2"]}, make_ctx(tmp_path))
    result = succeeded(outcome).result
    assert result["exit_code"] == 0
    assert "hello" in result["output"] and "oops" in result["output"]
    assert result["truncated"] is False
    assert result["bytes"] == len("hello\noops\n")


def test_shell_sees_the_run_env_but_not_the_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKER_SECRET", "do-not-leak")
    script = 'echo "$RUN_VAR/${WORKER_SECRET:-absent}"'
    outcome = call(shell, {"argv": ["sh", "-c", script]}, make_ctx(tmp_path, {"RUN_VAR": "set"}))
    assert succeeded(outcome).result["output"].strip() == "set/absent"


def test_shell_runs_in_a_workspace_subdirectory(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    outcome = call(shell, {"argv": ["pwd"], "cwd": "sub"}, make_ctx(tmp_path))
    assert succeeded(outcome).result["output"].strip() == str((tmp_path / "sub").resolve())


@pytest.mark.parametrize("cwd", ["..", "../..", "/etc", "sub/../../x"])
def test_shell_refuses_a_cwd_outside_the_workspace(tmp_path: Path, cwd: str) -> None:
    workspace = tmp_path / "ws"
    (workspace / "sub").mkdir(parents=True)
    outcome = call(shell, {"argv": ["pwd"], "cwd": cwd}, make_ctx(workspace))
    assert "outside the workspace" in failed(outcome, ErrorClass.PERMANENT).error


def test_shell_non_zero_exit_is_permanent_with_the_output_tail(tmp_path: Path) -> None:
    script = "echo first line; echo 'the real problem'; exit 3"
    outcome = call(shell, {"argv": ["sh", "-c", script]}, make_ctx(tmp_path))
    error = failed(outcome, ErrorClass.PERMANENT).error
    assert "exited 3" in error
    assert "the real problem" in error


def test_shell_error_message_is_bounded(tmp_path: Path) -> None:
    script = f"{sys.executable} -c \"print('y' * 100_000)\"; exit 1"
    outcome = call(shell, {"argv": ["sh", "-c", script]}, make_ctx(tmp_path))
    assert len(failed(outcome, ErrorClass.PERMANENT).error) < 2_500


def test_shell_exit_75_is_transient(tmp_path: Path) -> None:
    outcome = call(shell, {"argv": ["sh", "-c", "echo busy; exit 75"]}, make_ctx(tmp_path))
    error = failed(outcome, ErrorClass.TRANSIENT).error
    assert "EX_TEMPFAIL" in error and "busy" in error


def test_shell_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    # The shell starts a child and waits: both must be gone after the timeout.
    script = "sleep 30 & echo $! > child.pid; echo $$ > shell.pid; wait"
    outcome = call(shell, {"argv": ["sh", "-c", script], "timeout": 1}, make_ctx(tmp_path))
    assert "timed out after 1 s" in failed(outcome, ErrorClass.TRANSIENT).error
    for name in ("shell.pid", "child.pid"):
        pid = int((tmp_path / name).read_text())
        assert wait_until_gone(pid), f"{name} ({pid}) is still running"


def wait_until_gone(pid: int, within: float = 5.0) -> bool:
    """True once `pid` has exited (a zombie awaiting its reaper counts as exited)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_shell_caps_megabytes_of_output_without_holding_them(tmp_path: Path) -> None:
    size = 20 * 1024 * 1024
    code = (
        "import sys; w = sys.stdout.write; w('HEAD'); "
        f"[w('x' * 1024 * 1024) for _ in range({size // (1024 * 1024)})]; w('TAIL')"
    )
    tracemalloc.start()
    try:
        answer = shell.fn(
            shell.args_model.model_validate({"argv": [sys.executable, "-c", code]}),
            make_ctx(tmp_path),
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    result = answer.result
    assert result["bytes"] == size + 8
    assert result["truncated"] is True
    assert result["output"].startswith("HEAD") and result["output"].endswith("TAIL")
    assert f"output truncated: {size + 8} bytes total" in result["output"]
    assert len(result["output"].encode()) <= OUTPUT_LIMIT + 200
    assert peak < 2 * 1024 * 1024, f"peak Python memory {peak} bytes for {size} bytes of output"


def test_shell_unknown_command_is_permanent(tmp_path: Path) -> None:
    outcome = call(shell, {"argv": ["no-such-command-xyz"]}, make_ctx(tmp_path))
    assert "command not found" in failed(outcome, ErrorClass.PERMANENT).error


@pytest.mark.parametrize(
    "args",
    [
        {"argv": []},
        {"argv": [""]},
        {"argv": ["ls"], "shell": True},
        {"argv": ["ls"], "timeout": 9e9},
    ],
)
def test_shell_invalid_args_fail_permanently(tmp_path: Path, args: dict[str, Any]) -> None:
    outcome = call(shell, args, make_ctx(tmp_path))
    assert "invalid arguments for shell" in failed(outcome, ErrorClass.PERMANENT).error


# --- http_request -----------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    """/ok echoes the request; /status/<n> answers n; /big sends 100 KB; /moved redirects."""

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def _answer(self) -> None:
        if self.path.startswith("/status/"):
            self._send(int(self.path.rsplit("/", 1)[1]), b"server says no")
        elif self.path == "/big":
            self._send(200, b"z" * 100_000)
        elif self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/ok")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            length = int(self.headers.get("Content-Length") or 0)
            echo = {
                "method": self.command,
                "path": self.path,
                "content_type": self.headers.get("Content-Type"),
                "body": self.rfile.read(length).decode(),
            }
            self._send(200, json.dumps(echo).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_http_get_200(tmp_path: Path, server: str) -> None:
    outcome = call(http_request, {"url": f"{server}/ok?x=1"}, make_ctx(tmp_path))
    result = succeeded(outcome).result
    assert result["status"] == 200
    assert result["headers"]["content-type"] == "application/json"
    assert json.loads(result["body"])["path"] == "/ok?x=1"


def test_http_post_json_sets_the_content_type(tmp_path: Path, server: str) -> None:
    args = {"method": "POST", "url": f"{server}/ok", "json": {"a": [1, 2]}}
    echo = json.loads(succeeded(call(http_request, args, make_ctx(tmp_path))).result["body"])
    assert echo["method"] == "POST"
    assert echo["content_type"] == "application/json"
    assert json.loads(echo["body"]) == {"a": [1, 2]}


def test_http_follows_redirects(tmp_path: Path, server: str) -> None:
    outcome = call(http_request, {"url": f"{server}/moved"}, make_ctx(tmp_path))
    assert json.loads(succeeded(outcome).result["body"])["path"] == "/ok"


def test_http_large_body_is_capped(tmp_path: Path, server: str) -> None:
    body = succeeded(call(http_request, {"url": f"{server}/big"}, make_ctx(tmp_path))).result[
        "body"
    ]
    assert body.startswith("z" * 100)
    assert "body truncated" in body
    assert len(body) < OUTPUT_LIMIT + 100


def test_http_404_is_permanent(tmp_path: Path, server: str) -> None:
    outcome = call(http_request, {"url": f"{server}/status/404"}, make_ctx(tmp_path))
    error = failed(outcome, ErrorClass.PERMANENT).error
    assert "404" in error and "server says no" in error


@pytest.mark.parametrize("status", [429, 500, 503])
def test_http_429_and_5xx_are_transient(tmp_path: Path, server: str, status: int) -> None:
    outcome = call(http_request, {"url": f"{server}/status/{status}"}, make_ctx(tmp_path))
    assert str(status) in failed(outcome, ErrorClass.TRANSIENT).error


def test_http_connection_refused_is_transient(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nobody listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outcome = call(http_request, {"url": f"http://127.0.0.1:{port}/"}, make_ctx(tmp_path))
    assert "cannot connect" in failed(outcome, ErrorClass.TRANSIENT).error


@pytest.mark.parametrize(
    "args",
    [
        {"url": "ftp://example.com/file"},
        {"url": "/relative"},
        {"url": "http://x/", "method": "TRACE"},
        {"url": "http://x/", "body": "a", "json": {"b": 1}},
    ],
)
def test_http_invalid_args_fail_permanently(tmp_path: Path, args: dict[str, Any]) -> None:
    outcome = call(http_request, args, make_ctx(tmp_path))
    assert "invalid arguments for http_request" in failed(outcome, ErrorClass.PERMANENT).error


def test_http_spec_shows_the_json_field_by_its_public_name() -> None:
    properties = http_request.spec()["input_schema"]["properties"]
    assert "json" in properties and "json_body" not in properties


# --- set_env ----------------------------------------------------------------------


def test_set_env_updates_the_run_context(tmp_path: Path) -> None:
    args = {"name": "STAGING_DATABASE_URL", "value": "sqlite:///staging.db"}
    outcome = succeeded(call(set_env, args, make_ctx(tmp_path)))
    assert outcome.context_updates == {"STAGING_DATABASE_URL": "sqlite:///staging.db"}
    assert outcome.summary == "set STAGING_DATABASE_URL=sqlite:///staging.db"


@pytest.mark.parametrize(
    "name", ["API_KEY", "GITHUB_TOKEN", "CLIENT_SECRET", "DB_PASSWORD", "PASSPHRASE", "CREDENTIALS"]
)
def test_set_env_hides_secret_values(tmp_path: Path, name: str) -> None:
    outcome = succeeded(call(set_env, {"name": name, "value": "hunter2"}, make_ctx(tmp_path)))
    assert outcome.summary == f"set {name}=***"
    assert "hunter2" not in json.dumps(outcome.result)
    assert outcome.context_updates == {name: "hunter2"}


def test_set_env_masks_a_password_in_a_url(tmp_path: Path) -> None:
    args = {"name": "DATABASE_URL", "value": "postgresql://app:hunter2@db:5432/shop"}
    outcome = succeeded(call(set_env, args, make_ctx(tmp_path)))
    assert "hunter2" not in outcome.summary
    assert "postgresql://app:***@db:5432/shop" in outcome.summary


@pytest.mark.parametrize(
    "args",
    [
        {"name": "lower", "value": "x"},
        {"name": "1ABC", "value": "x"},
        {"name": "A", "value": "x" * 5000},
    ],
)
def test_set_env_invalid_args_fail_permanently(tmp_path: Path, args: dict[str, Any]) -> None:
    outcome = call(set_env, args, make_ctx(tmp_path))
    assert "invalid arguments for set_env" in failed(outcome, ErrorClass.PERMANENT).error


# --- registry ---------------------------------------------------------------------


def test_builtin_and_demo_tools_load_into_one_registry() -> None:
    registry = load_registry(["app.tools.builtin", "app.tools.demo"])
    names = {t.name for t in registry}
    assert {"shell", "http_request", "set_env", "checkout_pr", "deploy", "report"} <= names
    policies = registry.policies()
    assert policies["set_env"].idempotent and not policies["shell"].idempotent
    assert policies["shell"].timeout == builtin.SHELL_TOOL_TIMEOUT
    assert all(t.description and t.spec()["input_schema"] for t in registry)
