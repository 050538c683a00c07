"""The tool registry: a tool is a function with a pydantic argument model.

The argument model's JSON schema is what a planner sees; its validation is
what protects a tool from a planner's bad arguments. Flags (approval,
idempotency, timeout) belong to the tool, not to the plan.
"""

from __future__ import annotations

import importlib
import json
import signal
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

from pydantic import BaseModel, ValidationError

from app.engine.actions import StepFailed, StepOutcome, StepSucceeded
from app.engine.models import ErrorClass, ToolPolicy

MAX_RESULT_BYTES = 32_000
# Seconds a tool running in a thread gets past its timeout to end by itself.
THREAD_STOP_GRACE = 5.0


class ToolError(Exception):
    """Raised by a tool to say what failed and who must act on it.

    `not_applied=True` declares that the effect did not happen (nothing was sent, the
    command refused to start): only then is a TRANSIENT failure of a tool that is not
    idempotent retried. Otherwise such a failure pauses the run as outcome unknown.
    """

    def __init__(
        self,
        message: str,
        error_class: ErrorClass = ErrorClass.PERMANENT,
        *,
        not_applied: bool = False,
    ) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.not_applied = not_applied


class ToolTimeout(TimeoutError):
    """The tool ran past its timeout and was interrupted."""


class ToolStillRunning(Exception):
    """The tool ran past its timeout in a thread that cannot be interrupted, and it was
    still running when this attempt gave up on it: no new attempt may start."""


@dataclass(frozen=True)
class ToolContext:
    """What a tool may see of the run it works for."""

    run_id: str
    step_id: int
    idempotency_key: str
    workspace: Path
    env: Mapping[str, str]
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ToolResult:
    """A tool's answer: a JSON-able result, a one-line summary, context to set."""

    result: Any = None
    summary: str = ""
    context_updates: Mapping[str, str] = field(default_factory=dict)


ToolFn = Callable[[Any, ToolContext], ToolResult]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    args_model: type[BaseModel]
    fn: ToolFn
    requires_approval: bool = False
    idempotent: bool = False
    timeout: float = 60.0
    # Calls that need no approval although the tool does (see ToolPolicy.safe_calls).
    safe_calls: tuple[tuple[str, Any], ...] = ()
    # A few words for an approval prompt, e.g. "deploy to staging".
    summarize: Callable[[Mapping[str, Any]], str] | None = None

    @property
    def policy(self) -> ToolPolicy:
        return ToolPolicy(
            requires_approval=self.requires_approval,
            idempotent=self.idempotent,
            timeout=self.timeout,
            safe_calls=self.safe_calls,
        )

    def spec(self) -> dict[str, Any]:
        """The tool as a planner sees it (Anthropic tool-definition shape)."""
        return {
            "name": self.name,
            "description": self.description,
            "input_schema": self.args_model.model_json_schema(),
        }

    def describe_call(self, args: Mapping[str, Any]) -> str:
        if self.summarize is not None:
            return self.summarize(args)
        shown = ", ".join(f"{k}={v!r}" for k, v in args.items())
        return f"{self.name}({shown})"


class UnknownTool(KeyError):
    pass


class ToolRegistry:
    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        self._sources: dict[str, str] = {}
        self._specs: dict[str, dict[str, Any]] = {}
        self._policies: dict[str, ToolPolicy] = {}
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool, *, source: str = "") -> None:
        """Add `tool`; `source` says where it came from (e.g. "module app.tools.builtin").

        Raises ValueError naming both sources when a tool of that name is registered."""
        if tool.name in self._tools:
            first = self._sources.get(tool.name) or "an earlier registration"
            second = source or "a later registration"
            raise ValueError(f"tool {tool.name!r} is registered twice: by {first} and by {second}")
        self._tools[tool.name] = tool
        self._sources[tool.name] = source
        # Built once: schemas are slow to generate, and every iteration asks for the
        # policies and every planner call for the specs.
        self._specs[tool.name] = tool.spec()
        self._policies[tool.name] = tool.policy

    def declare_safe(self, name: str, calls: Iterable[tuple[str, Any]]) -> None:
        """Add calls of tool `name` that need no approval (a deployment's choice)."""
        tool = self.get(name)
        self._tools[name] = replace(tool, safe_calls=(*tool.safe_calls, *calls))
        self._policies[name] = self._tools[name].policy

    def get(self, name: str) -> Tool:
        try:
            return self._tools[name]
        except KeyError:
            known = ", ".join(sorted(self._tools))
            raise UnknownTool(f"unknown tool {name!r}; known tools: {known}") from None

    def source(self, name: str) -> str:
        """Where tool `name` came from ("" when it was registered without a source)."""
        self.get(name)
        return self._sources.get(name, "")

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Any:
        return iter(self._tools.values())

    def policies(self) -> Mapping[str, ToolPolicy]:
        return self._policies

    def specs(self) -> list[dict[str, Any]]:
        return list(self._specs.values())

    def check_args(
        self,
        name: str,
        args: Mapping[str, Any],
        *,
        unresolved: Iterable[tuple[str | int, ...]] = (),
    ) -> list[str]:
        """Problems with a call of `name` with `args`; empty when it is valid.

        `unresolved` are the places in `args` that hold a reference to a result not
        known yet: whatever is wrong there is checked once it is filled in, the
        rest of the args is checked now."""
        try:
            tool = self.get(name)
        except UnknownTool as exc:
            return [str(exc.args[0])]
        try:
            tool.args_model.model_validate(dict(args))
        except ValidationError as exc:
            pending = tuple(unresolved)
            errors = [e for e in exc.errors() if not _overlaps(tuple(e["loc"]), pending)]
            return [f"{name}: {_validation_message(errors)}"] if errors else []
        return []


def _overlaps(loc: tuple[str | int, ...], places: tuple[tuple[str | int, ...], ...]) -> bool:
    """Whether an error at `loc` concerns one of `places` (one lies within the other)."""
    return any(loc[: len(p)] == p or p[: len(loc)] == loc for p in places)


def _validation_message(errors: ValidationError | list[Any]) -> str:
    found = errors.errors() if isinstance(errors, ValidationError) else errors
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'args'}: {err['msg']}" for err in found
    )


def tool(
    *,
    name: str,
    description: str,
    args: type[BaseModel],
    requires_approval: bool = False,
    idempotent: bool = False,
    timeout: float = 60.0,
    safe_calls: tuple[tuple[str, Any], ...] = (),
    summarize: Callable[[Mapping[str, Any]], str] | None = None,
) -> Callable[[ToolFn], Tool]:
    """Decorator that turns `fn(args, ctx) -> ToolResult` into a Tool."""

    def wrap(fn: ToolFn) -> Tool:
        return Tool(
            name=name,
            description=description,
            args_model=args,
            fn=fn,
            requires_approval=requires_approval,
            idempotent=idempotent,
            timeout=timeout,
            safe_calls=safe_calls,
            summarize=summarize,
        )

    return wrap


TOOLS_GROUP = "agentloop.tools"
RUNBOOKS_GROUP = "agentloop.runbooks"
BUILTIN_MODULES = ("app.tools.builtin",)


def load_registry(modules: Iterable[str], *, entry_points: bool = False) -> ToolRegistry:
    """Tools from each module's `TOOLS` list, e.g. `app.tools.builtin`, then (with
    `entry_points`) from every installed plug-in's `agentloop.tools` entry point.

    Each tool remembers its source ("builtin", "module NAME", "entry point NAME
    (DIST)"). Raises ValueError naming the module or entry point when one cannot be
    loaded or has no TOOLS, and naming both sources when a tool name is taken.
    """
    registry = ToolRegistry()
    loaded: set[str] = set()
    for module_path in modules:
        if module_path in loaded:
            continue
        loaded.add(module_path)
        source = "builtin" if module_path in BUILTIN_MODULES else f"module {module_path}"
        try:
            module = importlib.import_module(module_path)
        except ImportError as exc:
            raise ValueError(f"cannot import tool module {module_path!r}: {exc}") from exc
        tools = getattr(module, "TOOLS", None)
        if not isinstance(tools, list | tuple):
            raise ValueError(f"tool module {module_path!r} has no TOOLS list")
        _register_all(registry, tools, source, f"tool module {module_path!r}")
    if entry_points:
        for ep in _entry_points(TOOLS_GROUP):
            module_name, _, attr = (part.strip() for part in ep.value.partition(":"))
            if module_name in loaded and attr in ("", "TOOLS"):
                continue  # the same module, configured by name as well
            loaded.add(module_name)
            source = f"entry point {_describe(ep)}"
            try:
                found = ep.load()
            except Exception as exc:
                raise ValueError(f"cannot load tool {source}: {exc}") from exc
            tools = getattr(found, "TOOLS", found)
            if isinstance(tools, Tool):
                tools = [tools]
            if not isinstance(tools, list | tuple):
                raise ValueError(
                    f"tool {source} names neither a module with a TOOLS list nor a list of tools"
                )
            _register_all(registry, tools, source, f"tool {source}")
    return registry


def _register_all(registry: ToolRegistry, tools: Iterable[Any], source: str, what: str) -> None:
    for item in tools:
        if not isinstance(item, Tool):
            raise ValueError(f"{what}: {item!r} is not a tool (use the @tool decorator)")
        registry.register(item, source=source)


def runbook_dirs_from_entry_points() -> list[Path]:
    """The runbook directories installed plug-ins declare (`agentloop.runbooks`).

    An entry point names a package (its directory holds the *.toml files) or an
    object that is a path (`mypkg.paths:RUNBOOKS`). Raises ValueError naming the
    entry point when it cannot be loaded or is not a directory."""
    found: list[Path] = []
    for ep in _entry_points(RUNBOOKS_GROUP):
        try:
            target = ep.load()
        except Exception as exc:
            raise ValueError(f"cannot load runbooks entry point {_describe(ep)}: {exc}") from exc
        if isinstance(target, ModuleType):
            locations = list(getattr(target, "__path__", []))
            if not locations and target.__file__:
                locations = [str(Path(target.__file__).parent)]
            path = Path(locations[0]) if locations else None
        elif isinstance(target, str | Path):
            path = Path(target)
        else:
            path = None
        if path is None or not path.is_dir():
            raise ValueError(
                f"runbooks entry point {_describe(ep)} names no directory "
                "(name a package of *.toml files, or a str or Path)"
            )
        found.append(path)
    return found


def _entry_points(group: str) -> list[metadata.EntryPoint]:
    """The group's entry points, each (distribution, name) once, in a stable order."""
    unique: dict[tuple[str, str], metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=group):
        unique.setdefault((_dist_name(ep), ep.name), ep)
    return sorted(unique.values(), key=lambda ep: (_dist_name(ep), ep.name))


def _dist_name(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return str(dist.metadata["Name"]) if dist is not None else ""


def _describe(ep: metadata.EntryPoint) -> str:
    dist = _dist_name(ep)
    return f"{ep.name} = {ep.value}" + (f" (package {dist})" if dist else "")


# --- running a tool ---------------------------------------------------------------


def run_tool(
    tool: Tool, args: Mapping[str, Any], ctx: ToolContext, *, timeout: float
) -> StepOutcome:
    """Validate, run under a timeout, and classify the outcome. Never raises for tool errors."""
    try:
        parsed = tool.args_model.model_validate(dict(args))
    except ValidationError as exc:
        return StepFailed(
            error=f"invalid arguments for {tool.name}: {_validation_message(exc)}",
            error_class=ErrorClass.PERMANENT,
        )
    try:
        answer = _call_with_timeout(tool.fn, parsed, ctx, timeout=timeout)
    except ToolError as exc:
        return StepFailed(error=str(exc), error_class=exc.error_class, not_applied=exc.not_applied)
    except ToolTimeout:
        return StepFailed(
            error=f"{tool.name} timed out after {timeout:g} s", error_class=ErrorClass.TRANSIENT
        )
    except ToolStillRunning:
        return StepFailed(
            error=f"{tool.name} timed out after {timeout:g} s and could not be stopped: it "
            "may still be running, so no other attempt starts until a person decides",
            error_class=ErrorClass.UNKNOWN_OUTCOME,
        )
    except ConnectionRefusedError as exc:  # refused before anything was sent
        return StepFailed(
            error=f"{type(exc).__name__}: {exc}",
            error_class=ErrorClass.TRANSIENT,
            not_applied=True,
        )
    except (TimeoutError, ConnectionError) as exc:
        return StepFailed(error=f"{type(exc).__name__}: {exc}", error_class=ErrorClass.TRANSIENT)
    except Exception as exc:  # a tool's bug is a failed step the planner can route around
        return StepFailed(error=f"{type(exc).__name__}: {exc}", error_class=ErrorClass.PERMANENT)
    return StepSucceeded(
        result=cap_result(answer.result),
        summary=answer.summary,
        context_updates=dict(answer.context_updates),
    )


def cap_result(result: Any, limit: int = MAX_RESULT_BYTES) -> Any:
    """Keep stored results bounded: oversize results become a marked preview."""
    encoded = json.dumps(result, default=str)
    if len(encoded) <= limit:
        return json.loads(encoded)
    return {
        "truncated": True,
        "bytes": len(encoded),
        "preview": encoded[:limit],
        "note": f"result truncated to {limit} of {len(encoded)} bytes",
    }


def _call_with_timeout(
    fn: ToolFn, args: BaseModel, ctx: ToolContext, *, timeout: float
) -> ToolResult:
    """Run fn, interrupting it after `timeout` seconds.

    In the main thread (Celery's prefork and solo pools run tasks there) a
    SIGALRM timer raises ToolTimeout inside the tool, even in a blocking call.
    Elsewhere (a thread pool) the tool runs in a daemon thread, which cannot be
    interrupted: past its timeout it is given `THREAD_STOP_GRACE` more seconds to end,
    then reported as still running (ToolStillRunning), never retried behind its back.
    """
    if threading.current_thread() is threading.main_thread():
        return _call_with_alarm(fn, args, ctx, timeout=timeout)
    return _call_in_thread(fn, args, ctx, timeout=timeout)


def _call_with_alarm(
    fn: ToolFn, args: BaseModel, ctx: ToolContext, *, timeout: float
) -> ToolResult:
    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise ToolTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return fn(args, ctx)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _call_in_thread(fn: ToolFn, args: BaseModel, ctx: ToolContext, *, timeout: float) -> ToolResult:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(args, ctx)
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    worker = threading.Thread(target=target, name=f"tool-{ctx.step_id}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        # A tool that waits on I/O with its own timeout may still end by itself; what
        # it ends with, late or not, is what happened.
        worker.join(THREAD_STOP_GRACE)
        if worker.is_alive():
            raise ToolStillRunning()
    if "error" in box:
        raise box["error"]
    result: ToolResult = box["result"]
    return result
