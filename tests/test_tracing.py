"""OpenTelemetry: the spans of a run over the in-process harness (the SDK's in-memory
exporter), tracing off by default, and two real worker processes exporting by
OTLP/HTTP to a loopback receiver: one trace per run, parent/child across processes."""

from __future__ import annotations

import dataclasses
import gzip
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from app import tracing
from app.engine.models import Decision, RunConfig, RunStatus
from app.planner.anthropic import AnthropicPlanner
from app.store.accounts import Accounts, Role, User
from tests.conftest import ROOT
from tests.fake_anthropic import FakeAnthropic, finish_reply, plan_reply, text_reply
from tests.support.fixtures import Harness, noop_then_flaky, wait_until, workspace
from tests.support.web import free_port, paused_run

# --- in process: the SDK's in-memory exporter --------------------------------------------


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The service's spans, recorded in memory by an SDK provider of this test's own
    (the global one stays as it was: other tests run with tracing off)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    try:
        yield exporter
    finally:
        tracing.use_provider(None)
        provider.shutdown()
    assert not tracing.enabled()


def of_run(exporter: InMemorySpanExporter, run_id: str) -> list[ReadableSpan]:
    trace_id = int(tracing.run_trace_id(run_id), 16)
    return [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


def test_a_run_is_one_trace_with_a_span_per_iteration(
    harness: Harness, spans: InMemorySpanExporter
):
    harness.planner.script = [noop_then_flaky()]
    run_id = harness.service.create_run("trace me")
    assert harness.drain() == 5  # plan, noop, flaky fails, flaky works, verify
    assert harness.service.status(run_id).run.status == RunStatus.COMPLETED

    found = of_run(spans, run_id)
    iterations = [s for s in found if s.name == "agentloop.iteration"]
    assert len(iterations) == 5
    _, root_span_id = tracing.run_trace_ids(run_id)
    for span in iterations:  # each a child of the run's root
        assert span.parent is not None and span.parent.span_id == root_span_id
        assert span.attributes is not None
        assert span.attributes["agentloop.run_id"] == run_id
        assert {"agentloop.tick", "agentloop.iteration", "agentloop.action"} <= set(span.attributes)
    iterations.sort(key=lambda s: s.start_time or 0)
    actions = [(s.attributes or {})["agentloop.action"] for s in iterations]
    assert actions == ["plan", "execute", "execute", "execute", "plan"]
    tools = [(s.attributes or {}).get("agentloop.tool") for s in iterations]
    assert tools == [None, "noop", "flaky", "flaky", None]
    assert [(s.attributes or {}).get("agentloop.step") for s in iterations[1:4]] == [1, 2, 2]

    for span in iterations:
        names = sorted(c.name for c in children(found, span))
        slow = "agentloop.planner" if span is iterations[0] else "agentloop.tool"
        if span is iterations[-1]:
            slow = "agentloop.planner"
        assert names == sorted(["agentloop.claim", slow, "agentloop.save"]), names

    (planner,) = [c for c in children(found, iterations[0]) if c.name == "agentloop.planner"]
    attrs = dict(planner.attributes or {})
    assert attrs["gen_ai.system"] == "anthropic"
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == RunConfig().model  # what the run asked for
    assert attrs["gen_ai.response.model"] == "test-model"  # what answered
    assert attrs["gen_ai.usage.input_tokens"] == 120
    assert attrs["gen_ai.usage.output_tokens"] == 30
    assert attrs["agentloop.cost_usd"] == pytest.approx(0.25)
    assert attrs["agentloop.outcome"] == "plan_produced"

    tool_spans = [
        c for s in iterations[1:4] for c in children(found, s) if c.name == "agentloop.tool"
    ]
    assert [(t.attributes or {})["gen_ai.tool.name"] for t in tool_spans] == [
        "noop",
        "flaky",
        "flaky",
    ]
    failed = tool_spans[1]
    assert failed.status.status_code is StatusCode.ERROR
    assert (failed.attributes or {})["error.type"] == "transient"
    assert tool_spans[2].status.status_code is not StatusCode.ERROR

    saves = [c for s in iterations for c in children(found, s) if c.name == "agentloop.save"]
    assert all((c.attributes or {})["agentloop.saved"] is True for c in saves)


def test_the_planner_span_carries_the_genai_attributes_of_claudes_answers(
    harness: Harness, spans: InMemorySpanExporter, fake_anthropic: FakeAnthropic
):
    """The real SDK against the fake API: a text answer (end_turn) is repaired into a
    plan (tool_use); the span sums both calls and lists why each stopped."""
    planner = AnthropicPlanner(api_key="test-key", base_url=fake_anthropic.base_url)
    harness.service = dataclasses.replace(harness.service, planners=lambda kind: planner)
    fake_anthropic.script(
        text_reply("I would rather chat", usage={"input_tokens": 100, "output_tokens": 10}),
        plan_reply(
            [{"description": "nothing", "tool": "noop", "args": {}}],
            usage={"input_tokens": 200, "output_tokens": 20},
        ),
        finish_reply("# done", usage={"input_tokens": 50, "output_tokens": 5}),
    )
    model = "claude-haiku-4-5"
    config = {"planner": "anthropic", "model": model}
    run_id = harness.service.create_run("plan with claude", config=config)
    harness.drain()
    planner.close()
    view = harness.service.status(run_id)
    assert view.run.status == RunStatus.COMPLETED, view.run.error

    planners = sorted(
        (s for s in of_run(spans, run_id) if s.name == "agentloop.planner"),
        key=lambda s: s.start_time or 0,
    )
    assert len(planners) == 2  # the plan (repaired once) and the verification
    first, verify = (dict(s.attributes or {}) for s in planners)
    assert first["gen_ai.operation.name"] == "chat"
    assert first["gen_ai.provider.name"] == "anthropic"
    assert first["gen_ai.request.model"] == first["gen_ai.response.model"] == model
    assert first["gen_ai.response.finish_reasons"] == ("end_turn", "tool_use")
    assert first["gen_ai.usage.input_tokens"] == 300
    assert first["gen_ai.usage.output_tokens"] == 30
    assert first["agentloop.llm_calls"] == 2
    calls = [e for e in view.events if e.kind == "llm_call"]
    assert [c.data["stop_reason"] for c in calls] == ["end_turn", "tool_use", "tool_use"]
    assert first["agentloop.cost_usd"] == pytest.approx(sum(c.data["cost_usd"] for c in calls[:2]))
    assert first["agentloop.cost_usd"] > 0
    assert verify["gen_ai.response.finish_reasons"] == ("tool_use",)
    assert verify["agentloop.plan.purpose"] == "verify"


def test_a_decision_joins_the_runs_trace(harness: Harness, spans: InMemorySpanExporter):
    run_id = paused_run(harness)
    spans.clear()
    request = tracing._tracer().start_span("GET /approve")  # as the web request's span
    with trace.use_span(request, end_on_exit=True):
        harness.service.approve(run_id, by="approver", channel="web")
    (decision,) = [s for s in of_run(spans, run_id) if s.name == "agentloop.decision"]
    assert decision.parent is not None
    assert decision.parent.span_id == tracing.run_trace_ids(run_id)[1]
    assert [link.context.span_id for link in decision.links] == [request.get_span_context().span_id]
    assert (decision.attributes or {})["agentloop.decision"] == str(Decision.APPROVE)
    assert (decision.attributes or {})["agentloop.channel"] == "web"
    assert harness.drain() >= 1  # the approved step runs (the second one pauses again)
    resumed = [s for s in of_run(spans, run_id) if s.name == "agentloop.iteration"]
    assert resumed and all((s.attributes or {})["agentloop.run_id"] == run_id for s in resumed)


def test_a_cancel_joins_the_runs_trace(harness: Harness, spans: InMemorySpanExporter):
    run_id = paused_run(harness)
    spans.clear()
    request = tracing._tracer().start_span("POST /runs/cancel")  # as the web request's span
    with trace.use_span(request, end_on_exit=True):
        harness.service.cancel(run_id, by="canceller")
    (cancel,) = [s for s in of_run(spans, run_id) if s.name == "agentloop.cancel"]
    assert cancel.parent is not None
    assert cancel.parent.span_id == tracing.run_trace_ids(run_id)[1]
    assert [link.context.span_id for link in cancel.links] == [request.get_span_context().span_id]
    assert (cancel.attributes or {})["agentloop.by"] == "canceller"
    assert harness.service.status(run_id).run.status == RunStatus.CANCELLED


def test_an_approval_expiring_joins_the_runs_trace(harness: Harness, spans: InMemorySpanExporter):
    run_id = paused_run(harness)
    other = paused_run(harness)
    spans.clear()
    harness.clock.advance(120)
    assert harness.service.expire_approvals(ttl=60, policy="reject") >= 2
    for each in (run_id, other):
        (expiry,) = [s for s in of_run(spans, each) if s.name == "agentloop.expiry"]
        assert expiry.parent is not None
        assert expiry.parent.span_id == tracing.run_trace_ids(each)[1]
        attributes = dict(expiry.attributes or {})
        assert attributes["agentloop.run_id"] == each
        assert attributes["agentloop.expiry.policy"] == "reject"
        assert attributes["agentloop.done"] is True  # settled
    assert harness.drain() >= 1  # the runs re-plan around the rejected step, in their traces
    assert [s for s in of_run(spans, run_id) if s.name == "agentloop.iteration"]


def test_tracing_is_off_without_an_endpoint():
    """No provider, no instrumentation: the decorators call straight through."""
    code = (
        "from opentelemetry import trace\n"
        "from app import tracing\n"
        "import tasks\n"
        "assert not tracing.setup('x')\n"
        "assert not tracing.enabled()\n"
        "assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)\n"
        "calls = []\n"
        "f = tracing.iteration_span(lambda self, run_id, tick: calls.append(run_id))\n"
        "f(object(), 'r', 1)\n"
        "assert calls == ['r']\n"
        "from app.web import create_app, deps\n"
        "with create_app().app_context():\n"
        "    deps.service()\n"
        "import sys\n"
        "assert 'opentelemetry.sdk.trace' not in sys.modules, 'the SDK was imported'\n"
        "assert 'opentelemetry.instrumentation.sqlalchemy' not in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_EXPORTER_OTLP")}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


# --- two real workers exporting by OTLP/HTTP to a loopback receiver ----------------------


@dataclass
class Received:
    spans: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.spans)


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


@pytest.fixture
def receiver() -> Iterator[tuple[str, Received]]:
    """A tiny OTLP/HTTP receiver: records what is POSTed to /v1/traces, decoded."""
    received = Received()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path != "/v1/traces":
                self.send_response(404)
                self.end_headers()
                return
            request = ExportTraceServiceRequest.FromString(body)
            found = []
            for resource_spans in request.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        found.append(
                            {
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent": span.parent_span_id.hex(),
                                "links": [link.span_id.hex() for link in span.links],
                                "attributes": {a.key: _value(a.value) for a in span.attributes},
                                "resource": resource,
                            }
                        )
            with received.lock:
                received.spans.extend(found)
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()


def test_a_cancel_from_the_cli_is_exported_in_the_runs_trace(
    harness: Harness, receiver: tuple[str, Received]
):
    endpoint, received = receiver
    run_id = paused_run(harness)
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "cancel", run_id],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert harness.service.status(run_id).run.status == RunStatus.CANCELLED
    (cancel,) = [s for s in received.snapshot() if s["name"] == "agentloop.cancel"]
    assert cancel["trace_id"] == tracing.run_trace_id(run_id)
    assert cancel["parent"] == format(tracing.run_trace_ids(run_id)[1], "016x")
    assert cancel["resource"]["service.name"] == "agentloop-cli"


WEB_CANCEL = """
import sys
from app import tracing
from app.web import create_app

client = create_app().test_client()
answer = client.post(
    f"/api/runs/{sys.argv[1]}/cancel", headers={"Authorization": f"Bearer {sys.argv[2]}"}
)
assert answer.status_code == 200, answer.get_data(as_text=True)
tracing.flush()
"""


def test_the_web_apps_sql_and_a_cancel_by_the_api_are_traced(
    harness: Harness,
    receiver: tuple[str, Received],
    make_user: Callable[..., User],
    accounts: Accounts,
):
    """The web app in a process of its own, exporting by OTLP: the request's SQL (the
    token check) as children of the request's span; the cancel in the run's trace,
    linked to the request, with its own SQL under it."""
    endpoint, received = receiver
    run_id = paused_run(harness)
    token = accounts.issue_token(make_user("admin", role=Role.ADMIN).id, label="tests")
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
    done = subprocess.run(
        [sys.executable, "-c", WEB_CANCEL, run_id, token],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = received.snapshot()
    (request,) = [s for s in found if s["name"] == "POST /api/runs/<run_id>/cancel"]
    assert request["resource"]["service.name"] == "agentloop-web"
    sql = [
        s for s in found if "db.system" in s["attributes"] or "db.system.name" in s["attributes"]
    ]
    assert any(s["parent"] == request["span_id"] for s in sql), "no SQL span under the request"
    (cancel,) = [s for s in found if s["name"] == "agentloop.cancel"]
    assert cancel["trace_id"] == tracing.run_trace_id(run_id)
    assert cancel["links"] == [request["span_id"]]
    assert any(s["parent"] == cancel["span_id"] for s in sql), "no SQL span under the cancel"
    assert harness.service.status(run_id).run.status == RunStatus.CANCELLED


@pytest.mark.e2e
def test_a_runs_iterations_on_two_workers_form_one_trace(
    start_worker, live_service, receiver: tuple[str, Received]
):
    endpoint, received = receiver
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    first = start_worker(name="a", beat=False, env=env)
    run_id = live_service.create_run("apply the idempotent effect holding 30s")
    wait_until(lambda: (workspace(run_id) / "effects.log").exists(), what="the effect to start")
    # The step holds on worker a; b starts, a shuts down warmly: the step ends and is
    # saved on a, the next iteration (verify) can only be consumed by b.
    start_worker(name="b", beat=False, env=env)
    first.process.send_signal(15)
    (workspace(run_id) / "release").touch()
    wait_until(
        lambda: live_service.status(run_id).run.status == RunStatus.COMPLETED,
        timeout=60,
        what="the run to complete",
    )
    first.process.wait(timeout=30)
    trace_id = tracing.run_trace_id(run_id)

    def iterations() -> list[dict[str, Any]]:
        return [
            s
            for s in received.snapshot()
            if s["name"] == "agentloop.iteration" and s["attributes"]["agentloop.run_id"] == run_id
        ]

    wait_until(lambda: len(iterations()) >= 3, timeout=20, what="3 iteration spans exported")
    found = iterations()
    assert {s["trace_id"] for s in found} == {trace_id}
    assert {s["resource"]["service.name"] for s in found} == {"agentloop-worker"}
    # An iteration that came on the other kind's queue (the publisher's guess was
    # wrong) passes its message on: it says so, and does nothing else.
    passed_on = [s for s in found if "agentloop.forwarded_to" in s["attributes"]]
    worked = [s for s in found if s not in passed_on]
    by_worker = {s["attributes"]["agentloop.worker"] for s in worked}
    assert len(by_worker) == 2, by_worker  # two processes
    spans = {s["span_id"]: s for s in received.snapshot() if s["trace_id"] == trace_id}

    def delivered_by(iteration: dict[str, Any]) -> dict[str, Any]:
        """The iteration that published the message `iteration` ran for: the consumer
        span it links to is a child of the publishing span inside that iteration."""
        (consumer,) = [spans[link] for link in iteration["links"] if link in spans]
        assert consumer["name"] == "run/agentloop.advance"
        publisher = spans[consumer["parent"]]
        assert publisher["name"] == "apply_async/agentloop.advance"
        return spans[publisher["parent"]]

    # The last iteration (on b) was delivered by a message that a's iteration, the one
    # that executed the step, published (passed on by b's queue guess, if it was).
    verify = max(worked, key=lambda s: s["attributes"]["agentloop.tick"])
    execute = [s for s in worked if s["attributes"]["agentloop.action"] == "execute"][-1]
    assert verify["attributes"]["agentloop.worker"] != execute["attributes"]["agentloop.worker"]
    publisher = delivered_by(verify)
    if publisher in passed_on:
        assert publisher["attributes"]["agentloop.forwarded_to"] == "plan"
        publisher = delivered_by(publisher)
    assert publisher["span_id"] == execute["span_id"]
    # Inside each iteration: the claim, the tool or planner call, the save, and SQL.
    for iteration in found:
        inside = {s["name"] for s in spans.values() if s["parent"] == iteration["span_id"]}
        if iteration in passed_on:
            assert "apply_async/agentloop.advance" in inside, inside
            assert not inside & {"agentloop.claim", "agentloop.save"}, inside
            continue
        assert {"agentloop.claim", "agentloop.save"} <= inside, inside
        assert inside & {"agentloop.tool", "agentloop.planner"}, inside
    claims = [s for s in spans.values() if s["name"] == "agentloop.claim"]
    assert any(s["parent"] == c["span_id"] for c in claims for s in spans.values()), (
        "no SQL span under a claim"
    )
