"""The service layer: create_run, advance, approve, reject, resolve, cancel, status, sweep.

Transports (Celery tasks, Flask views, the CLI) call these and nothing else.
One iteration is: read the run, decide, claim it with the iteration's first
write (conditional on the run being as read; it takes the lease and marks the
step begun), do the slow work (a tool, the planner) with no transaction open,
save the outcome under the lease, commit, and only then enqueue the next one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from secrets import token_hex
from typing import Any, Protocol

from pydantic import ValidationError
from sqlalchemy import Row
from sqlalchemy.exc import DBAPIError, IntegrityError

from app.engine import sanitize
from app.engine.actions import (
    AwaitHuman,
    Execute,
    Fail,
    NewEvent,
    Plan,
    PlanInvalid,
    PlannerFatal,
    PlanOutcome,
    PlanProduced,
    StepFailed,
    StepOutcome,
    StepSucceeded,
    Transition,
)
from app.engine.apply import apply_transition
from app.engine.machine import begin_step, decide, fail, fold_decision, fold_plan, fold_step, pause
from app.engine.models import (
    ACTIVE_STATUSES,
    DECISIONS_FOR,
    DEFAULT_APPROVAL_REQUIRED,
    MAX_TASK_CHARS,
    Decision,
    ErrorClass,
    EventKind,
    JSONDict,
    PauseKind,
    PlannedStep,
    RunConfig,
    RunSnapshot,
    RunStatus,
    Step,
    args_hash,
)
from app.engine.redact import redact, secret_values
from app.planner.base import EventView, Planner, PlanRequest, StepView, ToolSpec
from app.planner.prompt import (
    RECENT_EVENTS,
    completed_positions,
    next_position,
    summarize_events,
)
from app.planner.refs import RefError, check_refs, find_refs, resolve_refs
from app.store.repo import (
    Guard,
    NotFound,
    Store,
    Tx,
    database_away,
    snapshot_from_row,
)
from app.tools.registry import (
    THREAD_STOP_GRACE,
    ToolContext,
    ToolRegistry,
    UnknownTool,
    run_tool,
)

log = logging.getLogger(__name__)

RECENT_COMPLETED_STEPS = 50
SUMMARY_FOLD_LIMIT = 500
# Waits between attempts to save an outcome while the database is away.
SAVE_RETRY_FIRST_WAIT = 0.25
SAVE_RETRY_MAX_WAIT = 4.0
MAX_IDEMPOTENCY_KEY_CHARS = 200
REJECTED_STEPS = 50  # rejected calls a plan is checked against (the latest)
MAX_RUN_ID_CHARS = 32  # the column's width


class ServiceError(Exception):
    """Base for errors a caller should show to the person who asked."""


class InvalidInput(ServiceError):
    pass


class Conflict(ServiceError):
    """The run is not in a state that allows the request (e.g. approving twice)."""


class Dispatcher(Protocol):
    """Publishes 'advance run R at tick T in D seconds'. Called only after commit."""

    def enqueue(self, run_id: str, tick: int, delay: float) -> None: ...

    def queue_depth(self) -> int | None:
        """How many messages wait in the queue now; None if the broker cannot say."""
        ...


class Notice(StrEnum):
    """What people are told about (by email, Slack), after the commit that caused it."""

    APPROVAL_NEEDED = "approval_needed"
    OUTCOME_UNKNOWN = "outcome_unknown"
    COMPLETED = "completed"
    FAILED = "failed"


class Notifier(Protocol):
    """Delivers a notice about a run, asynchronously; delivery never fails the run."""

    def notify(self, notice: Notice, run_id: str) -> None: ...


def notice_for(transition: Transition) -> Notice | None:
    match transition.status:
        case RunStatus.PAUSED:
            request = transition.human_request
            approval = request is not None and request.kind is PauseKind.APPROVAL
            return Notice.APPROVAL_NEEDED if approval else Notice.OUTCOME_UNKNOWN
        case RunStatus.COMPLETED:
            return Notice.COMPLETED
        case RunStatus.FAILED:
            return Notice.FAILED
    return None


PlannerFactory = Callable[[str], Planner]


def utcnow() -> datetime:
    return datetime.now(UTC)


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{token_hex(3)}"


@dataclass(frozen=True)
class SlowWork:
    """What the slow part of an iteration needs, read when the run was claimed."""

    run: RunSnapshot
    lease_until: datetime
    request: PlanRequest | None = None
    args: JSONDict | StepFailed = field(default_factory=dict)


@dataclass(frozen=True)
class RunView:
    """A run as people read it: the row, every step, and the timeline."""

    run: Row[Any]
    steps: list[Step]
    events: list[Row[Any]]
    pending_approval: Row[Any] | None


@dataclass
class AgentService:
    store: Store
    tools: ToolRegistry
    dispatcher: Dispatcher
    notifier: Notifier
    planners: PlannerFactory
    default_planner: str
    workspaces: Path
    tool_settings: Mapping[str, Any] = field(default_factory=dict)
    lease_grace: float = 30.0
    llm_timeout: float = 120.0
    sweep_grace: float = 30.0
    # How long a nudge may wait in the queue before the sweep takes it for lost.
    nudge_timeout: float = 120.0
    # Time that decides ownership (leases, due times) must be the database's: wiring
    # passes a DatabaseClock; tests a manual one.
    clock: Callable[[], datetime] = utcnow
    sleep: Callable[[float], None] = time.sleep
    jitter: Callable[[], float] = random.random
    worker_id: str = field(default_factory=default_worker_id)

    # --- creating runs ------------------------------------------------------------

    def create_run(
        self,
        task: str,
        *,
        config: RunConfig | Mapping[str, Any] | None = None,
        created_by: str | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Store a new run and enqueue its first iteration; returns its id.

        With an `idempotency_key`, a retry of the same request by the same creator
        returns the run the first one made (and a different request with that key is
        a Conflict). Once the run is stored, nothing fails the call: a failed publish
        is logged and the sweep starts the run. Raises InvalidInput, Conflict."""
        task = check_text((task or "").strip(), "the task")
        if not task:
            raise InvalidInput("the task is empty: say what the agent should do")
        if len(task) > MAX_TASK_CHARS:
            raise InvalidInput(f"the task is {len(task)} characters; the limit is {MAX_TASK_CHARS}")
        cfg = self._validate_config(config)
        # A misspelt name would leave the real tool unguarded; the defaults may name
        # tools a deployment does not have.
        known = {t.name for t in self.tools} | set(DEFAULT_APPROVAL_REQUIRED)
        unknown = sorted(set(cfg.approval_required) - known)
        if unknown:
            raise InvalidInput(f"approval_required names unknown tools: {', '.join(unknown)}")
        planner = self.default_planner if cfg.planner == "auto" else cfg.planner
        try:
            self.planners(planner)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        key = _scoped_key(idempotency_key, created_by)
        request_hash = args_hash({"task": task, "config": cfg.model_dump(mode="json")})
        if key is not None and (existing := self._replayed(key, request_hash)) is not None:
            return existing
        run_id = token_hex(8)
        now = self.clock()
        try:
            with self.store.transaction() as tx:
                tx.insert_run(
                    run_id=run_id,
                    task=task,
                    planner=planner,
                    config=cfg,
                    deadline=now + timedelta(seconds=cfg.timeout),
                    now=now,
                    created_by=created_by,
                    idempotency_key=key,
                    request_hash=request_hash if key is not None else None,
                )
                tx.insert_events(
                    run_id,
                    0,
                    [
                        _status_event(
                            f"run created by {created_by or 'anonymous'} with the {planner} planner"
                        )
                    ],
                    now,
                )
        except IntegrityError:
            # The same key, created concurrently: the other request's run stands.
            if key is None or (existing := self._replayed(key, request_hash)) is None:
                raise
            return existing
        self._publish(run_id, 0, 0)
        return run_id

    def _replayed(self, key: str, request_hash: str) -> str | None:
        """The run an earlier request with this idempotency key created, if any; it is
        nudged again while still queued, in case that request's publish was lost."""
        with self.store.transaction() as tx:
            row = tx.run_by_idempotency_key(key)
        if row is None:
            return None
        if row.request_hash != request_hash:
            raise Conflict(
                "this idempotency key was already used for a different request: "
                "use a new key for a new run"
            )
        if row.status == RunStatus.QUEUED:
            self._publish(row.id, row.tick, 0)  # a duplicate message is a no-op
        run_id: str = row.id
        return run_id

    @staticmethod
    def _validate_config(config: RunConfig | Mapping[str, Any] | None) -> RunConfig:
        if isinstance(config, RunConfig):
            return config
        check_json(dict(config or {}), "config")
        try:
            return RunConfig.model_validate(dict(config or {}))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}"
                for e in exc.errors()
            )
            raise InvalidInput(f"invalid run config: {problems}") from None

    # --- one iteration --------------------------------------------------------------

    def advance(self, run_id: str, tick: int) -> None:
        """Advance a run by one iteration, if this message is still current.

        Raises the database's OperationalError when it cannot be reached before the
        claim (nothing was written: the message may simply be delivered again). Any
        other unexpected error fails the run with the reason recorded — but only
        while this worker may still write to it (see _fail_internal) — and is raised.
        """
        now = self.clock()
        stored = self.store.read_for_claim(run_id)
        if stored is None:
            log.warning("advance: run %s does not exist", run_id)
            return
        if not self._claimable(stored.row, tick, now):
            return
        run = stored.as_claimed()
        # Until the claim commits, the run may be written only if it is still as read.
        guard = Guard.claim(self.worker_id, stored.row)
        try:
            action = decide(run, now=now, tools=self.tools.policies())
            claimed = self._claim(stored.row, run, action, now)
            if claimed is None:
                return  # another worker claimed the run first, or it changed since read
            if isinstance(claimed, Transition):
                self._after_commit(run.id, run.tick, claimed)
                return
            run = claimed.run
            guard = Guard(owner=self.worker_id, tick=run.tick)  # the lease is ours now
            assert isinstance(action, Execute | Plan)  # only slow work leaves _claim unsettled
            self._finish(claimed, action, self._slow_work(stored.row.planner, claimed, action))
        except DBAPIError as exc:
            if database_away(exc):
                raise  # nothing more can be written now; the lease lapses, others recover
            self._fail_internal(run, guard, exc)
            raise
        except Exception as exc:
            self._fail_internal(run, guard, exc)
            raise

    def _slow_work(
        self, planner_kind: str, work: SlowWork, action: Execute | Plan
    ) -> StepOutcome | PlanOutcome:
        """The tool call or the planner call, with no transaction open."""
        if isinstance(action, Execute):
            return self._execute(work.run, work.run.step(action.step_id), work.args)
        assert work.request is not None
        return self._plan(planner_kind, work.request)

    def _claimable(self, row: Row[Any], tick: int, now: datetime) -> bool:
        """Whether this message may claim the run (the claim itself checks again). Not a
        stale or duplicate one, nor one for a run leased to a live worker; an early one,
        early because the broker countdown is capped, is published again for the rest."""
        if row.tick != tick or row.status not in ACTIVE_STATUSES:
            return False
        if row.lease_expires_at is not None and row.lease_expires_at >= now:
            return False
        if row.next_run_at is not None and row.next_run_at > now:
            if row.lease_owner is None:
                self._publish(row.id, tick, (row.next_run_at - now).total_seconds())
            return False
        return True

    def _claim(
        self,
        row: Row[Any],
        run: RunSnapshot,
        action: Fail | AwaitHuman | Execute | Plan,
        now: datetime,
    ) -> Transition | SlowWork | None:
        """Claim the run with the first write of the iteration: settle a quick action
        (returning what it changed) or mark slow work begun (returning what the work
        needs). None if the run is no longer as it was read."""
        claim = Guard.claim(self.worker_id, row)
        match action:
            case Fail() | AwaitHuman():
                settled = fail(action.reason) if isinstance(action, Fail) else pause(run, action)
                return (
                    settled if self._save(self.store, run, settled, guard=claim, now=now) else None
                )
            case Execute():
                step = run.step(action.step_id)
                began = begin_step(run, action)
                # The lease covers the whole tool call (and the time a thread-run tool
                # gets to end past its timeout); a crash is noticed when it lapses.
                lease = self._step_timeout(run, step, now) + THREAD_STOP_GRACE + self.lease_grace
                lease_until = now + timedelta(seconds=lease)
                if not self._save(
                    self.store,
                    run,
                    began,
                    guard=claim,
                    now=now,
                    lease_until=lease_until,
                    # Only a step that must not run twice needs `running` on disk first.
                    durable=not self._idempotent(step),
                ):
                    return None
                return SlowWork(
                    apply_transition(run, began),
                    lease_until=lease_until,
                    args=self._resolve_args(run, step),
                )
            case Plan():
                lease = self.llm_timeout * (run.config.max_plan_repairs + 1) + self.lease_grace
                lease_until = now + timedelta(seconds=lease)
                if not self._save(
                    self.store,
                    run,
                    Transition(),
                    guard=claim,
                    now=now,
                    lease_until=lease_until,
                    durable=False,  # if lost, the planner is simply asked again
                ):
                    return None
                with self.store.transaction() as tx:
                    # A new plan supersedes every pending step: the planner and the fold
                    # see the whole current plan, not only the steps `decide` looked at.
                    plan = tx.plan_steps(run.id, run.plan_version)
                    run = run.model_copy(update={"steps": plan})
                    request = self._plan_request(tx, row, run, action)
                return SlowWork(run, lease_until=lease_until, request=request)

    def _finish(
        self, work: SlowWork, action: Execute | Plan, outcome: StepOutcome | PlanOutcome
    ) -> None:
        run = work.run
        jitter = self.jitter()
        if isinstance(action, Execute) and isinstance(outcome, StepSucceeded | StepFailed):
            step = run.step(action.step_id)
            transition = fold_step(
                run,
                step,
                outcome,
                policy=self.tools.policies().get(step.tool),
                jitter_sample=jitter,
            )
        elif isinstance(action, Plan) and not isinstance(outcome, StepSucceeded | StepFailed):
            transition = fold_plan(run, action, outcome, jitter_sample=jitter)
        else:
            raise TypeError(f"outcome {type(outcome).__name__} does not answer {action.type}")
        if self._save_outcome(run, transition, lease_until=work.lease_until):
            self._after_commit(run.id, run.tick, transition)
            return
        now = self.clock()
        discarded = _error_event(
            f"result of iteration {run.iteration} discarded: the run was "
            "cancelled or its lease expired while the work ran"
        )
        # What the planner spent is spent, saved or not: budgets must never undercount.
        usage = Transition(
            tokens_delta=transition.tokens_delta,
            cost_delta=transition.cost_delta,
            events=[e for e in transition.events if e.kind is EventKind.LLM_CALL],
        )
        with self.store.transaction() as tx:
            tx.record_spending(run.id, run.iteration, usage, [discarded], now)

    def _save_outcome(
        self, run: RunSnapshot, transition: Transition, *, lease_until: datetime
    ) -> bool:
        """Save an iteration's outcome under this worker's lease; False when the lease
        was lost (the run was cancelled, or another worker recovered it).

        The outcome exists only in this process: a database that is away for a few
        seconds is waited for, with backoff, for as long as the lease holds, so a
        restart never turns a finished step into "outcome unknown". (This is the one
        sleep in a worker: there is nothing to re-enqueue, the outcome would be lost.)
        """
        guard = Guard(owner=self.worker_id, tick=run.tick)
        wait = SAVE_RETRY_FIRST_WAIT
        attempt = 1
        while True:
            try:
                return self._save(self.store, run, transition, guard=guard, now=self.clock())
            except DBAPIError as exc:
                if not database_away(exc):
                    raise
                if self.clock() + timedelta(seconds=wait) >= lease_until:
                    raise
                log.warning(
                    "saving iteration %d of run %s failed (attempt %d: %s); retrying in %.1f s",
                    run.iteration, run.id, attempt, exc.orig, wait,
                )  # fmt: skip
                self.sleep(wait)
                wait = min(wait * 2, SAVE_RETRY_MAX_WAIT)
                attempt += 1
                if self._saved_meanwhile(run):
                    return True

    def _saved_meanwhile(self, run: RunSnapshot) -> bool:
        """Whether a save that failed in flight (the connection dropped during its
        COMMIT) landed after all: the lease is released and the tick unchanged, which
        only this worker's own save does (every other writer bumps the tick)."""
        try:
            stored = self.store.read_for_claim(run.id)
        except DBAPIError as exc:
            if database_away(exc):
                return False
            raise
        return stored is not None and stored.row.tick == run.tick and stored.row.lease_owner is None

    def _fail_internal(self, run: RunSnapshot, guard: Guard, error: BaseException) -> None:
        """Record an unexpected error and fail the run, so no run is left silently stuck
        — under `guard`: before the claim, only if the run is still as it was read;
        after it, only while this worker holds the lease. A run that another worker
        now advances is left alone (its outcome is that worker's to save)."""
        log.exception("iteration %d of run %s failed unexpectedly", run.iteration, run.id)
        reason = sanitize.scrub_text(f"internal error: {type(error).__name__}: {error}")[:2000]
        failed = fail(reason).model_copy(
            update={"events": [_error_event(reason), *fail(reason).events]}
        )
        try:
            saved = self._save(self.store, run, failed, guard=guard, now=self.clock())
        except Exception:
            log.exception("could not record the failure of run %s", run.id)
            return
        if saved:
            self._after_commit(run.id, run.tick, failed)
        else:
            log.warning("run %s changed hands meanwhile: its failure is not recorded", run.id)

    def _after_commit(self, run_id: str, tick: int, transition: Transition) -> None:
        """Publish what a committed transition asks for: the next iteration, a notice.
        Never raises: the commit stands, and a run whose message is lost is found by
        the sweep."""
        if transition.delay is not None:
            self._publish(run_id, tick, transition.delay)
        if notice := notice_for(transition):
            try:
                self.notifier.notify(notice, run_id)
            except Exception:
                log.exception("could not hand over the %s notice for run %s", notice, run_id)

    def _publish(self, run_id: str, tick: int, delay: float) -> None:
        try:
            self.dispatcher.enqueue(run_id, tick, delay)
        except Exception:
            log.exception("could not publish the next iteration of run %s; the sweep will", run_id)

    def _save(
        self,
        writer: Tx | Store,  # an open transaction, or the store for one of its own
        run: RunSnapshot,
        transition: Transition,
        *,
        guard: Guard,
        now: datetime,
        lease_until: datetime | None = None,
        durable: bool = True,
    ) -> bool:
        transition = sanitize.scrub_transition(transition)
        secrets = secret_values(
            {**run.context, **transition.context_updates}, [*run.steps, *transition.new_steps]
        )
        events = [
            e.model_copy(
                update={"message": redact(e.message, secrets), "data": redact(e.data, secrets)}
            )
            for e in transition.events
        ]
        next_run_at = (
            None if transition.delay is None else now + timedelta(seconds=transition.delay)
        )
        if lease_until is not None:
            next_run_at = None
        written = writer.apply(
            run,
            transition.model_copy(update={"events": events}),
            guard=guard,
            now=now,
            next_run_at=next_run_at,
            lease_until=lease_until,
            durable=durable,
        )
        return written is not None

    # --- slow work (no transaction open) ----------------------------------------------

    def _idempotent(self, step: Step) -> bool:
        return step.tool in self.tools and self.tools.get(step.tool).idempotent

    def _step_timeout(self, run: RunSnapshot, step: Step, now: datetime) -> float:
        """The tool's own timeout, but never past the run's deadline."""
        remaining = (run.deadline - now).total_seconds()
        own = self.tools.get(step.tool).timeout if step.tool in self.tools else 60.0
        return max(1.0, min(own, remaining))

    def _resolve_args(self, run: RunSnapshot, step: Step) -> JSONDict | StepFailed:
        """The step's args with references to earlier results filled in."""
        refs = find_refs(step.args)
        if not refs:
            return step.args
        with self.store.transaction() as tx:
            results = tx.step_results(run.id, {ref.position for ref in refs})
        try:
            return resolve_refs(step.args, results)
        except RefError as exc:
            return StepFailed(error=str(exc), error_class=ErrorClass.PERMANENT)

    def _execute(self, run: RunSnapshot, step: Step, args: JSONDict | StepFailed) -> StepOutcome:
        if isinstance(args, StepFailed):
            return args
        try:
            tool = self.tools.get(step.tool)
        except UnknownTool as exc:
            return StepFailed(error=str(exc.args[0]), error_class=ErrorClass.PERMANENT)
        workspace = self.workspaces / run.id
        workspace.mkdir(parents=True, exist_ok=True)
        ctx = ToolContext(
            run_id=run.id,
            step_id=step.id,
            idempotency_key=step.idempotency_key,
            workspace=workspace,
            env=dict(run.context),
            settings=self.tool_settings,
        )
        return run_tool(tool, args, ctx, timeout=self._step_timeout(run, step, self.clock()))

    def _plan(self, planner_kind: str, request: PlanRequest) -> PlanOutcome:
        try:
            planner = self.planners(planner_kind)
        except ValueError as exc:
            return PlannerFatal(error=str(exc))

        def check(steps: list[PlannedStep]) -> list[str]:
            return self.check_plan(steps, rejected=request.rejected)

        outcome = planner.plan(request, check=check)
        if isinstance(outcome, PlanProduced) and (
            problems := check_refs(
                outcome.steps,
                completed_positions(request),
                first_position=next_position(request),
            )
            + check(outcome.steps)
        ):
            # Never trust a planner to have validated its own output.
            return PlanInvalid(
                error="; ".join(problems),
                raw=[s.model_dump() for s in outcome.steps],
                usage=outcome.usage,
            )
        return outcome

    def check_plan(
        self, steps: list[PlannedStep], *, rejected: Sequence[StepView] = ()
    ) -> list[str]:
        """Problems with proposed steps: unknown tools, arguments that fail validation,
        and calls a person already rejected in this run (same tool, same args).

        Args that refer to earlier results are validated except where the references
        are: those parts are validated when the step runs, once filled in.
        """
        refused = {(r.tool, args_hash(r.args)): r for r in rejected}
        problems: list[str] = []
        for position, step in enumerate(steps, 1):
            unresolved = [ref.where for ref in find_refs(step.args)]
            found = self.tools.check_args(step.tool, step.args, unresolved=unresolved)
            if earlier := refused.get((step.tool, args_hash(step.args))):
                found.append(
                    f"{step.tool} {json.dumps(step.args, sort_keys=True)[:300]} repeats the "
                    f"call of step {earlier.position}, which was {earlier.error}; propose "
                    "something else, or leave it out"
                )
            problems += [f"step {position}: {p}" for p in found]
        return problems

    def _plan_request(self, tx: Tx, row: Row[Any], run: RunSnapshot, action: Plan) -> PlanRequest:
        """What the planner is told; bounded whatever the run's length."""
        recent = tx.recent_events(run.id, RECENT_EVENTS)
        summary = self._fold_memory(tx, row, recent)
        positions = tx.step_positions([e.step_id for e in recent if e.step_id is not None])
        return PlanRequest(
            run_id=run.id,
            task=run.task,
            purpose=action.purpose,
            config=run.config,
            tools=self._tool_specs(),
            failure=action.failure,
            completed=[
                StepView.of(s) for s in tx.completed_steps(run.id, limit=RECENT_COMPLETED_STEPS)
            ],
            current_plan=[StepView.of(s) for s in run.steps],
            recent_events=[_event_view(e, positions) for e in recent],
            memory_summary=summary,
            context_keys=sorted(run.context),
            secrets=secret_values(run.context, run.steps),
            rejected=[StepView.of(s) for s in tx.rejected_steps(run.id, limit=REJECTED_STEPS)],
            **_budget_left(run),
        )

    def _tool_specs(self) -> list[ToolSpec]:
        policies = self.tools.policies()
        return [
            ToolSpec(
                **spec,
                requires_approval=policies[spec["name"]].requires_approval,
                idempotent=policies[spec["name"]].idempotent,
            )
            for spec in self.tools.specs()
        ]

    def _fold_memory(self, tx: Tx, row: Row[Any], recent: list[Row[Any]]) -> str:
        """Fold events older than the recent window into the run's running summary."""
        if not recent:
            return str(row.memory_summary)
        older = tx.events_between(
            row.id,
            after_id=row.summarized_through,
            before_id=recent[0].id,
            limit=SUMMARY_FOLD_LIMIT,
        )
        if not older:
            return str(row.memory_summary)
        summary = summarize_events(
            row.memory_summary, [_event_view(e, {}) for e in older], max_chars=4000
        )
        tx.save_memory_summary(row.id, summary, older[-1].id)
        return summary

    # --- people -------------------------------------------------------------------------

    def approve(
        self,
        run_id: str,
        *,
        by: str,
        args: Mapping[str, Any] | None = None,
        comment: str = "",
        approval_id: str | None = None,
        channel: str | None = None,
    ) -> None:
        """Approve the paused step (optionally with edited args). Raises NotFound, Conflict,
        InvalidInput."""
        self.decide(
            run_id,
            Decision.APPROVE,
            by=by,
            comment=comment,
            edited_args=args,
            approval_id=approval_id,
            channel=channel,
        )

    def reject(
        self,
        run_id: str,
        *,
        by: str,
        reason: str,
        approval_id: str | None = None,
        channel: str | None = None,
    ) -> None:
        if not reason.strip():
            raise InvalidInput("a rejection needs a reason: the agent re-plans around it")
        self.decide(
            run_id,
            Decision.REJECT,
            by=by,
            comment=reason,
            approval_id=approval_id,
            channel=channel,
        )

    def decide(
        self,
        run_id: str,
        decision: Decision,
        *,
        by: str,
        comment: str = "",
        edited_args: Mapping[str, Any] | None = None,
        approval_id: str | None = None,
        channel: str | None = None,
    ) -> None:
        """Record a person's decision on a paused run, exactly once, and resume it.

        `channel` (web, email, api, cli) is kept in the audit event with who decided."""
        check_text(comment, "the comment")
        if edited_args is not None:
            check_json(dict(edited_args), "args")
        if approval_id is not None and sanitize.text_problem(approval_id):
            raise NotFound(f"no approval with id {approval_id!r}")
        now = self.clock()
        with self.store.transaction() as tx:
            row = tx.lock_run(self._known_id(run_id))  # the run row first: one lock order
            pending = tx.get_approval(approval_id) if approval_id else tx.pending_approval(run_id)
            if pending is None or pending.run_id != run_id or pending.status != "pending":
                raise Conflict(self._why_not_pending(row, pending))
            kind = PauseKind(pending.kind)
            if decision not in DECISIONS_FOR[kind]:
                allowed = ", ".join(sorted(DECISIONS_FOR[kind]))
                raise InvalidInput(f"this pause ({kind}) takes one of: {allowed}")
            step = tx.get_step(pending.step_id)
            if edited_args is not None and (
                problems := self.tools.check_args(step.tool, edited_args)
            ):
                raise InvalidInput("edited args are invalid: " + "; ".join(problems))
            decided = tx.decide_approval(
                pending.id,
                decision=decision,
                by=by,
                comment=comment,
                edited_args=dict(edited_args) if edited_args is not None else None,
                now=now,
            )
            if decided is None:
                raise Conflict("this approval was already decided")
            transition = fold_decision(
                step,
                kind,
                decision,
                by=by,
                context=row.context or {},
                reason=comment,
                edited_args=dict(edited_args) if edited_args is not None else None,
            )
            if channel:
                transition = _via(transition, channel)
            run = snapshot_from_row(row, [step])
            tick = tx.apply(
                run, transition, guard=Guard(status=RunStatus.PAUSED), now=now, next_run_at=now
            )
            if tick is None:
                raise Conflict(f"run {run_id} is no longer paused")
        self._after_commit(run_id, tick, transition)

    @staticmethod
    def _known_id(run_id: str) -> str:
        """`run_id`, or NotFound for one no run can have (it would not even reach the
        database: a NUL, say)."""
        if sanitize.text_problem(run_id) or len(run_id) > MAX_RUN_ID_CHARS:
            raise NotFound(f"no run with id {run_id!r}")
        return run_id

    @staticmethod
    def _why_not_pending(row: Row[Any], approval: Row[Any] | None) -> str:
        if approval is not None and approval.status == "decided":
            return (
                f"already decided: {approval.decision} by {approval.decided_by} "
                f"at {approval.decided_at:%Y-%m-%d %H:%M:%S} UTC"
            )
        if approval is not None and approval.status != "pending":
            return f"this approval is {approval.status}"
        return f"run {row.id} is {row.status}, not waiting for a decision"

    def cancel(self, run_id: str, *, by: str) -> None:
        """Cancel a queued, running or paused run. Raises NotFound, Conflict."""
        now = self.clock()
        with self.store.transaction() as tx:
            row = tx.lock_run(self._known_id(run_id))  # the run row first: one lock order
            active = (RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.PAUSED)
            if (
                tx.set_status(
                    run_id,
                    RunStatus.CANCELLED,
                    error=f"cancelled by {by}",
                    now=now,
                    only_from=active,
                )
                is None
            ):
                raise Conflict(f"run {run_id} is {row.status}; only an active run can be cancelled")
            tx.close_approvals(run_id, "cancelled")
            tx.insert_events(run_id, row.iteration, [_status_event(f"run cancelled by {by}")], now)

    # --- reading ----------------------------------------------------------------------

    def status(self, run_id: str, *, after_event: int = 0) -> RunView:
        """The run, all its steps and its events after `after_event`. Raises NotFound."""
        with self.store.transaction() as tx:
            return RunView(
                run=tx.get_run(self._known_id(run_id)),
                steps=tx.all_steps(run_id),
                events=tx.events_after(run_id, after_event, limit=10_000),
                pending_approval=tx.pending_approval(run_id),
            )

    # --- healing --------------------------------------------------------------------

    def sweep(self) -> int:
        """Nudge active runs whose message was lost; returns how many were nudged.

        Each nudge is claimed in the database first, so a run has at most one nudge
        outstanding until a claim consumes it, however often the sweep runs and
        however far behind the queue is. An outstanding nudge is taken for lost
        after `nudge_timeout` — or at once when the queue holds fewer messages than
        there are outstanding nudges (the broker lost them: a restart, a flush)."""
        now = self.clock()
        overdue = now - timedelta(seconds=self.sweep_grace)
        renudge_before = now - timedelta(seconds=self.nudge_timeout)
        with self.store.transaction() as tx:
            outstanding = tx.count_nudged(before=overdue, now=now)
        depth = self.dispatcher.queue_depth() if outstanding else None
        if depth is not None and depth < outstanding:
            log.info("%d nudge(s) outstanding, %d message(s) queued", outstanding, depth)
            renudge_before = overdue
        with self.store.transaction() as tx:
            due = tx.claim_nudges(before=overdue, renudge_before=renudge_before, now=now)
        for row in due:
            self._publish(row.id, row.tick, 0)
        if due:
            log.info("sweep nudged %d run(s)", len(due))
        return len(due)

    # --- the people around a run: web app, notifications -----------------------------

    def list_runs(self, *, status: str | None = None, limit: int = 25, offset: int = 0) -> RunPage:
        """Newest first, optionally only runs with `status`; with the total for paging."""
        with self.store.transaction() as tx:
            return RunPage(
                rows=tx.list_runs(status=status, limit=limit, offset=offset),
                total=tx.count_runs(status=status),
            )

    def approval(self, approval_id: str) -> ApprovalView:
        """An approval with its run, its step and the plan around it. Raises NotFound."""
        if sanitize.text_problem(approval_id):
            raise NotFound(f"no approval with id {approval_id!r}")
        with self.store.transaction() as tx:
            row = tx.get_approval(approval_id)
            if row is None:
                raise NotFound(f"no approval with id {approval_id!r}")
            step = tx.get_step(row.step_id)
            return ApprovalView(
                approval=row,
                run=tx.get_run(row.run_id),
                step=step,
                plan=tx.plan_steps(row.run_id, step.plan_version),
            )

    def record_event(self, run_id: str, event: NewEvent) -> None:
        """Append to a run's timeline without touching its state (a notification that
        was sent, or could not be). Raises NotFound."""
        now = self.clock()
        with self.store.transaction() as tx:
            row = tx.get_run(run_id)
            tx.insert_events(run_id, row.iteration, [event], now)

    def expire_approvals(self, *, ttl: float, policy: str) -> int:
        """Settle approvals nobody decided within `ttl` seconds: "reject" (the agent
        re-plans around the step) or "fail" the run. Returns how many were settled.

        Only yes/no approvals expire: an unknown outcome (did the deploy happen?) is
        not something a timer can answer."""
        now = self.clock()
        with self.store.transaction() as tx:
            overdue = tx.overdue_approvals(
                kind=PauseKind.APPROVAL, opened_before=now - timedelta(seconds=ttl), now=now
            )
        settled = sum(self._expire(a.id, ttl=ttl, policy=policy) for a in overdue)
        if settled:
            log.info("expired %d approval(s) (policy: %s)", settled, policy)
        return settled

    def _expire(self, approval_id: str, *, ttl: float, policy: str) -> bool:
        now = self.clock()
        reason = f"nobody decided within {ttl:g} s, so the approval expired"
        with self.store.transaction() as tx:
            seen = tx.get_approval(approval_id)
            if seen is None:
                return False
            row = tx.lock_run(seen.run_id)  # the run row first: one lock order
            approval = tx.expire_approval(approval_id, now=now)
            if approval is None:
                return False  # decided, or expired by another beat, in the meantime
            step = tx.get_step(approval.step_id)
            if policy == "fail":
                transition = fail(f"step {step.position} ({step.tool}): {reason}")
            else:
                transition = fold_decision(
                    step,
                    PauseKind.APPROVAL,
                    Decision.REJECT,
                    by="agentloop",
                    context=row.context or {},
                    reason=reason,
                )
            run = snapshot_from_row(row, [step])
            tick = tx.apply(
                run,
                transition,
                guard=Guard(status=RunStatus.PAUSED),
                now=now,
                next_run_at=now if transition.delay is not None else None,
            )
        if tick is None:
            return False  # the run was no longer paused (cancelled): nothing to resume
        self._after_commit(approval.run_id, tick, transition)
        return True


def _budget_left(run: RunSnapshot) -> dict[str, Any]:
    """What a run's budgets have left, as PlanRequest's tokens_left and usd_left."""
    cfg = run.config
    return {
        "tokens_left": None
        if cfg.budget_tokens is None
        else max(0, cfg.budget_tokens - run.tokens_total),
        "usd_left": None if cfg.budget_usd is None else max(0.0, cfg.budget_usd - run.cost_usd),
    }


def check_text(text: str, what: str) -> str:
    """`text` from a person, or InvalidInput saying what it holds that cannot be kept."""
    if problem := sanitize.text_problem(text):
        raise InvalidInput(f"{what} {problem}")
    return text


def check_json(value: Any, what: str) -> None:
    """InvalidInput naming every part of `value` (from a person) that cannot be kept."""
    if found := sanitize.problems(value, what=what):
        raise InvalidInput("; ".join(found[:5]))


def _scoped_key(key: str | None, created_by: str | None) -> str | None:
    """An idempotency key is the creator's own: two people may use the same one."""
    if key is None:
        return None
    key = check_text(key.strip(), "the idempotency key")
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS:
        raise InvalidInput(
            f"the idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters"
        )
    return f"{created_by or ''}\x1f{key}"


def _status_event(message: str) -> NewEvent:
    return NewEvent(kind=EventKind.STATUS, message=message)


def _error_event(message: str) -> NewEvent:
    return NewEvent(kind=EventKind.ERROR, message=message)


def _event_view(row: Row[Any], positions: Mapping[int, int]) -> EventView:
    return EventView(
        id=row.id,
        kind=row.kind,
        message=row.message,
        step_position=positions.get(row.step_id) if row.step_id is not None else None,
        created_at=row.created_at,
        data=row.data or {},
    )


@dataclass(frozen=True)
class RunPage:
    """One page of the runs list, and how many runs match in all."""

    rows: list[Row[Any]]
    total: int


@dataclass(frozen=True)
class ApprovalView:
    """What a person deciding on an approval is shown."""

    approval: Row[Any]
    run: Row[Any]
    step: Step
    plan: list[Step]


def _via(transition: Transition, channel: str) -> Transition:
    """The decision's audit event, with the channel it came through."""
    events = [
        e.model_copy(
            update={
                "message": f"{e.message} (via {channel})",
                "data": {**e.data, "channel": channel},
            }
        )
        if e.kind is EventKind.APPROVAL
        else e
        for e in transition.events
    ]
    return transition.model_copy(update={"events": events})
