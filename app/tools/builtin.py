"""Built-in tools: run a command, make an HTTP request, set an env var for later steps.

The helpers `run_process`, `safe_env`, `resolve_inside`, `raise_for_exit` and
`send_request` are public: the demo tools run their subprocesses and HTTP
calls through them, so every tool bounds output and classifies errors the
same way.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import IO, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.engine.models import ErrorClass
from app.engine.redact import MASK, is_secret_name
from app.tools.registry import Tool, ToolContext, ToolError, ToolResult, tool

OUTPUT_LIMIT = 16 * 1024  # bytes of command output / response body kept in a result
ERROR_TAIL_CHARS = 2_000  # output tail quoted in an error message
EX_TEMPFAIL = 75  # sysexits.h: "temporary failure, try again"
SHELL_TOOL_TIMEOUT = 300.0
HTTP_TOOL_TIMEOUT = 60.0
# The command's own timeout fires this much before the registry's alarm, so the
# process group is killed and reported here rather than interrupted from outside.
TIMEOUT_MARGIN = 5.0
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL
SAFE_ENV_NAMES = ("PATH", "HOME", "LANG")
URL_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@/\s]+@")
KEPT_RESPONSE_HEADERS = (
    "content-type",
    "content-length",
    "location",
    "retry-after",
    "etag",
    "last-modified",
    "date",
)


# --- subprocesses ---------------------------------------------------------------


@dataclass(frozen=True)
class ProcessOutput:
    """A finished process: its exit code and its combined stdout+stderr, bounded.

    `output` is at most OUTPUT_LIMIT bytes of the real output (head and tail)
    plus a one-line truncation note; `bytes` is the full size.
    """

    exit_code: int
    output: str
    truncated: bool
    bytes: int

    def tail(self, chars: int = ERROR_TAIL_CHARS) -> str:
        return self.output[-chars:]


def safe_env(extra: Mapping[str, str]) -> dict[str, str]:
    """A minimal environment: PATH, HOME and LANG from ours, then `extra` (the run's env).

    The worker's own environment (API keys, database URLs) never leaks into a command.
    """
    base = {name: os.environ[name] for name in SAFE_ENV_NAMES if name in os.environ}
    return {**base, **extra}


def resolve_inside(root: Path, relative: str) -> Path:
    """`relative` resolved under `root`; raises ToolError PERMANENT if it escapes `root`."""
    base = root.resolve()
    target = (base / relative).resolve()
    if not target.is_relative_to(base):
        raise ToolError(f"path {relative!r} is outside the workspace", ErrorClass.PERMANENT)
    return target


def run_process(
    argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], timeout: float
) -> ProcessOutput:
    """Run argv (no shell) in its own process group; output goes to a temporary file.

    Whatever the command prints, memory use stays bounded: the output is
    spooled to disk and only its head and tail are read back. Raises ToolError
    TRANSIENT on timeout (the whole process group is killed first) and
    PERMANENT when the command cannot be started. A non-zero exit is returned,
    not raised: see raise_for_exit.
    """
    with tempfile.TemporaryFile() as spool:
        proc = _start(argv, cwd=cwd, env=env, spool=spool)
        try:
            exit_code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ToolError(
                f"`{_show(argv)}` timed out after {timeout:g} s; its process group was killed",
                ErrorClass.TRANSIENT,
            ) from None
        finally:
            # Also reached when the registry's alarm interrupts wait(): never leave
            # a command running after its step has ended.
            if proc.poll() is None:
                _kill_group(proc)
        output, truncated, size = _read_bounded(spool, OUTPUT_LIMIT)
    return ProcessOutput(exit_code=exit_code, output=output, truncated=truncated, bytes=size)


def raise_for_exit(result: ProcessOutput, what: str) -> None:
    """Raise ToolError for a failed command: exit 75 TRANSIENT, other non-zero PERMANENT."""
    if result.exit_code == 0:
        return
    transient = result.exit_code == EX_TEMPFAIL
    kind = "temporary failure (EX_TEMPFAIL), retry" if transient else "failed"
    raise ToolError(
        f"{what} exited {result.exit_code}: {kind}; output tail:\n{result.tail()}",
        ErrorClass.TRANSIENT if transient else ErrorClass.PERMANENT,
        # EX_TEMPFAIL is the command's own word that trying again is safe.
        not_applied=transient,
    )


def _start(
    argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], spool: IO[bytes]
) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=spool,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so a timeout kills children too
        )
    except FileNotFoundError:
        raise ToolError(f"command not found: {argv[0]!r}", ErrorClass.PERMANENT) from None
    except (PermissionError, NotADirectoryError, ValueError) as exc:
        raise ToolError(f"cannot run `{_show(argv)}`: {exc}", ErrorClass.PERMANENT) from None


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, then SIGKILL what is left of it, and reap the leader."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=KILL_GRACE)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    # Children can outlive the leader or ignore SIGTERM; none may keep running.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _read_bounded(spool: IO[bytes], limit: int) -> tuple[str, bool, int]:
    """(text, truncated, total bytes): all of it, or its first and last limit/2 bytes."""
    size = spool.seek(0, os.SEEK_END)
    spool.seek(0)
    if size <= limit:
        return spool.read().decode(errors="replace"), False, size
    head = spool.read(limit // 2)
    spool.seek(size - limit // 2)
    tail = spool.read()
    note = (
        f"\n[output truncated: {size} bytes total, showing first {len(head)} "
        f"and last {len(tail)} bytes]\n"
    )
    return head.decode(errors="replace") + note + tail.decode(errors="replace"), True, size


def _show(argv: Sequence[str], limit: int = 200) -> str:
    shown = shlex.join(argv)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


# --- shell ------------------------------------------------------------------------


class ShellArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    argv: list[str] = Field(
        min_length=1,
        description='Program and arguments, e.g. ["pytest", "-q"]. No shell: no pipes, '
        'globs or $VARS; use ["sh", "-c", "..."] if you need them.',
    )
    cwd: str = Field(".", description="Working directory, relative to the run's workspace.")
    timeout: float | None = Field(
        None,
        gt=0,
        le=SHELL_TOOL_TIMEOUT - TIMEOUT_MARGIN,
        description=f"Seconds before the command is killed; default "
        f"{SHELL_TOOL_TIMEOUT - TIMEOUT_MARGIN:g}.",
    )

    @field_validator("argv")
    @classmethod
    def _program_named(cls, argv: list[str]) -> list[str]:
        if not argv[0]:
            raise ValueError("argv[0] (the program) must not be empty")
        return argv


@tool(
    name="shell",
    description=(
        "Run one command (argv list, no shell) in the run's workspace and return "
        '{"exit_code", "output", "truncated", "bytes"}. stdout and stderr are combined; '
        f"only the first and last {OUTPUT_LIMIT // 2048} KB of output are kept. The command "
        "sees only PATH, HOME, LANG and the env vars set earlier in this run (set_env). "
        "Exit 0 succeeds; exit 75 (EX_TEMPFAIL) is a transient failure and is retried; any "
        "other exit code is a permanent failure whose message ends with the output tail. "
        "A command past its timeout is killed with its children, and as it may have done "
        "part of its work the run pauses for a person. cwd must stay inside the workspace. "
        "Not idempotent."
    ),
    args=ShellArgs,
    idempotent=False,
    # Any command can do anything the worker's account can: a person approves each,
    # except the commands a deployment lists in AGENTLOOP_SAFE_COMMANDS.
    requires_approval=True,
    timeout=SHELL_TOOL_TIMEOUT,
)
def shell(args: ShellArgs, ctx: ToolContext) -> ToolResult:
    cwd = resolve_inside(ctx.workspace, args.cwd)
    if not cwd.is_dir():
        raise ToolError(f"cwd {args.cwd!r} is not a directory in the workspace")
    timeout = args.timeout or SHELL_TOOL_TIMEOUT - TIMEOUT_MARGIN
    result = run_process(args.argv, cwd=cwd, env=safe_env(ctx.env), timeout=timeout)
    raise_for_exit(result, f"`{_show(args.argv)}`")
    note = ", truncated" if result.truncated else ""
    return ToolResult(
        result={
            "exit_code": result.exit_code,
            "output": result.output,
            "truncated": result.truncated,
            "bytes": result.bytes,
        },
        summary=f"`{_show(args.argv, 80)}` exited 0 ({result.bytes} bytes of output{note})",
    )


# --- http_request -----------------------------------------------------------------


class HttpArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    method: Literal["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"] = "GET"
    url: str = Field(description="An absolute http:// or https:// URL.")
    headers: dict[str, str] = Field(default_factory=dict)
    body: str | None = Field(None, description="A raw request body (UTF-8).")
    # "json" would shadow a BaseModel method, hence the alias.
    json_body: Any = Field(
        None, alias="json", description="A JSON request body; sets Content-Type."
    )
    timeout: float = Field(30.0, gt=0, le=HTTP_TOOL_TIMEOUT - TIMEOUT_MARGIN)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http:// or https:// URL")
        return url

    @model_validator(mode="after")
    def _one_body(self) -> HttpArgs:
        if self.body is not None and self.json_body is not None:
            raise ValueError("give either body or json, not both")
        return self


class _Readable(Protocol):
    def read(self, amt: int, /) -> bytes: ...


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: str
    truncated: bool


def send_request(request: urllib.request.Request, *, timeout: float) -> HttpResponse:
    """Send `request`; 2xx and 3xx are returned, everything else raised as ToolError.

    Redirects are followed. 429, 5xx, connection errors and timeouts are
    TRANSIENT; other 4xx and malformed requests are PERMANENT. The body read
    is capped at OUTPUT_LIMIT bytes, so a huge response costs no memory.
    """
    target = f"{request.get_method()} {_redact_url(request.full_url)}"
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return _read_response(response.status, response.headers, response)
    except urllib.error.HTTPError as exc:
        with exc:
            if 300 <= exc.code < 400:  # a redirect urllib would not follow (e.g. 307 on POST)
                return _read_response(exc.code, exc.headers, exc)
            raise _status_error(target, exc) from None
    except urllib.error.URLError as exc:
        raise ToolError(
            f"{target}: cannot connect: {exc.reason}",
            ErrorClass.TRANSIENT,
            not_applied=_never_sent(exc.reason),
        ) from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        raise ToolError(
            f"{target}: {type(exc).__name__}: {exc or 'timed out'}", ErrorClass.TRANSIENT
        ) from None
    except ValueError as exc:  # e.g. a header value with a newline in it
        raise ToolError(f"{target}: invalid request: {exc}", ErrorClass.PERMANENT) from None


def _read_response(status: int, headers: Message, stream: _Readable) -> HttpResponse:
    data = stream.read(OUTPUT_LIMIT + 1)
    kept = {k.lower(): v for k, v in headers.items() if k.lower() in KEPT_RESPONSE_HEADERS}
    body = data[:OUTPUT_LIMIT].decode(errors="replace")
    truncated = len(data) > OUTPUT_LIMIT
    if truncated:
        body += f"\n[body truncated: showing the first {OUTPUT_LIMIT} bytes]"
    return HttpResponse(status=status, headers=kept, body=body, truncated=truncated)


def _status_error(target: str, exc: urllib.error.HTTPError) -> ToolError:
    excerpt = exc.read(500).decode(errors="replace").strip()
    transient = exc.code == 429 or exc.code >= 500
    return ToolError(
        f"{target} answered {exc.code} {exc.reason}" + (f": {excerpt}" if excerpt else ""),
        ErrorClass.TRANSIENT if transient else ErrorClass.PERMANENT,
        # 429: the server refused to take the request on. A 5xx may come after the
        # effect (a proxy timing out on a server that went on), so it is not.
        not_applied=exc.code == 429,
    )


def _never_sent(reason: object) -> bool:
    """Whether a connection error happened before any byte of the request left:
    the name did not resolve, or the connection was refused."""
    return isinstance(reason, ConnectionRefusedError | socket.gaierror)


def _build_request(args: HttpArgs) -> urllib.request.Request:
    headers = dict(args.headers)
    data: bytes | None = None
    if args.json_body is not None:
        data = json.dumps(args.json_body).encode()
        if not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "application/json"
    elif args.body is not None:
        data = args.body.encode()
    return urllib.request.Request(args.url, data=data, headers=headers, method=args.method)


def _redact_url(url: str) -> str:
    return URL_PASSWORD.sub(r"\1***@", url)


@tool(
    name="http_request",
    description=(
        'Make one HTTP(S) request and return {"status", "headers", "body"}. Redirects '
        f"are followed; the body is cut at {OUTPUT_LIMIT // 1024} KB (with a note) and only "
        "content-type, content-length, location, retry-after, etag, last-modified and date "
        "headers are returned. Give either `body` (raw text) or `json` (sets Content-Type: "
        "application/json). 2xx/3xx succeed; other 4xx are permanent failures. A refused "
        "connection, an unknown host and 429 are retried with backoff; a timeout, a dropped "
        "connection or a 5xx may have taken effect, so the run pauses for a person. "
        "Not idempotent: it is never sent twice behind anyone's back."
    ),
    args=HttpArgs,
    idempotent=False,
    # A request can send anything anywhere; reading (GET, HEAD) needs no approval.
    requires_approval=True,
    safe_calls=(("method", None), ("method", "GET"), ("method", "HEAD")),
    timeout=HTTP_TOOL_TIMEOUT,
)
def http_request(args: HttpArgs, ctx: ToolContext) -> ToolResult:
    response = send_request(_build_request(args), timeout=args.timeout)
    note = ", body truncated" if response.truncated else ""
    return ToolResult(
        result={"status": response.status, "headers": response.headers, "body": response.body},
        summary=f"{args.method} {_redact_url(args.url)} → {response.status}{note}",
    )


# --- set_env ----------------------------------------------------------------------


def shown_value(name: str, value: str) -> str:
    """`value` fit for a summary: *** for a secret-looking name, URL passwords masked."""
    return MASK if is_secret_name(name) else _redact_url(value)


class SetEnvArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Z_][A-Z0-9_]*$", max_length=100)
    value: str = Field(max_length=4096)


@tool(
    name="set_env",
    description=(
        "Set an environment variable for the rest of this run: every later shell command "
        "and tool sees it (e.g. a missing STAGING_DATABASE_URL a deploy asked for). Names "
        "are UPPER_SNAKE_CASE; values up to 4 KB. Values of names containing KEY, TOKEN, "
        "SECRET, PASS(WORD) or CREDENTIAL are never shown. Idempotent."
    ),
    args=SetEnvArgs,
    idempotent=True,
)
def set_env(args: SetEnvArgs, ctx: ToolContext) -> ToolResult:
    shown = shown_value(args.name, args.value)
    return ToolResult(
        result={"name": args.name, "value": shown},
        summary=f"set {args.name}={shown}",
        context_updates={args.name: args.value},
    )


TOOLS: list[Tool] = [shell, http_request, set_env]
