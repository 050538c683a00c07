"""The chaos suite's fixtures: private PostgreSQL and Redis, workers over them, and
a `case` that checks the invariants (tests/chaos/invariants.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.chaos.invariants import REPORT, SUMMARIES, Case, one_line
from tests.support.private_services import (  # noqa: F401  (fixtures)
    ChaosEnv,
    chaos_client,
    chaos_env,
    chaos_service,
    private_postgres,
    private_redis,
    start_chaos_worker,
)


@pytest.fixture
def case(
    request: pytest.FixtureRequest,
    chaos_env: ChaosEnv,  # noqa: F811
    chaos_service: Any,  # noqa: F811
) -> Iterator[Case]:
    chaos = Case(name=request.node.name, env=chaos_env, service=chaos_service)
    yield chaos
    chaos.close()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not SUMMARIES:
        return
    terminalreporter.section("chaos: counts per case")
    for summary in SUMMARIES:
        terminalreporter.write_line(one_line(summary))
    terminalreporter.write_line(f"(details, with evidence: {REPORT})")
