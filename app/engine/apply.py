"""Apply a Transition to a snapshot in memory.

The store does the same thing in SQL; this version lets the engine be driven
end to end in unit tests, and lets a worker see the step as begin_step left it.
Both follow one field map (app/engine/fields.py).
"""

from __future__ import annotations

from app.engine.actions import StepUpdate, Transition
from app.engine.fields import RUN_WRITES, STEP_WRITES, new_step_columns
from app.engine.models import RunSnapshot, Step


def apply_step_update(step: Step, update: StepUpdate) -> Step:
    changes = {
        w.column: w.new_value(update, getattr(step, w.column))
        for w in STEP_WRITES
        if not w.keeps(update)
    }
    return step.model_copy(update=changes)


def apply_transition(run: RunSnapshot, transition: Transition) -> RunSnapshot:
    """The snapshot after `transition`; new steps get ids after the largest one."""
    updates = {u.step_id: u for u in transition.step_updates}
    steps = [apply_step_update(s, updates[s.id]) if s.id in updates else s for s in run.steps]
    changes = {
        w.column: w.new_value(transition, getattr(run, w.column))
        for w in RUN_WRITES
        if w.in_snapshot and not w.keeps(transition)
    }
    if transition.new_plan_version is not None:
        next_id = max([s.id for s in steps], default=0) + 1
        next_position = max([s.position for s in steps], default=0) + 1
        steps = steps + [
            Step(
                id=next_id + i,
                **new_step_columns(
                    run.id,
                    transition.new_plan_version,
                    next_position + i,
                    planned,
                    transition.carried_approvals.get(i),
                ),
            )
            for i, planned in enumerate(transition.new_steps)
        ]
    return run.model_copy(update={**changes, "steps": steps})
