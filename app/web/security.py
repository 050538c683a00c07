"""CSRF on every form, security headers on every response, hostile input refused
before it reaches a view, rate limits, and error pages (JSON under /api, HTML
elsewhere).

Rate limits (Flask-Limiter, one Limiter per app): failed sign-ins per account
name and per client address, and every /api request per bearer token. They are
kept in Redis when the broker is Redis (or AGENTLOOP_RATELIMIT_STORAGE_URL says
where), so every gunicorn worker shares them; in memory for the embedded demo.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from flask import Flask, Response, current_app, jsonify, render_template, request
from flask_limiter import Limiter
from flask_limiter.errors import RateLimitExceeded
from flask_limiter.util import get_remote_address
from flask_wtf.csrf import CSRFError, CSRFProtect
from limits import parse as parse_limit
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from werkzeug.exceptions import BadRequest, HTTPException

from app.config import Settings
from app.engine.sanitize import text_problem
from app.errors import Conflict, Forbidden, InvalidInput, NotFound

log = logging.getLogger(__name__)
csrf = CSRFProtect()

# No inline script or style anywhere: everything comes from /static.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # Approval links carry a token in the path: never send it on as a Referer.
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}
# Two years, every subdomain: sent only when the site is served over https.
HSTS = "max-age=63072000; includeSubDomains"


# --- settings --------------------------------------------------------------------------


class LimitSettings(BaseSettings):
    """AGENTLOOP_RATELIMIT_*: how many failed sign-ins and API requests are allowed,
    and where the counters live. Limits are Flask-Limiter strings ("5/minute",
    "20 per 10 minutes", "600/minute;10000/day")."""

    model_config = SettingsConfigDict(
        env_prefix="AGENTLOOP_RATELIMIT_", env_file=".env", extra="ignore"
    )

    enabled: bool = True
    # Empty: the broker's Redis when CELERY_BROKER_URL is redis://, memory otherwise.
    storage_url: str = ""
    # Failed sign-ins for one account name, from any address.
    login_account: str = "5/minute"
    # Failed sign-ins from one client address, for any account.
    login_address: str = "20/minute"
    # Requests to /api per bearer token (per address for requests without one).
    api: str = "600/minute"
    # Proxies in front of the app whose X-Forwarded-For/-Proto are trusted (0: none).
    proxy_hops: int = Field(0, ge=0, le=5)

    @field_validator("login_account", "login_address", "api")
    @classmethod
    def _a_limit(cls, value: str) -> str:
        for part in value.split(";"):
            parse_limit(part)  # ValueError names the bad string
        return value

    def storage_for(self, settings: Settings) -> str:
        if self.storage_url:
            return self.storage_url
        broker = settings.resolved_broker_url
        if broker.startswith(("redis://", "rediss://")):
            return broker
        return "memory://"


def limiter_of(app: Flask) -> Limiter:
    found: Limiter = app.extensions["agentloop_limiter"]
    return found


def _login_name() -> str:
    name = request.form.get("name", "")
    return f"name:{name.strip().casefold()[:80]}" if name.strip() else ""


def _api_key() -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return "token:" + hashlib.sha256(token.strip().encode(errors="replace")).hexdigest()[:32]
    return "addr:" + (get_remote_address() or "unknown")


def _address() -> str:
    return "addr:" + (get_remote_address() or "unknown")


def _failed_sign_in(response: Response) -> bool:
    """Only failures count: people behind one address who sign in fine are never
    locked out by each other."""
    return response.status_code != 302


def init_limiter(app: Flask, settings: Settings, limits: LimitSettings) -> Limiter:
    """A Limiter for this app: failed sign-ins per name and per address, the API per
    token. The view functions must be registered already."""
    app.config.setdefault("RATELIMIT_ENABLED", limits.enabled)
    app.config.setdefault("RATELIMIT_STORAGE_URI", limits.storage_for(settings))
    app.config.setdefault("RATELIMIT_HEADERS_ENABLED", True)
    app.config.setdefault("RATELIMIT_STRATEGY", "moving-window")
    limiter = Limiter(
        _address,
        # One deployment's counters, whatever else shares the Redis database (the
        # queue names the deployment; tests use one per session).
        key_prefix=app.config.get("RATELIMIT_KEY_PREFIX") or f"agentloop:{settings.queue}",
    )
    limiter.init_app(app)
    app.extensions["agentloop_limiter"] = limiter
    login: Any = app.view_functions["auth.login"]
    for value, key in ((limits.login_account, _login_name), (limits.login_address, _address)):
        login = limiter.limit(
            value,
            key_func=key,
            methods=["POST"],
            deduct_when=_failed_sign_in,
            scope="sign-in",
            error_message="Too many failed sign-ins",
        )(login)
    app.view_functions["auth.login"] = login
    limiter.limit(limits.api, key_func=_api_key, scope="api")(_api_blueprint())
    return limiter


def _api_blueprint() -> Any:
    from app.web import api

    return api.bp


# --- requests and responses ------------------------------------------------------------


def init_app(app: Flask) -> None:
    csrf.init_app(app)
    app.before_request(refuse_hostile_input)
    app.after_request(add_headers)
    app.register_error_handler(CSRFError, csrf_failed)
    app.register_error_handler(RateLimitExceeded, too_many)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(NotFound, lambda e: _service_error(e, 404))
    app.register_error_handler(Forbidden, lambda e: _service_error(e, 403))
    app.register_error_handler(InvalidInput, lambda e: _service_error(e, 400))
    app.register_error_handler(Conflict, lambda e: _service_error(e, 409))


def refuse_hostile_input() -> None:
    """A NUL or a lone surrogate in a page's query string or form never reaches a view
    (nor the database): 400 naming the field. (/api checks its own input.)"""
    if wants_json():
        return
    for source in (request.args, request.form):
        for name, value in source.items(multi=True):
            for text, what in ((name, "the name of a field"), (value, f"the field {name!r}")):
                if (problem := text_problem(text)) is not None:
                    raise BadRequest(f"{what.capitalize()} {problem}; nothing was done.")


def add_headers(response: Response) -> Response:
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    if request.endpoint != "static":
        # Runs, approvals and users are not for shared caches, nor for the back button
        # after sign-out.
        response.headers.setdefault("Cache-Control", "no-store")
    if current_app.config.get("AGENTLOOP_HSTS"):
        response.headers.setdefault("Strict-Transport-Security", HSTS)
    return response


def wants_json() -> bool:
    return request.path == "/api" or request.path.startswith("/api/")


def csrf_failed(error: CSRFError) -> tuple[Response | str, int]:
    if wants_json():
        return jsonify(error=error.description), 400
    return (
        render_template(
            "error.html",
            title="The form could not be verified",
            message="It was not sent from a page of this site, or your session changed. "
            "Go back, reload the page and try again. Nothing was changed.",
        ),
        400,
    )


def too_many(error: RateLimitExceeded) -> tuple[Response | str, int]:
    """429; Flask-Limiter adds Retry-After (seconds) to it after the handler."""
    limit = str(error.limit.limit) if getattr(error, "limit", None) else error.description
    if wants_json():
        return jsonify(error=f"rate limit exceeded ({limit}); retry after Retry-After seconds"), 429
    if request.endpoint == "auth.login":
        message = (
            "Too many failed sign-ins for this account or from this address "
            f"(at most {limit}). Wait a minute and try again."
        )
        return render_template("error.html", title="Too many attempts", message=message), 429
    message = f"Too many requests (at most {limit}). Wait a moment and try again."
    return render_template("error.html", title="Too many requests", message=message), 429


def _service_error(error: Exception, status: int) -> tuple[Response | str, int]:
    """A service error no view caught: never a 500."""
    message = str(error.args[0]) if error.args else type(error).__name__
    if wants_json():
        return jsonify(error=message), status
    titles = {404: "Not found", 403: "Forbidden", 400: "Bad request", 409: "Conflict"}
    return render_template("error.html", title=titles[status], message=message), status


def http_error(error: HTTPException) -> Response:
    status = error.code or 500
    if wants_json():
        response = jsonify(error=error.description or error.name)
    else:
        response = Response(
            render_template("error.html", title=error.name, message=error.description),
            mimetype="text/html",
        )
    response.status_code = status
    # A 405 names the methods allowed (werkzeug puts them on the exception).
    for name, value in error.get_headers():
        if name in {"Allow", "WWW-Authenticate"}:
            response.headers[name] = value
    return response
