"""Time travel: what a fork keeps of its parent's history.

"Step N" is the number people see: the step's position, shown as "N." on the run
page and by `agentloop status`, and in events as "step N". Positions count every
step of a run from 1 across all its plans, in the order they were planned, so the
steps through N are exactly those that came before it or are it.

Pure: given the parent's steps, the history a fork starts from, or ForkRefused.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.engine.models import JSONDict, Step, StepStatus


class ForkRefused(ValueError):
    """A fork that cannot start from that step; the message says why."""


class NoSuchStep(ForkRefused):
    """The run has no step with that number."""


class StepNotCompleted(ForkRefused):
    """The step exists but did not complete: its effects are not known to stand."""


@dataclass(frozen=True)
class ForkPoint:
    """The history a fork from step `position` keeps."""

    position: int
    step: Step  # step N itself
    kept: list[Step]  # every step through N, in position order, as they ended
    plan_version: int  # the plan step N belonged to: the fork's current plan
    context: JSONDict  # the run context as it was right after step N

    @property
    def completed(self) -> int:
        return sum(1 for s in self.kept if s.status is StepStatus.COMPLETED)


def fork_point(steps: list[Step], position: int) -> ForkPoint:
    """What a fork from step `position` of a run with `steps` keeps. Raises
    ForkRefused when the run has no such step or the step did not complete."""
    ordered = sorted(steps, key=lambda s: s.position)
    if not ordered:
        raise NoSuchStep("the run has no steps yet: there is nothing to fork from")
    last = ordered[-1].position
    step = next((s for s in ordered if s.position == position), None)
    if step is None:
        raise NoSuchStep(f"the run has no step {position}: its steps are numbered 1 to {last}")
    if step.status is not StepStatus.COMPLETED:
        raise StepNotCompleted(
            f"step {position} ({step.tool}) did not complete (it is {step.status}): "
            "fork from a completed step"
        )
    kept = [s for s in ordered if s.position <= position]
    return ForkPoint(
        position=position,
        step=step,
        kept=kept,
        plan_version=step.plan_version,
        context=context_after(kept),
    )


def context_after(steps: list[Step]) -> JSONDict:
    """The run context that `steps` (in position order) left: what each completed
    step set, later steps over earlier ones — as the run merged it when they ran."""
    context: JSONDict = {}
    for step in steps:
        if step.status is StepStatus.COMPLETED and step.context_updates:
            context.update(step.context_updates)
    return context
