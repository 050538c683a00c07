"""The promises of issue 8, each with the fault that broke it, over real PostgreSQL
(only the queue boundary is replaced): a publish error after a commit, a guard on
every internal failure, one lock order, claimed nudges, hostile bytes, rejected
calls proposed again, validation of empty args, lenient stored config, budgets."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import func, select, text, update

from app.engine.actions import LlmUsage, PlanProduced
from app.engine.models import PlannedStep, RunStatus, StepStatus, ToolPolicy
from app.engine.routing import WorkKind
from app.errors import NotFound
from app.service import Conflict, InvalidInput
from app.store.repo import DatabaseClock, Store, make_engine
from app.store.schema import runs
from app.tools.registry import ToolRegistry
from tests.support.fixtures import Harness, RecordingDispatcher, make_harness, steps, wait_until
from tests.support.private_services import PrivatePostgres


def run_row(harness: Harness, run_id: str):
    with harness.service.store.transaction() as tx:
        return tx.get_run(run_id)


def messages(harness: Harness, run_id: str) -> list[str]:
    return [e.message for e in harness.service.status(run_id).events]


class BrokenBroker(RecordingDispatcher):
    """A broker that refuses the next `failures` publishes, as kombu does when Redis
    goes away after the database committed."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def enqueue(self, run_id: str, tick: int, delay: float, kind: WorkKind) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise BrokerError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        super().enqueue(run_id, tick, delay, kind)


# --- 2. after a commit, nothing fails the run --------------------------------------------


def test_a_publish_error_after_the_commit_leaves_a_healthy_run_to_the_sweep(
    private_store: Store, tmp_path: Path
):
    harness = make_harness(private_store, tmp_path)  # the sweep sees only this run
    harness.planner.script = [steps("noop", "noop")]
    broker = BrokenBroker(failures=1)
    harness.service.dispatcher = broker
    harness.dispatcher = broker
    run_id = harness.service.create_run("publish fails")  # its first publish is lost
    assert broker.sent == [] and run_row(harness, run_id).status == RunStatus.QUEUED
    harness.clock.advance(5)
    assert harness.service.sweep() == 1
    harness.step()  # plan: its publish fails too, after the commit
    broker.failures = 1
    harness.step()  # the first step
    row = run_row(harness, run_id)
    assert row.status == RunStatus.RUNNING and row.error is None
    assert broker.sent == []
    harness.clock.advance(5)
    assert harness.service.sweep() == 1
    harness.drain()
    assert run_row(harness, run_id).status == RunStatus.COMPLETED


def test_a_create_retried_with_its_idempotency_key_returns_the_same_run(
    harness: Harness, store: Store
):
    first = harness.service.create_run("noop chain", created_by="ann", idempotency_key="k-1")
    again = harness.service.create_run("noop chain", created_by="ann", idempotency_key="k-1")
    assert again == first
    # Someone else's key is their own; a new request with a used key is refused.
    other = harness.service.create_run("noop chain", created_by="bob", idempotency_key="k-1")
    assert other != first
    with pytest.raises(Conflict, match="already used for a different request"):
        harness.service.create_run("another task", created_by="ann", idempotency_key="k-1")
    with store.transaction() as tx:
        count = tx.conn.execute(
            select(func.count()).select_from(runs).where(runs.c.id.in_([first, other]))
        ).scalar_one()
    assert count == 2


def test_a_replayed_create_nudges_a_run_whose_first_publish_was_lost(harness: Harness):
    broker = BrokenBroker(failures=1)
    harness.service.dispatcher = broker
    run_id = harness.service.create_run("noop chain", created_by="ann", idempotency_key="k-2")
    assert broker.sent == []
    assert harness.service.create_run("noop chain", created_by="ann", idempotency_key="k-2") == (
        run_id
    )
    assert broker.sent == [(run_id, 0, 0)]


def test_concurrent_creates_with_one_key_make_one_run(store: Store, tmp_path: Path):
    harnesses = [make_harness(store, tmp_path, worker_id=f"web{i}") for i in range(4)]
    barrier = threading.Barrier(len(harnesses))
    made: list[str] = []

    def create(h: Harness) -> None:
        barrier.wait()
        made.append(h.service.create_run("noop chain", created_by="ci", idempotency_key="k-3"))

    threads = [threading.Thread(target=create, args=(h,)) for h in harnesses]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 4 and len(set(made)) == 1


# --- 3. an internal error fails only a run this worker may still write ---------------------


class RegistryThatBreaks(ToolRegistry):
    """A registry whose next lookup of tool policies runs `meanwhile`, then raises:
    a bug in this worker at the worst moment."""

    def __init__(self, tools: ToolRegistry, meanwhile: Callable[[], None]) -> None:
        super().__init__(tools)
        self.meanwhile: Callable[[], None] | None = meanwhile

    def policies(self) -> Mapping[str, ToolPolicy]:
        if self.meanwhile is not None:
            meanwhile, self.meanwhile = self.meanwhile, None
            meanwhile()
            raise RuntimeError("a bug in this worker")
        return super().policies()


def test_an_internal_error_does_not_fail_a_run_another_worker_holds(store: Store, tmp_path: Path):
    """Worker A reads the run; worker B claims it and starts a tool; A hits a bug.
    A must not fail the run under B (whose tool's result would be thrown away)."""
    a = make_harness(store, tmp_path, worker_id="a")
    b = make_harness(store, tmp_path, worker_id="b")
    a.planner.script = [
        PlanProduced(steps=[PlannedStep(description="hold", tool="idem_effect", args={"hold": 30})])
    ]
    run_id = a.service.create_run("B holds the lease while A fails")
    a.step()  # plan
    _, tick, _ = a.dispatcher.pop()
    workspace = tmp_path / "workspaces" / run_id
    holder = threading.Thread(target=b.service.advance, args=(run_id, tick))

    def b_claims_and_starts_the_tool() -> None:
        holder.start()
        wait_until(lambda: (workspace / "effects.log").exists(), what="B's tool to start")

    a.service.tools = RegistryThatBreaks(a.service.tools, b_claims_and_starts_the_tool)
    try:
        with pytest.raises(RuntimeError, match="a bug in this worker"):
            a.service.advance(run_id, tick)
        assert run_row(a, run_id).status == RunStatus.RUNNING
    finally:
        (workspace / "release").touch()
        holder.join()
    assert run_row(a, run_id).status == RunStatus.RUNNING
    assert b.service.status(run_id).steps[0].status == StepStatus.COMPLETED


def test_an_internal_error_of_the_lease_holder_fails_the_run_with_the_reason(
    harness: Harness,
):
    harness.planner.script = [steps("noop")]
    run_id = harness.service.create_run("a bug")
    harness.service.tools = RegistryThatBreaks(harness.service.tools, lambda: None)
    with pytest.raises(RuntimeError):
        harness.step()
    row = run_row(harness, run_id)
    assert row.status == RunStatus.FAILED
    assert row.error == "internal error: RuntimeError: a bug in this worker"
    assert ("failed", run_id) in harness.notifier.sent


def test_an_internal_error_after_the_claim_but_before_the_slow_work_fails_the_run(
    harness: Harness,
):
    """The claim has committed (the tick moved on): the failure is recorded under the
    lease, not dropped as if another worker held the run."""

    class SpecsThatBreak(ToolRegistry):
        def specs(self) -> list[dict[str, Any]]:
            raise RuntimeError("a bug while telling the planner about the tools")

    harness.service.tools = SpecsThatBreak(harness.service.tools)
    run_id = harness.service.create_run("plan")
    with pytest.raises(RuntimeError):
        harness.step()
    row = run_row(harness, run_id)
    assert row.status == RunStatus.FAILED and row.lease_owner is None
    assert "a bug while telling the planner" in (row.error or "")


# --- 4. one lock order: the run row first ---------------------------------------------


def test_cancel_approve_and_expire_racing_never_deadlock(store: Store, tmp_path: Path):
    """decide and expire locked the approval then the run; cancel the run then the
    approvals: "deadlock detected" (a 500 on the page). Race all three, many times."""
    setup = make_harness(store, tmp_path)
    racers = [make_harness(store, tmp_path, worker_id=f"racer{i}") for i in range(3)]
    run_ids = []
    for _ in range(150):
        setup.planner.script = [
            PlanProduced(
                steps=[PlannedStep(description="ship", tool="deploy", args={"env": "staging"})]
            )
        ]
        run_ids.append(setup.service.create_run("ship it"))
        setup.drain(limit=2)
    unexpected: list[BaseException] = []

    def race(run_id: str) -> None:
        barrier = threading.Barrier(3)

        def attempt(action: Callable[[], Any]) -> None:
            barrier.wait()
            try:
                action()
            except Conflict:
                pass  # someone else decided first: the expected loser's answer
            except BaseException as exc:
                unexpected.append(exc)

        cancel, approve, expire = racers
        threads = [
            threading.Thread(target=attempt, args=(lambda: cancel.service.cancel(run_id, by="c"),)),
            threading.Thread(
                target=attempt, args=(lambda: approve.service.approve(run_id, by="a"),)
            ),
            threading.Thread(
                target=attempt,
                args=(lambda: expire.service._expire(pending(run_id), ttl=0, policy="reject"),),
            ),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def pending(run_id: str) -> str:
        with store.transaction() as tx:
            row = tx.conn.execute(
                text("SELECT id FROM approvals WHERE run_id = :r"), {"r": run_id}
            ).first()
        assert row is not None
        return str(row.id)

    for run_id in run_ids:
        race(run_id)
    assert unexpected == []
    with store.transaction() as tx:
        left = tx.conn.execute(
            text("SELECT count(*) FROM approvals WHERE status = 'pending' AND run_id = ANY(:ids)"),
            {"ids": run_ids},
        ).scalar_one()
    assert left == 0


# --- 5. time that decides ownership is the database's ----------------------------------------


def test_the_database_clock_follows_the_server_not_this_process(store: Store):
    clock = DatabaseClock(store)
    with store.transaction() as tx:
        before = tx.conn.execute(select(func.clock_timestamp())).scalar_one()
    reading = clock()
    with store.transaction() as tx:
        after = tx.conn.execute(select(func.clock_timestamp())).scalar_one()
    # Within the round trips' uncertainty of the server's clock (this process's clock
    # is not skewed here: tests/chaos/test_workers.py skews a worker's by ±60 s).
    slack = timedelta(milliseconds=250)
    assert before - slack <= reading <= after + slack
    assert clock() >= reading  # carried forward, never backwards


# --- 6. the sweep claims its nudges ------------------------------------------------------


def test_the_sweep_keeps_one_nudge_outstanding_per_run(private_store: Store, tmp_path: Path):
    """It re-published every overdue run each interval: 25,854 messages for ~1,200
    useful ones. Now a run has at most one nudge until a claim consumes it. (A
    database of its own: other tests' runs would be overdue too.)"""
    harness = make_harness(private_store, tmp_path)
    harness.planner.script = [steps("noop")] * 3
    lost = [harness.service.create_run(f"lost {i}") for i in range(3)]

    def nudged() -> list[str]:
        return sorted(r for r, _, _ in harness.dispatcher.sent if r in lost)

    harness.dispatcher.sent.clear()  # the broker lost them
    harness.clock.advance(5)
    harness.service.sweep()
    assert nudged() == sorted(lost)
    for _ in range(5):  # however often the sweep runs, nothing more is queued for them
        harness.clock.advance(5)
        harness.service.sweep()
    assert nudged() == sorted(lost)
    harness.dispatcher.sent = [m for m in harness.dispatcher.sent if m[0] in lost]
    advanced, _, _ = harness.step()  # a nudge is consumed: that run goes on normally
    assert nudged() == sorted(lost)
    # The broker loses what it held (a restart): fewer messages queued than nudges
    # outstanding, so those nudges are taken for lost and sent again at once.
    harness.dispatcher.sent.clear()
    harness.clock.advance(5)
    harness.service.sweep()
    assert set(lost) - {advanced} <= set(nudged())


def test_a_nudge_that_waits_past_its_timeout_is_sent_again(private_store: Store, tmp_path: Path):
    harness = make_harness(private_store, tmp_path)
    harness.planner.script = [steps("noop")]
    run_id = harness.service.create_run("lost twice")
    harness.dispatcher.sent.clear()
    harness.clock.advance(5)
    harness.service.sweep()
    assert [r for r, _, _ in harness.dispatcher.sent].count(run_id) == 1
    # Many messages queued (the nudge may still be among them), but not for ever:
    harness.dispatcher.sent += [("other", 0, 0)] * 10_000
    harness.clock.advance(5)
    harness.service.sweep()
    assert [r for r, _, _ in harness.dispatcher.sent].count(run_id) == 1
    harness.clock.advance(harness.service.nudge_timeout)
    harness.service.sweep()
    assert [r for r, _, _ in harness.dispatcher.sent].count(run_id) == 2


# --- 11. bytes the database cannot hold ------------------------------------------------


@pytest.mark.parametrize(
    ("task", "config", "message"),
    [
        ("deploy\x00 now", None, "the task contains a NUL character"),
        ("deploy \ud800", None, "the task contains a lone surrogate"),
        ("ok", {"budget_usd": float("inf")}, "budget_usd"),
        ("ok", {"budget_usd": float("nan")}, "budget_usd"),
        ("ok", {"runbook": "a\x00b"}, "config.runbook: contains a NUL character"),
        ("ok", {"approvers": ["ann\udfff"]}, "contains a lone surrogate"),
    ],
)
def test_hostile_bytes_from_a_person_are_refused_with_a_message(
    harness: Harness, task: str, config: dict[str, Any] | None, message: str
):
    with pytest.raises(InvalidInput, match=message):
        harness.service.create_run(task, config=config)


def test_hostile_bytes_in_a_decision_are_refused(harness: Harness):
    harness.planner.script = [
        PlanProduced(
            steps=[PlannedStep(description="ship", tool="deploy", args={"env": "staging"})]
        )
    ]
    run_id = harness.service.create_run("ship it")
    harness.drain(limit=2)
    with pytest.raises(InvalidInput, match="NUL"):
        harness.service.reject(run_id, by="ann", reason="no\x00")
    with pytest.raises(InvalidInput, match="lone surrogate"):
        harness.service.approve(run_id, by="ann", comment="\udc80")
    with pytest.raises(NotFound):
        harness.service.approve(run_id, by="ann", approval_id="a\x00")
    with pytest.raises(NotFound):
        harness.service.cancel("r\x00", by="ann")
    assert run_row(harness, run_id).status == RunStatus.PAUSED


def test_hostile_bytes_from_a_model_and_a_tool_are_kept_harmlessly(harness: Harness):
    harness.planner.script = [
        PlanProduced(
            steps=[
                # (pydantic itself refuses a lone surrogate in a str field; args are JSON)
                PlannedStep(
                    description="print odd bytes\x00",
                    tool="shell",
                    args={"argv": ["printf", "a\\000b"], "cwd": ".", "timeout": None},
                ),
                PlannedStep(description="note", tool="set_env", args={"name": "X", "value": "ok"}),
            ],
            reasoning="why\x00not",
            usage=[LlmUsage(model="m", input_tokens=1, output_tokens=1)],
        )
    ]
    harness.service.tools.declare_safe("shell", [("argv", ("printf",))])
    run_id = harness.service.create_run("odd bytes", config={"approval_required": []})
    harness.drain()
    view = harness.service.status(run_id)
    assert view.run.status == RunStatus.COMPLETED, view.run.error
    assert view.steps[0].description == "print odd bytes\ufffd"
    assert view.steps[0].result["output"] == "a\ufffdb"
    plan = next(e for e in view.events if e.kind == "plan")
    assert plan.data["reasoning"] == "why\ufffdnot"


# --- 12, 13. plans that must not pass ---------------------------------------------------


def test_a_rejected_call_proposed_again_is_an_invalid_plan(harness: Harness):
    """The person was asked four times about the same rejected deploy."""
    deploy = PlannedStep(description="ship", tool="deploy", args={"env": "staging"})
    harness.planner.script = [
        PlanProduced(steps=[deploy]),
        PlanProduced(steps=[deploy.model_copy(update={"description": "ship, again"})]),
        steps("noop"),
    ]
    run_id = harness.service.create_run("ship it")
    harness.drain(limit=2)
    harness.service.reject(run_id, by="ann", reason="not on a friday")
    harness.drain()
    view = harness.service.status(run_id)
    assert view.run.status == RunStatus.COMPLETED
    approvals = [m for m in messages(harness, run_id) if m.startswith("paused for a person")]
    assert len(approvals) == 1
    assert any(
        "repeats the call of step 1, which was rejected by ann: not on a friday" in m
        for m in messages(harness, run_id)
    )
    # The planner is told what was rejected, so it can avoid it.
    assert [r.tool for r in harness.planner.requests[-1].rejected] == ["deploy"]


def test_empty_args_are_validated_like_any_others(harness: Harness):
    """A person was asked to approve `delete {}`."""
    problems = harness.service.check_plan([PlannedStep(description="rm", tool="delete")])
    assert problems and "path" in problems[0]


def test_args_with_a_reference_are_validated_except_where_the_reference_is(harness: Harness):
    check = harness.service.check_plan
    ok = PlannedStep(description="e", tool="idem_effect", args={"hold": "${steps.1.result.n}"})
    assert check([ok]) == []
    bad = PlannedStep(
        description="e", tool="http_request", args={"url": "${steps.1.result.u}", "method": "PUSH"}
    )
    found = check([bad])
    assert len(found) == 1 and "method" in found[0] and "url" not in found[0]


# --- 15. budgets --------------------------------------------------------------------------


def test_the_planner_is_told_what_the_budget_has_left(harness: Harness, store: Store):
    harness.planner.script = [
        PlanProduced(
            steps=[PlannedStep(description="n", tool="noop")],
            usage=[LlmUsage(model="m", input_tokens=600, output_tokens=100, cost_usd=0.25)],
        )
    ]
    harness.service.create_run("spend", config={"budget_tokens": 1000, "budget_usd": 1.0})
    harness.drain()
    first, verify = harness.planner.requests
    assert (first.tokens_left, first.usd_left) == (1000, 1.0)
    assert (verify.tokens_left, verify.usd_left) == (300, 0.75)


def test_what_a_discarded_planner_call_spent_still_counts(store: Store, tmp_path: Path):
    harness = make_harness(store, tmp_path)
    usage = LlmUsage(model="m", input_tokens=500, output_tokens=200, cost_usd=0.5)

    class CancelledMeanwhile:
        name = "scripted"

        def plan(self, request, *, check):
            harness.service.cancel(request.run_id, by="ann")
            return PlanProduced(steps=[PlannedStep(description="n", tool="noop")], usage=[usage])

    harness.service.planners = lambda kind: CancelledMeanwhile()
    run_id = harness.service.create_run("cancelled while planning")
    harness.step()
    row = run_row(harness, run_id)
    assert row.status == RunStatus.CANCELLED
    assert (row.tokens_total, row.cost_usd) == (700, 0.5)
    assert any(m.startswith("result of iteration 1 discarded") for m in messages(harness, run_id))


# --- 16. stored config is read leniently ---------------------------------------------------


def test_a_stored_config_with_a_field_a_release_dropped_still_runs(harness: Harness, store: Store):
    harness.planner.script = [steps("noop")]
    run_id = harness.service.create_run("an old run")
    with store.transaction() as tx:
        config = dict(tx.get_run(run_id).config)
        config["temperature"] = 0.7  # a field this release no longer has
        config["retry_policy"] = {**config["retry_policy"], "strategy": "old"}
        config["max_iterations"] = -5  # a value this release no longer accepts
        tx.conn.execute(update(runs).where(runs.c.id == run_id).values(config=config))
    harness.drain()
    assert run_row(harness, run_id).status == RunStatus.COMPLETED


# --- 7, 9. a database restart costs nobody a decision, nor a request ---------------------


@pytest.fixture
def private_store(private_postgres: PrivatePostgres) -> Iterator[Store]:
    """A store on a PostgreSQL of this suite's own, which a test may stop and restart."""
    private_postgres.ensure_running()
    store = Store(make_engine(private_postgres.create_database()))
    yield store
    private_postgres.ensure_running()
    store.dispose()


def test_the_outcome_save_waits_for_the_database_while_the_lease_holds(
    private_store: Store, private_postgres: PrivatePostgres, tmp_path: Path
):
    """The database goes away while a non-idempotent tool runs. The worker keeps the
    outcome and saves it once the database is back: the step is completed, not
    paused later as `outcome unknown` (14 of 14 such pauses had applied their effect)."""
    harness = make_harness(private_store, tmp_path)
    harness.planner.script = [steps("effect")]
    run_id = harness.service.create_run("a blip", config={"approval_required": []})
    harness.step()  # plan
    restarted = threading.Event()
    run_the_tool = harness.service._execute

    def tool_then_database_away(*args: Any) -> Any:
        outcome = run_the_tool(*args)
        private_postgres.stop("fast")
        threading.Thread(target=lambda: (private_postgres.start(), restarted.set())).start()
        return outcome

    def wait(seconds: float) -> None:  # real waiting; the lease's clock moves as much
        time.sleep(seconds)
        harness.clock.advance(seconds)

    harness.service._execute = tool_then_database_away  # type: ignore[method-assign]
    harness.service.sleep = wait
    harness.step()
    assert restarted.is_set()
    view = harness.service.status(run_id)
    assert view.steps[0].status == StepStatus.COMPLETED
    assert view.run.status == RunStatus.RUNNING and not view.run.lease_owner
    effects = (tmp_path / "workspaces" / run_id / "effects.log").read_text().splitlines()
    assert sum(line.startswith("effect") for line in effects) == 1


@pytest.mark.parametrize("mode", ["fast", "immediate"])  # a clean restart, a crash
def test_the_first_request_after_a_database_restart_succeeds(
    mode: str, private_store: Store, private_postgres: PrivatePostgres, tmp_path: Path
):
    """Pooled connections closed by a restart failed the first create after it."""
    harness = make_harness(private_store, tmp_path)
    harness.service.create_run("before the restart")  # the pool now holds connections
    private_postgres.restart(mode)
    run_id = harness.service.create_run("after the restart")
    assert run_row(harness, run_id).status == RunStatus.QUEUED


def test_an_approval_that_cannot_be_expired_does_not_keep_the_others_waiting(
    private_store: Store, tmp_path: Path
):
    """The beat's expiry met a pending approval of a step that is gone and raised,
    every minute, expiring nothing at all."""
    harness = make_harness(private_store, tmp_path)
    harness.planner.script = [
        PlanProduced(steps=[PlannedStep(description="rm", tool="delete", args={"path": "x"})])
    ]
    broken = harness.service.create_run("broken", config={"approval_required": ["delete"]})
    harness.drain(limit=2)
    with private_store.transaction() as tx:  # the first run's approval names no real step
        tx.conn.execute(text("UPDATE approvals SET step_id = 0 WHERE run_id = :r"), {"r": broken})
        tx.conn.execute(text("UPDATE approvals SET created_at = created_at - interval '1 day'"))
    assert harness.service.expire_approvals(ttl=60, policy="reject") == 0
    harness.planner.script = [
        PlanProduced(steps=[PlannedStep(description="rm", tool="delete", args={"path": "y"})])
    ]
    fine = harness.service.create_run("fine", config={"approval_required": ["delete"]})
    harness.drain(limit=2)
    harness.clock.advance(120)
    assert harness.service.expire_approvals(ttl=60, policy="reject") == 1
    assert run_row(harness, fine).status == RunStatus.RUNNING
