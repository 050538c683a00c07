"""People's decisions on a run: approve, reject, resolve an unknown outcome,
cancel, and approvals that expire. Each locks the run row first: one lock
order, no deadlocks."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from app import metrics, tracing
from app.engine import sanitize
from app.engine.actions import NewEvent, Transition
from app.engine.machine import fail, fold_decision
from app.engine.models import DECISIONS_FOR, Decision, EventKind, PauseKind, RunConfig, RunStatus
from app.errors import Conflict, InvalidInput, NotFound
from app.service.base import ServiceBase
from app.service.inputs import check_json, check_text
from app.service.permissions import (
    Actor,
    cancel_refused,
    decision_refused,
    name_of,
    require_cancel,
    require_decision,
)
from app.service.ports import Notice
from app.store.records import ApprovalRecord, RunRecord
from app.store.repo import Guard, snapshot_from_row

log = logging.getLogger(__name__)


class Decisions(ServiceBase):
    def approve(
        self,
        run_id: str,
        *,
        by: Actor | str,
        args: Mapping[str, Any] | None = None,
        comment: str = "",
        approval_id: str | None = None,
        channel: str | None = None,
    ) -> None:
        """Approve the paused step (optionally with edited args). Raises NotFound, Conflict,
        InvalidInput."""
        self.decide(
            run_id,
            Decision.APPROVE,
            by=by,
            comment=comment,
            edited_args=args,
            approval_id=approval_id,
            channel=channel,
        )

    def reject(
        self,
        run_id: str,
        *,
        by: Actor | str,
        reason: str,
        approval_id: str | None = None,
        channel: str | None = None,
    ) -> None:
        if not reason.strip():
            raise InvalidInput("a rejection needs a reason: the agent re-plans around it")
        self.decide(
            run_id,
            Decision.REJECT,
            by=by,
            comment=reason,
            approval_id=approval_id,
            channel=channel,
        )

    @tracing.decision_span
    def decide(
        self,
        run_id: str,
        decision: Decision,
        *,
        by: Actor | str,
        comment: str = "",
        edited_args: Mapping[str, Any] | None = None,
        approval_id: str | None = None,
        channel: str | None = None,
    ) -> None:
        """Record a person's decision on a paused run, exactly once, and resume it.

        `channel` (web, email, api, cli) is kept in the audit event with who decided.
        Raises NotFound, Conflict, InvalidInput, Forbidden (see permissions)."""
        check_text(comment, "the comment")
        if edited_args is not None:
            check_json(dict(edited_args), "args")
        if approval_id is not None and sanitize.text_problem(approval_id):
            raise NotFound(f"no approval with id {approval_id!r}")
        now = self.clock()
        with self.store.transaction() as tx:
            row = tx.lock_run(self._known_id(run_id))  # the run row first: one lock order
            pending = tx.get_approval(approval_id) if approval_id else tx.pending_approval(run_id)
            if pending is None or pending.run_id != run_id or pending.status != "pending":
                raise Conflict(self._why_not_pending(row, pending))
            self._require_decision(by, row)
            who = name_of(by)
            kind = PauseKind(pending.kind)
            if decision not in DECISIONS_FOR[kind]:
                allowed = ", ".join(sorted(DECISIONS_FOR[kind]))
                raise InvalidInput(f"this pause ({kind}) takes one of: {allowed}")
            step = tx.get_step(pending.step_id)
            if edited_args is not None and (
                problems := self.tools.check_args(step.tool, edited_args)
            ):
                raise InvalidInput("edited args are invalid: " + "; ".join(problems))
            decided = tx.decide_approval(
                pending.id,
                decision=decision,
                by=who,
                comment=comment,
                edited_args=dict(edited_args) if edited_args is not None else None,
                now=now,
            )
            if decided is None:
                raise Conflict("this approval was already decided")
            transition = fold_decision(
                step,
                kind,
                decision,
                by=who,
                context=row.context or {},
                reason=comment,
                edited_args=dict(edited_args) if edited_args is not None else None,
            )
            if channel:
                transition = _via(transition, channel)
            run = snapshot_from_row(row, [step])
            tick = tx.apply(
                run, transition, guard=Guard(status=RunStatus.PAUSED), now=now, next_run_at=now
            )
            if tick is None:
                raise Conflict(f"run {run_id} is no longer paused")
        metrics.decision(decision, channel)
        self._after_commit(run_id, tick, transition)

    def approvers_of(self, run: Any) -> tuple[str, ...]:
        """Who decides on `run`: the deployment's approvers and those the run adds."""
        return self.policy.approvers_of(RunConfig.from_stored(run.config).approvers)

    def may_decide(self, by: Actor, run: Any) -> bool:
        """Whether `by` may decide on `run` (for pages: show only usable buttons)."""
        return (
            decision_refused(
                by, approvers=self.approvers_of(run), created_by=run.created_by, policy=self.policy
            )
            is None
        )

    def may_cancel(self, by: Actor, run: Any) -> bool:
        return cancel_refused(by, created_by=run.created_by) is None

    def _require_decision(self, by: Actor | str, run: Any) -> None:
        require_decision(
            by, approvers=self.approvers_of(run), created_by=run.created_by, policy=self.policy
        )

    @staticmethod
    def _why_not_pending(row: RunRecord, approval: ApprovalRecord | None) -> str:
        if approval is not None and approval.status == "decided":
            return (
                f"already decided: {approval.decision} by {approval.decided_by} "
                f"at {approval.decided_at:%Y-%m-%d %H:%M:%S} UTC"
            )
        if approval is not None and approval.status != "pending":
            return f"this approval is {approval.status}"
        return f"run {row.id} is {row.status}, not waiting for a decision"

    @tracing.cancel_span
    def cancel(self, run_id: str, *, by: Actor | str, reason: str = "") -> None:
        """Cancel a queued, running or paused run; `reason` (optional) says why. Raises
        NotFound, Conflict, Forbidden (an operator cancels only their own runs),
        InvalidInput (a reason the database cannot hold)."""
        reason = check_text(reason, "the reason").strip()
        now = self.clock()
        who = name_of(by)
        with self.store.transaction() as tx:
            row = tx.lock_run(self._known_id(run_id))  # the run row first: one lock order
            require_cancel(by, created_by=row.created_by)
            active = (RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.PAUSED)
            if (
                tx.set_status(
                    run_id,
                    RunStatus.CANCELLED,
                    error=None,
                    now=now,
                    only_from=active,
                    ended_by=who,
                    end_reason=reason or None,
                )
                is None
            ):
                raise Conflict(f"run {run_id} is {row.status}; only an active run can be cancelled")
            tx.close_approvals(run_id, "cancelled")
            because = f": {reason}" if reason else ""
            cancelled = NewEvent(
                kind=EventKind.STATUS,
                message=f"run cancelled by {who}{because}",
                data={"outcome": RunStatus.CANCELLED, "by": who, "reason": reason or None},
            )
            tx.insert_events(run_id, row.iteration, [cancelled], now)
        self._tell(Notice.CANCELLED, run_id)

    def expire_approvals(self, *, ttl: float, policy: str) -> int:
        """Settle approvals nobody decided within `ttl` seconds: "reject" (the agent
        re-plans around the step) or "fail" the run. Returns how many were settled.

        Only yes/no approvals expire: an unknown outcome (did the deploy happen?) is
        not something a timer can answer."""
        now = self.clock()
        with self.store.transaction() as tx:
            overdue = tx.overdue_approvals(
                kind=PauseKind.APPROVAL, opened_before=now - timedelta(seconds=ttl), now=now
            )
        settled = sum(self._expire_one(a, ttl=ttl, policy=policy) for a in overdue)
        if settled:
            log.info("expired %d approval(s) (policy: %s)", settled, policy)
        return settled

    @tracing.expiry_span
    def _expire_one(self, approval: ApprovalRecord, *, ttl: float, policy: str) -> bool:
        """One approval: an approval that cannot be settled (its step is gone) is logged
        and left, so it never keeps the others from expiring."""
        try:
            return self._expire(approval.id, ttl=ttl, policy=policy)
        except NotFound:
            log.exception("approval %s cannot be expired", approval.id)
            return False

    def _expire(self, approval_id: str, *, ttl: float, policy: str) -> bool:
        now = self.clock()
        reason = f"nobody decided within {ttl:g} s, so the approval expired"
        with self.store.transaction() as tx:
            seen = tx.get_approval(approval_id)
            if seen is None:
                return False
            row = tx.lock_run(seen.run_id)  # the run row first: one lock order
            approval = tx.expire_approval(approval_id, now=now)
            if approval is None:
                return False  # decided, or expired by another beat, in the meantime
            step = tx.get_step(approval.step_id)
            if policy == "fail":
                transition = fail(f"step {step.position} ({step.tool}): {reason}")
            else:
                transition = fold_decision(
                    step,
                    PauseKind.APPROVAL,
                    Decision.REJECT,
                    by="agentloop",
                    context=row.context or {},
                    reason=reason,
                )
            run = snapshot_from_row(row, [step])
            tick = tx.apply(
                run,
                transition,
                guard=Guard(status=RunStatus.PAUSED),
                now=now,
                next_run_at=now if transition.delay is not None else None,
            )
        if tick is None:
            return False  # the run was no longer paused (cancelled): nothing to resume
        metrics.decision("expired", "timer")
        self._after_commit(approval.run_id, tick, transition)
        return True


def _via(transition: Transition, channel: str) -> Transition:
    """The decision's audit event, with the channel it came through."""
    events = [
        e.model_copy(
            update={
                "message": f"{e.message} (via {channel})",
                "data": {**e.data, "channel": channel},
            }
        )
        if e.kind is EventKind.APPROVAL
        else e
        for e in transition.events
    ]
    return transition.model_copy(update={"events": events})
