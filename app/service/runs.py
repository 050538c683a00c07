"""Creating runs: validation, the planner's choice, idempotency keys."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import timedelta
from secrets import token_hex
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError

from app.engine import sanitize
from app.engine.models import (
    DEFAULT_APPROVAL_REQUIRED,
    MAX_TASK_CHARS,
    RunConfig,
    RunStatus,
    args_hash,
)
from app.errors import Conflict
from app.planner.base import ChecksTasks
from app.service.base import ServiceBase, status_event
from app.service.inputs import Problem, Problems, scoped_key, validation_problems
from app.service.permissions import Actor, name_of, require_role
from app.store.accounts import Accounts, Role

log = logging.getLogger(__name__)


class Runs(ServiceBase):
    def create_run(
        self,
        task: str,
        *,
        config: RunConfig | Mapping[str, Any] | None = None,
        created_by: Actor | str | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Store a new run and enqueue its first iteration; returns its id.

        With an `idempotency_key`, a retry of the same request by the same creator
        returns the run the first one made (and a different request with that key is
        a Conflict). Once the run is stored, nothing fails the call: a failed publish
        is logged and the sweep starts the run. Raises Problems (an InvalidInput that
        lists every problem of the request at once), Conflict, Forbidden (creating
        runs takes the operator role)."""
        if created_by is not None:
            require_role(created_by, Role.OPERATOR, "create runs")
            created_by = name_of(created_by)
        found, task, cfg, planner = self._examine(task, config)
        if found:
            raise Problems(found)
        key = scoped_key(idempotency_key, created_by)
        request_hash = args_hash({"task": task, "config": cfg.model_dump(mode="json")})
        if key is not None and (existing := self._replayed(key, request_hash)) is not None:
            return existing
        run_id = token_hex(8)
        now = self.clock()
        try:
            with self.store.transaction() as tx:
                tx.insert_run(
                    run_id=run_id,
                    task=task,
                    planner=planner,
                    config=cfg,
                    deadline=now + timedelta(seconds=cfg.timeout),
                    now=now,
                    created_by=created_by,
                    idempotency_key=key,
                    request_hash=request_hash if key is not None else None,
                )
                tx.insert_events(
                    run_id,
                    0,
                    [
                        status_event(
                            f"run created by {created_by or 'anonymous'} with the {planner} planner"
                        )
                    ],
                    now,
                )
        except IntegrityError:
            # The same key, created concurrently: the other request's run stands.
            if key is None or (existing := self._replayed(key, request_hash)) is None:
                raise
            return existing
        self._publish(run_id, 0, 0)
        return run_id

    def _replayed(self, key: str, request_hash: str) -> str | None:
        """The run an earlier request with this idempotency key created, if any; it is
        nudged again while still queued, in case that request's publish was lost."""
        with self.store.transaction() as tx:
            row = tx.run_by_idempotency_key(key)
        if row is None:
            return None
        if row.request_hash != request_hash:
            raise Conflict(
                "this idempotency key was already used for a different request: "
                "use a new key for a new run"
            )
        if row.status == RunStatus.QUEUED:
            self._publish(row.id, row.tick, 0)  # a duplicate message is a no-op
        run_id: str = row.id
        return run_id

    def run_problems(
        self, task: str, config: RunConfig | Mapping[str, Any] | None = None
    ) -> list[Problem]:
        """Every problem a run of `task` with `config` would be refused for (empty: it
        would be created). Nothing is stored."""
        return self._examine(task, config)[0]

    def _examine(
        self, task: str, config: RunConfig | Mapping[str, Any] | None
    ) -> tuple[list[Problem], str, RunConfig, str]:
        """(every problem at once, the task, the config, the planner it resolves to).
        Where a config field is invalid its default stands in, so the checks that
        depend on the others still run: one answer lists everything to fix."""
        task = (task or "").strip()
        found = _task_problems(task)
        cfg, config_found = _config(config)
        found += config_found
        flagged = {p.field for p in config_found}
        # A misspelt name would leave the real tool unguarded; the defaults may name
        # tools a deployment does not have.
        known = {t.name for t in self.tools} | set(DEFAULT_APPROVAL_REQUIRED)
        if unknown := sorted(set(cfg.approval_required) - known):
            found.append(
                Problem("config.approval_required", f"names unknown tools: {', '.join(unknown)}")
            )
        # A misspelt approver would leave a run nobody can decide. (Names the database
        # cannot hold are not looked up: their problem is listed already.)
        storable = not any(p.field == "config" for p in config_found)
        if storable and (strangers := Accounts(self.store.engine).unknown_names(cfg.approvers)):
            found.append(
                Problem(
                    "config.approvers",
                    f"names no user: {', '.join(strangers)} (give user names of "
                    "`agentloop user list`, or email addresses)",
                )
            )
        planner = self.default_planner if cfg.planner == "auto" else cfg.planner
        if not flagged & {"config.planner", "config.runbook"}:
            found += self._planner_problems(planner, task, cfg)
        return found, task, cfg, planner

    def _planner_problems(self, planner: str, task: str, cfg: RunConfig) -> list[Problem]:
        """Whether `planner` exists here and, if it can tell, whether it can plan `task`."""
        try:
            chosen = self.planners(planner)
        except ValueError as exc:
            hint = (
                ": this deployment has no key, so choose the offline planner (runbooks), "
                "or set ANTHROPIC_API_KEY for the web app, the CLI and the workers"
                if "ANTHROPIC_API_KEY" in str(exc)
                else ""
            )
            return [Problem("config.planner", f"{exc}{hint}")]
        if not task or not isinstance(chosen, ChecksTasks):
            return []
        where = "config.runbook" if cfg.runbook is not None else "task"
        tools = [t.name for t in self.tools]
        return [Problem(where, text) for text in chosen.task_problems(task, cfg, tools)]


def _task_problems(task: str) -> list[Problem]:
    if problem := sanitize.text_problem(task):
        return [Problem("task", f"the task {problem}")]
    if not task:
        return [Problem("task", "the task is empty: say what the agent should do")]
    if len(task) > MAX_TASK_CHARS:
        return [
            Problem("task", f"the task is {len(task)} characters; the limit is {MAX_TASK_CHARS}")
        ]
    return []


def _config(config: RunConfig | Mapping[str, Any] | None) -> tuple[RunConfig, list[Problem]]:
    """The run's config and its problems; an invalid field's default stands in for it."""
    if isinstance(config, RunConfig):
        return config, []
    if config is not None and not isinstance(config, Mapping):
        return RunConfig(), [Problem("config", "must be an object of run options")]
    given = dict(config or {})
    # NUL, lone surrogates, Infinity: what the database cannot hold ("config" problems).
    found = [Problem("config", text) for text in sanitize.problems(given, what="config")]
    try:
        return RunConfig.model_validate(given), found
    except ValidationError as exc:
        found += validation_problems(exc, prefix="config")
    return RunConfig.from_stored(given), found
