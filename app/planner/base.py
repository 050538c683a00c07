"""The Planner protocol: turn a task (and what happened so far) into steps.

A planner is told everything through a PlanRequest, plain data the service
assembles from the store, and answers with a PlanOutcome. It never touches
the database, and it never sleeps: a transient failure is reported as
PlannerUnavailable and the loop's own countdown does the waiting.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from datetime import datetime
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field

from app.engine.actions import Failure, PlanOutcome
from app.engine.models import JSONDict, PlannedStep, RunConfig, Step


class ToolSpec(BaseModel):
    """A tool as a planner sees it."""

    name: str
    description: str
    input_schema: JSONDict
    requires_approval: bool = False
    idempotent: bool = False


class StepView(BaseModel):
    """A step already in some plan, with its outcome."""

    position: int
    plan_version: int
    description: str
    tool: str
    args: JSONDict
    status: str
    result: Any = None
    error: str | None = None

    @classmethod
    def of(cls, step: Step) -> StepView:
        return cls(
            position=step.position,
            plan_version=step.plan_version,
            description=step.description,
            tool=step.tool,
            args=step.args,
            status=step.status,
            result=step.result,
            error=step.error,
        )


class EventView(BaseModel):
    """One memory entry: what the planner may read of the timeline."""

    id: int
    kind: str
    message: str
    step_position: int | None = None
    created_at: datetime
    data: JSONDict = Field(default_factory=dict)


class PlanRequest(BaseModel):
    """Everything a planner is told. Bounded in size whatever the run's length."""

    run_id: str
    task: str
    purpose: Literal["initial", "replan", "verify"]
    config: RunConfig
    tools: list[ToolSpec]
    failure: Failure | None = None
    completed: list[StepView] = Field(default_factory=list)
    current_plan: list[StepView] = Field(default_factory=list)
    recent_events: list[EventView] = Field(default_factory=list)
    memory_summary: str = ""
    context_keys: list[str] = Field(default_factory=list)
    secrets: list[str] = Field(default_factory=list, exclude=True, repr=False)
    # What the run's budgets have left (None: no such budget); a planner never asks
    # for more output than these pay for.
    tokens_left: int | None = None
    usd_left: float | None = None
    # Calls a person rejected in this run: a plan must not propose them again.
    rejected: list[StepView] = Field(default_factory=list)


PlanCheck = Callable[[list[PlannedStep]], list[str]]
"""Validates proposed steps against the tool registry; returns the problems found."""


class Planner(Protocol):
    """Plans, re-plans and verifies. `name` is shown in the CLI and the web UI."""

    name: str

    def plan(self, request: PlanRequest, *, check: PlanCheck) -> PlanOutcome: ...


@runtime_checkable
class ChecksTasks(Protocol):
    """A planner that can tell, when a run is created, that it will not be able to plan
    the task (the offline planner: no runbook handles it), so the run is refused then
    instead of failing at its first iteration."""

    def task_problems(self, task: str, config: RunConfig, tools: Collection[str]) -> list[str]:
        """What stands in the way, in words; empty when it can plan the task."""
        ...
