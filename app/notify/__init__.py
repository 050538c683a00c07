"""Notifications: email and Slack when a run needs a person, completes or fails.

`deliver` is called by the `agentloop.notify` Celery task, after the commit
that caused the notice. It never changes a run's status: a channel that cannot
deliver is recorded as an `error` event and DeliveryFailed is raised, so the
task retries with a countdown. Each successful delivery is recorded as a
`status` event too, so a retry does not send it twice. On PostgreSQL each
delivery is claimed with an advisory lock while it is sent and recorded, and what
was sent is read again under that lock: two deliveries of one notice (a
redelivered message, a retry next to a duplicate) never send one channel twice.
"""

from __future__ import annotations

import smtplib
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, text

from app.config import Settings, load_settings
from app.engine.actions import NewEvent
from app.engine.models import EventKind, PauseKind
from app.notify.compose import Links, approval_mail, run_mail, slack_text
from app.notify.email import send_mail
from app.notify.recipients import approvers_of, resolve_emails, run_recipients
from app.notify.slack import SlackRefused, post_slack
from app.notify.tokens import ApprovalClaim, sign_approval
from app.service import AgentService, Notice, RunView
from app.store.accounts import Accounts
from app.store.records import ApprovalRecord

__all__ = ["DeliveryFailed", "approval_link", "configured", "deliver"]

# What a channel raises when it cannot deliver: retried. Anything else is a bug.
DELIVERY_ERRORS = (OSError, smtplib.SMTPException, SlackRefused)


class DeliveryFailed(Exception):
    """At least one channel could not deliver; the caller retries with backoff."""


@dataclass(frozen=True)
class Delivery:
    key: str  # stable across retries of one notice: what was sent is not sent again
    channel: str
    to: str
    send: Callable[[], None]


def deliver(service: AgentService, notice: Notice, run_id: str, *, attempt: int) -> None:
    """Send `notice` about the run on every configured channel. Raises DeliveryFailed
    (after recording an error event) when a channel could not deliver."""
    settings = load_settings()
    if not configured(settings):
        return  # sent before the channels were switched off
    view = service.status(run_id)
    accounts = Accounts(service.store.engine)
    failures: list[str] = []
    for delivery in _deliveries(service, settings, accounts, notice, view, attempt=attempt):
        with _claimed(service.store.engine, delivery.key) as claimed:
            if not claimed:  # another worker is sending this very delivery right now
                failures.append(f"{delivery.channel} to {delivery.to}: being sent elsewhere")
                continue
            if delivery.key in _sent(service, run_id):
                continue
            try:
                delivery.send()
            except DELIVERY_ERRORS as exc:
                failures.append(f"{delivery.channel} to {delivery.to}: {type(exc).__name__}: {exc}")
                continue
            service.record_event(
                run_id,
                NewEvent(
                    kind=EventKind.STATUS,
                    message=f"notified {delivery.to} by {delivery.channel}: {notice}",
                    data={"notification": delivery.key, "channel": delivery.channel},
                ),
            )
    if failures:
        _record_failure(service, run_id, notice, failures, attempt=attempt)
        raise DeliveryFailed(f"{notice} for run {run_id}: " + "; ".join(failures))


def configured(settings: Settings) -> bool:
    """Whether any channel (email, Slack) can deliver a notice; without one, no notice
    is published at all (app/wiring.py)."""
    return bool(settings.smtp_host or settings.slack_webhook_url)


def _sent(service: AgentService, run_id: str) -> set[str]:
    """The delivery keys already recorded as sent: read afresh, under the claim."""
    events = service.status(run_id).events
    return {
        str(e.data["notification"])
        for e in events
        if e.kind == EventKind.STATUS and "notification" in e.data
    }


@contextmanager
def _claimed(engine: Engine, key: str) -> Iterator[bool]:
    """Hold a PostgreSQL advisory lock on `key` while one delivery is sent and recorded;
    yields False when another session holds it. The lock dies with its connection, so
    a worker that is killed mid-send never blocks a retry. Other databases (the
    embedded SQLite) have a single worker: nothing to claim against."""
    if engine.dialect.name != "postgresql":
        yield True
        return
    lock = zlib.crc32(key.encode()) - 2**31  # a signed 32-bit key, stable across processes
    with engine.connect() as conn:
        got = conn.execute(text("SELECT pg_try_advisory_lock(1852797281, :k)"), {"k": lock})
        if not got.scalar():
            yield False
            return
        try:
            yield True
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(1852797281, :k)"), {"k": lock})


def _record_failure(
    service: AgentService, run_id: str, notice: Notice, failures: list[str], *, attempt: int
) -> None:
    service.record_event(
        run_id,
        NewEvent(
            kind=EventKind.ERROR,
            message=f"notification {notice} not delivered (attempt {attempt}, retried with "
            f"backoff): " + "; ".join(failures),
            data={"notice": str(notice), "attempt": attempt, "failures": failures},
        ),
    )


def _deliveries(
    service: AgentService,
    settings: Settings,
    accounts: Accounts,
    notice: Notice,
    view: RunView,
    *,
    attempt: int,
) -> Iterator[Delivery]:
    pending = view.pending_approval
    waits = notice in (Notice.APPROVAL_NEEDED, Notice.OUTCOME_UNKNOWN)
    if waits and pending is None:
        return  # decided before this message ran: nobody needs to be asked any more
    instance = f"{notice}:{pending.id if waits and pending is not None else view.run.id}"
    links = Links(run=run_url(settings, view.run.id))
    if settings.smtp_host:
        if notice is Notice.APPROVAL_NEEDED and pending is not None:
            yield from _approval_mails(
                service, settings, accounts, view, pending, instance, attempt
            )
        else:
            mail = run_mail(notice, view, links)
            for to in run_recipients(view.run, settings, accounts):
                yield Delivery(f"{instance}:email:{to}", "email", to, _mailer(settings, mail, to))
    if settings.slack_webhook_url:
        text = slack_text(notice, view, links)
        url = settings.slack_webhook_url
        yield Delivery(f"{instance}:slack", "slack", "Slack", lambda: post_slack(url, text))


def _approval_mails(
    service: AgentService,
    settings: Settings,
    accounts: Accounts,
    view: RunView,
    pending: ApprovalRecord,
    instance: str,
    attempt: int,
) -> Iterator[Delivery]:
    """One mail per approver, each with a link only that approver can use."""
    if pending.kind != PauseKind.APPROVAL:
        return
    context = service.approval(pending.id)
    found, missing = resolve_emails(approvers_of(view.run, settings), accounts)
    if missing and attempt == 1:
        service.record_event(
            view.run.id,
            NewEvent(
                kind=EventKind.ERROR,
                message="no email address for approver(s) "
                + ", ".join(missing)
                + ": add them with `agentloop user add NAME --email ADDRESS`",
            ),
        )
    expires = pending.created_at + timedelta(seconds=settings.approval_ttl)
    for approver, address in sorted(found.items()):
        link = approval_link(settings, pending.id, approver, pending.args_hash)
        links = Links(run=run_url(settings, view.run.id), decide=link, expires=expires)
        mail = approval_mail(context, links)
        yield Delivery(
            f"{instance}:email:{address}", "email", address, _mailer(settings, mail, address)
        )


def _mailer(settings: Settings, mail: Any, to: str) -> Callable[[], None]:
    return lambda: send_mail(settings, mail, to=to)


def run_url(settings: Settings, run_id: str) -> str:
    return f"{settings.base_url.rstrip('/')}/runs/{run_id}"


def approval_link(settings: Settings, approval_id: str, approver: str, args_hash: str) -> str:
    """The signed link an approver follows; see app/notify/tokens.py."""
    claim = ApprovalClaim(approval_id=approval_id, approver=approver, args_hash=args_hash)
    return f"{settings.base_url.rstrip('/')}/approvals/{sign_approval(settings.secret_key, claim)}"
