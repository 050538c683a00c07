"""Structured logs: one JSON line per event worth logging, from the web app, the
worker and beat, each carrying the run id, iteration, step and tool of the
iteration in progress (set in contextvars by `in_iteration` and `bind_action`, so
every log call made during an iteration gets them without passing anything).

    {"ts": "2026-11-30T12:00:00.123Z", "level": "INFO", "logger": "app.service.iteration",
     "message": "iteration 3 of run … executed step 2 (build)", "run_id": "…",
     "iteration": 3, "step": 2, "tool": "build", "process": "ForkPoolWorker-1"}

The format is JSON unless stderr is a terminal (then one human-readable line);
AGENTLOOP_LOG_FORMAT=human|json overrides. The level is the worker's --loglevel,
else AGENTLOOP_LOG_LEVEL (default INFO).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from flask import Flask

FORMAT_VARIABLE = "AGENTLOOP_LOG_FORMAT"
LEVEL_VARIABLE = "AGENTLOOP_LOG_LEVEL"
CONTEXT_FIELDS = ("run_id", "iteration", "step", "tool")

_run_id: ContextVar[str | None] = ContextVar("agentloop_run_id", default=None)
_iteration: ContextVar[int | None] = ContextVar("agentloop_iteration", default=None)
_step: ContextVar[int | None] = ContextVar("agentloop_step", default=None)
_tool: ContextVar[str | None] = ContextVar("agentloop_tool", default=None)
_action: ContextVar[str | None] = ContextVar("agentloop_action", default=None)
_VARS: dict[str, ContextVar[Any]] = {
    "run_id": _run_id,
    "iteration": _iteration,
    "step": _step,
    "tool": _tool,
    "action": _action,
}

log = logging.getLogger("app.service.iteration")
F = TypeVar("F", bound=Callable[..., Any])

# Attributes every LogRecord has: anything else passed with `extra=` is a field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    *CONTEXT_FIELDS,
}


# --- context ---------------------------------------------------------------------------


def current() -> dict[str, Any]:
    """The run, iteration, step and tool of the iteration in progress (None if none)."""
    return {name: _VARS[name].get() for name in CONTEXT_FIELDS}


def bind(**fields: Any) -> None:
    """Set context fields for the rest of the current context (an iteration, a request)."""
    for name, value in fields.items():
        _VARS[name].set(value)


@contextmanager
def context(**fields: Any) -> Iterator[None]:
    """Context fields for the duration of a block; what was there before comes back."""
    tokens = [(_VARS[name], _VARS[name].set(value)) for name, value in fields.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def in_iteration(advance: F) -> F:
    """Decorate `advance(self, run_id, tick)`: the run id (and what the iteration binds
    later) is on every log line made during it, and one line says what it did."""

    @functools.wraps(advance)
    def wrapper(self: Any, run_id: str, tick: int, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        with context(run_id=run_id, iteration=None, step=None, tool=None, action=None):
            try:
                return advance(self, run_id, tick, *args, **kwargs)
            finally:
                _log_iteration(run_id, tick, time.perf_counter() - started)

    return wrapper  # type: ignore[return-value]


def _log_iteration(run_id: str, tick: int, seconds: float) -> None:
    action = _action.get()
    extra: dict[str, Any] = {"tick": tick, "duration_ms": round(seconds * 1000, 1)}
    if action is None:  # a stale or early message: nothing was claimed
        log.debug("message for run %s tick %d: nothing to do", run_id, tick, extra=extra)
        return
    what = action
    if _step.get() is not None:
        what += f" step {_step.get()} ({_tool.get()})"
    extra["action"] = action
    log.info(
        "iteration %s of run %s: %s", _iteration.get(), run_id, what, extra=extra
    )  # fmt: skip


def bind_action(run: Any, action: Any) -> None:
    """What the iteration decided: its number, and for a step its position and tool."""
    step_id = getattr(action, "step_id", None)
    step = run.step(step_id) if step_id is not None else None
    bind(
        iteration=run.iteration,
        action=getattr(action, "type", type(action).__name__),
        step=step.position if step is not None else None,
        tool=step.tool if step is not None else None,
    )


# --- formatting ------------------------------------------------------------------------


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class ContextFilter(logging.Filter):
    """Copies the iteration's context onto each record (unless the call gave its own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in current().items():
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, the context fields, the
    process, anything given with `extra=`, and `exc` with the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = current()
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            body[name] = value if value is not None else context[name]
        body["process"] = record.processName
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in body:
                body[key] = value
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            body["exc"] = record.exc_text
        if record.stack_info:
            body["stack"] = self.formatStack(record.stack_info)
        return json.dumps(body, default=str, ensure_ascii=False)


class HumanFormatter(logging.Formatter):
    """`12:00:00.123 INFO  logger: message  [run … it 3 step 2 build]` for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        context = {name: getattr(record, name, None) or value for name, value in current().items()}
        tags = []
        if context["run_id"]:
            tags.append(f"run {context['run_id']}")
        if context["iteration"] is not None:
            tags.append(f"it {context['iteration']}")
        if context["step"] is not None:
            tags.append(f"step {context['step']}")
        if context["tool"]:
            tags.append(str(context["tool"]))
        moment = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        line = (
            f"{moment}.{int(record.msecs):03d} {record.levelname:<7} {record.name}: "
            f"{record.getMessage()}"
        )
        if tags:
            line += f"  [{' '.join(tags)}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def formatter(stream: Any = None) -> logging.Formatter:
    """JSON, or human-readable when `stream` (stderr) is a terminal; the environment wins."""
    chosen = os.environ.get(FORMAT_VARIABLE, "").strip().lower()
    if chosen not in ("human", "json"):
        stream = stream if stream is not None else sys.stderr
        chosen = "human" if getattr(stream, "isatty", lambda: False)() else "json"
    return HumanFormatter() if chosen == "human" else JsonFormatter()


# --- setup -----------------------------------------------------------------------------


class _DropNoise(logging.Filter):
    """kombu's "No hostname was supplied. Reverting to default 'localhost'": logged
    each time a connection to the embedded (filesystem) broker is described, which
    has no host at all, so the default is exactly right and the warning says nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No hostname was supplied")


_NOISE = _DropNoise()


def quiet_noise() -> None:
    """Filter the warnings that carry no information (idempotent)."""
    logger = logging.getLogger("kombu.connection")
    if _NOISE not in logger.filters:
        logger.addFilter(_NOISE)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler `setup` installs (recognised so a second call replaces it)."""


def setup(level: int | str | None = None, stream: Any = None) -> logging.Handler:
    """Send every log record to stderr (or `stream`), one line each, with the context
    fields; replaces an earlier handler of ours. Returns the handler."""
    quiet_noise()
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(handler.stream))
    handler.addFilter(ContextFilter())
    root.addHandler(handler)
    chosen = level or os.environ.get(LEVEL_VARIABLE) or logging.INFO
    root.setLevel(logging.getLevelName(chosen.upper()) if isinstance(chosen, str) else chosen)
    return handler


def init_flask(app: Flask) -> None:
    """The web app: our handler on the root logger (unless testing, or logging is
    already configured by someone else, e.g. gunicorn's --log-config), and the run
    id of the page or API call being served on every line logged while serving it."""
    from flask import request

    root = logging.getLogger()
    if not app.testing and all(isinstance(h, _Handler) for h in root.handlers):
        setup()
    quiet_noise()

    @app.before_request
    def _bind_run() -> None:
        run_id = (request.view_args or {}).get("run_id")
        bind(run_id=run_id if isinstance(run_id, str) else None, iteration=None, step=None)
        bind(tool=None, action=None)

    @app.teardown_request
    def _unbind_run(_: BaseException | None) -> None:
        bind(run_id=None, iteration=None, step=None, tool=None, action=None)
