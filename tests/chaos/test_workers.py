"""Two workers, both running beat (two sweepers), on a mix of chains and guarded
runs; and one worker whose clock is 60 s ahead or behind (libfaketime).

Promises: leases and due times are judged by one clock (the database's), so a
skewed worker never steals a live lease nor stalls a run."""

from __future__ import annotations

import pytest

from tests.chaos.invariants import Case, trials

pytestmark = pytest.mark.chaos


def test_two_workers_two_sweepers(case: Case, start_chaos_worker) -> None:
    start_chaos_worker(name="a", beat=True)
    start_chaos_worker(name="b", beat=True)
    for _ in range(trials()):
        for _ in range(20):
            case.create("chaos chain")
        for _ in range(3):
            case.create("chaos guarded")
        case.create("chaos one count holding 1500ms")
    case.fault("second worker with its own beat")
    case.settle(timeout=90 + 20 * trials())
    case.check(healthy=True)


@pytest.mark.parametrize("offset", ["+60s", "-60s"])
def test_one_worker_clock_skewed(offset: str, case: Case, start_chaos_worker) -> None:
    start_chaos_worker(name="straight", beat=True)
    start_chaos_worker(name="skewed", beat=True, clock_offset=offset)
    case.fault(f"worker clock {offset}")
    for _ in range(trials()):
        for tool in ("count", "idem_count", "count", "idem_count"):
            case.create(f"chaos one {tool} holding 2000ms")
        for _ in range(6):
            case.create("chaos chain")
    case.settle(timeout=90 + 20 * trials())
    case.check(healthy=True)
