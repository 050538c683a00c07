"""Apply a Transition to a snapshot in memory.

The store does the same thing in SQL; this version lets the engine be driven
end to end in unit tests, and lets a worker see the step as begin_step left it.
"""

from __future__ import annotations

from app.engine.actions import StepUpdate, Transition
from app.engine.models import RunSnapshot, Step, idempotency_key


def apply_step_update(step: Step, update: StepUpdate) -> Step:
    changes: dict[str, object] = {}
    for field in ("status", "attempts", "error_class", "args", "approved_args_hash"):
        value = getattr(update, field)
        if value is not None:
            changes[field] = value
    if update.set_result:
        changes["result"] = update.result
    if update.set_error:
        changes["error"] = update.error
    return step.model_copy(update=changes)


def apply_transition(run: RunSnapshot, transition: Transition) -> RunSnapshot:
    """The snapshot after `transition`; new steps get ids after the largest one."""
    updates = {u.step_id: u for u in transition.step_updates}
    steps = [apply_step_update(s, updates[s.id]) if s.id in updates else s for s in run.steps]
    plan_version = run.plan_version
    if transition.new_plan_version is not None:
        plan_version = transition.new_plan_version
        next_id = max([s.id for s in steps], default=0) + 1
        next_position = max([s.position for s in steps], default=0) + 1
        steps = steps + [
            Step(
                id=next_id + i,
                plan_version=plan_version,
                position=next_position + i,
                description=p.description,
                tool=p.tool,
                args=p.args,
                idempotency_key=idempotency_key(run.id, plan_version, next_position + i),
                approved_args_hash=transition.carried_approvals.get(i),
            )
            for i, p in enumerate(transition.new_steps)
        ]
    return run.model_copy(
        update={
            "status": transition.status or run.status,
            "steps": steps,
            "plan_version": plan_version,
            "replans": run.replans + transition.replans_delta,
            "planner_failures": (
                run.planner_failures
                if transition.planner_failures is None
                else transition.planner_failures
            ),
            "context": {**run.context, **transition.context_updates},
            "tokens_total": run.tokens_total + transition.tokens_delta,
            "cost_usd": run.cost_usd + transition.cost_delta,
        }
    )
