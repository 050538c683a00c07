"""A model-based test of the service over real PostgreSQL (issue 8, "Proof, in the
project"): hypothesis drives random interleavings of what can happen to runs —
messages delivered by any of three workers (three AgentService instances, one
store, one clock, one modelled queue: on time, early, twice, lost, with stale and
future ticks), approve (as proposed, with valid or invalid edited args), reject,
resolve (retry / skip / mark done), cancel, expire (reject or fail), sweep and clock
jumps — with a fault injected at each boundary of an iteration:

- commit / publish: the broker refuses the publish after the commit (kombu's
  OperationalError), or the worker dies between the commit and the publish;
- the tool (a fault stays armed until a tool call meets it): it times out before
  or after its effect, the connection is refused, it declares its effect not
  applied, it reports an unknown outcome, a permanent error or a need for a person,
  the worker dies before or after the effect, the run is cancelled meanwhile, or
  the lease lapses meanwhile and another worker recovers the run (via the sweep);
- the model: garbage answers (PlanInvalid, PlannerUnavailable, PlannerFatal, plans
  with unknown tools or invalid args, a plan that repeats a rejected call), the
  worker dies while planning, the run is cancelled or recovered meanwhile.

A worker's death is a BaseException (like SIGKILL, nothing in the service may
catch it): the run is left as a killed worker leaves it. After every step the
invariants (`promises_hold`) are checked against the database: no run lost; no
internal error failed a run; ticks never decrease; events are append-only with
increasing ids; a terminal run holds no lease and never changes again; a paused
run has exactly one pending approval, an active one none and no lease that never
lapses; a non-idempotent tool never starts again on an idempotency key after an
attempt that may have applied, unless a person decided `retry` that many times; a
tool that needs approval (run config or the tool's flag) never starts without an
approve decision on record for its exact args. At the end of each example, the
faults stop and the runs are healed (messages delivered, people decide, the sweep
runs): every run must end terminal. Only Conflict, InvalidInput and NotFound may
escape the service.

The test uses a database of its own (emptied before each example), so the sweep
sees only the runs of the example. It is derandomized (the same examples on every
run); `AGENTLOOP_MODEL_RANDOM=1 AGENTLOOP_MODEL_EXAMPLES=500 pytest
tests/test_model_based.py -s` explores further and prints what it covered.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from kombu.exceptions import OperationalError as BrokerError
from pydantic import BaseModel, Field
from sqlalchemy import create_engine, text

from app.engine.actions import (
    PlanFinished,
    PlanInvalid,
    PlannerFatal,
    PlannerUnavailable,
    PlanOutcome,
    PlanProduced,
)
from app.engine.models import Decision, ErrorClass, PlannedStep, RunStatus
from app.planner.base import PlanCheck, PlanRequest
from app.service import AgentService, Conflict, InvalidInput, NotFound, Notice
from app.store.migrate import upgrade
from app.store.repo import Store, make_engine
from app.tools.registry import Tool, ToolContext, ToolError, ToolRegistry, ToolResult, ToolTimeout
from app.tools.registry import tool as tool_decorator
from tests.conftest import PG_SERVER, TEST_DB
from tests.support import tools as support_tools

EXAMPLES = int(os.environ.get("AGENTLOOP_MODEL_EXAMPLES", "60"))
STEPS = int(os.environ.get("AGENTLOOP_MODEL_STEPS", "50"))
RANDOM = os.environ.get("AGENTLOOP_MODEL_RANDOM") == "1"
START = datetime(2030, 1, 1, tzinfo=UTC)
WORKERS = 3
MAX_RUNS = 3
LEASE_GRACE = 5.0
SWEEP_GRACE = 1.0
ALLOWED = (Conflict, InvalidInput, NotFound)  # what the service documents it raises


class WorkerKilled(BaseException):
    """The worker process died here (SIGKILL): nothing in the service catches it."""


# --- the world around the service: a broker, a clock, tools and a model we control -----


@dataclass
class Message:
    run_id: str
    tick: int
    due: datetime


@dataclass
class Clock:
    now: datetime = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    def at_least(self, moment: datetime) -> None:
        self.now = max(self.now, moment)


@dataclass
class Broker:
    """The modelled queue. `refuse` publishes fail as kombu fails when Redis is away;
    `kill` kills the worker in its next publish (after the commit that preceded it)."""

    clock: Clock
    runs: dict[str, int] = field(default_factory=dict)  # run id: its index in the model
    messages: list[Message] = field(default_factory=list)
    refuse: int = 0
    kill: bool = False

    def enqueue(self, run_id: str, tick: int, delay: float, kind: object = None) -> None:
        if self.kill:
            self.kill = False
            raise WorkerKilled("killed between the commit and the publish")
        if self.refuse > 0:
            self.refuse -= 1
            raise BrokerError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        if run_id in self.runs:
            self.messages.append(Message(run_id, tick, self.clock.now + timedelta(seconds=delay)))
            # In an order that does not depend on the random run ids, nor on the order
            # in which the database returns rows that tie: examples must replay exactly.
            self.messages.sort(key=lambda m: (m.due, self.runs[m.run_id], m.tick))

    def queue_depth(self) -> int | None:
        return len(self.messages)


class QuietNotifier:
    def notify(self, notice: Notice, run_id: str) -> None:
        pass


class Amount(BaseModel):
    amount: int = Field(ge=1, le=100)


@tool_decorator(
    name="charge",
    description="Charges a card: must not run twice; the tool itself asks for approval.",
    args=Amount,
    requires_approval=True,
    timeout=8,
)
def charge(args: Amount, ctx: ToolContext) -> ToolResult:
    return ToolResult(result={"charged": args.amount}, summary=f"charged {args.amount}")


BASE_TOOLS = [
    support_tools.noop,
    support_tools.effect,  # approval_required by config in some runs
    support_tools.idem_effect,
    support_tools.flaky,
    support_tools.delete,  # approval_required by the default list
    charge,  # approval by the tool's own flag
]
NOT_IDEMPOTENT = {t.name for t in BASE_TOOLS if not t.idempotent}

VALID_CALLS = [
    ("noop", {}),
    ("effect", {}),
    ("idem_effect", {}),
    ("flaky", {"failures": 1}),
    ("delete", {"path": "a"}),
    ("delete", {"path": "b"}),
    ("charge", {"amount": 1}),
]
BAD_CALLS = [("launch_missiles", {}), ("delete", {}), ("charge", {"amount": -1})]
EDITS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {  # tool: (valid, invalid)
    "delete": ({"path": "edited"}, {"path": ""}),
    "effect": ({"hold": 0}, {"hold": -1}),
    "charge": ({"amount": 7}, {"amount": 0}),
}

TOOL_FAULTS = [
    None,
    "timeout_before",  # ToolTimeout before the effect: ambiguous
    "timeout_after",  # ToolTimeout after the effect: ambiguous
    "refused",  # ConnectionRefusedError: declared not applied
    "not_applied",  # ToolError(TRANSIENT, not_applied=True)
    "unknown",  # ToolError(UNKNOWN_OUTCOME) after the effect
    "permanent",
    "needs_human",
    "killed_before",
    "killed_after",
    "cancelled_meanwhile",
    "recovered_meanwhile",  # the lease lapses, another worker recovers the run
]
GUARDED_CALLS = [c for c in VALID_CALLS if c[0] in ("delete", "effect", "charge")]
PLANNER_ANSWERS = st.one_of(
    st.tuples(st.just("plan"), st.lists(st.sampled_from(GUARDED_CALLS), min_size=1, max_size=2)),
    st.tuples(st.just("plan"), st.lists(st.sampled_from(VALID_CALLS), min_size=1, max_size=3)),
    st.tuples(st.just("plan"), st.lists(st.sampled_from(VALID_CALLS), min_size=1, max_size=2)),
    st.tuples(st.just("bad_plan"), st.sampled_from(BAD_CALLS)),
    st.tuples(st.just("unavailable"), st.sampled_from([None, 3.0, 400.0])),
    st.sampled_from(
        [
            ("finish",),
            ("repeat_rejected",),
            ("invalid",),
            ("fatal",),
            ("killed",),
            ("cancelled_meanwhile",),
            ("recovered_meanwhile",),
        ]
    ),
)


@dataclass
class Start:
    """One start of a tool, as the tool saw it, with what was on record then."""

    run_id: str
    step_id: int
    key: str
    tool: str
    args: dict[str, Any]
    needs_approval: bool
    approved: bool  # an approve decision on record for this exact call
    retries: int  # `retry` decisions on record for this step
    maybe_applied: bool = True  # False only when the attempt declared it applied nothing


# --- the state machine ---------------------------------------------------------------------


def checked(method: Callable[..., Any]) -> Callable[..., Any]:
    """Marks the machine broken while a step runs, so teardown does not heal (and mask
    the failure with a second one) after a failed step."""

    @functools.wraps(method)
    def wrapper(self: AgentServiceMachine, *args: Any, **kwargs: Any) -> Any:
        self.healthy = False
        result = method(self, *args, **kwargs)
        self.healthy = True
        return result

    return wrapper


class AgentServiceMachine(RuleBasedStateMachine):
    store: ClassVar[Store]
    workspaces: ClassVar[Path]
    counts: ClassVar[Counter[str]] = Counter()

    def __init__(self) -> None:
        super().__init__()
        self.healthy = True
        with self.store.transaction() as tx:
            tx.conn.execute(text("TRUNCATE runs, steps, events, approvals"))
        self.clock = Clock()
        self.broker = Broker(self.clock)
        self.tool_fault: str | None = None
        self.answer: tuple[Any, ...] | None = None
        self.current = 0  # the worker whose iteration is running
        self.runs: list[str] = []
        self.starts: list[Start] = []
        self.unexpected: list[BaseException] = []
        self.ticks: dict[str, int] = {}
        self.events: dict[str, list[int]] = {}
        self.terminal: dict[str, tuple[Any, ...]] = {}
        registry = ToolRegistry(self._instrumented(t) for t in BASE_TOOLS)
        self.services = [
            AgentService(
                store=self.store,
                tools=registry,
                dispatcher=self.broker,
                notifier=QuietNotifier(),
                planners=lambda kind: self,
                default_planner="offline",
                workspaces=self.workspaces,
                clock=self.clock,
                sleep=self.clock.advance,
                jitter=lambda: 0.0,
                worker_id=f"w{i}",
                lease_grace=LEASE_GRACE,
                sweep_grace=SWEEP_GRACE,
                llm_timeout=10.0,
            )
            for i in range(WORKERS)
        ]
        self.counts["examples"] += 1

    # --- the model (a Planner) and the tools, with their faults ---------------------

    name = "model"

    def plan(self, request: PlanRequest, *, check: PlanCheck) -> PlanOutcome:
        answer, self.answer = self.answer or ("finish",), None
        self.counts[f"planner answer: {answer[0]}"] += 1
        match answer:
            case ("plan", calls):
                return PlanProduced(
                    steps=[PlannedStep(description=f"call {t}", tool=t, args=a) for t, a in calls]
                )
            case ("bad_plan", (tool, args)):
                return PlanProduced(
                    steps=[
                        PlannedStep(description="fine", tool="noop"),
                        PlannedStep(description="garbage", tool=tool, args=args),
                    ]
                )
            case ("unavailable", retry_after):
                return PlannerUnavailable(error="overloaded (529)", retry_after=retry_after)
            case ("repeat_rejected",):
                if not request.rejected:
                    return PlanFinished(report="done")
                again = request.rejected[0]
                return PlanProduced(
                    steps=[PlannedStep(description="again", tool=again.tool, args=again.args)]
                )
            case ("invalid",):
                return PlanInvalid(error="the answer was not JSON", raw="{{{")
            case ("fatal",):
                return PlannerFatal(error="401: invalid x-api-key")
            case ("killed",):
                raise WorkerKilled("killed while planning")
            case ("cancelled_meanwhile",):
                self._meanwhile_cancel(request.run_id)
                return PlanProduced(steps=[PlannedStep(description="n", tool="noop")])
            case ("recovered_meanwhile",):
                self._meanwhile_recover(request.run_id)
                return PlanProduced(steps=[PlannedStep(description="n", tool="noop")])
        return PlanFinished(report="done")

    def _instrumented(self, tool: Tool) -> Tool:
        def fn(args: BaseModel, ctx: ToolContext) -> ToolResult:
            # Timeouts are injected as faults: the real-time alarm (a second, near a
            # run's deadline) would make examples depend on this machine's load.
            signal.setitimer(signal.ITIMER_REAL, 0)
            start = self._record_start(tool, ctx)
            fault, self.tool_fault = self.tool_fault, None
            self.counts[f"tool fault: {fault}"] += 1
            match fault:
                case "refused":
                    start.maybe_applied = False
                    raise ConnectionRefusedError(111, "Connection refused")
                case "not_applied":
                    start.maybe_applied = False
                    raise ToolError("503 before sending", ErrorClass.TRANSIENT, not_applied=True)
                case "timeout_before":
                    raise ToolTimeout()
                case "killed_before":
                    raise WorkerKilled("killed before the effect")
                case "cancelled_meanwhile":
                    self._meanwhile_cancel(ctx.run_id)
                case "recovered_meanwhile":
                    self._meanwhile_recover(ctx.run_id)
            result = tool.fn(args, ctx)
            match fault:
                case "timeout_after":
                    raise ToolTimeout()
                case "unknown":
                    raise ToolError("the answer was lost", ErrorClass.UNKNOWN_OUTCOME)
                case "permanent":
                    raise ToolError("400 bad request", ErrorClass.PERMANENT)
                case "needs_human":
                    raise ToolError("2FA code needed", ErrorClass.NEEDS_HUMAN)
                case "killed_after":
                    raise WorkerKilled("killed after the effect")
            return result

        return dataclasses.replace(tool, fn=fn)

    def _record_start(self, tool: Tool, ctx: ToolContext) -> Start:
        with self.store.transaction() as tx:
            q = tx.conn.execute
            config = q(text("SELECT config FROM runs WHERE id = :r"), {"r": ctx.run_id}).scalar()
            args = q(text("SELECT args FROM steps WHERE id = :s"), {"s": ctx.step_id}).scalar()
            retries = q(
                text("SELECT count(*) FROM approvals WHERE step_id = :s AND decision = 'retry'"),
                {"s": ctx.step_id},
            ).scalar_one()
            approved = [
                (row.tool, row.edited_args if row.edited_args is not None else row.args)
                for row in q(
                    text(
                        "SELECT s.tool, s.args, a.edited_args FROM approvals a "
                        "JOIN steps s ON s.id = a.step_id "
                        "WHERE a.run_id = :r AND a.decision = 'approve'"
                    ),
                    {"r": ctx.run_id},
                )
            ]
        start = Start(
            run_id=ctx.run_id,
            step_id=ctx.step_id,
            key=ctx.idempotency_key,
            tool=tool.name,
            args=args,
            needs_approval=tool.requires_approval or tool.name in config["approval_required"],
            approved=(tool.name, args) in approved,
            retries=retries,
        )
        self.starts.append(start)
        self.counts["starts"] += 1
        return start

    def _meanwhile_cancel(self, run_id: str) -> None:
        try:
            self.services[(self.current + 1) % WORKERS].cancel(run_id, by="ann")
        except Exception as exc:
            self.unexpected.append(exc)

    def _meanwhile_recover(self, run_id: str) -> None:
        """While this worker works, its lease lapses; the sweep nudges the run and
        another worker takes it over."""
        outer = self.current
        self.current = (outer + 1) % WORKERS
        other = self.services[self.current]
        try:
            with self.store.transaction() as tx:
                row = tx.get_run(run_id)
            if row.lease_expires_at is not None:
                self.clock.at_least(row.lease_expires_at + timedelta(seconds=SWEEP_GRACE + 1))
            other.sweep()
            for message in [m for m in self.broker.messages if m.run_id == run_id]:
                self.broker.messages.remove(message)
                self.clock.at_least(message.due)
                other.advance(message.run_id, message.tick)
        except Exception as exc:
            self.unexpected.append(exc)
        finally:
            self.current = outer

    # --- calling the service ----------------------------------------------------------

    def _call(self, what: str, action: Callable[[], Any], *, person: bool = False) -> None:
        self.counts["steps"] += 1
        outcome = "ok"
        try:
            action()
        except WorkerKilled:
            outcome = "worker killed"  # the run is as a killed worker leaves it
        except ALLOWED as exc:
            if not person:
                raise
            outcome = type(exc).__name__
        finally:
            self.counts[f"{what}: {outcome}"] += 1
            self.answer = None  # (a tool fault stays armed until a tool call meets it)
            self.broker.refuse, self.broker.kill = 0, False

    def _arm(self, publish: str | None) -> None:
        if publish == "refused":
            self.broker.refuse = 1
        elif publish == "killed":
            self.broker.kill = True

    def _run(self, index: int) -> str:
        return self.runs[index % len(self.runs)]

    def _row(self, run_id: str) -> Any:
        with self.store.transaction() as tx:
            return tx.get_run(run_id)

    # --- rules --------------------------------------------------------------------------

    @initialize(approval=st.sampled_from([("delete",), ("delete", "effect")]))
    @checked
    def first_run(self, approval: tuple[str, ...]) -> None:
        self._create(approval, refused=False)

    @precondition(lambda self: len(self.runs) < MAX_RUNS)
    @rule(approval=st.sampled_from([("delete",), ("delete", "effect")]), refused=st.booleans())
    @checked
    def create_run(self, approval: tuple[str, ...], refused: bool) -> None:
        self._create(approval, refused=refused)

    def _create(self, approval: tuple[str, ...], *, refused: bool) -> None:
        self.broker.refuse = 1 if refused else 0
        self.counts["runs"] += 1
        run_id = self.services[0].create_run(
            f"model run {len(self.runs)}",
            config={
                "approval_required": list(approval),
                "retry_policy": {"max_retries": 2, "base": 2.0, "max_backoff": 8.0},
                "max_iterations": 40,
                "timeout": 3000,
            },
        )
        self.broker.refuse = 0
        self.runs.append(run_id)
        if refused:  # the broker refused the first publish: the message is lost
            assert not [m for m in self.broker.messages if m.run_id == run_id]
        self.broker.runs[run_id] = len(self.broker.runs)
        if not refused:
            self.broker.messages.append(Message(run_id, 0, self.clock.now))
            self.broker.messages.sort(key=lambda m: (m.due, self.broker.runs[m.run_id], m.tick))

    @precondition(lambda self: self.broker.messages)
    @rule(
        index=st.integers(0, 20),
        worker=st.integers(0, WORKERS - 1),
        duplicate=st.booleans(),
        on_time=st.booleans(),
        tool_fault=st.sampled_from(TOOL_FAULTS),
        answer=PLANNER_ANSWERS,
        publish=st.sampled_from([None, None, "refused", "killed"]),
    )
    @checked
    def deliver(
        self,
        index: int,
        worker: int,
        duplicate: bool,
        on_time: bool,
        tool_fault: str | None,
        answer: tuple[Any, ...],
        publish: str | None,
    ) -> None:
        """Deliver a queued message (on time or early; kept queued when `duplicate`, as
        a redelivery would), with a fault armed for whatever the iteration does: the
        tool, the model, or the publish after the commit."""
        message = self.broker.messages[index % len(self.broker.messages)]
        if not duplicate:
            self.broker.messages.remove(message)
        if on_time:
            self.clock.at_least(message.due)
        self.current, self.answer = worker, answer
        self.tool_fault = tool_fault or self.tool_fault
        self._arm(publish)
        self._call("deliver", lambda: self.services[worker].advance(message.run_id, message.tick))

    @precondition(lambda self: self.broker.messages)
    @rule(
        worker=st.integers(0, WORKERS - 1),
        tool_fault=st.sampled_from(TOOL_FAULTS),
        answer=PLANNER_ANSWERS,
    )
    @checked
    def deliver_faulty_next(
        self, worker: int, tool_fault: str | None, answer: tuple[Any, ...]
    ) -> None:
        """The next tool call, in this iteration or a later one, meets `tool_fault`."""
        self.tool_fault = tool_fault
        self._deliver_next(worker, answer)

    @precondition(lambda self: self.broker.messages)
    @rule(worker=st.integers(0, WORKERS - 1), answer=PLANNER_ANSWERS)
    @checked
    def deliver_next(self, worker: int, answer: tuple[Any, ...]) -> None:
        """The common case: the message due first, on time, the tool works (the
        model may still answer badly)."""
        self._deliver_next(worker, answer)

    @precondition(lambda self: self.broker.messages)
    @rule(worker=st.integers(0, WORKERS - 1), answer=PLANNER_ANSWERS)
    @checked
    def deliver_next_again(self, worker: int, answer: tuple[Any, ...]) -> None:
        self._deliver_next(worker, answer)

    def _deliver_next(self, worker: int, answer: tuple[Any, ...]) -> None:
        message = self.broker.messages.pop(0)  # the first due
        self.clock.at_least(message.due)
        self.current, self.answer = worker, answer
        self._call(
            "deliver next", lambda: self.services[worker].advance(message.run_id, message.tick)
        )

    @rule(
        kind=st.sampled_from(["lose", "stale", "future"]),
        index=st.integers(0, 20),
        worker=st.integers(0, WORKERS - 1),
    )
    @checked
    def broker_trouble(self, kind: str, index: int, worker: int) -> None:
        """A message is lost, or one with a stale or a future tick arrives."""
        if kind == "lose":
            if self.broker.messages:
                self.broker.messages.pop(index % len(self.broker.messages))
            return
        run_id = self._run(index)
        tick = self._row(run_id).tick + (-1 - index % 2 if kind == "stale" else 1 + index % 2)
        self.current = worker
        self._call(f"{kind} tick", lambda: self.services[worker].advance(run_id, tick))

    @rule(
        action=st.sampled_from(["approve", "approve", "approve", "reject", "resolve", "cancel"]),
        index=st.integers(0, 20),
        edit=st.sampled_from([None, None, "valid", "invalid"]),
        decision=st.sampled_from([Decision.RETRY, Decision.SKIP, Decision.MARK_DONE]),
        publish=st.sampled_from([None, None, "refused", "killed"]),
    )
    @checked
    def person(
        self, action: str, index: int, edit: str | None, decision: Decision, publish: str | None
    ) -> None:
        """A person decides (mostly on a paused run, sometimes on any), or cancels."""
        paused = [r for r in self.runs if self._row(r).status == RunStatus.PAUSED]
        run_id = paused[index % len(paused)] if paused and index % 4 else self._run(index)
        service = self.services[index % WORKERS]
        self._arm(publish)
        match action:
            case "approve":
                args = None
                pending = service.status(run_id).pending_approval
                if edit is not None and pending is not None:
                    with self.store.transaction() as tx:
                        tool = tx.get_step(pending.step_id).tool
                    if tool in EDITS:
                        args = EDITS[tool][0 if edit == "valid" else 1]
                call = functools.partial(service.approve, run_id, by="ann", args=args)
            case "reject":
                call = functools.partial(service.reject, run_id, by="bob", reason="not now")
            case "resolve":
                call = functools.partial(service.decide, run_id, decision, by="cy")
                action = f"resolve {decision}"
            case _:
                call = functools.partial(service.cancel, run_id, by="dee")
        self._call(action, call, person=True)

    @rule(
        kind=st.sampled_from(["jump", "jump", "sweep", "expire"]),
        seconds=st.sampled_from([0.5, 2.0, 9.0, 20.0, 70.0, 130.0, 130.0, 3600.0]),
        worker=st.integers(0, WORKERS - 1),
        ttl=st.sampled_from([0.0, 30.0, 3600.0]),
        policy=st.sampled_from(["reject", "fail"]),
        publish=st.sampled_from([None, "refused"]),
    )
    @checked
    def time_passes(
        self, kind: str, seconds: float, worker: int, ttl: float, policy: str, publish: str | None
    ) -> None:
        """The clock jumps (past backoffs, leases, nudge timeouts, deadlines), or the
        beat runs the sweep or expires undecided approvals."""
        if kind == "jump":
            self.clock.advance(seconds)
        elif kind == "sweep":
            self._arm(publish)
            self._call("sweep", self.services[worker].sweep)
        else:
            self._call(
                f"expire ({policy})",
                lambda: self.services[worker].expire_approvals(ttl=ttl, policy=policy),
            )

    # --- invariants ---------------------------------------------------------------------

    @invariant()
    @checked
    def promises_hold(self) -> None:
        if not self.runs:
            return
        assert not self.unexpected, f"an exception escaped a concurrent action: {self.unexpected}"
        ids = list(self.runs)
        with self.store.transaction() as tx:
            q = tx.conn.execute
            rows = {
                r.id: r for r in q(text("SELECT * FROM runs WHERE id = ANY(:ids)"), {"ids": ids})
            }
            pending: dict[str, int] = dict(
                q(  # type: ignore[arg-type]
                    text(
                        "SELECT run_id, count(*) FROM approvals WHERE status = 'pending' "
                        "AND run_id = ANY(:ids) GROUP BY run_id"
                    ),
                    {"ids": ids},
                ).all()
            )
            events: dict[str, list[int]] = {}
            for run_id, event_id in q(
                text("SELECT run_id, id FROM events WHERE run_id = ANY(:ids) ORDER BY id"),
                {"ids": ids},
            ):
                events.setdefault(run_id, []).append(event_id)
            steps: dict[str, list[tuple[Any, ...]]] = {}
            for s in q(
                text(
                    "SELECT run_id, id, status, attempts FROM steps "
                    "WHERE run_id = ANY(:ids) ORDER BY id"
                ),
                {"ids": ids},
            ):
                steps.setdefault(s.run_id, []).append((s.id, s.status, s.attempts))
        assert set(rows) == set(ids), f"runs lost: {set(ids) - set(rows)}"
        for run_id, row in rows.items():
            status = RunStatus(row.status)
            assert not (row.error or "").startswith("internal error"), (
                f"run {run_id} failed by an internal error: {row.error}"
            )
            assert row.tick >= self.ticks.get(run_id, 0), f"run {run_id}: its tick went back"
            self.ticks[run_id] = row.tick
            seen, now_events = self.events.get(run_id, []), events.get(run_id, [])
            assert now_events[: len(seen)] == seen, f"run {run_id}: an event changed or vanished"
            assert now_events == sorted(set(now_events))
            self.events[run_id] = now_events
            if status.is_terminal:
                assert row.lease_owner is None and row.lease_expires_at is None, (
                    f"terminal run {run_id} holds a lease"
                )
                assert pending.get(run_id, 0) == 0, f"terminal run {run_id} waits for a person"
                frozen = (
                    row.status, row.tick, row.iteration, row.plan_version, row.error,
                    row.report, row.context, tuple(steps.get(run_id, [])),
                )  # fmt: skip
                assert self.terminal.setdefault(run_id, frozen) == frozen, (
                    f"terminal run {run_id} changed: {self.terminal[run_id]} -> {frozen}"
                )
            elif status is RunStatus.PAUSED:
                assert pending.get(run_id, 0) == 1, (
                    f"paused run {run_id} has {pending.get(run_id, 0)} pending approvals"
                )
                assert row.lease_owner is None, f"paused run {run_id} holds a lease"
            else:  # queued, running: held by a lease that lapses, or the sweep's to find
                assert pending.get(run_id, 0) == 0, f"active run {run_id} has a pending approval"
                assert row.lease_owner is None or row.lease_expires_at is not None, (
                    f"active run {run_id} is held by a lease that never lapses"
                )
        for i, start in enumerate(self.starts):
            if start.needs_approval:
                assert start.approved, (
                    f"{start.tool} {start.args} started without approval; the run's timeline:\n"
                    f"{self._timeline(start.run_id)}"
                )
            if start.tool in NOT_IDEMPOTENT:
                earlier = [s for s in self.starts[:i] if s.key == start.key and s.maybe_applied]
                assert len(earlier) <= start.retries, (
                    f"{start.tool} (key {start.key}) started again after {len(earlier)} "
                    f"attempt(s) that may have applied, with {start.retries} retry decision(s); "
                    f"the run's timeline:\n{self._timeline(start.run_id)}"
                )

    def _timeline(self, run_id: str) -> str:
        return "\n".join(
            f"  {e.id} it{e.iteration} {e.kind}: {e.message}"
            for e in self.services[0].status(run_id).events
        )

    # --- at the end: every run reaches an end once the faults stop ----------------------

    def teardown(self) -> None:
        if self.healthy and self.runs:
            for run_id in self.runs:
                row = self._row(run_id)
                why = f" ({(row.error or '').split(':')[0]})" if row.error else ""
                self.counts[f"before healing: {row.status}{why}"] += 1
            self._heal()

    def _heal(self) -> None:
        self.tool_fault = None
        service = self.services[0]
        for _ in range(600):
            if self.broker.messages:
                message = self.broker.messages.pop(0)
                self.clock.at_least(message.due)
                service.advance(message.run_id, message.tick)
                continue
            rows = [self._row(r) for r in self.runs]
            paused = [r for r in rows if r.status == RunStatus.PAUSED]
            for row in paused:
                approval = service.status(row.id).pending_approval
                assert approval is not None, f"paused run {row.id} has no pending approval"
                if approval.kind == "approval":
                    service.approve(row.id, by="heal")
                else:
                    service.decide(row.id, Decision.MARK_DONE, by="heal")
            if paused:
                continue
            active = [r for r in rows if r.status in (RunStatus.QUEUED, RunStatus.RUNNING)]
            if not active:
                break
            later = [t for r in active for t in (r.lease_expires_at, r.next_run_at) if t]
            self.clock.at_least(max([self.clock.now, *later]))
            self.clock.advance(SWEEP_GRACE + 1)
            if service.sweep() == 0:
                self.clock.advance(service.nudge_timeout + 1)
                service.sweep()
        self.promises_hold()
        stuck = {r: self._row(r).status for r in self.runs}
        assert all(RunStatus(s).is_terminal for s in stuck.values()), f"runs never ended: {stuck}"


# --- the test ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_store(database_url: str) -> Iterator[Store]:
    """A database of this test's own: the sweep sees every active run of a database,
    and must see only the runs of the example."""
    name = f"{TEST_DB}_model"
    admin = create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    upgrade(f"{PG_SERVER}/{name}")
    store = Store(make_engine(f"{PG_SERVER}/{name}"))
    yield store
    store.dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_the_service_keeps_its_promises_under_any_interleaving_of_faults(
    model_store: Store, tmp_path: Path
):
    AgentServiceMachine.store = model_store
    AgentServiceMachine.workspaces = tmp_path / "workspaces"
    AgentServiceMachine.counts = Counter()
    run_state_machine_as_test(
        AgentServiceMachine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            derandomize=not RANDOM,
            database=None,
            print_blob=True,
            suppress_health_check=[
                HealthCheck.too_slow,
                HealthCheck.filter_too_much,
                HealthCheck.data_too_large,
            ],
        ),
    )
    counts = AgentServiceMachine.counts
    print("\nmodel-based test:\n" + "\n".join(f"{n:6} {k}" for k, n in sorted(counts.items())))
