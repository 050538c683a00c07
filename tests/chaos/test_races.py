"""cancel x approve x expire, raced from the test process (as the web app, a
person and the beat would) on runs paused for approval.

Promises: exactly one of them wins, the losers are told so (Conflict), nothing
deadlocks, and the guarded step runs only if a person's approval won."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

import pytest

from tests.chaos.invariants import PERSON, Case, trials

pytestmark = pytest.mark.chaos

RUNS_PER_TRIAL = 30


def race(case: Case, requests: list[tuple[str, Callable[[], object]]]) -> None:
    barrier = threading.Barrier(len(requests))

    def go(what: str, request: Callable[[], object]) -> None:
        barrier.wait()
        time.sleep(random.random() * 0.02)  # so that each of them wins some races
        case.answer(what, request)

    threads = [threading.Thread(target=go, args=r) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def expire(service: object, approval_id: str, policy: str) -> Callable[[], object]:
    """The beat's expiry of this one approval (ttl 0): `expire_approvals` settles
    every overdue approval at once, which would leave the other runs nothing to race."""
    one = getattr(service, "_expire", None)
    if one is not None:
        return lambda: one(approval_id, ttl=0, policy=policy)
    return lambda: service.expire_approvals(ttl=0, policy=policy)  # type: ignore[attr-defined]


def test_cancel_approve_expire_races(case: Case, start_chaos_worker) -> None:
    start_chaos_worker(concurrency=2)
    service = case.service
    runs = [case.create("chaos guarded") for _ in range(RUNS_PER_TRIAL * trials())]
    case.settle(timeout=60 + 2 * len(runs), person=False)
    pending = {
        a.run_id: a.id
        for a in case.query(
            "SELECT id, run_id FROM approvals WHERE run_id IN :ids AND status = 'pending'"
        )
    }
    for i, run_id in enumerate(runs):
        policy = "reject" if i % 2 else "fail"
        race(
            case,
            [
                ("approve", lambda r=run_id: service.approve(r, by=PERSON)),
                ("cancel", lambda r=run_id: service.cancel(r, by=PERSON)),
                ("expire", expire(service, pending.get(run_id, ""), policy)),
            ],
        )
        case.fault("cancel x approve x expire")
    case.settle(timeout=60 + len(runs), person=False)
    case.check()
