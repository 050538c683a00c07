"""Operating it: /healthz and /readyz, `agentloop health`, and Flower's task names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient

from app.config import load_settings
from app.store.migrate import alembic_config
from app.web import create_app
from app.web.health import schema_heads
from tests.conftest import QUEUE, REDIS_DB, ROOT
from tests.support.fixtures import drop_queue

AGENTLOOP = str(Path(sys.executable).with_name("agentloop"))


def test_healthz_is_open_and_touches_nothing(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "alive"}
    assert response.headers["Cache-Control"] == "no-store"


def test_readyz_is_ready_with_the_database_at_head_and_the_broker_up(client: FlaskClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {
        "status": "ready",
        "checks": {"database": "ok", "broker": "ok"},
    }
    assert response.headers["Cache-Control"] == "no-store"


def test_readyz_says_when_the_broker_is_away(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks import celery_app

    for key in ("broker_url", "broker_write_url"):
        monkeypatch.setattr(celery_app.conf, key, "redis://127.0.0.1:1/0")
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.get_json()
    assert body["not_ready"] == ["broker"]
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["broker"].startswith("unreachable")


@pytest.mark.chaos
def test_readyz_turns_503_while_the_database_is_stopped(private_postgres, redis_db) -> None:
    url = private_postgres.create_database()
    app = create_app({"TESTING": True, "AGENTLOOP_SETTINGS": load_settings(database_url=url)})
    client = app.test_client()
    try:
        assert client.get("/readyz").status_code == 200
        private_postgres.stop()
        response = client.get("/readyz")
        assert response.status_code == 503
        body = response.get_json()
        assert body["not_ready"] == ["database"]
        assert body["checks"]["database"].startswith("unreachable")
        assert body["checks"]["broker"] == "ok"
        assert client.get("/healthz").status_code == 200  # alive all the same
        private_postgres.start()
        response = client.get("/readyz")
        assert response.status_code == 200, response.get_json()
    finally:
        private_postgres.ensure_running()
        app.extensions["agentloop"].service.store.dispose()


@pytest.mark.chaos
def test_readyz_is_not_ready_while_the_schema_is_behind(private_postgres, redis_db) -> None:
    from alembic import command

    url = private_postgres.create_database()
    command.downgrade(alembic_config(url), "-1")
    app = create_app({"TESTING": True, "AGENTLOOP_SETTINGS": load_settings(database_url=url)})
    try:
        response = app.test_client().get("/readyz")
        assert response.status_code == 503
        problem = response.get_json()["checks"]["database"]
        assert problem.startswith("schema at ") and "agentloop db upgrade" in problem
        assert all(head in problem for head in schema_heads())
    finally:
        app.extensions["agentloop"].service.store.dispose()


def health(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AGENTLOOP, "health", *args], capture_output=True, text=True, cwd=ROOT, timeout=60,
        env=os.environ.copy(),
    )  # fmt: skip


def test_health_fails_with_one_line_when_no_worker_consumes_the_queue(redis_db) -> None:
    done = health("--timeout", "1")
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("agentloop health: no worker")
    assert QUEUE in lines[0] or "answered within 1 s" in lines[0]


def test_health_passes_when_a_worker_consumes_the_queue(start_worker) -> None:
    start_worker(beat=False)
    done = health("--timeout", "5")
    assert done.returncode == 0, done
    assert QUEUE in done.stdout and done.stderr == ""


def test_health_fails_when_the_broker_is_away(redis_db) -> None:
    env = {**os.environ, "CELERY_BROKER_URL": "redis://127.0.0.1:1/0"}
    done = subprocess.run(
        [AGENTLOOP, "health"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60
    )
    assert done.returncode == 1
    assert done.stderr.startswith("agentloop health: cannot reach the broker")
    assert len(done.stderr.strip().splitlines()) == 1


def test_flower_sees_the_run_and_tick_an_iteration_advances(redis_db) -> None:
    from app.engine.routing import WorkKind
    from tasks import CeleryDispatcher

    client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
    drop_queue(client)
    try:
        CeleryDispatcher(max_countdown=60).enqueue("run-abc", 7, 0, WorkKind.TOOL)
        (raw,) = client.lrange(QUEUE, 0, -1)
        message = json.loads(raw)
        assert message["headers"]["task"] == "agentloop.advance"
        assert message["headers"]["shadow"] == "agentloop.advance[run-abc tick 7]"
    finally:
        drop_queue(client)
        client.close()
