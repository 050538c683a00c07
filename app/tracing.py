"""OpenTelemetry traces: one trace per run, a span per iteration.

Off and free unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set: then `setup()` installs the SDK's
TracerProvider with a batching OTLP/HTTP exporter and the Celery instrumentation
(the web app adds Flask's, the worker SQLAlchemy's on its engines). Otherwise no
provider is installed and every decorator below calls straight through (the API's
no-op tracer is never even asked for a span).

A run's trace id is derived from its run id (`run_context`): every iteration,
on any worker, and every decision a person makes is a child of that root, so they
land in one trace even when a message carried no context (the first one, from
whoever created the run; one the sweep published again). The root span itself is
never exported. Each iteration span links to the span that delivered it (the
Celery instrumentation's consumer span, itself a child of the publishing span in
the previous iteration, across processes).

The service uses decorators only (app/engine stays free of this):
`iteration_span` on `advance`, `child_span` on the claim and the save,
`slow_work_span` on the tool or planner call, `decision_span`, `cancel_span` and
`expiry_span` on what people (and the approval timer) do to a run.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    NoOpTracerProvider,
    ProxyTracerProvider,
    Span,
    SpanContext,
    SpanKind,
    TraceFlags,
)

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

TRACER_NAME = "agentloop"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
# Requests not worth a trace each: probes, scrapes, static files.
FLASK_EXCLUDED_URLS = "healthz,readyz,metrics,static"

_lock = threading.Lock()
_state: dict[str, Any] = {}


# --- setup -----------------------------------------------------------------------------


def configured() -> bool:
    """Whether this process should export traces (an OTLP endpoint is set)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(os.environ.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def setup(service_name: str) -> bool:
    """Install the SDK's provider (OTLP/HTTP, batching) and the Celery instrumentation,
    once per process, when `configured()`. True when tracing is on."""
    if not configured():
        return False
    with _lock:
        if "provider" in _state:
            return True
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over the default name.
        named = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
        provider = TracerProvider(resource=Resource.create(named))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        CeleryInstrumentor().instrument()  # type: ignore[no-untyped-call]
        _state["provider"] = provider
    log.info("tracing on: spans exported by OTLP/HTTP as %s", service_name)
    return True


def instrument_flask(app: Any) -> None:
    """The web app's requests as spans (a decision's span links to its request)."""
    if setup("agentloop-web"):
        from opentelemetry.instrumentation.flask import FlaskInstrumentor

        FlaskInstrumentor().instrument_app(  # type: ignore[no-untyped-call]
            app, excluded_urls=FLASK_EXCLUDED_URLS
        )


def instrument_engines(engines: Iterable[Any]) -> None:
    """Every SQL statement on `engines` as a span (once per process)."""
    if "provider" not in _state:
        return
    with _lock:
        if _state.get("sqlalchemy"):
            return
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

        # The instrumentation declares SQLAlchemy < 2.1; it only listens to engine events,
        # which 2.1 keeps (tests/test_tracing.py checks the SQL spans arrive).
        SQLAlchemyInstrumentor().instrument(engines=list(engines), skip_dep_check=True)
        _state["sqlalchemy"] = True


def flush(timeout_millis: int = 5000) -> None:
    """Export what is buffered (a process about to exit)."""
    provider = _state.get("provider")
    if provider is not None:
        provider.force_flush(timeout_millis)


def use_provider(provider: trace.TracerProvider | None) -> None:
    """For tests: this module's spans go to `provider`, whatever the global one is
    (None: back to the global provider)."""
    _state["override"] = provider


def enabled() -> bool:
    """Whether spans are recorded: a real provider is installed (by `setup`, or a test)."""
    if _state.get("override") is not None:
        return True
    return not isinstance(trace.get_tracer_provider(), ProxyTracerProvider | NoOpTracerProvider)


def _tracer() -> trace.Tracer:
    override = _state.get("override")
    if override is not None:
        return override.get_tracer(TRACER_NAME)  # type: ignore[no-any-return]
    return trace.get_tracer(TRACER_NAME)


# --- a run's trace -----------------------------------------------------------------------


def run_trace_ids(run_id: str) -> tuple[int, int]:
    """The trace id of `run_id`'s trace and the span id of its (never exported) root."""
    digest = hashlib.sha256(f"agentloop.run {run_id}".encode()).digest()
    return int.from_bytes(digest[:16], "big") or 1, int.from_bytes(digest[16:24], "big") or 1


def run_trace_id(run_id: str) -> str:
    """The run's trace id as trace backends show it (32 hex digits)."""
    return format(run_trace_ids(run_id)[0], "032x")


def run_context(run_id: str) -> Context:
    """A context whose current span is the run's root: spans started in it join the run."""
    trace_id, span_id = run_trace_ids(run_id)
    root = SpanContext(
        trace_id, span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)
    )
    return trace.set_span_in_context(NonRecordingSpan(root))


@contextmanager
def run_span(
    name: str, run_id: str, attributes: Mapping[str, Any], kind: SpanKind = SpanKind.INTERNAL
) -> Iterator[Span]:
    """A span of `run_id`'s trace, linked to the span current here (the message's
    delivery, a web request) when there is one."""
    current = trace.get_current_span().get_span_context()
    links = [Link(current)] if current.is_valid else []
    with _tracer().start_as_current_span(
        name,
        context=run_context(run_id),
        kind=kind,
        links=links,
        attributes={"agentloop.run_id": run_id, **attributes},
    ) as span:
        yield span


def _arg(args: tuple[Any, ...], kwargs: Mapping[str, Any], index: int, name: str) -> Any:
    return kwargs[name] if name in kwargs else args[index] if len(args) > index else None


# --- decorators the service uses ------------------------------------------------------


def iteration_span(fn: Callable[P, R]) -> Callable[P, R]:
    """`advance(self, run_id, tick)` as the span `agentloop.iteration` of the run's trace."""

    @functools.wraps(fn)
    def traced(*args: P.args, **kwargs: P.kwargs) -> R:
        if not enabled():
            return fn(*args, **kwargs)
        run_id = str(_arg(args, kwargs, 1, "run_id"))
        attributes = {
            "agentloop.tick": int(_arg(args, kwargs, 2, "tick")),
            "agentloop.worker": str(getattr(args[0], "worker_id", "")),
        }
        with run_span("agentloop.iteration", run_id, attributes):
            return fn(*args, **kwargs)

    return traced


def decided(run: Any, action: Any) -> None:
    """What the iteration decided, on its span: iteration, action kind, step and tool."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attribute("agentloop.iteration", int(run.iteration))
    kind = str(getattr(action, "type", type(action).__name__))
    span.set_attribute("agentloop.action", kind)
    if kind == "plan":
        span.set_attribute("agentloop.plan.purpose", str(action.purpose))
    step_id = getattr(action, "step_id", None)
    if step_id is None:
        return
    try:
        step = run.step(step_id)
    except Exception:  # a step the snapshot lacks: the attributes are not worth a failure
        return
    span.set_attribute("agentloop.step", int(step.position))
    span.set_attribute("agentloop.step_id", int(step.id))
    span.set_attribute("agentloop.tool", str(step.tool))
    span.set_attribute("agentloop.attempt", int(step.attempts) + 1)


def forwarded(kind: Any) -> None:
    """The iteration only passed its message on to the queue for `kind` of work (it
    came on the other one): no claim, no work, in this span."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("agentloop.forwarded_to", str(kind))


def child_span(
    name: str, describe: Callable[[Span, Any], None] | None = None
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Run the decorated method in a child span `name`; `describe(span, result)` adds
    what the result says."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def traced(*args: P.args, **kwargs: P.kwargs) -> R:
            if not enabled():
                return fn(*args, **kwargs)
            with _tracer().start_as_current_span(name) as span:
                result = fn(*args, **kwargs)
                if describe is not None and span.is_recording():
                    describe(span, result)
                return result

        return traced

    return decorate


def claimed(span: Span, result: Any) -> None:
    span.set_attribute("agentloop.claimed", result is not None)


def saved(span: Span, result: Any) -> None:
    span.set_attribute("agentloop.saved", bool(result))


def slow_work_span(fn: Callable[P, R]) -> Callable[P, R]:
    """`_slow_work(self, planner_kind, work, action)`: the tool call (`agentloop.tool`)
    or the planner call (`agentloop.planner`, GenAI attributes), with its outcome."""

    @functools.wraps(fn)
    def traced(*args: P.args, **kwargs: P.kwargs) -> R:
        if not enabled():
            return fn(*args, **kwargs)
        planner_kind = _arg(args, kwargs, 1, "planner_kind")
        work = _arg(args, kwargs, 2, "work")
        action = _arg(args, kwargs, 3, "action")
        step_id = getattr(action, "step_id", None)
        if step_id is not None:
            step = work.run.step(step_id)
            attributes: dict[str, Any] = {
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": str(step.tool),
                "agentloop.step": int(step.position),
            }
            with _tracer().start_as_current_span("agentloop.tool", attributes=attributes) as span:
                outcome = fn(*args, **kwargs)
                _describe_tool(span, outcome)
                return outcome
        attributes = {
            "gen_ai.operation.name": "chat",
            "agentloop.planner": str(planner_kind),
            "agentloop.plan.purpose": str(getattr(action, "purpose", "")),
        }
        with _tracer().start_as_current_span(
            "agentloop.planner", kind=SpanKind.CLIENT, attributes=attributes
        ) as span:
            outcome = fn(*args, **kwargs)
            request = getattr(work, "request", None)
            _describe_planner(span, outcome, requested=request.config.model if request else None)
            return outcome

    return traced


def _describe_tool(span: Span, outcome: Any) -> None:
    if not span.is_recording():
        return
    span.set_attribute("agentloop.outcome", str(getattr(outcome, "type", "")))
    error_class = getattr(outcome, "error_class", None)
    if error_class is not None:
        span.set_attribute("error.type", str(error_class))
        span.set_status(trace.StatusCode.ERROR, str(getattr(outcome, "error", ""))[:500])


def _describe_planner(span: Span, outcome: Any, *, requested: str | None) -> None:
    """The planner call's GenAI attributes: model asked for and answering, tokens, cost
    and why each model call stopped (`gen_ai.response.finish_reasons`)."""
    if not span.is_recording():
        return
    span.set_attribute("agentloop.outcome", str(getattr(outcome, "type", "")))
    usage = list(getattr(outcome, "usage", ()) or ())
    if not usage:
        return  # no model was called (the offline planner)
    span.set_attribute("gen_ai.system", "anthropic")  # the one model planner there is
    span.set_attribute("gen_ai.provider.name", "anthropic")  # the attribute's newer name
    span.set_attribute("gen_ai.request.model", str(requested or usage[-1].model))
    span.set_attribute("gen_ai.response.model", str(usage[-1].model))
    span.set_attribute("gen_ai.usage.input_tokens", sum(u.input_tokens for u in usage))
    span.set_attribute("gen_ai.usage.output_tokens", sum(u.output_tokens for u in usage))
    span.set_attribute(
        "agentloop.usage.cache_creation_tokens", sum(u.cache_creation_tokens for u in usage)
    )
    span.set_attribute("agentloop.usage.cache_read_tokens", sum(u.cache_read_tokens for u in usage))
    span.set_attribute("agentloop.cost_usd", float(sum(u.cost_usd for u in usage)))
    span.set_attribute("agentloop.llm_calls", len(usage))
    stopped = [u.stop_reason for u in usage if u.stop_reason]
    if stopped:  # one per model call, repairs included
        span.set_attribute("gen_ai.response.finish_reasons", stopped)


def in_run_trace(
    name: str, describe: Callable[[tuple[Any, ...], Mapping[str, Any]], tuple[str, dict[str, Any]]]
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Run the decorated method as span `name` of a run's trace, linked to the span
    current here (a web request, a beat task's delivery); `describe(args, kwargs)` says
    which run, and with what attributes."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def traced(*args: P.args, **kwargs: P.kwargs) -> R:
            if not enabled():
                return fn(*args, **kwargs)
            run_id, attributes = describe(args, kwargs)
            with run_span(name, run_id, attributes) as span:
                result = fn(*args, **kwargs)
                if isinstance(result, bool):
                    span.set_attribute("agentloop.done", result)
                return result

        return traced

    return decorate


def _who(by: Any) -> str:
    return str(getattr(by, "name", by))


def _decision(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    return str(_arg(args, kwargs, 1, "run_id")), {
        "agentloop.decision": str(_arg(args, kwargs, 2, "decision")),
        "agentloop.channel": str(kwargs.get("channel") or "none"),
        "agentloop.by": _who(kwargs.get("by")),
    }


def _cancel(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    return str(_arg(args, kwargs, 1, "run_id")), {"agentloop.by": _who(kwargs.get("by"))}


def _expiry(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    approval = _arg(args, kwargs, 1, "approval")
    return str(approval.run_id), {
        "agentloop.approval_id": str(approval.id),
        "agentloop.expiry.policy": str(kwargs.get("policy")),
    }


# `decide(self, run_id, decision, ..., by=, channel=)`: the iteration it resumes follows.
decision_span = in_run_trace("agentloop.decision", _decision)
# `cancel(self, run_id, *, by=)`, from the web, the API or the CLI.
cancel_span = in_run_trace("agentloop.cancel", _cancel)
# `_expire_one(self, approval, *, ttl=, policy=)` (beat); agentloop.done: it was settled.
expiry_span = in_run_trace("agentloop.expiry", _expiry)
