"""Sign-in for the pages (a session cookie) and bearer tokens for the JSON API."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import ParamSpec, TypeVar
from urllib.parse import urlsplit

from flask import Blueprint, flash, g, redirect, render_template, request, session, url_for
from flask.typing import ResponseReturnValue
from flask_wtf import FlaskForm
from wtforms import PasswordField, StringField
from wtforms.validators import DataRequired, Length

from app.store.accounts import User
from app.web import deps

bp = Blueprint("auth", __name__)

P = ParamSpec("P")
R = TypeVar("R")


class LoginForm(FlaskForm):  # type: ignore[misc]
    name = StringField("User name", validators=[DataRequired(), Length(max=80)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=1024)])


@bp.before_app_request
def load_user() -> None:
    """The signed-in user, while the session may still act: the user is enabled and
    has not signed out (or changed password) since it began."""
    uid, version = session.get("uid"), session.get("ver")
    if isinstance(uid, int) and isinstance(version, int):
        g.user = deps.accounts().signed_in(uid, version)
    else:
        g.user = None


def current_user() -> User | None:
    user: User | None = g.get("user")
    return user


def login_required(view: Callable[P, R]) -> Callable[P, R | ResponseReturnValue]:
    @wraps(view)
    def wrapped(*args: P.args, **kwargs: P.kwargs) -> R | ResponseReturnValue:
        if current_user() is None:
            return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
        return view(*args, **kwargs)

    return wrapped


def safe_next(target: str | None) -> str:
    """Only a plain path on this site: never an open redirect to another host.

    Browsers remove tabs and newlines from a URL and read a backslash as a slash
    before they follow it, so `/%09/evil.example` is `//evil.example`: any control
    character, space or backslash refuses the target outright, as does a scheme
    (`https:`, `javascript:`), a host (`//x`) or anything not starting with one `/`."""
    fallback = url_for("runs.index")
    if not target or len(target) > 2000:
        return fallback
    if any(c.isspace() or not c.isprintable() or c == "\\" for c in target):
        return fallback
    if not target.startswith("/") or target.startswith("//"):
        return fallback
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not parts.path.startswith("/"):
        return fallback
    return target


@bp.route("/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    form = LoginForm()
    if form.validate_on_submit():
        user = deps.accounts().authenticate(form.name.data or "", form.password.data or "")
        if user is not None:
            session.clear()  # a new session on sign-in: no fixation
            session["uid"] = user.id
            session["ver"] = user.session_version
            return redirect(safe_next(request.args.get("next")))
        form.password.errors = ["That user name and password do not match."]
    status = 401 if form.is_submitted() else 200
    return render_template("login.html", form=form), status


@bp.post("/logout")
def logout() -> ResponseReturnValue:
    """Sign-out ends the session for good: a copy of the cookie taken before stops
    working too (the user's session version moves on)."""
    if (user := current_user()) is not None:
        deps.accounts().end_sessions(user.id)
    session.clear()
    flash("You are signed out.")
    return redirect(url_for("auth.login"))


def bearer_user() -> User | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return deps.accounts().user_for_token(token.strip())
