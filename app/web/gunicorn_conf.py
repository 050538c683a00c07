"""gunicorn settings for the web app (Procfile: `gunicorn -c python:app.web.gunicorn_conf`).

gunicorn writes `Server: gunicorn` itself, ahead of the app's headers
(gunicorn.http.wsgi.Response.default_headers), and has no setting to turn it off:
the response class is patched here to leave that line out, so no server banner
says what to attack.
"""

from __future__ import annotations

import os
from typing import Any

from gunicorn.http import wsgi

bind = f"127.0.0.1:{os.environ.get('AGENTLOOP_WEB_PORT', '8000')}"
workers = int(os.environ.get("AGENTLOOP_WEB_WORKERS", "2"))

_default_headers = wsgi.Response.default_headers


def _without_server(self: Any) -> list[str]:
    return [h for h in _default_headers(self) if not h.lower().startswith("server:")]


wsgi.Response.default_headers = _without_server
