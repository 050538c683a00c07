"""Who is told: the approvers a run names (or the configured default), by email."""

from __future__ import annotations

from app.config import Settings
from app.engine.models import RunConfig
from app.service.permissions import ApprovalPolicy
from app.store.accounts import Accounts
from app.store.records import RunRecord


def approvers_of(run: RunRecord, settings: Settings) -> tuple[str, ...]:
    """The run's approvers (user names or emails): the deployment's, and those the run
    adds (the service's own rule: ApprovalPolicy)."""
    policy = ApprovalPolicy(approvers=settings.default_approvers)
    return policy.approvers_of(RunConfig.from_stored(run.config).approvers)


def resolve_emails(names: tuple[str, ...], accounts: Accounts) -> tuple[dict[str, str], list[str]]:
    """Map each approver to an address: an email as given, a user name through the
    users table. Returns (approver -> address, approvers with no address)."""
    direct = {n: n for n in names if "@" in n}
    looked_up = accounts.emails_for(tuple(n for n in names if "@" not in n))
    found = {**direct, **looked_up}
    return found, [n for n in names if n not in found]


def run_recipients(run: RunRecord, settings: Settings, accounts: Accounts) -> list[str]:
    """Addresses told when a run ends: its approvers and the person who started it."""
    names = approvers_of(run, settings)
    if run.created_by and run.created_by not in names:
        names = (*names, run.created_by)
    found, _ = resolve_emails(names, accounts)
    return sorted(set(found.values()))
