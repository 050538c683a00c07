"""A tool that overruns its timeout (1 s; it holds 3 s on its first start), for an
idempotent and a non-idempotent tool. A non-idempotent tool whose effect is
ambiguous must not start again unless a person says `retry`."""

from __future__ import annotations

import pytest

from tests.chaos.invariants import Case, trials

pytestmark = pytest.mark.chaos


def test_tool_timeout_overrun(case: Case, start_chaos_worker) -> None:
    start_chaos_worker(concurrency=2)
    for _ in range(trials()):
        for tool in ("count_short", "idem_count_short"):
            case.create(f"chaos one {tool} holding 3000ms", retry_policy={"base": 0.2})
            case.fault(f"{tool} overruns")
    case.settle(timeout=60 + 10 * trials())
    case.check()
