"""MCP servers for the tests, written with the SDK's server side (MCPServer, the
former FastMCP), run as real processes:

    python -m tests.support.mcp_servers stdio [--state DIR]
    python -m tests.support.mcp_servers http --port N [--state DIR]

Tools: `echo` (read-only), `add` (read-only, idempotent), `write_note` (destructive:
appends to DIR/notes.txt), `fail` (answers isError), `die` (the process exits while the
call is in flight), `slow` (sleeps), `pid` (this process's id, so a test sees restarts),
`env` (an environment variable, to check the configured env reaches the server).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations

READ_ONLY = ToolAnnotations(read_only_hint=True)
DESTRUCTIVE = ToolAnnotations(read_only_hint=False, destructive_hint=True)


def build(state: Path) -> MCPServer:
    server = MCPServer("agentloop-test", log_level="WARNING")

    @server.tool(description="Echo a message back.", annotations=READ_ONLY)
    def echo(message: str) -> str:
        return f"echo: {message}"

    @server.tool(
        description="Add two integers.",
        annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True),
    )
    def add(a: int, b: int) -> int:
        return a + b

    @server.tool(description="Append a line to the notes file.", annotations=DESTRUCTIVE)
    def write_note(text: str) -> str:
        state.mkdir(parents=True, exist_ok=True)
        with (state / "notes.txt").open("a") as notes:
            notes.write(text + "\n")
        return f"wrote {len(text)} characters"

    @server.tool(description="Always fails with a tool error.")
    def fail(reason: str) -> str:
        raise ToolError(f"cannot do it: {reason}")

    @server.tool(description="The server process exits during the call.")
    def die(marker: str = "") -> str:
        if marker:
            state.mkdir(parents=True, exist_ok=True)
            (state / marker).write_text(str(os.getpid()))
        os._exit(3)

    @server.tool(description="Sleep for a while.", annotations=READ_ONLY)
    def slow(seconds: float) -> str:
        time.sleep(seconds)
        return f"slept {seconds:g} s"

    @server.tool(description="This server's process id.", annotations=READ_ONLY)
    def pid() -> int:
        return os.getpid()

    @server.tool(description="An environment variable of the server.", annotations=READ_ONLY)
    def env(name: str) -> str:
        return os.environ.get(name, "")

    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("transport", choices=["stdio", "http"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--state", type=Path, default=Path(os.environ.get("MCP_STATE", ".")))
    options = parser.parse_args()
    server = build(options.state)
    if options.transport == "stdio":
        server.run("stdio")
    else:
        server.run("streamable-http", host="127.0.0.1", port=options.port)


if __name__ == "__main__":
    main()
