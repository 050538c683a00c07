"""Who may do what, checked in the service so the CLI, the API and the pages agree.

An Actor is the person behind a request, with a role (app/store/accounts.py):
viewer (read), operator (create runs, cancel their own), approver (decide),
admin (everything). A plain name instead of an Actor is the trusted in-process
path (a worker, the beat, a test): transports always pass an Actor.

Four eyes by default: the deployment's approvers (AGENTLOOP_APPROVERS) are a
floor a run can add to but not replace, and the creator of a run does not
decide on its steps unless the deployment allows it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from app.errors import Forbidden
from app.store.accounts import Role, User


@dataclass(frozen=True)
class Actor:
    """Who asks: a signed-in user, an API token's owner, an approver named in a
    signed email link, or the person at the terminal."""

    name: str
    role: Role
    email: str | None = None

    @classmethod
    def of(cls, user: User) -> Actor:
        return cls(name=user.name, role=user.role, email=user.email)

    def answers_to(self, names: Iterable[str]) -> bool:
        """True when `names` (approvers: user names or emails) include this actor."""
        wanted = {n.casefold() for n in names}
        return self.name.casefold() in wanted or bool(
            self.email and self.email.casefold() in wanted
        )


@dataclass(frozen=True)
class ApprovalPolicy:
    """The deployment's floor: who approves any run, and whether a run's creator
    may approve its own steps."""

    approvers: tuple[str, ...] = ()
    allow_self_approval: bool = False

    def approvers_of(self, run_approvers: Iterable[str]) -> tuple[str, ...]:
        """The deployment's approvers, then those the run adds (never fewer)."""
        merged = list(self.approvers)
        merged += [a for a in run_approvers if a.casefold() not in {m.casefold() for m in merged}]
        return tuple(merged)


def name_of(by: Actor | str) -> str:
    return by.name if isinstance(by, Actor) else by


def require_role(by: Actor | str, role: Role, doing: str) -> None:
    """Forbidden unless `by` has `role` (a trusted caller always has)."""
    if isinstance(by, Actor) and not by.role.includes(role):
        raise Forbidden(f"{by.name} is a {by.role} and may not {doing}: it takes the {role} role")


def cancel_refused(by: Actor, *, created_by: str | None) -> str | None:
    """Why `by` may not cancel a run started by `created_by`; None when they may:
    an operator cancels their own runs, an admin any run."""
    if by.role.includes(Role.ADMIN):
        return None
    if not by.role.includes(Role.OPERATOR):
        return f"{by.name} is a {by.role}: cancelling takes the operator role"
    if created_by != by.name:
        return (
            f"{by.name} may cancel only runs they started (this one was started by "
            f"{created_by or 'someone else'}); an admin may cancel any run"
        )
    return None


def require_cancel(by: Actor | str, *, created_by: str | None) -> None:
    if isinstance(by, Actor) and (why := cancel_refused(by, created_by=created_by)):
        raise Forbidden(why)


def decision_refused(
    by: Actor, *, approvers: tuple[str, ...], created_by: str | None, policy: ApprovalPolicy
) -> str | None:
    """Why `by` may not decide on a run with these approvers; None when they may.

    An approver decides on runs that name them (or, when nobody is named
    anywhere, on any run); an admin on any run; nobody on their own run unless
    the deployment allows it."""
    if not by.role.includes(Role.APPROVER):
        return f"{by.name} is a {by.role}: deciding takes the approver role"
    if created_by is not None and by.name == created_by and not policy.allow_self_approval:
        return (
            f"{by.name} started this run, and a run's steps are approved by someone else "
            "(four eyes; AGENTLOOP_ALLOW_SELF_APPROVAL=true turns this off)"
        )
    if approvers and not by.answers_to(approvers) and not by.role.includes(Role.ADMIN):
        return f"{by.name} is not one of this run's approvers ({', '.join(approvers)})"
    return None


def require_decision(
    by: Actor | str, *, approvers: tuple[str, ...], created_by: str | None, policy: ApprovalPolicy
) -> None:
    if isinstance(by, Actor) and (
        why := decision_refused(by, approvers=approvers, created_by=created_by, policy=policy)
    ):
        raise Forbidden(why)
