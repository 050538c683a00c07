"""The Flask app: `create_app()` builds everything; nothing runs at import.

Blueprints, one per feature: auth (sign-in), runs (the pages people use),
approvals (the links sent by email), api (JSON for scripts and CI).
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask

from app.config import load_settings
from app.web import api, approvals, auth, runs, security
from app.web.deps import Deps, present_filters

log = logging.getLogger(__name__)
DEV_SECRET = "dev-only-change-me"


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """The web app. `test_config` may carry AGENTLOOP_SETTINGS (a Settings) and
    AGENTLOOP_SERVICE (an AgentService; otherwise one publishing to Celery is built
    on first use)."""
    app = Flask(__name__)
    overrides = dict(test_config or {})
    settings = overrides.get("AGENTLOOP_SETTINGS") or load_settings()
    app.config.from_mapping(
        SECRET_KEY=settings.secret_key,
        AGENTLOOP_SETTINGS=settings,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.base_url.startswith("https://"),
        # A CSRF token lives as long as the session: an approval page left open for an
        # hour must still submit.
        WTF_CSRF_TIME_LIMIT=None,
        MAX_CONTENT_LENGTH=1024 * 1024,
        RUNS_PER_PAGE=25,
        POLL_MILLISECONDS=1000,
    )
    app.config.update(overrides)
    if settings.secret_key == DEV_SECRET and not app.testing:
        # Sessions, CSRF tokens and approval links are all signed with this key.
        log.warning("AGENTLOOP_SECRET_KEY is the development default: set your own")
    app.extensions["agentloop"] = Deps(settings, overrides.get("AGENTLOOP_SERVICE"))
    security.init_app(app)
    app.register_blueprint(auth.bp)
    app.register_blueprint(runs.bp)
    app.register_blueprint(approvals.bp)
    app.register_blueprint(api.bp)
    security.csrf.exempt(api.bp)  # bearer tokens, never cookies: no cross-site forgery
    app.jinja_env.filters.update(present_filters())
    app.jinja_env.globals["flower_url"] = settings.flower_url
    return app
