"""Which kind of work an iteration does: a planner call or a tool call.

The two travel on separate queues (app/queues.py): planner calls wait on the
network for up to minutes, and on a small prefork pool they would hold every
tool back. Pure: the publisher guesses from the transition it just committed,
and the worker that takes the message knows for sure once it has decided.
"""

from __future__ import annotations

from enum import StrEnum

from app.engine.actions import Action, Execute, Plan, Transition
from app.engine.models import StepStatus


class WorkKind(StrEnum):
    PLAN = "plan"
    TOOL = "tool"


def work_of(action: Action) -> WorkKind | None:
    """The kind of slow work `action` does; None for a quick one (pause, fail), which
    any worker settles in a moment."""
    match action:
        case Plan():
            return WorkKind.PLAN
        case Execute():
            return WorkKind.TOOL
    return None


def next_work(transition: Transition) -> WorkKind:
    """The kind of the iteration `transition` asks for, as far as it tells: a new plan
    runs its first step, a failed or rejected step is planned around, a planner that
    failed is asked again, the plan's last step done is verified; after any other step
    that succeeded the next one runs. (When it guesses wrong, the worker that takes
    the message forwards it to the other queue.)"""
    if transition.new_steps:
        return WorkKind.TOOL
    if transition.planner_failures or transition.plan_finished:
        return WorkKind.PLAN
    replan = (StepStatus.FAILED, StepStatus.REJECTED)
    if any(update.status in replan for update in transition.step_updates):
        return WorkKind.PLAN
    return WorkKind.TOOL
