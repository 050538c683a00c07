"""Creating runs: validation, the planner's choice, idempotency keys."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import timedelta
from secrets import token_hex
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError

from app.engine.models import (
    DEFAULT_APPROVAL_REQUIRED,
    MAX_TASK_CHARS,
    RunConfig,
    RunStatus,
    args_hash,
)
from app.errors import Conflict, InvalidInput
from app.service.base import ServiceBase, status_event
from app.service.inputs import check_json, check_text, scoped_key
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
        is logged and the sweep starts the run. Raises InvalidInput, Conflict,
        Forbidden (creating runs takes the operator role)."""
        if created_by is not None:
            require_role(created_by, Role.OPERATOR, "create runs")
            created_by = name_of(created_by)
        task = check_text((task or "").strip(), "the task")
        if not task:
            raise InvalidInput("the task is empty: say what the agent should do")
        if len(task) > MAX_TASK_CHARS:
            raise InvalidInput(f"the task is {len(task)} characters; the limit is {MAX_TASK_CHARS}")
        cfg = self._validate_config(config)
        # A misspelt name would leave the real tool unguarded; the defaults may name
        # tools a deployment does not have.
        known = {t.name for t in self.tools} | set(DEFAULT_APPROVAL_REQUIRED)
        unknown = sorted(set(cfg.approval_required) - known)
        if unknown:
            raise InvalidInput(f"approval_required names unknown tools: {', '.join(unknown)}")
        # A misspelt approver would leave a run nobody can decide.
        if strangers := Accounts(self.store.engine).unknown_names(cfg.approvers):
            raise InvalidInput(
                f"approvers names no user: {', '.join(strangers)} (give user names of "
                "`agentloop user list`, or email addresses)"
            )
        planner = self.default_planner if cfg.planner == "auto" else cfg.planner
        try:
            self.planners(planner)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
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

    @staticmethod
    def _validate_config(config: RunConfig | Mapping[str, Any] | None) -> RunConfig:
        if isinstance(config, RunConfig):
            return config
        check_json(dict(config or {}), "config")
        try:
            return RunConfig.model_validate(dict(config or {}))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}"
                for e in exc.errors()
            )
            raise InvalidInput(f"invalid run config: {problems}") from None
