"""Shared fixtures: a real PostgreSQL database and Redis db of the suite's own,
services wired like production with only the queue boundary replaced, and real
Celery worker processes for the end-to-end tests.

With CI=true a missing PostgreSQL or Redis fails the tests that need it; on a
developer machine those tests are skipped with the reason.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(tempfile.mkdtemp(prefix="agentloop-tests-"))
TEST_DB = f"agentloop_test_{os.getpid()}"
PG_SERVER = "postgresql+psycopg2://postgres@127.0.0.1:5432"
REDIS_DB = 13  # the suite's own Redis database
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
# A queue of the session's own, so two sessions on one machine never take each
# other's messages.
QUEUE = f"agentloop-test-{os.getpid()}"

# Every process of the suite (this one, the workers it starts) reads the same
# settings from the environment, set before anything imports the Celery app.
os.environ.update(
    DATABASE_URL=f"{PG_SERVER}/{TEST_DB}",
    CELERY_BROKER_URL=REDIS_URL,
    AGENTLOOP_DATA_DIR=str(DATA_DIR),
    # The demo tools are not registered by default; the suite asks for them.
    AGENTLOOP_TOOL_MODULES="app.tools.demo,tests.support.tools",
    AGENTLOOP_RUNBOOKS_DIR=str(ROOT / "tests" / "support" / "runbooks"),
    AGENTLOOP_LEASE_GRACE="1.5",
    AGENTLOOP_SWEEP_GRACE="0.5",
    AGENTLOOP_SWEEP_INTERVAL="0.5",
    AGENTLOOP_SECRET_KEY="test-secret-key-not-for-production",
    AGENTLOOP_QUEUE=QUEUE,
)
for _name in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "SLACK_WEBHOOK_URL"):
    os.environ.pop(_name, None)

pytest_plugins = [
    "tests.support.fixtures",
    "tests.support.private_services",
    "tests.support.web",
    "tests.fake_anthropic",
]
