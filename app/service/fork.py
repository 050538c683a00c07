"""Time travel: fork a run from step N, and read a run's lineage.

A fork is a new run whose history is its parent's through step N (what "step N"
means: app/engine/lineage.py). It keeps, copied into the new run:
- every step through N as it ended (results, errors, attempts), and the run
  context exactly as it was right after step N;
- the parent's events up to the last one about step N, so the timeline and the
  planner's memory read as the parent's did then;
- the parent's workspace files, copied (they are not kept per step, so the copy
  is the workspace as the parent has it when the fork is made);
- what the parent had spent by then: iterations, re-plans, tokens and cost. The
  fork continues the parent's story, so max_iterations, max_replans and the
  budgets count from where the parent was at step N, as if it had continued from
  there; only the timeout starts again (a deadline in the past means nothing).

Nothing is replayed: the copied steps are history, never executed again. The
fork's first iteration finds every kept step finished and asks the planner what
is still needed (with the optional instruction added to the task), and every
step it plans runs through the usual approval rules. No approval carries over:
approvals are not copied and no kept step keeps its approval mark, so a deploy
after N asks again even though someone approved it in the parent.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from secrets import token_hex
from typing import Any

from pydantic import ValidationError

from app.engine.actions import LlmUsage, NewEvent
from app.engine.lineage import ForkPoint, ForkRefused, StepNotCompleted, fork_point
from app.engine.models import (
    MAX_TASK_CHARS,
    EventKind,
    RunConfig,
    RunStatus,
    idempotency_key,
)
from app.errors import Conflict, InvalidInput, NotFound
from app.service.base import ServiceBase
from app.service.inputs import check_text
from app.service.permissions import Actor, name_of, require_role
from app.store.accounts import Role
from app.store.records import EventRecord, RunRecord
from app.store.repo import Tx

log = logging.getLogger(__name__)

MAX_INSTRUCTION_CHARS = 2_000


@dataclass(frozen=True)
class Lineage:
    """Where a run came from and what was forked from it."""

    parent_id: str | None
    forked_from_step: int | None
    parent: RunRecord | None  # None when it is not here (pruned, or imported without it)
    forks: list[RunRecord]


class Forks(ServiceBase):
    def fork_run(
        self,
        run_id: str,
        *,
        from_step: int,
        by: Actor | str,
        instruction: str | None = None,
    ) -> str:
        """A new run with run `run_id`'s history through step `from_step` (see the
        module's docstring), queued to plan what is still needed; returns its id.

        Raises NotFound (no such run), InvalidInput (no such step; an instruction
        that cannot be kept or makes the task too long; the parent's planner is not
        available here), Conflict (the step did not complete), Forbidden (forking
        takes the operator role, as creating runs does).
        """
        require_role(by, Role.OPERATOR, "fork runs")
        who = name_of(by)
        note = check_text((instruction or "").strip(), "the instruction")
        if len(note) > MAX_INSTRUCTION_CHARS:
            raise InvalidInput(
                f"the instruction is {len(note)} characters; the limit is {MAX_INSTRUCTION_CHARS}"
            )
        fork_id = token_hex(8)
        with self.store.transaction() as tx:
            parent = tx.get_run(self._known_id(run_id))
            point = _point(tx, run_id, from_step)
            last = tx.last_event_of_step(run_id, point.step.id)
            history = [] if last is None else tx.events_through(run_id, last)
        task = _forked_task(parent.task, from_step, note)
        try:
            self.planners(parent.planner)  # the fork plans next: with the parent's planner
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        workspace = self._copy_workspace(parent.id, fork_id)
        try:
            self._store_fork(fork_id, parent, point, history, task, who, note)
        except BaseException:
            shutil.rmtree(workspace, ignore_errors=True)
            raise
        self._publish(fork_id, 0, 0)
        return fork_id

    def _store_fork(
        self,
        fork_id: str,
        parent: RunRecord,
        point: ForkPoint,
        history: list[EventRecord],
        task: str,
        who: str,
        note: str,
    ) -> None:
        """The fork's run, its copy of the history, and a note in both timelines."""
        now = self.clock()
        with self.store.transaction() as tx:
            tx.insert_run_row(_fork_row(fork_id, parent, point, history, task, who, now))
            new_ids = _copy_steps(tx, parent.id, fork_id, point.position)
            tx.insert_event_rows([_copied(e, fork_id, new_ids) for e in history])
            tx.insert_events(
                fork_id, _first_iteration(history), [_fork_event(parent, point, who, note)], now
            )
            tx.insert_events(
                parent.id,
                parent.iteration,
                [
                    NewEvent(
                        kind=EventKind.STATUS,
                        message=f"forked by {who} at step {point.position} into run {fork_id}",
                        data={"fork": fork_id, "from_step": point.position},
                    )
                ],
                now,
            )

    def _copy_workspace(self, parent_id: str, fork_id: str) -> Path:
        """The fork's workspace: a copy of the parent's files (a checkout, a build), so
        that steps after N find what steps through N left. Files are not kept per step:
        the copy is the workspace as the parent has it now, later steps' files
        included. Like prune, it assumes the workers share AGENTLOOP_DATA_DIR.
        Raises Conflict when a file cannot be copied (one a running step is changing,
        a pipe): nothing is left behind, and forking again may work."""
        source, target = self.workspaces / parent_id, self.workspaces / fork_id
        if not source.is_dir():
            return target
        try:
            shutil.copytree(source, target, symlinks=True)
        except (OSError, shutil.Error) as exc:
            shutil.rmtree(target, ignore_errors=True)
            why = _first_problem(exc)
            raise Conflict(f"could not copy run {parent_id}'s workspace: {why}") from None
        return target

    def lineage(self, run_id: str) -> Lineage:
        """The run's parent (if it was forked) and its forks. Raises NotFound."""
        with self.store.transaction() as tx:
            run = tx.get_run(self._known_id(run_id))
            parent = None
            if run.parent_run_id is not None:
                try:
                    parent = tx.get_run(run.parent_run_id)
                except NotFound:
                    parent = None
            return Lineage(
                parent_id=run.parent_run_id,
                forked_from_step=run.forked_from_step,
                parent=parent,
                forks=tx.forks_of(run.id),
            )


def _fork_row(
    fork_id: str,
    parent: RunRecord,
    point: ForkPoint,
    history: list[EventRecord],
    task: str,
    who: str,
    now: datetime,
) -> dict[str, Any]:
    """The fork's run row: the parent's config and planner, its counters as they were
    at step N, a fresh deadline, queued to start now."""
    tokens, cost = spent(history)
    config = RunConfig.from_stored(parent.config)
    return {
        "id": fork_id,
        "task": task,
        "status": RunStatus.QUEUED,
        "planner": parent.planner,
        "config": parent.config,
        "context": point.context,
        "iteration": _first_iteration(history),
        "tick": 0,
        "plan_version": point.plan_version,
        "replans": sum(1 for e in history if _plan_purpose(e) == "replan"),
        "planner_failures": 0,
        "deadline": now + timedelta(seconds=config.timeout),
        "next_run_at": now,
        "tokens_total": tokens,
        "cost_usd": cost,
        "memory_summary": "",
        "summarized_through": 0,
        "created_by": who,
        "created_at": now,
        "updated_at": now,
        "parent_run_id": parent.id,
        "forked_from_step": point.position,
    }


def _first_iteration(history: list[EventRecord]) -> int:
    """The fork's own first iteration number, the one its creation is recorded at:
    the one after the last it keeps (as a new run's creation is at iteration 0)."""
    return history[-1].iteration + 1 if history else 0


def _first_problem(exc: OSError | shutil.Error) -> str:
    """One line about a failed copy (shutil.Error carries a list of them)."""
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list):
        source, _, why = exc.args[0][0]
        return f"{Path(source).name}: {why}"
    return str(exc)


def _point(tx: Tx, run_id: str, position: int) -> ForkPoint:
    try:
        return fork_point(tx.all_steps(run_id), position)
    except StepNotCompleted as exc:
        raise Conflict(str(exc)) from None
    except ForkRefused as exc:
        raise InvalidInput(str(exc)) from None


def _forked_task(task: str, position: int, instruction: str) -> str:
    """The parent's task, and the instruction for the fork after it (the planner
    reads the task; an offline runbook still matches the parent's words)."""
    if not instruction:
        return task
    forked = f"{task}\n\nInstruction for this fork (from step {position}): {instruction}"
    if len(forked) > MAX_TASK_CHARS:
        raise InvalidInput(
            f"the task with the instruction is {len(forked)} characters; the limit is "
            f"{MAX_TASK_CHARS}: shorten the instruction"
        )
    return forked


def _copy_steps(tx: Tx, parent_id: str, fork_id: str, through: int) -> dict[int, int]:
    """Copy the parent's steps through position `through` into the fork, as they
    ended but without any approval mark; returns parent step id -> fork step id."""
    new_ids: dict[int, int] = {}
    for row in tx.step_rows(parent_id):
        if row["position"] > through:
            continue
        old_id = int(row.pop("id"))
        row.update(
            run_id=fork_id,
            approved_args_hash=None,
            idempotency_key=idempotency_key(fork_id, row["plan_version"], row["position"]),
        )
        new_ids[old_id] = tx.insert_step_row(row)
    return new_ids


def _copied(event: EventRecord, fork_id: str, new_ids: dict[int, int]) -> dict[str, Any]:
    return {
        "run_id": fork_id,
        "iteration": event.iteration,
        "step_id": None if event.step_id is None else new_ids.get(int(event.step_id)),
        "kind": event.kind,
        "message": event.message,
        "data": event.data,
        "created_at": event.created_at,
    }


def _fork_event(parent: RunRecord, point: ForkPoint, who: str, instruction: str) -> NewEvent:
    told = f"; instruction: {instruction}" if instruction else ""
    return NewEvent(
        kind=EventKind.STATUS,
        message=f"forked by {who} from run {parent.id} at step {point.position} "
        f"({point.step.tool}): steps 1-{point.position} kept as they ended "
        f"({point.completed} completed), context as it was then; what follows is planned "
        f"again, and every step needing approval asks again{told}",
        data={
            "forked_from": parent.id,
            "from_step": point.position,
            "instruction": instruction or None,
            "context_keys": sorted(point.context),
        },
    )


def spent(events: list[EventRecord]) -> tuple[int, float]:
    """Tokens and cost of the planner calls among `events` (their llm_call records)."""
    tokens, cost = 0, 0.0
    for event in events:
        if event.kind != EventKind.LLM_CALL:
            continue
        try:
            usage = LlmUsage.model_validate(event.data)
        except ValidationError:
            log.warning("llm_call event %s holds no usage; not counted", event.id)
            continue
        tokens += usage.total_tokens
        cost += usage.cost_usd
    return tokens, cost


def _plan_purpose(event: EventRecord) -> str | None:
    if event.kind != EventKind.PLAN or not isinstance(event.data, dict):
        return None
    purpose = event.data.get("purpose")
    return purpose if isinstance(purpose, str) else None
