"""Prometheus metrics: counters moved by a run (in-process registry, parsed back from
the text format), the web app's /metrics with the gauges read from the database,
multiprocess mode across forked processes, and a real worker's endpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

from flask.testing import FlaskClient
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from app.engine.models import RunStatus
from tests.conftest import ROOT
from tests.support.fixtures import Harness, noop_then_flaky, wait_until
from tests.support.web import free_port, paused_run

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape() -> Samples:
    return parse(generate_latest(REGISTRY).decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_a_run_moves_the_counters(harness: Harness):
    harness.planner.script = [noop_then_flaky()]
    before = scrape()
    run_id = harness.service.create_run("count me")
    assert harness.drain() == 5  # plan, noop, flaky fails, flaky works, verify
    assert harness.service.status(run_id).run.status == RunStatus.COMPLETED
    after = scrape()

    def d(name: str, **labels: str) -> float:
        return moved(before, after, name, **labels)

    assert d("agentloop_iteration_seconds_count", kind="plan") == 2
    assert d("agentloop_iteration_seconds_count", kind="execute") == 3
    assert d("agentloop_iteration_seconds_bucket", kind="execute", le="+Inf") == 3
    assert d("agentloop_iteration_seconds_sum", kind="execute") > 0
    assert d("agentloop_queue_lag_seconds_count") == 5
    assert d("agentloop_tool_calls_total", tool="noop") == 1
    assert d("agentloop_tool_calls_total", tool="flaky") == 2
    assert d("agentloop_tool_failures_total", tool="flaky", error_class="transient") == 1
    assert d("agentloop_tool_failures_total", tool="noop", error_class="transient") == 0
    assert d("agentloop_llm_calls_total", model="test-model", purpose="plan") == 1
    assert d("agentloop_llm_tokens_total", model="test-model", direction="input") == 120
    assert d("agentloop_llm_tokens_total", model="test-model", direction="output") == 30
    assert d("agentloop_llm_cost_usd_total", model="test-model") == 0.25


def test_a_pause_a_decision_and_a_sweep_are_counted(harness: Harness):
    before = scrape()
    run_id = paused_run(harness)
    harness.service.approve(run_id, by="admin-for-metrics", channel="cli")
    harness.dispatcher.sent.clear()  # the broker lost the message
    harness.clock.advance(5)
    assert harness.service.sweep() >= 1
    after = scrape()
    assert moved(before, after, "agentloop_iteration_seconds_count", kind="pause") == 1
    assert moved(before, after, "agentloop_approval_decisions_total", decision="approve",
                 channel="cli") == 1  # fmt: skip
    assert moved(before, after, "agentloop_sweep_republished_total") >= 1


def test_nothing_is_counted_for_a_message_that_does_nothing(harness: Harness):
    run_id = harness.service.create_run("stale")
    before = scrape()
    harness.service.advance(run_id, 99)  # a stale tick: no claim, no iteration
    after = scrape()
    ours = [k for k in after if k[0].startswith("agentloop_") and not k[0].endswith("_created")]
    assert {k: after[k] for k in ours} == {k: before.get(k) for k in ours}


def test_the_web_app_serves_metrics_with_the_database_gauges(harness: Harness, client: FlaskClient):
    run_id = paused_run(harness)
    response = client.get("/metrics")  # no sign-in: a scraper has none
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    samples = parse(response.get_data(as_text=True))
    assert value(samples, "agentloop_database_up") == 1
    assert value(samples, "agentloop_runs", status="paused") >= 1
    for status in RunStatus:
        assert ("agentloop_runs", frozenset({("status", str(status))})) in samples
    assert value(samples, "agentloop_approvals_waiting", kind="approval") >= 1
    assert value(samples, "agentloop_approval_oldest_age_seconds", kind="approval") >= 0
    # The process's counters are there too.
    assert value(samples, "agentloop_iteration_seconds_count", kind="pause") >= 1
    harness.service.cancel(run_id, by="admin")


def test_the_database_gauges_say_when_the_database_is_away():
    from app.metrics import exposition

    def away() -> object:
        raise RuntimeError("no database")

    samples = parse(exposition(store=away).decode())
    assert value(samples, "agentloop_database_up") == 0
    assert not any(name == "agentloop_runs" for name, _ in samples)


MULTIPROCESS = """
import os, sys
from app import metrics
from app.engine.actions import Plan, StepFailed
from app.engine.models import ErrorClass

children = []
for n in range(3):
    pid = os.fork()
    if pid == 0:
        try:
            metrics.tool_call("noop", StepFailed(error="x", error_class=ErrorClass.PERMANENT))
            metrics.iteration(Plan(purpose="initial"), 0.2)
        finally:
            os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
sys.stdout.write(metrics.exposition().decode())
"""


def test_multiprocess_mode_sums_every_process(tmp_path: Path):
    directory = tmp_path / "prometheus"
    directory.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MULTIPROCESS)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    samples = parse(done.stdout)
    assert value(samples, "agentloop_tool_calls_total", tool="noop") == 3
    assert value(samples, "agentloop_tool_failures_total", tool="noop",
                 error_class="permanent") == 3  # fmt: skip
    assert value(samples, "agentloop_iteration_seconds_count", kind="plan") == 3
    assert len(list(directory.glob("*.db"))) >= 3


def test_a_workers_metrics_endpoint_sums_its_pool(start_worker, live_service, tmp_path: Path):
    directory = tmp_path / "worker-prometheus"
    directory.mkdir()
    port = free_port()
    start_worker(
        beat=False,
        env={
            "PROMETHEUS_MULTIPROC_DIR": str(directory),
            "AGENTLOOP_WORKER_METRICS_PORT": str(port),
        },
    )
    run_id = live_service.create_run("noop chain")
    wait_until(
        lambda: live_service.status(run_id).run.status == RunStatus.COMPLETED,
        timeout=90,
        what="the run to complete",
    )

    def read() -> Samples:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            return parse(answer.read().decode())

    samples = read()
    assert value(samples, "agentloop_iteration_seconds_count", kind="plan") >= 1
    assert value(samples, "agentloop_iteration_seconds_count", kind="execute") >= 1
    assert value(samples, "agentloop_queue_lag_seconds_count") >= 4
    assert value(samples, "agentloop_tool_calls_total", tool="noop") == 3
    assert not any(name == "agentloop_runs" for name, _ in samples)  # no database work
