"""What the service needs from the outside: a queue to publish iterations to, a
notifier for people; and the notices it sends."""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import StrEnum
from typing import Protocol

from app.engine.actions import Transition
from app.engine.models import PauseKind, RunStatus
from app.engine.routing import WorkKind
from app.planner.base import Planner

log = logging.getLogger(__name__)


PlannerFactory = Callable[[str], Planner]


class Dispatcher(Protocol):
    """Publishes 'advance run R at tick T in D seconds' on the queue for `kind` of work
    (a guess: the worker forwards a message that guessed wrong). Called only after
    commit."""

    def enqueue(self, run_id: str, tick: int, delay: float, kind: WorkKind) -> None: ...

    def queue_depth(self) -> int | None:
        """How many iterations wait in the queues now; None if the broker cannot say."""
        ...


class Notice(StrEnum):
    """What people are told about (by email, Slack), after the commit that caused it."""

    APPROVAL_NEEDED = "approval_needed"
    OUTCOME_UNKNOWN = "outcome_unknown"
    COMPLETED = "completed"
    FAILED = "failed"
    # Ended by a person's decision: told as a decision, with who and why.
    REJECTED = "rejected"
    CANCELLED = "cancelled"


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
        case RunStatus.REJECTED:
            return Notice.REJECTED
    return None
