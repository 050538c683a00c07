"""The slow part of an iteration, run with no transaction open: a tool call (its
args resolved, under its timeout) or a planner call (its answer checked)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime

from app.engine.actions import (
    PlanInvalid,
    PlannerFatal,
    PlanOutcome,
    PlanProduced,
    StepFailed,
    StepOutcome,
)
from app.engine.models import ErrorClass, JSONDict, PlannedStep, RunSnapshot, Step, args_hash
from app.planner.base import PlanRequest, StepView
from app.planner.prompt import completed_positions, next_position
from app.planner.refs import RefError, check_refs, find_refs, resolve_refs
from app.service.base import ServiceBase
from app.tools.registry import ToolContext, UnknownTool, run_tool

log = logging.getLogger(__name__)


class Work(ServiceBase):
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
        refused_tools = {tool for tool, _ in refused}
        problems: list[str] = []
        for position, step in enumerate(steps, 1):
            unresolved = [ref.where for ref in find_refs(step.args)]
            found = self.tools.check_args(step.tool, step.args, unresolved=unresolved)
            # Hashing the args (JSON and SHA-256) only for a tool a person refused a call of.
            if step.tool in refused_tools and (
                earlier := refused.get((step.tool, args_hash(step.args)))
            ):
                found.append(
                    f"{step.tool} {json.dumps(step.args, sort_keys=True)[:300]} repeats the "
                    f"call of step {earlier.position}, which was {earlier.error}; propose "
                    "something else, or leave it out"
                )
            problems += [f"step {position}: {p}" for p in found]
        return problems
