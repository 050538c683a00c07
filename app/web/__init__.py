"""The Flask app: `create_app()` builds everything; nothing runs at import.

Blueprints, one per feature: auth (sign-in), runs (the pages people use),
approvals (the links sent by email), admin (user management), api (JSON for
scripts and CI). app/web/security.py adds CSRF, headers, input checks, rate limits
and error pages to all of them.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from app import logs, tracing
from app.config import ConfigError, load_settings
from app.web import admin, api, approvals, auth, fork, health, metrics, runs, security
from app.web.deps import Deps, present_filters

log = logging.getLogger(__name__)
DEV_SECRET = "dev-only-change-me"


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """The web app. `test_config` may carry AGENTLOOP_SETTINGS (a Settings) and
    AGENTLOOP_SERVICE (an AgentService; otherwise one publishing to Celery is built
    on first use), AGENTLOOP_LIMITS (a security.LimitSettings) and Flask-Limiter's
    RATELIMIT_* keys (e.g. RATELIMIT_STORAGE_URI="memory://")."""
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
    logs.init_flask(app)  # JSON lines with the run id of the request (app/logs.py)
    tracing.instrument_flask(app)  # spans, when OTEL_EXPORTER_OTLP_ENDPOINT is set
    limits = overrides.get("AGENTLOOP_LIMITS") or _limit_settings()
    # HSTS only when people reach the site over https (a browser would refuse plain
    # http to this host for two years after seeing it).
    app.config.setdefault("AGENTLOOP_HSTS", settings.base_url.startswith("https://"))
    if settings.secret_key == DEV_SECRET and not app.testing:
        # Sessions, CSRF tokens and approval links are all signed with this key.
        log.warning("AGENTLOOP_SECRET_KEY is the development default: set your own")
    app.extensions["agentloop"] = Deps(settings, overrides.get("AGENTLOOP_SERVICE"))
    security.init_app(app)
    app.register_blueprint(auth.bp)
    app.register_blueprint(runs.bp)
    app.register_blueprint(fork.bp)  # time travel: fork from a step, lineage
    app.register_blueprint(approvals.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(health.bp)  # /healthz, /readyz: no sign-in
    app.register_blueprint(metrics.bp)
    security.csrf.exempt(api.bp)  # bearer tokens, never cookies: no cross-site forgery
    security.init_limiter(app, settings, limits)
    if limits.proxy_hops:
        # Behind a reverse proxy: the client's address (rate limits) and scheme come
        # from the X-Forwarded-* headers the trusted proxies set.
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=limits.proxy_hops, x_proto=limits.proxy_hops
        )
    app.jinja_env.filters.update(present_filters())
    app.jinja_env.globals["flower_url"] = settings.flower_url
    return app


def _limit_settings() -> security.LimitSettings:
    from pydantic import ValidationError

    try:
        return security.LimitSettings()
    except ValidationError as exc:
        problems = "; ".join(
            f"AGENTLOOP_RATELIMIT_{'.'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
