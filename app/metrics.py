"""Prometheus metrics: every definition, and the small functions the service calls.

Counters and histograms live in the process that moves them (free when nobody
scrapes: no database work per iteration). What the database knows — runs by
status, approvals waiting and the age of the oldest — is read at scrape time,
by `DatabaseCollector`, only for the web app's /metrics.

Multiprocess: with PROMETHEUS_MULTIPROC_DIR set (before this module is imported)
each process writes its samples to files there, and `exposition()` (the web app)
or the worker's endpoint (`serve_worker_metrics`) sums them across gunicorn's
workers or Celery's prefork children.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from app.engine.actions import LlmUsage, StepFailed, StepOutcome
from app.engine.models import RunStatus

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
WORKER_PORT_VARIABLE = "AGENTLOOP_WORKER_METRICS_PORT"

# Iterations span a no-op claim (milliseconds) to a tool call of minutes.
ITERATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

ITERATION_SECONDS = Histogram(
    "agentloop_iteration_seconds",
    "Iterations by what they did (plan, execute, pause, fail), and how long each took "
    "from reading the run to publishing the next (the _count is the number of iterations)",
    ["kind"],
    buckets=ITERATION_BUCKETS,
)
QUEUE_LAG_SECONDS = Histogram(
    "agentloop_queue_lag_seconds",
    "From the time an iteration was due to the time a worker claimed it",
    buckets=LAG_BUCKETS,
)
TOOL_CALLS = Counter("agentloop_tool_calls", "Tool calls, by tool", ["tool"])
TOOL_FAILURES = Counter(
    "agentloop_tool_failures", "Failed tool calls, by tool and error class", ["tool", "error_class"]
)
LLM_CALLS = Counter(
    "agentloop_llm_calls", "Model calls, by model and purpose", ["model", "purpose"]
)
LLM_TOKENS = Counter(
    "agentloop_llm_tokens",
    "Model tokens, by model and direction (input, output, cache_creation, cache_read)",
    ["model", "direction"],
)
LLM_COST = Counter("agentloop_llm_cost_usd", "What model calls cost, in US dollars", ["model"])
SWEEP_REPUBLISHED = Counter(
    "agentloop_sweep_republished", "Iterations the sweep published again (their message was lost)"
)
DECISIONS = Counter(
    "agentloop_approval_decisions",
    "Decisions on paused steps, by decision (approve, reject, retry, skip, done, expired) "
    "and the channel they came through",
    ["decision", "channel"],
)

ITERATION_KINDS = {"plan": "plan", "execute": "execute", "await_human": "pause", "fail": "fail"}


# --- what the service calls ----------------------------------------------------------


def iteration(action: Any, seconds: float) -> None:
    """One iteration done: `action` is what `decide` chose (Plan, Execute, AwaitHuman,
    Fail), `seconds` how long the iteration took."""
    kind = ITERATION_KINDS.get(getattr(action, "type", ""), "other")
    ITERATION_SECONDS.labels(kind).observe(max(0.0, seconds))


def queue_lag(due: datetime | None, claimed: datetime) -> None:
    """A run claimed at `claimed` (database time) that was due at `due`."""
    if due is not None:
        QUEUE_LAG_SECONDS.observe(max(0.0, (claimed - due).total_seconds()))


def tool_call(tool: str, outcome: StepOutcome) -> None:
    TOOL_CALLS.labels(tool).inc()
    if isinstance(outcome, StepFailed):
        TOOL_FAILURES.labels(tool, str(outcome.error_class)).inc()


def llm_usage(outcome: Any) -> None:
    """Tokens and cost of the model calls a planner outcome made."""
    usage: Iterable[LlmUsage] = getattr(outcome, "usage", ())
    for u in usage:
        LLM_CALLS.labels(u.model, u.purpose or "plan").inc()
        for direction, tokens in (
            ("input", u.input_tokens),
            ("output", u.output_tokens),
            ("cache_creation", u.cache_creation_tokens),
            ("cache_read", u.cache_read_tokens),
        ):
            if tokens > 0:
                LLM_TOKENS.labels(u.model, direction).inc(tokens)
        if u.cost_usd > 0:
            LLM_COST.labels(u.model).inc(u.cost_usd)


def sweep_republished(count: int) -> None:
    if count:
        SWEEP_REPUBLISHED.inc(count)


def decision(decided: Any, channel: str | None = None) -> None:
    DECISIONS.labels(str(decided), channel or "none").inc()


# --- what the database knows, read at scrape time --------------------------------------


class DatabaseCollector(Collector):
    """Runs by status and approvals waiting (count and age of the oldest), read with
    two GROUP BY queries when scraped. `store` is called at scrape time (the web app
    builds its service on first use)."""

    def __init__(self, store: Callable[[], Any]) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        from app.store.schema import approvals, runs

        up = GaugeMetricFamily(
            "agentloop_database_up", "Whether the database answered this scrape's queries"
        )
        runs_by_status = GaugeMetricFamily(
            "agentloop_runs", "Runs in the database, by status", labels=["status"]
        )
        waiting = GaugeMetricFamily(
            "agentloop_approvals_waiting", "Pauses waiting for a person, by kind", labels=["kind"]
        )
        oldest = GaugeMetricFamily(
            "agentloop_approval_oldest_age_seconds",
            "How long the oldest pause of each kind has been waiting for a person",
            labels=["kind"],
        )
        try:
            store = self._store()
            with store.engine.connect() as conn:
                counts = dict(
                    conn.execute(select(runs.c.status, func.count()).group_by(runs.c.status)).all()
                )
                pending = conn.execute(
                    select(approvals.c.kind, func.count(), func.min(approvals.c.created_at))
                    .where(approvals.c.status == "pending")
                    .group_by(approvals.c.kind)
                ).all()
            now = store.database_now() if pending else None
        except Exception:
            log.warning("metrics: cannot read runs and approvals", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        for status in [*RunStatus, *sorted(set(counts) - set(RunStatus))]:
            runs_by_status.add_metric([str(status)], counts.get(str(status), 0))
        for kind, count, first in pending:
            waiting.add_metric([kind], count)
            if now is not None and first is not None:
                oldest.add_metric([kind], max(0.0, (now - first).total_seconds()))
        yield from (up, runs_by_status, waiting, oldest)


# --- exposition -----------------------------------------------------------------------


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class _ThisProcess(Collector):
    """The default registry's metrics (this process's), inside another registry."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def registry(store: Callable[[], Any] | None = None) -> CollectorRegistry:
    """What a scrape shows: every process's metrics in multiprocess mode, else this
    process's; plus the database's gauges when `store` is given."""
    found = CollectorRegistry(auto_describe=False)
    if multiprocess_dir():
        MultiProcessCollector(found)  # type: ignore[no-untyped-call]
    else:
        found.register(_ThisProcess())
    if store is not None:
        found.register(DatabaseCollector(store))
    return found


def exposition(store: Callable[[], Any] | None = None) -> bytes:
    """The text a Prometheus scrape gets."""
    return generate_latest(registry(store))


_served: list[Any] = []
_serving = threading.Lock()


def serve_worker_metrics() -> bool:
    """Serve the worker's metrics over HTTP when AGENTLOOP_WORKER_METRICS_PORT is set
    (`PORT`, or `HOST:PORT`; the host defaults to 127.0.0.1). Called once in the
    worker's main process, before the pool starts. True when serving."""
    setting = os.environ.get(WORKER_PORT_VARIABLE, "").strip()
    if not setting:
        return False
    host, _, port = setting.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        log.error("%s=%r is not a port (PORT or HOST:PORT)", WORKER_PORT_VARIABLE, setting)
        return False
    with _serving:
        if _served:
            return True
        if not multiprocess_dir():
            log.warning(
                "%s is set without PROMETHEUS_MULTIPROC_DIR: only this process's metrics are "
                "served, not those of a prefork pool's children",
                WORKER_PORT_VARIABLE,
            )
        _served.append(start_http_server(number, addr=host or "127.0.0.1", registry=registry()))
    log.info("worker metrics on http://%s:%d/metrics", host or "127.0.0.1", number)
    return True
