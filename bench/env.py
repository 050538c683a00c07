"""The benchmark's own world, set up before anything reads a setting: a database of
its own, Redis database 14 with queues named after this process (nothing else's is
touched, nothing is flushed), a data folder, the test tools and the bench runbooks.

Imported first by bench/run.py and by the floor worker (bench/floors.py), which
must find the same database and queues: AGENTLOOP_BENCH_* carry them over.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: import the project and its test tools

PG = "postgresql+psycopg2://postgres@127.0.0.1:5432"
DB = os.environ.setdefault("AGENTLOOP_BENCH_DB", f"agentloop_bench_{os.getpid()}")
REDIS = "redis://127.0.0.1:6379/14"
QUEUE = os.environ.setdefault("AGENTLOOP_BENCH_QUEUE", f"agentloop-bench-{os.getpid()}")
FLOOR_QUEUE = f"{QUEUE}.floor"
DATA = Path(os.environ.get("AGENTLOOP_BENCH_DATA") or tempfile.mkdtemp(prefix="agentloop-bench-"))
RUNBOOKS = DATA / "runbooks"

os.environ.update(
    AGENTLOOP_BENCH_DATA=str(DATA),
    DATABASE_URL=f"{PG}/{DB}",
    CELERY_BROKER_URL=REDIS,
    AGENTLOOP_QUEUE=QUEUE,
    AGENTLOOP_DATA_DIR=str(DATA),
    AGENTLOOP_TOOL_MODULES="tests.support.tools",
    AGENTLOOP_RUNBOOKS_DIR=str(RUNBOOKS),
)
