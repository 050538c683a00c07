"""Past one machine: two workers as separate processes, named as nodes of two hosts
(`-n name@host`), share one database and one broker. Runs complete, both workers
do iterations, and no step runs twice (docs/scaling.md)."""

from __future__ import annotations

import collections

import pytest

from app.engine.models import RunStatus
from tests.support.fixtures import wait_until, workspace

pytestmark = pytest.mark.e2e

RUNS = 8
STEPS_PER_RUN = 4  # tests/support/runbooks/effect_chain.toml


def effects(run_id: str) -> list[str]:
    """What the `effect` tool wrote: `start <pid> <key>`, then `effect <key>`."""
    log = workspace(run_id) / "effects.log"
    return log.read_text().splitlines() if log.exists() else []


def test_two_hosts_share_the_runs_and_run_each_step_once(start_worker, live_service):
    workers = {
        host: start_worker(name=host, hostname=f"agentloop@{host}", beat=host == "host-a")
        for host in ("host-a", "host-b")
    }
    for host, worker in workers.items():
        assert f"agentloop@{host}" in worker.output()  # the node name Celery runs as
    run_ids = [live_service.create_run(f"effect chain {n}") for n in range(RUNS)]

    def finished() -> bool:
        return all(RunStatus(live_service.status(r).run.status).is_terminal for r in run_ids)

    wait_until(finished, timeout=180, what="every run to finish")
    host_of_pid = {pid: host for host, w in workers.items() for pid in w.child_pids()}
    executed_by: collections.Counter[str] = collections.Counter()
    for run_id in run_ids:
        view = live_service.status(run_id)
        assert view.run.status == RunStatus.COMPLETED, (run_id, view.run.error)
        lines = [line.split() for line in effects(run_id)]
        starts = [(words[1], words[2]) for words in lines if words[0] == "start"]
        keys = [key for _, key in starts]
        assert len(keys) == STEPS_PER_RUN and len(set(keys)) == STEPS_PER_RUN, lines
        assert sorted(words[1] for words in lines if words[0] == "effect") == sorted(keys)
        for pid, _ in starts:
            executed_by[host_of_pid[int(pid)]] += 1
    # Both hosts took part, and together did every step exactly once.
    print("steps executed by", dict(executed_by))
    assert set(executed_by) == set(workers), executed_by
    assert sum(executed_by.values()) == RUNS * STEPS_PER_RUN
