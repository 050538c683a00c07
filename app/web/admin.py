"""User management for admins: every user with their role and state, and the
changes an admin makes (role, disable/enable, revoke every API token), each a
POST with a CSRF token, recorded in the audit log with the admin's name.

Anyone else gets 403 (or the sign-in page when not signed in).
"""

from __future__ import annotations

from collections.abc import Callable

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from app.store.accounts import AccountError, Role, User
from app.web import deps
from app.web.auth import current_user, login_required

bp = Blueprint("admin", __name__, url_prefix="/admin")

AUDIT_SHOWN = 50


def _admin() -> User:
    user = current_user()
    if user is None or not user.can(Role.ADMIN):
        name = user.name if user is not None else "nobody"
        abort(403, f"{name} is not an admin: managing users takes the admin role.")
    return user


@bp.get("/users")
@login_required
def users() -> ResponseReturnValue:
    _admin()
    accounts = deps.accounts()
    people = accounts.list_users()
    return render_template(
        "admin/users.html",
        users=people,
        tokens={u.name: len(accounts.tokens(u.name)) for u in people},
        roles=[r.value for r in Role],
        audit=accounts.audit_entries(limit=AUDIT_SHOWN),
    )


@bp.post("/users/<name>/role")
@login_required
def set_role(name: str) -> ResponseReturnValue:
    admin = _admin()
    wanted = request.form.get("role", "")
    if wanted not in {r.value for r in Role}:
        abort(400, f"unknown role {wanted[:40]!r}; one of {', '.join(r.value for r in Role)}")
    if name == admin.name:
        return _refused("You cannot change your own role: ask another admin.")
    return _apply(
        lambda: deps.accounts().set_role(name, Role(wanted), by=admin.name),
        f"{name} is now {wanted}.",
    )


@bp.post("/users/<name>/disable")
@login_required
def disable(name: str) -> ResponseReturnValue:
    admin = _admin()
    if name == admin.name:
        return _refused("You cannot disable yourself: ask another admin.")
    return _apply(
        lambda: deps.accounts().set_disabled(name, True, by=admin.name),
        f"{name} is disabled: their sessions and API tokens stopped working.",
    )


@bp.post("/users/<name>/enable")
@login_required
def enable(name: str) -> ResponseReturnValue:
    admin = _admin()
    return _apply(
        lambda: deps.accounts().set_disabled(name, False, by=admin.name),
        f"{name} is enabled again (their old sessions stay ended).",
    )


@bp.post("/users/<name>/revoke-tokens")
@login_required
def revoke_tokens(name: str) -> ResponseReturnValue:
    admin = _admin()
    try:
        count = deps.accounts().revoke_tokens(name, by=admin.name)
    except AccountError as exc:
        abort(404, str(exc))
    flash(f"Revoked {count} API token{'s' if count != 1 else ''} of {name}.")
    return redirect(url_for("admin.users"))


def _apply(change: Callable[[], User], done: str) -> ResponseReturnValue:
    try:
        change()
    except AccountError as exc:  # no such user
        abort(404, str(exc))
    flash(done)
    return redirect(url_for("admin.users"))


def _refused(message: str) -> ResponseReturnValue:
    """Nothing changed: back to the list with the reason."""
    flash(f"Nothing was changed: {message}", "error")
    return redirect(url_for("admin.users"))
