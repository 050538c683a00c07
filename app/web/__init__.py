"""The Flask app: `create_app()` builds everything; nothing runs at import."""

from __future__ import annotations

from typing import Any

from flask import Flask

from app.config import load_settings


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    settings = load_settings()
    app.config.from_mapping(SECRET_KEY=settings.secret_key, AGENTLOOP_SETTINGS=settings)
    if test_config:
        app.config.update(test_config)

    @app.get("/")
    def index() -> str:
        return (
            "<!doctype html><title>agentloop</title><h1>agentloop</h1>"
            "<p>Runs are created with <code>agentloop run</code>; "
            f'workers are monitored in <a href="{settings.flower_url}">Flower</a>.</p>'
        )

    return app
