"""The service over real PostgreSQL, driven message by message (only the queue
boundary is replaced): ticks, leases, approvals, cancel, sweep, bad input."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg2.extensions
import pytest
from sqlalchemy import event, select, text

from app.engine.actions import Execute, PlanProduced, StepSucceeded, Transition
from app.engine.apply import apply_transition
from app.engine.machine import begin_step, fold_step
from app.engine.models import Decision, PlannedStep, RunStatus, StepStatus
from app.errors import NotFound
from app.service import Conflict, InvalidInput
from app.store.repo import Guard, Store, Tx, snapshot_from_row
from app.store.schema import runs
from tests.support.fixtures import Harness, make_harness, steps, wait_until


def run_row(harness: Harness, run_id: str):
    with harness.service.store.transaction() as tx:
        return tx.get_run(run_id)


def kinds(harness: Harness, run_id: str) -> list[str]:
    return [e.kind for e in harness.service.status(run_id).events]


def test_a_run_goes_from_plan_to_report(harness: Harness):
    harness.planner.script = [steps("noop", "noop")]
    run_id = harness.service.create_run("do two things")
    assert harness.drain() == 4  # plan, two steps, verify
    view = harness.service.status(run_id)
    assert view.run.status == RunStatus.COMPLETED
    assert view.run.report == "# scripted report"
    assert [s.status for s in view.steps] == [StepStatus.COMPLETED] * 2
    assert kinds(harness, run_id).count("observation") == 2


def test_a_duplicate_message_is_a_no_op(harness: Harness):
    harness.planner.script = [steps("noop")]
    run_id = harness.service.create_run("once")
    harness.step()  # plan
    message = harness.dispatcher.sent[0]
    harness.step()  # the step runs
    before = run_row(harness, run_id)
    again = harness.service.advance(message[0], message[1])  # the same message again
    assert again.startswith("stale message"), again
    after = run_row(harness, run_id)
    assert (after.iteration, after.tick) == (before.iteration, before.tick)


def test_a_stale_tick_is_a_no_op(harness: Harness):
    run_id = harness.service.create_run("stale")
    assert harness.service.advance(run_id, 99).startswith("stale message")
    assert run_row(harness, run_id).iteration == 0
    assert harness.dispatcher.sent == [(run_id, 0, 0)]


def test_an_early_message_is_published_again_for_the_rest_of_its_wait(harness: Harness):
    harness.planner.script = [steps("flaky")]
    run_id = harness.service.create_run("wait")
    harness.step()  # plan
    harness.step()  # flaky fails once: retry after the backoff
    _, tick, delay = harness.dispatcher.pop()
    assert delay == 2.0  # base 2 s, no jitter in this harness
    harness.clock.advance(0.5)
    harness.service.advance(run_id, tick)  # arrives 1.5 s early
    assert harness.dispatcher.sent == [(run_id, tick, 1.5)]
    assert run_row(harness, run_id).iteration == 2


def test_two_workers_never_advance_one_run_at_once(store, tmp_path: Path):
    first = make_harness(store, tmp_path, worker_id="first")
    second = make_harness(store, tmp_path, worker_id="second")
    first.planner.script = [
        PlanProduced(steps=[PlannedStep(description="hold", tool="idem_effect", args={"hold": 30})])
    ]
    run_id = first.service.create_run("hold the lease")
    first.step()  # plan
    message = first.dispatcher.pop()
    holder = threading.Thread(target=first.service.advance, args=message[:2])
    holder.start()
    ws = tmp_path / "workspaces" / run_id
    try:
        for _ in range(200):
            if (ws / "effects.log").exists():
                break
            threading.Event().wait(0.05)
        # The same message delivered to another worker while the first holds the lease.
        second.service.advance(*message[:2])
        # A message for the new tick, before the lease expires, is refused too.
        second.service.advance(run_id, message[1] + 1)
    finally:
        (ws / "release").touch()
        holder.join()
    log = (ws / "effects.log").read_text().splitlines()
    assert sum(line.startswith("start") for line in log) == 1
    assert run_row(first, run_id).iteration == 2


def test_a_claim_over_a_lapsed_lease_gives_way_when_the_holder_saves_meanwhile(
    store: Store, tmp_path: Path
):
    """The holder of a lapsed lease saves its result just after another worker read
    the run: that worker's claim must fail, not act on what it read (the effect
    would look interrupted, and the run would pause for nothing)."""
    first = make_harness(store, tmp_path, worker_id="first")
    second = make_harness(store, tmp_path, worker_id="second")
    first.planner.script = [steps("effect", "noop")]
    run_id = first.service.create_run("a slow effect")
    first.step()  # plan
    now, lease = first.clock(), first.clock() + timedelta(seconds=1)
    stored = store.read_for_claim(run_id)  # the first worker claims and starts the effect
    assert stored is not None
    run = stored.as_claimed()
    began = begin_step(run, Execute(step_id=run.steps[0].id))
    claim = Guard.claim("first", stored.row)
    assert store.apply(run, began, guard=claim, now=now, next_run_at=None, lease_until=lease)
    run = apply_transition(run, began)
    done = fold_step(
        run, run.steps[0], StepSucceeded(result={"ok": True}), policy=None, jitter_sample=0.0
    )
    second.clock.advance(60)  # the lease has lapsed when the second worker gets a message
    with store.transaction() as tx:
        holder = Guard(owner="first", tick=run.tick)
        assert tx.apply(run, done, guard=holder, now=now, next_run_at=now) is not None
        claimer = threading.Thread(target=second.service.advance, args=(run_id, run.tick))
        claimer.start()
        wait_until(lambda: lock_waiters(store), what="the claim to wait for the row lock")
    claimer.join()
    view = second.service.status(run_id)
    assert view.run.status == RunStatus.RUNNING
    assert [s.status for s in view.steps] == [StepStatus.COMPLETED, StepStatus.PENDING]
    assert view.steps[0].result == {"ok": True}
    assert second.dispatcher.sent == []
    second.service.advance(run_id, run.tick)  # the message the first worker publishes
    assert [s.status for s in second.service.status(run_id).steps] == [StepStatus.COMPLETED] * 2


def test_every_new_connection_prepares_the_hot_statements_again(harness: Harness, store):
    """PostgreSQL keeps prepared statements per connection: a connection that
    replaces one (a restart, a recycled pool) prepares its own."""
    harness.planner.script = [steps("noop", "noop")]
    run_id = harness.service.create_run("two connections")
    harness.step()  # plan
    harness.step()  # the first step, on the pool's connection
    store.dispose()  # the next iteration gets new connections
    assert harness.drain() == 2
    assert run_row(harness, run_id).status == RunStatus.COMPLETED


def test_only_a_step_that_must_not_run_twice_waits_for_the_disk_before_it_runs(
    harness: Harness, store
):
    """Marking a step begun is committed durably (synchronous_commit on) only when a
    lost commit could run it twice; outcomes are always durable."""
    harness.planner.script = [steps("noop", "effect")]
    run_id = harness.service.create_run("one of each")
    modes: list[tuple[str, str]] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        if "p_synchronous_commit" in parameters:
            kinds = [e["kind"] for e in json.loads(parameters["p_events"])]
            modes.append((kinds[0] if kinds else "-", parameters["p_synchronous_commit"]))

    for engine in store.engines:
        event.listen(engine, "before_cursor_execute", record)
    try:
        harness.drain(limit=3)  # plan, noop, effect
    finally:
        for engine in store.engines:
            event.remove(engine, "before_cursor_execute", record)
    assert modes == [
        ("-", "off"),  # the planner's lease: if lost, the planner is simply asked again
        ("plan", "on"),
        ("tool_call", "off"),  # noop is idempotent
        ("observation", "on"),
        ("tool_call", "on"),  # effect is not
        ("observation", "on"),
    ]
    with store.engine.connect() as conn, conn.begin() as transaction:
        tx = Tx(conn)
        run = snapshot_from_row(tx.get_run(run_id), [])
        tx.apply(run, Transition(), guard=Guard(), now=harness.clock(), next_run_at=None,
                 durable=False)  # fmt: skip
        assert conn.execute(text("SHOW synchronous_commit")).scalar_one() == "off"
        transaction.rollback()
    with store.transaction() as tx:  # the setting was the transaction's own
        assert tx.conn.execute(text("SHOW synchronous_commit")).scalar_one() == "on"


def lock_waiters(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
        )


def test_sql_statements_per_iteration_do_not_grow_with_the_run(harness: Harness, store):
    harness.planner.script = [steps("noop") for _ in range(600)]
    run_id = harness.service.create_run("long", config={"max_iterations": 2000})
    counts: dict[int, int] = {}
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    for engine in store.engines:
        event.listen(engine, "before_cursor_execute", count)
    try:
        iteration = 0
        while iteration < 1000:
            statements.clear()
            harness.step()
            iteration = run_row(harness, run_id).iteration
            counts[iteration] = len(statements) - 1  # less run_row's own SELECTs
    finally:
        for engine in store.engines:
            event.remove(engine, "before_cursor_execute", count)
    # Odd iterations plan, even ones execute a step: compare like with like.
    assert counts[10] == counts[1000], (counts[10], counts[1000])
    assert counts[11] == counts[999], (counts[11], counts[999])


def test_a_step_costs_three_round_trips_to_the_database(harness: Harness, store):
    """A no-op step's iteration sends PostgreSQL three statements (read, claim, save
    the outcome) and nothing else: handing out a pooled connection costs no round
    trip (pool_pre_ping cost one per checkout, three per iteration)."""
    harness.planner.script = [steps("noop", "noop", "noop")]
    harness.service.create_run("counted")
    harness.step()  # plan
    sent: list[str] = []  # what psycopg2 sends, pings included
    statements: list[str] = []  # what SQLAlchemy runs

    class Counting(psycopg2.extensions.cursor):
        def execute(self, query: Any, vars: Any = None) -> Any:
            sent.append(str(query))
            return super().execute(query, vars)

    def counting(dbapi_connection, _record):
        dbapi_connection.cursor_factory = Counting

    def count(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    store.dispose()  # connections made from now on count
    for engine in store.engines:
        event.listen(engine, "connect", counting)
        event.listen(engine, "before_cursor_execute", count)
    try:
        harness.step()  # the first step, on new connections: they prepare the hot statements
        first = len(statements)
        harness.step()  # the second step
    finally:
        for engine in store.engines:
            event.remove(engine, "connect", counting)
            event.remove(engine, "before_cursor_execute", count)
    assert len(sent) == len(statements), (sent, statements)
    assert len(statements) - first == 3, statements[first:]


def test_a_planner_iteration_reads_what_the_planner_is_told_in_four_statements(
    harness: Harness, store
):
    """Besides the claim (read, write) and the outcome, a planner iteration reads the
    plan, the recent events with their steps' positions, the events older than those
    (to fold into the summary), and the latest completed and rejected steps."""
    harness.planner.script = [steps("noop", "noop")]
    harness.service.create_run("counted plan")
    assert harness.drain(limit=3) == 3  # plan, two steps: the verify is next
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):
        if not statement.startswith("PREPARE"):  # once per connection, not per iteration
            statements.append(statement)

    for engine in store.engines:
        event.listen(engine, "before_cursor_execute", count)
    try:
        harness.step()  # the verify: a report, no new steps
    finally:
        for engine in store.engines:
            event.remove(engine, "before_cursor_execute", count)
    assert len(statements) == 2 + 4 + 1, statements


def test_a_planner_is_told_the_position_of_each_recent_events_step(harness: Harness):
    harness.planner.script = [steps("noop", "noop")]
    run_id = harness.service.create_run("positions")
    assert harness.drain() == 4  # plan, two steps, verify
    view = harness.service.status(run_id)
    position_of = {step.id: step.position for step in view.steps}
    told = harness.planner.requests[-1].recent_events
    assert {e.step_position for e in told} == {None, 1, 2}
    assert [e.step_position for e in told] == [
        None if e.step_id is None else position_of[e.step_id]
        for e in view.events
        if e.id in {t.id for t in told}
    ]


# --- people -------------------------------------------------------------------------


def paused_for_approval(harness: Harness) -> str:
    harness.planner.script = [
        PlanProduced(
            steps=[PlannedStep(description="ship", tool="deploy", args={"env": "staging"})]
        )
    ]
    run_id = harness.service.create_run("ship it")
    harness.drain(limit=2)
    assert run_row(harness, run_id).status == RunStatus.PAUSED
    return run_id


def test_approving_twice_says_already_decided_and_resumes_once(harness: Harness):
    run_id = paused_for_approval(harness)
    harness.service.approve(run_id, by="ann")
    assert len(harness.dispatcher.sent) == 1
    with pytest.raises(Conflict, match="not waiting for a decision"):
        harness.service.approve(run_id, by="bob")
    assert len(harness.dispatcher.sent) == 1


def test_a_decided_approval_cannot_be_decided_again_by_id(harness: Harness):
    run_id = paused_for_approval(harness)
    approval_id = harness.service.status(run_id).pending_approval.id
    harness.service.reject(run_id, by="ann", reason="not today", approval_id=approval_id)
    with pytest.raises(Conflict, match="already decided: reject by ann"):
        harness.service.approve(run_id, by="bob", approval_id=approval_id)


def test_concurrent_approvals_resume_the_run_exactly_once(store, tmp_path: Path):
    harness = make_harness(store, tmp_path)
    run_id = paused_for_approval(harness)
    others = [make_harness(store, tmp_path, worker_id=f"web{i}") for i in range(4)]
    outcomes: list[str] = []
    barrier = threading.Barrier(len(others))

    def approve(h: Harness) -> None:
        barrier.wait()
        try:
            h.service.approve(run_id, by="someone")
            outcomes.append("ok")
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=approve, args=(h,)) for h in others]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["conflict"] * 3 + ["ok"]
    assert sum(len(h.dispatcher.sent) for h in others) == 1


def test_approving_a_run_that_is_not_paused_or_does_not_exist(harness: Harness):
    run_id = harness.service.create_run("not paused")
    with pytest.raises(Conflict, match="queued, not waiting"):
        harness.service.approve(run_id, by="ann")
    with pytest.raises(NotFound):
        harness.service.approve("nope", by="ann")


def test_edited_args_are_validated_against_the_tool(harness: Harness):
    run_id = paused_for_approval(harness)
    with pytest.raises(InvalidInput, match="edited args are invalid"):
        harness.service.approve(run_id, by="ann", args={"env": "production"})
    assert run_row(harness, run_id).status == RunStatus.PAUSED


def test_a_rejection_needs_a_reason(harness: Harness):
    run_id = paused_for_approval(harness)
    with pytest.raises(InvalidInput, match="needs a reason"):
        harness.service.reject(run_id, by="ann", reason="  ")


def test_an_unknown_outcome_takes_retry_skip_or_done_only(harness: Harness):
    run_id = paused_for_approval(harness)
    with pytest.raises(InvalidInput, match="takes one of: approve, reject"):
        harness.service.decide(run_id, Decision.SKIP, by="ann")


def test_cancel_stops_the_run_and_later_messages_do_nothing(harness: Harness):
    harness.planner.script = [steps("noop", "noop")]
    run_id = harness.service.create_run("cancel me")
    harness.step()
    harness.service.cancel(run_id, by="ann")
    harness.drain()
    row = run_row(harness, run_id)
    assert row.status == RunStatus.CANCELLED and (row.ended_by, row.error) == ("ann", None)
    with pytest.raises(Conflict, match="only an active run"):
        harness.service.cancel(run_id, by="ann")


# --- healing ------------------------------------------------------------------------


def test_the_sweep_finds_a_run_whose_message_was_lost(harness: Harness):
    harness.planner.script = [steps("noop")]
    run_id = harness.service.create_run("lost")
    harness.dispatcher.sent.clear()  # the broker lost the message
    harness.service.sweep()
    assert (run_id, 0, 0) not in harness.dispatcher.sent  # not overdue yet
    harness.clock.advance(5)
    assert harness.service.sweep() >= 1
    assert (run_id, 0, 0) in harness.dispatcher.sent


def test_the_sweep_leaves_leased_and_paused_runs_alone(harness: Harness, store):
    run_id = paused_for_approval(harness)
    harness.clock.advance(60)
    harness.service.sweep()
    assert all(sent[0] != run_id for sent in harness.dispatcher.sent)
    with store.transaction() as tx:
        assert (
            tx.conn.execute(select(runs.c.status).where(runs.c.id == run_id)).scalar() == "paused"
        )


# --- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "config", "message"),
    [
        ("", None, "the task is empty"),
        ("   ", None, "the task is empty"),
        ("x" * 10_001, None, "the limit is 10000"),
        ("ok", {"max_iterations": -1}, "max_iterations"),
        ("ok", {"timeout": 10**12}, "timeout"),
        ("ok", {"retry_policy": {"base": 10, "max_backoff": 1}}, "max_backoff"),
        ("ok", {"approval_required": ["no_such_tool"]}, "unknown tools: no_such_tool"),
        ("ok", {"colour": "blue"}, "colour"),
    ],
)
def test_bad_input_gets_a_clear_error_and_creates_nothing(
    harness: Harness, store, task, config, message
):
    with store.transaction() as tx:
        before = tx.count_runs()
    with pytest.raises(InvalidInput, match=message):
        harness.service.create_run(task, config=config)
    with store.transaction() as tx:
        assert tx.count_runs() == before
    assert harness.dispatcher.sent == []


def test_a_plan_with_an_unknown_tool_or_bad_args_is_an_error_event_then_a_new_plan(
    harness: Harness,
):
    harness.planner.script = [
        PlanProduced(steps=[PlannedStep(description="x", tool="teleport")]),
        PlanProduced(steps=[PlannedStep(description="x", tool="flaky", args={"failures": "lots"})]),
        steps("noop"),
    ]
    run_id = harness.service.create_run("plan badly", config={"max_plan_repairs": 3})
    harness.drain()
    view = harness.service.status(run_id)
    assert view.run.status == RunStatus.COMPLETED
    errors = [e.message for e in view.events if e.kind == "error"]
    assert any("unknown tool 'teleport'" in m for m in errors)
    assert any("failures" in m for m in errors)


def test_a_secret_set_by_the_agent_never_reaches_the_events(harness: Harness):
    secret = "s3cr3t-value-123"
    harness.planner.script = [
        PlanProduced(
            steps=[
                PlannedStep(
                    description="set the token",
                    tool="set_env",
                    args={"name": "API_TOKEN", "value": secret},
                )
            ]
        )
    ]
    run_id = harness.service.create_run("use a token")
    harness.drain()
    view = harness.service.status(run_id)
    assert view.run.status == RunStatus.COMPLETED
    text = repr([(e.message, e.data) for e in view.events])
    assert secret not in text and "***" in text


def test_a_step_can_use_an_earlier_steps_result(harness: Harness):
    harness.planner.script = [
        PlanProduced(
            steps=[
                PlannedStep(description="probe", tool="noop"),
                PlannedStep(
                    description="remember",
                    tool="set_env",
                    args={"name": "PROBE", "value": "ok=${steps.1.result.ok}"},
                ),
            ]
        )
    ]
    run_id = harness.service.create_run("use a result")
    harness.drain()
    row = run_row(harness, run_id)
    assert row.status == RunStatus.COMPLETED
    assert row.context == {"PROBE": "ok=true"}


def test_a_reference_to_a_missing_result_is_refused_before_it_runs(harness: Harness):
    harness.planner.script = [
        PlanProduced(
            steps=[
                PlannedStep(
                    description="bad",
                    tool="set_env",
                    args={"name": "X", "value": "${steps.9.result}"},
                )
            ]
        ),
        steps("noop"),
    ]
    run_id = harness.service.create_run("refer to the future")
    harness.drain()
    view = harness.service.status(run_id)
    assert view.run.status == RunStatus.COMPLETED
    assert any("steps.9" in e.message for e in view.events if e.kind == "error")


def test_a_run_view_is_read_as_of_one_moment(harness: Harness, store: Store):
    """A decision committed between the view's reads of the run row and of its
    approval must not show a paused run with no approval to decide (nor, the other
    way, a running run beside a pending approval, as a test once saw)."""
    run_id = paused_for_approval(harness)
    reads: list[str] = []

    def approve_after_the_row_is_read(conn, cursor, statement, parameters, context, many):
        if statement.lstrip().upper().startswith("SELECT"):
            reads.append(statement)
            if len(reads) == 2:  # the row is read; the rest of the view is not
                harness.service.approve(run_id, by="ann")

    event.listen(store.engine, "before_cursor_execute", approve_after_the_row_is_read)
    try:
        view = harness.service.status(run_id)
    finally:
        event.remove(store.engine, "before_cursor_execute", approve_after_the_row_is_read)
    assert len(reads) > 2
    assert view.run.status == RunStatus.PAUSED
    assert view.pending_approval is not None
    assert harness.service.status(run_id).run.status == RunStatus.RUNNING


def test_an_iteration_says_which_step_it_ran(harness: Harness):
    """The worker's task returns it: Flower's Result column and the worker log."""
    harness.planner.script = [steps("noop", "noop")]
    run_id = harness.service.create_run("two steps")
    assert harness.service.advance(run_id, 0) == "plan (initial)"
    tick = harness.dispatcher.sent[-1][1]
    assert harness.service.advance(run_id, tick) == "execute step 1 (noop)"
    assert harness.service.advance("no-such-run", 0) == "no such run"
