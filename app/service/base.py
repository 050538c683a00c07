"""What every part of the service shares: its collaborators and settings, the
one path a transition is written by, and publishing after the commit."""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from secrets import token_hex
from typing import Any

from app.engine import sanitize
from app.engine.actions import NewEvent, Transition
from app.engine.models import EventKind, RunSnapshot
from app.engine.redact import redact, secret_values
from app.engine.routing import WorkKind, next_work
from app.errors import NotFound
from app.service.inputs import MAX_RUN_ID_CHARS
from app.service.permissions import ApprovalPolicy
from app.service.ports import Dispatcher, Notice, Notifier, PlannerFactory, notice_for
from app.store.repo import Guard, Store, Tx
from app.tools.registry import ToolRegistry

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{token_hex(3)}"


def status_event(message: str) -> NewEvent:
    return NewEvent(kind=EventKind.STATUS, message=message)


def error_event(message: str) -> NewEvent:
    return NewEvent(kind=EventKind.ERROR, message=message)


@dataclass
class ServiceBase:
    """The service's collaborators and settings, and the one path every write takes
    (`_save`) and every publish after it (`_after_commit`)."""

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
    # Who approves any run (a run may add approvers), and whether a run's creator
    # may approve its own steps.
    policy: ApprovalPolicy = field(default_factory=ApprovalPolicy)
    # How long a nudge may wait in the queue before the sweep takes it for lost.
    nudge_timeout: float = 120.0
    # Time that decides ownership (leases, due times) must be the database's: wiring
    # passes a DatabaseClock; tests a manual one.
    clock: Callable[[], datetime] = utcnow
    sleep: Callable[[float], None] = time.sleep
    jitter: Callable[[], float] = random.random
    worker_id: str = field(default_factory=default_worker_id)

    def _after_commit(self, run_id: str, tick: int, transition: Transition) -> None:
        """Publish what a committed transition asks for: the next iteration, a notice.
        Never raises: the commit stands, and a run whose message is lost is found by
        the sweep."""
        if transition.delay is not None:
            self._publish(run_id, tick, transition.delay, next_work(transition))
        if notice := notice_for(transition):
            self._tell(notice, run_id)

    def _tell(self, notice: Notice, run_id: str) -> None:
        """Hand a notice over after the commit that caused it; never raises."""
        try:
            self.notifier.notify(notice, run_id)
        except Exception:
            log.exception("could not hand over the %s notice for run %s", notice, run_id)

    def _publish(
        self, run_id: str, tick: int, delay: float, kind: WorkKind = WorkKind.PLAN
    ) -> None:
        """Publish the next iteration for `kind` of work; when it is not known (the
        sweep, a forked run), the planner's queue: it has threads to spare, and a worker
        there forwards a tool iteration to the tools' queue at once."""
        try:
            self.dispatcher.enqueue(run_id, tick, delay, kind)
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

    @staticmethod
    def _known_id(run_id: str) -> str:
        """`run_id`, or NotFound for one no run can have (it would not even reach the
        database: a NUL, say)."""
        if sanitize.text_problem(run_id) or len(run_id) > MAX_RUN_ID_CHARS:
            raise NotFound(f"no run with id {run_id!r}")
        return run_id
