"""Tools from MCP servers: real server processes (tests/support/mcp_servers.py, written
with the SDK's server side) over stdio and streamable HTTP, the SDK as the client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.config import load_settings
from app.engine.actions import StepFailed, StepOutcome, StepSucceeded
from app.engine.models import ErrorClass, RunStatus
from app.service import AgentService
from app.tools.mcp import McpServers, load_config, register_mcp_tools
from app.tools.registry import ToolContext, ToolRegistry, run_tool
from tests.conftest import ROOT
from tests.fake_anthropic import FakeAnthropic, finish_reply, plan_reply
from tests.support.fixtures import die_with_parent, wait_until

SERVER = [sys.executable, "-m", "tests.support.mcp_servers"]


# --- helpers -----------------------------------------------------------------------------


def stdio_server(state: Path, **extra: Any) -> dict[str, Any]:
    return {
        "command": sys.executable,
        "args": ["-m", "tests.support.mcp_servers", "stdio", "--state", str(state)],
        "cwd": str(ROOT),
        "startup_timeout": 20,
        **extra,
    }


def write_config(path: Path, servers: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"servers": servers}))
    return path


def make_ctx(tmp_path: Path) -> ToolContext:
    return ToolContext(
        run_id="run-1", step_id=1, idempotency_key="run-1:1", workspace=tmp_path, env={}
    )


def call(registry: ToolRegistry, name: str, args: dict[str, Any], tmp_path: Path) -> StepOutcome:
    tool = registry.get(name)
    return run_tool(tool, args, make_ctx(tmp_path), timeout=tool.timeout)


def succeeded(outcome: StepOutcome) -> StepSucceeded:
    assert isinstance(outcome, StepSucceeded), outcome
    return outcome


def failed(outcome: StepOutcome, error_class: ErrorClass) -> StepFailed:
    assert isinstance(outcome, StepFailed), outcome
    assert outcome.error_class is error_class, outcome.error
    return outcome


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_http_server(port: int, state: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [*SERVER, "http", "--port", str(port), "--state", str(state)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )

    def listening() -> bool:
        assert process.poll() is None, "the MCP HTTP server exited"
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, timeout=30, what="the MCP HTTP server to listen")
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def stdio_registry(tmp_path: Path) -> Iterator[tuple[ToolRegistry, McpServers, Path]]:
    state = tmp_path / "state"
    config = write_config(
        tmp_path / "mcp.json",
        {
            "notes": stdio_server(
                state,
                env={"GREETING": "hello from the config"},
                policy={"add": {"idempotent": True}, "slow": {"timeout": 2}},
            )
        },
    )
    registry = ToolRegistry()
    servers = register_mcp_tools(registry, config)
    yield registry, servers, state
    servers.close()


# --- listing and calling -----------------------------------------------------------------


def test_stdio_server_tools_are_listed_with_schema_and_safe_policies(
    stdio_registry: tuple[ToolRegistry, McpServers, Path],
) -> None:
    registry, _, _ = stdio_registry
    names = {t.name for t in registry}
    assert {"notes__echo", "notes__add", "notes__write_note", "notes__fail", "notes__die"} <= names
    assert registry.source("notes__echo") == "mcp server notes"
    spec = next(s for s in registry.specs() if s["name"] == "notes__add")
    assert spec["input_schema"]["properties"]["a"]["type"] == "integer"
    assert spec["input_schema"]["required"] == ["a", "b"]
    assert spec["description"].startswith("[MCP server notes] Add two integers")
    policies = registry.policies()
    # Read-only tools skip approval; destructive ones and those the server says
    # nothing about need it. Nothing is idempotent unless the config says so.
    assert policies["notes__echo"].requires_approval is False
    assert policies["notes__write_note"].requires_approval is True
    assert policies["notes__fail"].requires_approval is True
    assert policies["notes__echo"].idempotent is False
    assert policies["notes__add"].idempotent is True
    assert policies["notes__slow"].timeout == 2
    assert policies["notes__echo"].timeout == 60


def test_calls_over_stdio(
    stdio_registry: tuple[ToolRegistry, McpServers, Path], tmp_path: Path
) -> None:
    registry, _, state = stdio_registry
    outcome = succeeded(call(registry, "notes__echo", {"message": "hi"}, tmp_path))
    assert outcome.result["content"] == "echo: hi"
    assert outcome.summary == "notes.echo: echo: hi"
    assert succeeded(call(registry, "notes__add", {"a": 2, "b": 3}, tmp_path)).result[
        "structured"
    ] == {"result": 5}
    env = succeeded(call(registry, "notes__env", {"name": "GREETING"}, tmp_path))
    assert env.result["content"] == "hello from the config"
    succeeded(call(registry, "notes__write_note", {"text": "first"}, tmp_path))
    assert (state / "notes.txt").read_text() == "first\n"


def test_calls_over_streamable_http(tmp_path: Path) -> None:
    port = free_port()
    server = start_http_server(port, tmp_path / "state")
    try:
        config = write_config(
            tmp_path / "mcp.toml.json",
            {"web": {"url": f"http://127.0.0.1:{port}/mcp", "tools": ["echo", "add", "fail"]}},
        )
        registry = ToolRegistry()
        servers = register_mcp_tools(registry, config)
        assert sorted(t.name for t in registry) == ["web__add", "web__echo", "web__fail"]
        outcome = succeeded(call(registry, "web__echo", {"message": "over http"}, tmp_path))
        assert outcome.result["content"] == "echo: over http"
        assert succeeded(call(registry, "web__add", {"a": 1, "b": 1}, tmp_path)).result[
            "structured"
        ] == {"result": 2}
        error = failed(
            call(registry, "web__fail", {"reason": "no"}, tmp_path), ErrorClass.PERMANENT
        )
        assert "cannot do it: no" in error.error

        # The server goes away: the next call cannot connect, so nothing was sent.
        stop(server)
        gone = failed(call(registry, "web__echo", {"message": "x"}, tmp_path), ErrorClass.TRANSIENT)
        assert gone.not_applied, gone.error
        assert "'web'" in gone.error
        # It comes back on the same port: the next call reconnects.
        server = start_http_server(port, tmp_path / "state")
        again = succeeded(call(registry, "web__echo", {"message": "back"}, tmp_path))
        assert again.result["content"] == "echo: back"
        servers.close()
    finally:
        stop(server)


def test_toml_config(tmp_path: Path) -> None:
    path = tmp_path / "mcp.toml"
    path.write_text(
        '[servers.notes]\ncommand = "python3"\nargs = ["-m", "x"]\ncwd = "sub"\n'
        'env = { TOKEN = "${MCP_TEST_TOKEN}" }\ntools = ["write_note"]\n\n'
        "[servers.notes.policy.write_note]\nrequires_approval = false\ntimeout = 5\n\n"
        '[servers.web]\nurl = "http://127.0.0.1:1/mcp"\noptional = true\n'
    )
    os.environ["MCP_TEST_TOKEN"] = "secret"
    try:
        config = load_config(path)
    finally:
        del os.environ["MCP_TEST_TOKEN"]
    notes, web = config.servers
    assert (notes.name, notes.transport, web.transport) == ("notes", "stdio", "streamable HTTP")
    assert notes.env == {"TOKEN": "secret"}
    assert notes.cwd == (tmp_path / "sub").resolve()
    assert notes.policy["write_note"].requires_approval is False
    assert web.optional


@pytest.mark.parametrize(
    ("servers", "message"),
    [
        (
            {"both": {"command": "x", "url": "http://h/mcp"}},
            "servers.both: Value error, give either",
        ),
        ({"none": {}}, "servers.none: Value error, give either"),
        ({"bad name!": {"command": "x"}}, "servers.bad name!.name"),
        ({"s": {"command": "x", "policy": {"t": {"retries": 1}}}}, "servers.s.policy.t.retries"),
    ],
)
def test_config_errors_name_the_file_and_server(
    tmp_path: Path, servers: dict[str, Any], message: str
) -> None:
    path = write_config(tmp_path / "mcp.json", servers)
    with pytest.raises(ValueError, match="MCP config") as caught:
        load_config(path)
    assert message in str(caught.value)


def test_a_server_that_cannot_start_is_reported_by_name(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "mcp.json", {"broken": {"command": str(tmp_path / "no-such-server")}}
    )
    with pytest.raises(ValueError) as caught:
        register_mcp_tools(ToolRegistry(), config)
    text = str(caught.value)
    assert text.startswith("MCP server 'broken' cannot start:"), text
    assert "\n" not in text
    # A refused HTTP server, the same; optional ones are skipped.
    config = write_config(
        tmp_path / "mcp.json",
        {"away": {"url": f"http://127.0.0.1:{free_port()}/mcp", "startup_timeout": 5}},
    )
    with pytest.raises(ValueError, match="MCP server 'away' cannot start: ConnectError"):
        register_mcp_tools(ToolRegistry(), config)
    config = write_config(
        tmp_path / "mcp.json",
        {"away": {"url": f"http://127.0.0.1:{free_port()}/mcp", "optional": True}},
    )
    registry = ToolRegistry()
    register_mcp_tools(registry, config)
    assert list(registry) == []


def test_a_configured_tool_the_server_lacks_is_an_error(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "mcp.json", {"notes": stdio_server(tmp_path, tools=["echo", "rm_rf"])}
    )
    with pytest.raises(ValueError, match="MCP server 'notes' does not offer rm_rf"):
        register_mcp_tools(ToolRegistry(), config)


# --- validation and errors ---------------------------------------------------------------


def test_schema_validation_refuses_bad_args_at_plan_time_and_before_the_call(
    stdio_registry: tuple[ToolRegistry, McpServers, Path], tmp_path: Path
) -> None:
    registry, _, state = stdio_registry
    assert registry.check_args("notes__add", {"a": 1, "b": 2}) == []
    problems = registry.check_args("notes__add", {"a": "one"})
    assert len(problems) == 1
    assert "notes__add" in problems[0]
    assert "a: 'one' is not of type 'integer'" in problems[0]
    assert "'b' is a required property" in problems[0]
    # A place that will hold a result not known yet is checked later.
    assert registry.check_args("notes__add", {"a": "{{step 1}}", "b": 2}, unresolved=[("a",)]) == []
    assert registry.check_args("notes__write_note", {"text": 7}) == [
        "notes__write_note: text: 7 is not of type 'string'"
    ]
    # And again before the call: the server never sees it.
    outcome = failed(
        call(registry, "notes__write_note", {"text": 7}, tmp_path), ErrorClass.PERMANENT
    )
    assert outcome.error.startswith("invalid arguments for notes__write_note")
    assert not (state / "notes.txt").exists()


def test_a_tool_error_is_a_permanent_failure(
    stdio_registry: tuple[ToolRegistry, McpServers, Path], tmp_path: Path
) -> None:
    registry, _, _ = stdio_registry
    outcome = failed(
        call(registry, "notes__fail", {"reason": "disk full"}, tmp_path), ErrorClass.PERMANENT
    )
    assert outcome.error.startswith("notes.fail failed: ")
    assert outcome.error.endswith("cannot do it: disk full")
    assert not outcome.not_applied


def test_the_server_dying_mid_call_is_an_unknown_outcome_and_the_next_call_restarts_it(
    stdio_registry: tuple[ToolRegistry, McpServers, Path], tmp_path: Path
) -> None:
    registry, servers, state = stdio_registry
    first = succeeded(call(registry, "notes__pid", {}, tmp_path)).result["structured"]["result"]
    outcome = failed(
        call(registry, "notes__die", {"marker": "died"}, tmp_path), ErrorClass.TRANSIENT
    )
    assert not outcome.not_applied  # sent, and then the server went away
    assert "went away during the call" in outcome.error
    assert (state / "died").read_text() == str(first)  # the call did reach the server
    second = succeeded(call(registry, "notes__pid", {}, tmp_path)).result["structured"]["result"]
    assert second != first
    assert servers.connection("notes").starts == 3  # listing, first call, restart


def test_a_timeout_leaves_the_client_usable(
    stdio_registry: tuple[ToolRegistry, McpServers, Path], tmp_path: Path
) -> None:
    registry, _, _ = stdio_registry
    # run_tool's SIGALRM interrupts the wait in this (the main) thread.
    tool = registry.get("notes__slow")
    started = time.monotonic()
    outcome = run_tool(tool, {"seconds": 30}, make_ctx(tmp_path), timeout=1)
    assert time.monotonic() - started < 5
    assert not failed(outcome, ErrorClass.TRANSIENT).not_applied
    # The client's own timeout (the tool's, 2 s) when no alarm interrupts.
    outcome = run_tool(tool, {"seconds": 30}, make_ctx(tmp_path), timeout=10)
    assert "no answer within 2 s" in failed(outcome, ErrorClass.TRANSIENT).error
    assert succeeded(call(registry, "notes__echo", {"message": "still here"}, tmp_path))


# --- end to end: Claude plans an MCP tool, a person approves, a worker runs it ------------

E2E_TASK = "write a note through the notes MCP server (mcp e2e)"


@pytest.mark.e2e
def test_claude_plans_an_mcp_tool_a_person_approves_and_a_worker_runs_it(
    fake_anthropic: FakeAnthropic,
    start_worker: Any,
    database_url: str,
    redis_db: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from app.wiring import build_service
    from tasks import CeleryDispatcher, CeleryNotifier

    state = tmp_path / "state"
    config = write_config(tmp_path / "mcp.json", {"notes": stdio_server(state)})
    env = {
        "ANTHROPIC_API_KEY": "test-key",
        "ANTHROPIC_BASE_URL": fake_anthropic.base_url,
        "AGENTLOOP_MCP_CONFIG": str(config),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    service: AgentService = build_service(
        settings, CeleryDispatcher(settings.max_countdown), CeleryNotifier()
    )
    assert "notes__write_note" in service.tools
    worker = start_worker(env=env, beat=False, name="mcp")

    fake_anthropic.script(
        plan_reply(
            [
                {
                    "description": "Write the note",
                    "tool": "notes__write_note",
                    "args": {"text": "approved note"},
                }
            ],
            reasoning="the notes server writes notes",
        ),
        finish_reply("# Note written\n\nThe notes server wrote it."),
    )
    run_id = service.create_run(E2E_TASK, config={"planner": "anthropic"}, created_by="e2e")

    def status() -> str:
        return str(service.status(run_id).run.status)

    wait_until(
        lambda: status() in ("paused", "completed", "failed"),
        timeout=60,
        what=f"a pause; worker log:\n{worker.output()[-3000:]}",
    )
    view = service.status(run_id)
    assert view.run.status == RunStatus.PAUSED, view.run.error
    assert view.pending_approval.kind == "approval"
    assert "notes__write_note needs approval" in view.pending_approval.reason
    assert not (state / "notes.txt").exists()  # nothing ran before the approval

    # What Claude was offered: the MCP tool with the server's schema.
    first = fake_anthropic.requests[0].body
    offered = {t["name"]: t for t in first.get("tools", [])}
    submit = json.dumps(first)
    assert "notes__write_note" in submit
    if "notes__write_note" in offered:
        assert offered["notes__write_note"]["input_schema"]["required"] == ["text"]

    service.approve(run_id, by="approver")
    wait_until(lambda: status() in ("completed", "failed"), timeout=90, what="the run to end")
    view = service.status(run_id)
    assert view.run.status == RunStatus.COMPLETED, view.run.error
    assert (state / "notes.txt").read_text() == "approved note\n"
    written = next(s for s in view.steps if s.tool == "notes__write_note")
    assert written.status == "completed"
    assert written.result["content"] == "wrote 13 characters"
