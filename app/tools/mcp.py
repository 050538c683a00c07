"""Tools from MCP servers, through the official `mcp` SDK as the client.

Servers are declared in a TOML or JSON file (AGENTLOOP_MCP_CONFIG, see docs/mcp.md):

    [servers.notes]                       # stdio: a command the worker starts
    command = "python"
    args = ["-m", "notes_server"]
    env = { NOTES_TOKEN = "${NOTES_TOKEN}" }   # ${VAR} is read from the worker's env
    tools = ["read_note", "write_note"]   # which tools to expose; omitted: all
    timeout = 60                          # default per-call timeout, seconds

    [servers.notes.policy.write_note]     # per tool; each field optional
    idempotent = false
    requires_approval = true
    timeout = 30

    [servers.search]                      # streamable HTTP
    url = "http://127.0.0.1:9000/mcp"

Each tool joins the registry as `<server>__<tool>` (Anthropic tool names allow only
`[a-zA-Z0-9_-]{1,64}`), with the server's JSON Schema as what the planner sees and
what arguments are validated against (at plan time and again before the call).
Policy defaults to the safe side: not idempotent, and approval needed unless the
server marks the tool read-only (annotations.readOnlyHint).

Failures are classified for the engine: a tool error (isError) is PERMANENT; a server
that cannot be started or reached before the request is sent is TRANSIENT with
`not_applied`; a call whose outcome is unknown (timeout, connection lost mid-call)
is TRANSIENT without it, so a tool that is not idempotent pauses for a person.

The SDK is async: each process runs one event loop in a background thread, and the
tools call into it synchronously with a timeout. Servers start lazily in the process
that calls them, and are started again when they have died. Listing (at registry
build) starts each server, lists its tools and stops it again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import json
import logging
import os
import re
import sys
import threading
import tomllib
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from app.engine.models import ErrorClass
from app.tools.registry import Tool, ToolContext, ToolError, ToolRegistry, ToolResult

log = logging.getLogger(__name__)

TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
SEPARATOR = "__"
DEFAULT_TIMEOUT = 60.0
DEFAULT_STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
RESULT_TEXT_LIMIT = 16_000
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
T = TypeVar("T")


# --- configuration --------------------------------------------------------------------


class ToolPolicyConfig(BaseModel):
    """A tool's flags as the deployment sets them; unset fields take the safe default."""

    model_config = ConfigDict(extra="forbid")

    idempotent: bool | None = None
    requires_approval: bool | None = None
    timeout: float | None = Field(None, gt=0, le=3600)


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,40}$")
    command: str | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: Path | None = None
    url: str | None = None
    # Tools to expose (the server's names); None: every tool it lists.
    tools: list[str] | None = None
    policy: dict[str, ToolPolicyConfig] = Field(default_factory=dict)
    timeout: float = Field(DEFAULT_TIMEOUT, gt=0, le=3600)
    startup_timeout: float = Field(DEFAULT_STARTUP_TIMEOUT, gt=0, le=600)
    # A server that cannot be listed at registry build is skipped (logged) instead
    # of failing the build.
    optional: bool = False

    @model_validator(mode="after")
    def _one_transport(self) -> ServerConfig:
        if (self.command is None) == (self.url is None):
            raise ValueError("give either command (stdio) or url (streamable HTTP)")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return self

    @field_validator("env")
    @classmethod
    def _expand(cls, env: dict[str, str]) -> dict[str, str]:
        return {k: ENV_REFERENCE.sub(lambda m: os.environ.get(m[1], ""), v) for k, v in env.items()}

    @property
    def transport(self) -> str:
        return "stdio" if self.command is not None else "streamable HTTP"


class McpConfig(BaseModel):
    servers: list[ServerConfig]


def load_config(path: Path) -> McpConfig:
    """The servers declared in `path` (TOML, or JSON when it ends in .json).

    The file holds `servers` (or `mcpServers`), a table of server name -> settings.
    Raises ValueError naming the file and what is wrong."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read MCP config {str(path)!r}: {exc.strerror}") from None
    try:
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"MCP config {str(path)!r} is not valid: {exc}") from None
    servers = raw.get("servers", raw.get("mcpServers")) if isinstance(raw, dict) else None
    if not isinstance(servers, dict):
        raise ValueError(f"MCP config {str(path)!r} has no [servers] table")
    try:
        config = McpConfig(
            servers=[
                {**(body if isinstance(body, dict) else {}), "name": name}
                for name, body in servers.items()
            ]
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"{_location(err['loc'], servers)}: {err['msg']}" for err in exc.errors()
        )
        raise ValueError(f"MCP config {str(path)!r}: {problems}") from None
    for server in config.servers:
        if server.cwd is not None and not server.cwd.is_absolute():
            server.cwd = (path.parent / server.cwd).resolve()
    return config


def _location(loc: tuple[Any, ...], servers: Mapping[str, Any]) -> str:
    names = list(servers)
    if len(loc) >= 2 and loc[0] == "servers" and isinstance(loc[1], int) and loc[1] < len(names):
        return ".".join(["servers", names[loc[1]], *(str(p) for p in loc[2:])])
    return ".".join(str(p) for p in loc)


# --- the event loop thread --------------------------------------------------------------


class _Loop:
    """An asyncio loop in a daemon thread; `run` calls into it from any thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, name="mcp-client", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """The coroutine's result. Whatever ends the wait early (a timeout here, the
        tool's SIGALRM, KeyboardInterrupt) cancels the coroutine in the loop, so the
        loop stays usable for the next call."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no answer within {timeout:g} s") from None
        except BaseException:
            future.cancel()
            raise


# --- one server ----------------------------------------------------------------------------


class NotSent(Exception):
    """The server could not be started or reached: the request was not sent."""


class Lost(Exception):
    """The request was sent but its outcome is unknown."""


class _Connection:
    """One server's client session, owned by a task of its own in the loop (the SDK's
    task groups must be entered and left by the same task)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.client: Any = None
        self.task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None
        self.stop: asyncio.Event | None = None
        self.starts = 0

    def _target(self) -> Any:
        if self.config.url is not None:
            return self.config.url
        from mcp import StdioServerParameters
        from mcp.client.stdio import stdio_client

        assert self.config.command is not None
        params = StdioServerParameters(
            command=self.config.command,
            args=self.config.args,
            env=self.config.env or None,
            cwd=self.config.cwd,
        )
        # The server's stderr goes to this process's real stderr: a Celery worker
        # replaces sys.stderr with a logging proxy that has no file descriptor.
        return stdio_client(params, errlog=_real_stderr())

    def alive(self) -> bool:
        if self.client is None or self.task is None or self.task.done():
            return False
        dispatcher = getattr(self.client.session, "_dispatcher", None)
        return not getattr(dispatcher, "_closed", False)

    async def _own(self, ready: asyncio.Future[Any], stop: asyncio.Event) -> None:
        from mcp import Client

        try:
            async with Client(self._target()) as client:
                if not ready.done():
                    ready.set_result(client)
                await stop.wait()
        except BaseException as exc:  # kept: it says why the connection ended
            self.error = exc
            if not ready.done():
                ready.set_exception(NotSent(describe(exc)))
            if isinstance(exc, asyncio.CancelledError) and stop.is_set():
                return

    async def ensure(self) -> Any:
        """A live client, starting (or restarting) the server when needed."""
        if self.alive():
            return self.client
        await self.close()
        self.starts += 1
        self.error = None
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[Any] = loop.create_future()
        self.stop = asyncio.Event()
        self.task = loop.create_task(self._own(ready, self.stop))
        try:
            async with asyncio.timeout(self.config.startup_timeout):
                self.client = await asyncio.shield(ready)
        except TimeoutError:
            await self.close()
            raise NotSent(
                f"MCP server {self.config.name!r} did not answer within "
                f"{self.config.startup_timeout:g} s of starting"
            ) from None
        except NotSent as exc:
            await self.close()
            raise NotSent(f"MCP server {self.config.name!r} cannot start: {exc}") from None
        return self.client

    async def close(self) -> None:
        task, self.task, self.client = self.task, None, None
        if task is None:
            return
        if self.stop is not None:
            self.stop.set()
        if not task.done():
            done, _ = await asyncio.wait([task], timeout=STOP_TIMEOUT)
            if not done:
                task.cancel()
                await asyncio.wait([task], timeout=STOP_TIMEOUT)

    async def list_tools(self) -> list[Any]:
        client = await self.ensure()
        tools: list[Any] = []
        cursor: str | None = None
        async with asyncio.timeout(self.config.startup_timeout):
            while True:
                page = await client.list_tools(cursor=cursor)
                tools.extend(page.tools)
                cursor = page.next_cursor
                if not cursor:
                    return tools

    async def call(self, tool: str, args: dict[str, Any], timeout: float) -> Any:
        from mcp import MCPError
        from mcp_types.jsonrpc import CONNECTION_CLOSED

        client = await self.ensure()
        try:
            async with asyncio.timeout(timeout):
                return await client.call_tool(tool, args)
        except TimeoutError:
            raise Lost(f"no answer within {timeout:g} s; the call may still be running") from None
        except MCPError as exc:
            if exc.code != CONNECTION_CLOSED:
                raise
            # The connection ended: let its owner finish, to learn why.
            if self.task is not None:
                await asyncio.wait([self.task], timeout=1.0)
            why = describe(self.error) if self.error is not None else "the connection closed"
            refused = self.error is not None and _refused(self.error)
            await self.close()
            if refused:
                raise NotSent(f"MCP server {self.config.name!r} is not reachable: {why}") from None
            raise Lost(
                f"MCP server {self.config.name!r} went away during the call ({why}); "
                "whether the call took effect is unknown"
            ) from None


def _real_stderr() -> TextIO:
    for stream in (sys.stderr, sys.__stderr__):
        try:
            if stream is not None:
                stream.fileno()
                return stream
        except (AttributeError, OSError, ValueError):
            continue
    return open(os.devnull, "w")  # lives as long as the server


def _leaves(exc: BaseException) -> Iterable[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
        return
    yield exc
    for linked in (exc.__cause__, exc.__context__):
        if linked is not None and linked is not exc:
            yield from _leaves(linked)


def _refused(exc: BaseException) -> bool:
    """Whether the connection failed before anything was sent (connect refused)."""
    return any(
        isinstance(e, ConnectionRefusedError) or type(e).__name__ == "ConnectError"
        for e in _leaves(exc)
    )


def describe(exc: BaseException) -> str:
    """One line for an exception, the innermost real cause of a group."""
    leaves = [e for e in _leaves(exc) if not isinstance(e, asyncio.CancelledError)]
    first = leaves[0] if leaves else exc
    text = str(first).strip().splitlines()
    return f"{type(first).__name__}: {text[0]}" if text else type(first).__name__


# --- the servers of a process ----------------------------------------------------------------


class McpServers:
    """The configured servers of this process. After a fork the child starts afresh
    (a thread does not survive fork; the parent's server processes are its own)."""

    def __init__(self, configs: Iterable[ServerConfig]) -> None:
        self.configs = {c.name: c for c in configs}
        self._lock = threading.Lock()
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._loop: _Loop | None = None
        self._connections: dict[str, _Connection] = {}
        self._pid = os.getpid()

    def _ready(self) -> _Loop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                self._reset()
                self._loop = _Loop()
            return self._loop

    def connection(self, name: str) -> _Connection:
        self._ready()
        if name not in self._connections:
            self._connections[name] = _Connection(self.configs[name])
        return self._connections[name]

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        return self._ready().run(coro, timeout)

    def list_tools(self, name: str) -> list[Any]:
        """The server's tools; the server is stopped again afterwards."""
        conn = self.connection(name)
        config = conn.config

        async def listing() -> list[Any]:
            try:
                return await conn.list_tools()
            finally:
                await conn.close()

        try:
            return self.run(listing(), config.startup_timeout * 2 + STOP_TIMEOUT)
        except NotSent as exc:
            raise ValueError(str(exc)) from None
        except TimeoutError:
            raise ValueError(
                f"MCP server {name!r} did not list its tools within {config.startup_timeout:g} s"
            ) from None
        except Exception as exc:
            raise ValueError(
                f"MCP server {name!r} cannot list its tools: {describe(exc)}"
            ) from None

    def call(self, server: str, tool: str, args: dict[str, Any], timeout: float) -> Any:
        conn = self.connection(server)
        budget = timeout + conn.config.startup_timeout + 2 * STOP_TIMEOUT
        try:
            return self.run(conn.call(tool, args, timeout), budget)
        except TimeoutError as exc:  # the thread-side safety net
            raise Lost(str(exc)) from None

    def close(self) -> None:
        """Stop every server this process started."""
        if self._loop is None or self._pid != os.getpid():
            return
        for conn in list(self._connections.values()):
            with contextlib.suppress(Exception):
                self.run(conn.close(), STOP_TIMEOUT * 2)


# --- tools --------------------------------------------------------------------------------


def tool_name(server: str, tool: str) -> str:
    """The registry name of `tool` of `server` (characters Anthropic refuses become _)."""
    return f"{server}{SEPARATOR}{re.sub(r'[^A-Za-z0-9_-]', '_', tool)}"


def args_model(name: str, schema: Mapping[str, Any]) -> type[BaseModel]:
    """A pydantic model that validates with the tool's JSON Schema (jsonschema) and
    reports it as its own schema, so `ToolRegistry.check_args`, `run_tool` and the
    planner's tool specs work as for any tool. Raises ValueError for a bad schema."""
    from jsonschema import Draft202012Validator, SchemaError
    from jsonschema.validators import validator_for

    shown = dict(copy.deepcopy(schema))
    shown.setdefault("type", "object")
    shown.setdefault("properties", {})
    validator_class = validator_for(shown, default=Draft202012Validator)
    try:
        validator_class.check_schema(shown)
    except SchemaError as exc:
        raise ValueError(f"the input schema of {name} is not valid: {exc.message}") from None
    validator = validator_class(shown)

    class McpArgs(BaseModel):
        model_config = ConfigDict(extra="allow")

        @classmethod
        def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> McpArgs:
            errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
            if errors:
                raise ValidationError.from_exception_data(
                    title=name,
                    line_errors=[
                        InitErrorDetails(
                            type=PydanticCustomError(
                                "json_schema", "{message}", {"message": e.message}
                            ),
                            loc=tuple(e.absolute_path),
                            input=e.instance,
                        )
                        for e in errors
                    ],
                )
            return super().model_validate(obj, *args, **kwargs)

        @classmethod
        def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
            return copy.deepcopy(shown)

    McpArgs.__name__ = McpArgs.__qualname__ = f"{name}_args"
    return McpArgs


@dataclass(frozen=True)
class _Caller:
    servers: McpServers
    server: str
    tool: str
    timeout: float

    def __call__(self, args: BaseModel, ctx: ToolContext) -> ToolResult:
        payload = dict(args.__pydantic_extra__ or {})
        try:
            answer = self.servers.call(self.server, self.tool, payload, self.timeout)
        except NotSent as exc:
            raise ToolError(str(exc), ErrorClass.TRANSIENT, not_applied=True) from None
        except Lost as exc:
            raise ToolError(str(exc), ErrorClass.TRANSIENT) from None
        except Exception as exc:  # a JSON-RPC error: the server refused the request
            raise ToolError(
                f"MCP server {self.server!r} refused {self.tool}: {describe(exc)}",
                ErrorClass.PERMANENT,
            ) from None
        text = _text_of(answer.content)
        if answer.is_error:
            raise ToolError(
                f"{self.server}.{self.tool} failed: {text or 'the tool reported an error'}",
                ErrorClass.PERMANENT,
            )
        result: dict[str, Any] = {"content": text}
        if answer.structured_content is not None:
            result["structured"] = answer.structured_content
        first = text.strip().splitlines()[0] if text.strip() else "done"
        return ToolResult(result=result, summary=f"{self.server}.{self.tool}: {first[:200]}")


def _text_of(blocks: Iterable[Any]) -> str:
    parts: list[str] = []
    for block in blocks:
        kind = getattr(block, "type", "")
        if kind == "text":
            parts.append(str(block.text))
        else:
            mime = getattr(block, "mime_type", None) or getattr(block, "uri", None) or ""
            parts.append(f"[{kind} {mime}]".replace(" ]", "]"))
    text = "\n".join(parts)
    return text if len(text) <= RESULT_TEXT_LIMIT else text[:RESULT_TEXT_LIMIT] + "\n[truncated]"


def policy_for(config: ServerConfig, listed: Any) -> tuple[bool, bool, float]:
    """(requires_approval, idempotent, timeout): the deployment's word first, then the
    safe side — approval unless the server says the tool only reads, never idempotent."""
    chosen = config.policy.get(listed.name, ToolPolicyConfig())
    hints = listed.annotations
    read_only = bool(hints is not None and hints.read_only_hint is True)
    approval = chosen.requires_approval
    if approval is None:
        approval = not read_only
    idempotent = bool(chosen.idempotent)
    return approval, idempotent, chosen.timeout or config.timeout


def build_tools(servers: McpServers, *, skip_unavailable: bool = True) -> list[Tool]:
    """The tools of every configured server, listed now. Raises ValueError naming the
    server when one cannot be listed (unless it is optional) or a configured tool is
    missing."""
    tools: list[Tool] = []
    for name, config in servers.configs.items():
        try:
            listed = servers.list_tools(name)
        except ValueError as exc:
            if config.optional and skip_unavailable:
                log.error("%s; its tools are not registered", exc)
                continue
            raise
        offered = {t.name: t for t in listed}
        wanted = config.tools if config.tools is not None else list(offered)
        missing = [t for t in wanted if t not in offered]
        if missing:
            raise ValueError(
                f"MCP server {name!r} does not offer {', '.join(missing)} "
                f"(it offers {', '.join(sorted(offered)) or 'no tools'})"
            )
        unknown_policy = [t for t in config.policy if t not in offered]
        if unknown_policy:
            raise ValueError(
                f"MCP server {name!r}: policy for tools it does not offer: "
                f"{', '.join(unknown_policy)}"
            )
        for tool_id in wanted:
            listed_tool = offered[tool_id]
            full = tool_name(name, tool_id)
            if not TOOL_NAME.match(full):
                message = f"MCP tool name {full!r} is longer than 64 characters"
                if config.tools is not None:
                    raise ValueError(message)
                log.warning("%s; skipped", message)
                continue
            approval, idempotent, timeout = policy_for(config, listed_tool)
            description = (listed_tool.description or listed_tool.title or tool_id).strip()
            tools.append(
                Tool(
                    name=full,
                    description=f"[MCP server {name}] {description}"[:2000],
                    args_model=args_model(full, listed_tool.input_schema or {}),
                    fn=_Caller(servers, name, tool_id, timeout),
                    requires_approval=approval,
                    idempotent=idempotent,
                    timeout=timeout,
                )
            )
    return tools


def register_mcp_tools(registry: ToolRegistry, config_path: Path) -> McpServers:
    """Register the tools of the servers declared in `config_path` into `registry`.

    Raises ValueError (one line, naming the file or the server) when the config is
    wrong or a server that is not optional cannot be listed."""
    servers = McpServers(load_config(config_path).servers)
    for item in build_tools(servers):
        registry.register(item, source=f"mcp server {item.name.split(SEPARATOR)[0]}")
    return servers
