"""/metrics: Prometheus's text format, for a scraper on the same network.

No sign-in (a scraper has none): it shows counts and timings, never a run's
content. In multiprocess mode (PROMETHEUS_MULTIPROC_DIR) it sums every gunicorn
worker's samples, and adds what the database knows, read at scrape time.
"""

from __future__ import annotations

from flask import Blueprint, Response

from app import metrics
from app.web.deps import service

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def scrape() -> Response:
    body = metrics.exposition(store=lambda: service().store)
    return Response(body, headers={"Content-Type": metrics.CONTENT_TYPE})
