"""A local fake of the Anthropic Messages API, scripted per test.

The real `anthropic` SDK talks to it over real HTTP (base_url / ANTHROPIC_BASE_URL),
so the SDK's own request building, response parsing and error mapping run.
Each POST /v1/messages takes the next entry of a script and answers with it;
every request is recorded (parsed JSON body, raw bytes, headers).

Script entries (plain JSON, so a script can also live in a file):

    {"tool_use": {"name": "submit_plan", "input": {...}}}   a tool call (stop_reason tool_use)
    {"text": "..."}                                          a text-only answer (end_turn)
    {"content": [blocks], "stop_reason": "max_tokens"}       blocks verbatim (ids filled in)
    {"status": 429, "error": {"type": "rate_limit_error", "message": "..."},
     "headers": {"retry-after": "7"}}                        an API error
    {"status": 200, "raw": "not json"}                       a raw body (str or bytes)
    {"status": 200, "body": <any JSON>}                      that JSON, verbatim

A raw str is encoded as UTF-8 with lone surrogates passed through, so a test can
serve invalid UTF-8 as well as any text (e.g. JSON nested 10,000 levels deep).
Every entry may also carry "delay" (seconds before answering, for timeouts),
"usage" (overrides the computed token counts), "headers" (a content-type given
here replaces the default application/json), "patch" (fields set on the built
message, null included), "omit" (fields removed from it) and, with tool_use,
"text" (a text block before the call). When the script runs out the server
answers 500 saying so. Like the real API at anthropic-version 2026-10-21 it
rejects temperature/top_p/top_k with a 400, and it answers 401 without a key.
It also answers 400 to conversations the API refuses (see conversation_problem):
a tool_use whose input is not an object, empty or blank text blocks, a turn with
no content, a tool_result with no tool_use before it, duplicate tool_use ids,
max_tokens below 1, lone surrogates; and, stricter than the API (which merges
them silently), two turns of one role in a row.

Token counts are estimated at 4 bytes a token. Prompt caching is emulated:
the first request with a given cached prefix (tools + system, when they carry
cache_control) reports cache_creation_input_tokens, later ones cache_read.

In tests use the `fake_anthropic` fixture (the lead imports it into
tests/conftest.py). Standalone, for a worker in another process:

    python -m tests.fake_anthropic --port 0 --script script.json [--record requests.jsonl]

prints "fake anthropic listening on http://127.0.0.1:PORT" and serves until
SIGTERM/SIGINT. --record appends one JSON line per request:
{"index", "path", "bytes", "received_at", "body"}. GET /_fake/requests returns the same list,
and POST /_fake/script (a JSON list) appends entries to the running script.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

Entry = dict[str, Any]
API_VERSION_WITHOUT_SAMPLING = "2026-10-21"
SAMPLING_PARAMS = ("temperature", "top_p", "top_k")
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


# --- script helpers -------------------------------------------------------------------


def tool_reply(name: str, tool_input: Any, **extra: Any) -> Entry:
    return {"tool_use": {"name": name, "input": tool_input}, **extra}


def plan_reply(steps: list[dict[str, Any]], reasoning: str = "because", **extra: Any) -> Entry:
    return tool_reply("submit_plan", {"reasoning": reasoning, "steps": steps}, **extra)


def finish_reply(report: str, **extra: Any) -> Entry:
    return tool_reply("finish", {"done": True, "report": report}, **extra)


def more_steps_reply(steps: list[dict[str, Any]], reasoning: str = "not done yet") -> Entry:
    return tool_reply("finish", {"done": False, "steps": steps, "reasoning": reasoning})


def text_reply(text: str, **extra: Any) -> Entry:
    return {"text": text, **extra}


def error_reply(
    status: int,
    message: str = "",
    *,
    error_type: str | None = None,
    retry_after: float | None = None,
    headers: dict[str, str] | None = None,
) -> Entry:
    kind = error_type or ERROR_TYPES.get(status, "api_error")
    all_headers = dict(headers or {})
    if retry_after is not None:
        all_headers["retry-after"] = f"{retry_after:g}"
    return {
        "status": status,
        "error": {"type": kind, "message": message or kind.replace("_", " ")},
        "headers": all_headers,
    }


def slow(entry: Entry, seconds: float) -> Entry:
    return {**entry, "delay": seconds}


# --- recording ------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    index: int
    path: str
    headers: dict[str, str]
    raw: bytes
    body: Any  # the parsed JSON, or None when it was not JSON
    received_at: float = 0.0  # time.time() when the request arrived (before any delay)

    @property
    def size(self) -> int:
        return len(self.raw)

    def text(self) -> str:
        return self.raw.decode("utf-8", errors="replace")

    def summary(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "path": self.path,
            "bytes": self.size,
            "received_at": self.received_at,
            "body": self.body,
        }


@dataclass
class _State:
    script: list[Entry] = field(default_factory=list)
    requests: list[RecordedRequest] = field(default_factory=list)
    cached_prefixes: set[str] = field(default_factory=set)
    record_to: Path | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)
    counter: int = 0

    def next_id(self) -> int:
        with self.lock:
            self.counter += 1
            return self.counter


# --- the server -----------------------------------------------------------------------


class FakeAnthropic:
    """The server; use as a context manager, or start() / stop()."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, record_to: Path | None = None):
        self.state = _State(record_to=record_to)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self._server = _Server((host, port), handler)
        # A short poll interval: shutdown() waits for it, once per test.
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="fake-anthropic",
            daemon=True,
        )

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeAnthropic:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.state.stopping.set()  # wakes delayed answers at once
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeAnthropic:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def script(self, *entries: Entry) -> FakeAnthropic:
        """Append answers, in the order requests will receive them."""
        with self.state.lock:
            self.state.script.extend(entries)
        return self

    def reset(self) -> FakeAnthropic:
        """Forget the script and the recorded requests (one server, many examples)."""
        with self.state.lock:
            self.state.script.clear()
            self.state.requests.clear()
        return self

    @property
    def requests(self) -> list[RecordedRequest]:
        with self.state.lock:
            return list(self.state.requests)

    @property
    def remaining(self) -> int:
        with self.state.lock:
            return len(self.state.script)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's listen backlog is 5: fifty planner threads connecting at once
    # overflowed it, and a connection whose SYN was dropped waits seconds to retry.
    # A real API front end takes a burst like that.
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up is part of the tests, not an error.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    state: _State
    server_version = "fake-anthropic/1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/_fake/requests":
            with self.state.lock:
                listed = [r.summary() for r in self.state.requests]
            self._send(200, listed)
            return
        self._send_error(404, "not_found_error", f"no route GET {self.path}")

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path.rstrip("/") == "/_fake/script":
            with self.state.lock:
                self.state.script.extend(json.loads(raw))
            self._send(200, {"ok": True})
            return
        body = _parse(raw)
        self._record(raw, body)
        if self.path.split("?")[0].rstrip("/") != "/v1/messages":
            self._send_error(404, "not_found_error", f"no route POST {self.path}")
            return
        problem = self._invalid(body)
        if problem is not None:
            self._send_error(*problem)
            return
        self._answer(self._next_entry(), body, len(raw))

    # --- checks the real API makes ----------------------------------------------------

    def _invalid(self, body: Any) -> tuple[int, str, str] | None:
        if not (self.headers.get("x-api-key") or self.headers.get("authorization")):
            return 401, "authentication_error", "x-api-key header is required"
        if not isinstance(body, dict):
            return 400, "invalid_request_error", "the request body is not valid JSON"
        for name in ("model", "max_tokens", "messages"):
            if name not in body:
                return 400, "invalid_request_error", f"{name}: Field required"
        version = self.headers.get("anthropic-version", "")
        used = [name for name in SAMPLING_PARAMS if name in body]
        if used and version >= API_VERSION_WITHOUT_SAMPLING:
            return 400, "invalid_request_error", f"{used[0]}: Extra inputs are not permitted"
        problem = conversation_problem(body)
        if problem is not None:
            return 400, "invalid_request_error", problem
        return None

    def _next_entry(self) -> Entry:
        with self.state.lock:
            if self.state.script:
                return self.state.script.pop(0)
        return error_reply(500, "fake anthropic: the script ran out of responses")

    # --- answering --------------------------------------------------------------------

    def _answer(self, entry: Entry, body: dict[str, Any], size: int) -> None:
        delay = float(entry.get("delay", 0))
        if delay and self.state.stopping.wait(delay):
            return
        headers = dict(entry.get("headers") or {})
        if "error" in entry:
            error = entry["error"]
            status = int(entry.get("status", 500))
            self._send_error(status, error["type"], error["message"], headers)
            return
        status = int(entry.get("status", 200))
        if "raw" in entry:
            raw = entry["raw"]
            if not isinstance(raw, bytes):
                raw = str(raw).encode("utf-8", errors="surrogatepass")
            self._send_raw(status, raw, headers)
            return
        if "body" in entry:
            self._send(status, entry["body"], headers)
            return
        message = self._message(entry, body, size)
        message.update(entry.get("patch") or {})
        for name in entry.get("omit") or ():
            message.pop(name, None)
        self._send(status, message, headers)

    def _message(self, entry: Entry, body: dict[str, Any], size: int) -> dict[str, Any]:
        content, stop_reason = self._content(entry)
        number = self.state.next_id()
        return {
            "id": f"msg_fake_{number:04d}",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": content,
            "stop_reason": entry.get("stop_reason", stop_reason),
            "stop_sequence": None,
            "usage": entry.get("usage") or self._usage(body, size, content),
        }

    def _content(self, entry: Entry) -> tuple[list[dict[str, Any]], str]:
        if "content" in entry:
            blocks = [dict(b) if isinstance(b, dict) else b for b in entry["content"]]
            for block in blocks:
                if isinstance(block, dict) and block.get("type") == "tool_use":
                    block.setdefault("id", f"toolu_fake_{self.state.next_id():04d}")
            return blocks, "end_turn"
        blocks = [{"type": "text", "text": entry["text"]}] if "text" in entry else []
        if "tool_use" in entry:
            call = entry["tool_use"]
            blocks.append(
                {
                    "type": "tool_use",
                    "id": f"toolu_fake_{self.state.next_id():04d}",
                    "name": call["name"],
                    "input": call["input"],
                }
            )
            return blocks, "tool_use"
        return blocks, "end_turn"

    def _usage(
        self, body: dict[str, Any], size: int, content: list[dict[str, Any]]
    ) -> dict[str, int]:
        prefix = _cached_prefix(body)
        cached = len(prefix) // 4
        key = hashlib.sha256(prefix.encode()).hexdigest()
        with self.state.lock:
            seen = key in self.state.cached_prefixes
            self.state.cached_prefixes.add(key)
        return {
            "input_tokens": max(1, (size - len(prefix)) // 4),
            "output_tokens": max(1, len(json.dumps(content)) // 4),
            "cache_creation_input_tokens": 0 if seen or not prefix else cached,
            "cache_read_input_tokens": cached if seen and prefix else 0,
        }

    # --- writing ----------------------------------------------------------------------

    def _record(self, raw: bytes, body: Any) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        with self.state.lock:
            recorded = RecordedRequest(
                len(self.state.requests), self.path, headers, raw, body, time.time()
            )
            self.state.requests.append(recorded)
            if self.state.record_to is not None:
                with self.state.record_to.open("a") as out:
                    out.write(json.dumps(recorded.summary()) + "\n")

    def _send_error(
        self, status: int, kind: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        body = {
            "type": "error",
            "error": {"type": kind, "message": message},
            "request_id": f"req_fake_{self.state.next_id():04d}",
        }
        self._send(status, body, headers)

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self._send_raw(status, json.dumps(body).encode(), headers)

    def _send_raw(self, status: int, raw: bytes, headers: dict[str, str] | None) -> None:
        try:
            self.send_response(status, _reason(status))
            extra = dict(headers or {})
            if not any(name.lower() == "content-type" for name in extra):
                self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(raw)))
            self.send_header("request-id", f"req_fake_{self.state.next_id():04d}")
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(raw)
        except ConnectionError:
            pass  # the client gave up (a timeout test): nothing to answer


def conversation_problem(body: dict[str, Any]) -> str | None:
    """What the Messages API would refuse in this request body, or None."""
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return f"max_tokens: must be an integer of at least 1, got {max_tokens!r}"
    if _has_lone_surrogate(body):
        return "the request contains a lone surrogate (invalid Unicode)"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    seen_ids: set[str] = set()
    pending: set[str] = set()  # tool_use ids of the previous assistant turn
    previous_role = None
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            return f"{where}: role must be user or assistant"
        role = message["role"]
        if role == previous_role:
            return f"{where}: two {role} turns in a row"
        if i == 0 and role != "user":
            return f"{where}: the first message must use the user role"
        previous_role = role
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list) or not content:
            return f"{where}: all messages must have non-empty content"
        answered: set[str] = set()
        for j, block in enumerate(content):
            at = f"{where}.content.{j}"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                if not isinstance(block.get("text"), str) or not block["text"].strip():
                    return f"{at}: text content blocks must contain non-whitespace text"
            elif kind == "tool_use":
                if role != "assistant":
                    return f"{at}: tool_use blocks are only allowed in assistant turns"
                ident = block.get("id")
                if not isinstance(ident, str) or not TOOL_USE_ID.fullmatch(ident):
                    return f"{at}.id: String should match pattern '{TOOL_USE_ID.pattern}'"
                if ident in seen_ids:
                    return f"{at}: tool_use ids must be unique, {ident!r} is repeated"
                seen_ids.add(ident)
                if not isinstance(block.get("name"), str) or not block["name"]:
                    return f"{at}.name: Field required"
                if not isinstance(block.get("input"), dict):
                    return f"{at}.input: Input should be a valid dictionary"
            elif kind == "tool_result":
                if role != "user" or block.get("tool_use_id") not in pending:
                    return (
                        f"{at}: unexpected tool_use_id found in tool_result blocks: "
                        f"{block.get('tool_use_id')!r}. Each tool_result block must have a "
                        "corresponding tool_use block in the previous message."
                    )
                answered.add(block["tool_use_id"])
            elif kind in ("thinking", "redacted_thinking"):
                if role != "assistant":
                    return f"{at}: {kind} blocks are only allowed in assistant turns"
            else:
                return f"{at}.type: Input tag {kind!r} found using 'type' does not match"
        if role == "user" and pending - answered:
            return (
                f"{where}: tool_use ids were found without tool_result blocks immediately "
                f"after: {', '.join(sorted(pending - answered))}"
            )
        pending = (
            {b["id"] for b in content if isinstance(b, dict) and b.get("type") == "tool_use"}
            if role == "assistant"
            else set()
        )
    return None


TOOL_USE_ID = re.compile(r"[a-zA-Z0-9_-]+")


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if any("\ud800" <= ch <= "\udfff" for ch in item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _parse(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Overloaded" if status == 529 else "Error"


def _cached_prefix(body: dict[str, Any]) -> str:
    """Tools then system, up to the last cache_control breakpoint; "" when there is none."""
    parts: list[Any] = [*body.get("tools", [])]
    system = body.get("system", [])
    parts += system if isinstance(system, list) else [{"type": "text", "text": system}]
    marked = [
        i for i, part in enumerate(parts) if isinstance(part, dict) and "cache_control" in part
    ]
    if not marked:
        return ""
    return json.dumps(parts[: marked[-1] + 1], separators=(",", ":"))


# --- pytest -------------------------------------------------------------------------


@pytest.fixture
def fake_anthropic() -> Iterator[FakeAnthropic]:
    """A running fake on a free loopback port; script it with .script(...)."""
    with FakeAnthropic() as server:
        yield server


# --- standalone -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--script", type=Path, help="a JSON list of script entries")
    parser.add_argument("--record", type=Path, help="append each request as a JSON line")
    args = parser.parse_args(argv)
    entries = json.loads(args.script.read_text()) if args.script else []
    if not isinstance(entries, list):
        parser.error("the script must be a JSON list of entries")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with FakeAnthropic(host=args.host, port=args.port, record_to=args.record) as server:
        server.script(*entries)
        print(f"fake anthropic listening on {server.base_url}", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
