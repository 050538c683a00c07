"""Schemathesis against the live app's /api/openapi.json, in process (WSGI), as an
approver and as a viewer: every phase the CLI runs (examples, coverage, fuzzing,
stateful, following the document's links), every check, a bounded number of
examples; zero failures.

The same as `schemathesis run --checks all --max-examples 25 --phases
examples,coverage,fuzzing,stateful -H "Authorization: Bearer TOKEN"
http://HOST/api/openapi.json` against a running server, with one setting the
document explains: a 422 (the request fits the document, the service refuses
what it says: an unknown tool, an approver no user answers to, edited args the
waiting tool does not take) counts as an answer to valid data.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, events
from schemathesis.engine import from_schema as engine_for
from werkzeug.serving import WSGIRequestHandler, make_server

from app.store.accounts import Accounts, Role, User
from app.web import create_app
from tests.support.fixtures import Harness, steps
from tests.support.web import free_port

MAX_EXAMPLES = 10
# Valid data may be refused for what it says (422), never for its shape (400).
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "422", "429"]


def seed(harness: Harness) -> dict[str, str]:
    """Runs in every state the path operations care about."""
    harness.planner.script = [steps("noop")]
    paused = harness.service.create_run("contract paused", config={"approval_required": ["noop"]})
    harness.drain()
    harness.planner.script = [steps("noop")]
    completed = harness.service.create_run("contract completed")
    harness.drain()
    harness.planner.script = [steps("noop", "noop")]
    running = harness.service.create_run("contract running")
    harness.step()  # planned; the next message stays in the queue
    queued = harness.service.create_run("contract queued")
    return {"paused": paused, "completed": completed, "running": running, "queued": queued}


def run_schemathesis(
    url: str, token: str, *, run_id: str | None = None, examples: int = MAX_EXAMPLES
) -> tuple[int, list[str]]:
    """(cases executed, failures) of one schemathesis run against the app at `url`."""
    config: dict[str, Any] = {
        "headers": {"Authorization": f"Bearer {token}"},
        "seed": 9,
        "workers": 1,
        "generation": {"max-examples": examples},
        "checks": {"positive_data_acceptance": {"expected-statuses": ACCEPTED}},
        "phases": {"stateful": {"max-steps": 20}},
    }
    if run_id is not None:
        # Every path operation on this one run (no stateful phase: it makes its own).
        config["parameters"] = {"path.run_id": run_id}
        config["phases"] = {"stateful": {"enabled": False}}
    schema = schemathesis.openapi.from_url(
        f"{url}/api/openapi.json", config=SchemathesisConfig.from_dict(config)
    )
    cases, failures = 0, []
    for event in engine_for(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            cases += len(event.recorder.cases)
            for case_id, checks in event.recorder.checks.items():
                for check in checks:
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        failures.append(_explain(event.recorder, case_id, check))
        elif isinstance(event, events.NonFatalError):
            failures.append(f"error in {event.label}: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            failures.append(f"fatal: {event.exception!r}")
    return cases, failures


def _explain(recorder: Any, case_id: str, check: Any) -> str:
    failure = check.failure_info.failure
    interaction = recorder.interactions.get(case_id)
    sent = ""
    if interaction is not None:
        request = interaction.request
        status = interaction.response.status_code if interaction.response else None
        body = (request.body or b"")[:300]
        answer = interaction.response.content[:300] if interaction.response else b""
        sent = f" — {request.method} {request.uri} {body!r} -> {status} {answer!r}"
    return f"{check.name}: {failure.title}: {failure.message[:300]}{sent}"


class Quiet(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


@pytest.fixture
def contract_url(harness: Harness) -> Iterator[str]:
    """The app over HTTP on a free loopback port, its service the in-process harness."""
    # Rate limits off: a run sends hundreds of requests a minute with one token.
    app = create_app(
        {"TESTING": True, "AGENTLOOP_SERVICE": harness.service, "RATELIMIT_ENABLED": False}
    )
    port = free_port()
    server = make_server("127.0.0.1", port, app, threaded=False, request_handler=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("role", [Role.APPROVER, Role.VIEWER])
def test_schemathesis_finds_nothing(
    role: Role,
    contract_url: str,
    harness: Harness,
    accounts: Accounts,
    make_user: Callable[..., User],
) -> None:
    runs = seed(harness)
    person = make_user(f"contract-{role}", role=role)
    token = accounts.issue_token(person.id, label="schemathesis")
    seen: Counter[str] = Counter()
    cases, failures = run_schemathesis(contract_url, token)
    seen["random ids"] = cases
    # The path operations on real runs too: one that waits for a decision.
    cases, more = run_schemathesis(contract_url, token, run_id=runs["paused"], examples=5)
    seen["a paused run"] = cases
    failures += more
    print(f"schemathesis as {role}: {dict(seen)} cases")
    assert not failures, "\n".join(sorted(set(failures)))
    assert sum(seen.values()) >= 100
