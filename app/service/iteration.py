"""One iteration: read the run, decide, claim it with the iteration's first write
(conditional on the run being as read), do the slow work with no transaction
open, save the outcome under the lease, commit, and only then publish the next."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row
from sqlalchemy.exc import DBAPIError

from app import logs, metrics, tracing
from app.engine import sanitize
from app.engine.actions import (
    Action,
    AwaitHuman,
    Execute,
    Fail,
    Plan,
    PlanOutcome,
    StepFailed,
    StepOutcome,
    StepSucceeded,
    Transition,
)
from app.engine.apply import apply_transition
from app.engine.machine import begin_step, decide, fail, fold_plan, fold_step, pause, stop
from app.engine.models import ACTIVE_STATUSES, EventKind, JSONDict, RunSnapshot
from app.engine.routing import WorkKind, work_of
from app.planner.base import PlanRequest
from app.service.base import error_event
from app.service.context import Context
from app.service.work import Work
from app.store.repo import Guard, database_away
from app.tools.registry import THREAD_STOP_GRACE

log = logging.getLogger(__name__)


# Waits between attempts to save an outcome while the database is away.
SAVE_RETRY_FIRST_WAIT = 0.25
SAVE_RETRY_MAX_WAIT = 4.0


def did_label(run: RunSnapshot, action: Action) -> str:
    """An iteration's work in a few words: `execute step 3 (deploy)`, `plan (replan)`."""
    match action:
        case Plan():
            return f"plan ({action.purpose})"
        case Execute() | AwaitHuman():
            step = run.step(action.step_id)
            return f"{action.type} step {step.position} ({step.tool})"
    return action.type


@dataclass(frozen=True)
class Claimed:
    """A run this worker has just claimed for slow work, and how long its lease holds."""

    run: RunSnapshot
    lease_until: datetime


@dataclass(frozen=True)
class SlowWork:
    """What the slow part of an iteration needs, read when the run was claimed."""

    run: RunSnapshot
    lease_until: datetime
    request: PlanRequest | None = None
    args: JSONDict | StepFailed = field(default_factory=dict)


class Iteration(Context, Work):
    @tracing.iteration_span
    @logs.in_iteration  # the run id, iteration, step and tool on every log line
    def advance(self, run_id: str, tick: int, *, kind: WorkKind | None = None) -> str:
        """Advance a run by one iteration, if this message is still current. `kind`: the
        work the queue this message came from is for; a message that finds the other
        kind due is forwarded to that kind's queue, unclaimed (None: do it here).
        Returns what the message led to, in a few words (the worker's task returns it:
        Flower's Result column and the worker log show which step an iteration ran).

        Raises the database's OperationalError when it cannot be reached before the
        claim (nothing was written: the message may simply be delivered again). Any
        other unexpected error fails the run with the reason recorded — but only
        while this worker may still write to it (see _fail_internal) — and is raised.
        """
        started = time.perf_counter()
        now = self.clock()
        stored = self.store.read_for_claim(run_id)
        if stored is None:
            log.warning("advance: run %s does not exist", run_id)
            return "no such run"
        if unclaimable := self._unclaimable(stored.row, tick, now, kind):
            return unclaimable
        run = stored.as_claimed()
        # Until the claim commits, the run may be written only if it is still as read.
        guard = Guard.claim(self.worker_id, stored.row)
        try:
            action = decide(run, now=now, tools=self.tools.policies())
            logs.bind_action(run, action)
            tracing.decided(run, action)
            did = did_label(run, action)
            if forwarded := self._forwarded(run_id, tick, action, kind):
                return f"{did}: forwarded to the {forwarded} queue"
            claimed = self._claim(stored.row, run, action, now)
            if claimed is None:  # another worker claimed the run first, or it changed
                return f"{did}: claimed by another worker first"
            metrics.queue_lag(stored.row.next_run_at, now)
            if isinstance(claimed, Transition):
                self._after_commit(run.id, run.tick, claimed)
                metrics.iteration(action, time.perf_counter() - started)
                return did
            run = claimed.run
            guard = Guard(owner=self.worker_id, tick=run.tick)  # the lease is ours now
            assert isinstance(action, Execute | Plan)  # only slow work leaves _claim unsettled
            work = self._prepare(stored.row, claimed, action)
            self._finish(work, action, self._slow_work(stored.row.planner, work, action))
            metrics.iteration(action, time.perf_counter() - started)
            return did
        except DBAPIError as exc:
            if database_away(exc):
                raise  # nothing more can be written now; the lease lapses, others recover
            self._fail_internal(run, guard, exc)
            raise
        except Exception as exc:
            self._fail_internal(run, guard, exc)
            raise

    def _forwarded(
        self, run_id: str, tick: int, action: Action, kind: WorkKind | None
    ) -> WorkKind | None:
        """Publish this message again on the queue for the work `action` does when it
        came on the other one (the publisher guessed wrong, or could not know: the
        sweep); the run is left as it is, still due, for a worker of that kind. Returns
        that kind when it did."""
        needed = work_of(action)
        if kind is None or needed is None or needed is kind:
            return None
        tracing.forwarded(needed)
        self._publish(run_id, tick, 0, needed)
        return needed

    def _unclaimable(
        self, row: Row[Any], tick: int, now: datetime, kind: WorkKind | None
    ) -> str | None:
        """Why this message may not claim the run, or None when it may (the claim itself
        checks again). A stale or duplicate one may not, nor one for a run leased to a
        live worker; an early one, early because the broker countdown is capped, is
        published again for the rest."""
        if row.tick != tick or row.status not in ACTIVE_STATUSES:
            return f"stale message (the run is {row.status} at tick {row.tick})"
        if row.lease_expires_at is not None and row.lease_expires_at >= now:
            return "the run is leased to a live worker"
        if row.next_run_at is not None and row.next_run_at > now:
            if row.lease_owner is None:
                rest = (row.next_run_at - now).total_seconds()
                self._publish(row.id, tick, rest, kind or WorkKind.TOOL)
                return f"early: published again for the last {rest:.0f} s"
            return "not due yet"
        return None

    @tracing.child_span("agentloop.claim", tracing.claimed)
    def _claim(
        self,
        row: Row[Any],
        run: RunSnapshot,
        action: Fail | AwaitHuman | Execute | Plan,
        now: datetime,
    ) -> Transition | Claimed | None:
        """Claim the run with the first write of the iteration: settle a quick action
        (returning what it changed) or mark slow work begun (returning the run as
        claimed). None if the run is no longer as it was read."""
        claim = Guard.claim(self.worker_id, row)
        match action:
            case Fail() | AwaitHuman():
                settled = stop(action) if isinstance(action, Fail) else pause(run, action)
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
                return Claimed(apply_transition(run, began), lease_until)
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
                return Claimed(run, lease_until)

    def _prepare(self, row: Row[Any], claimed: Claimed, action: Execute | Plan) -> SlowWork:
        """What the slow work needs, read under the lease just taken: a step's args
        with their references filled in, or what the planner is told."""
        run = claimed.run
        if isinstance(action, Execute):
            args = self._resolve_args(run, run.step(action.step_id))
            return SlowWork(run, lease_until=claimed.lease_until, args=args)
        with self.store.transaction() as tx:
            # A new plan supersedes every pending step: the planner and the fold see the
            # whole current plan, not only the steps `decide` looked at.
            plan = tx.plan_steps(run.id, run.plan_version)
            run = run.model_copy(update={"steps": plan})
            request = self._plan_request(tx, row, run, action)
        return SlowWork(run, lease_until=claimed.lease_until, request=request)

    @tracing.slow_work_span
    def _slow_work(
        self, planner_kind: str, work: SlowWork, action: Execute | Plan
    ) -> StepOutcome | PlanOutcome:
        """The tool call or the planner call, with no transaction open."""
        if isinstance(action, Execute):
            return self._execute(work.run, work.run.step(action.step_id), work.args)
        assert work.request is not None
        return self._plan(planner_kind, work.request)

    def _finish(
        self, work: SlowWork, action: Execute | Plan, outcome: StepOutcome | PlanOutcome
    ) -> None:
        run = work.run
        jitter = self.jitter()
        if isinstance(action, Execute) and isinstance(outcome, StepSucceeded | StepFailed):
            step = run.step(action.step_id)
            metrics.tool_call(step.tool, outcome)
            transition = fold_step(
                run,
                step,
                outcome,
                policy=self.tools.policies().get(step.tool),
                jitter_sample=jitter,
            )
        elif isinstance(action, Plan) and not isinstance(outcome, StepSucceeded | StepFailed):
            metrics.llm_usage(outcome)
            transition = fold_plan(run, action, outcome, jitter_sample=jitter)
        else:
            raise TypeError(f"outcome {type(outcome).__name__} does not answer {action.type}")
        if self._save_outcome(run, transition, lease_until=work.lease_until):
            self._after_commit(run.id, run.tick, transition)
            return
        now = self.clock()
        discarded = error_event(
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

    @tracing.child_span("agentloop.save", tracing.saved)
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
            update={"events": [error_event(reason), *fail(reason).events]}
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
