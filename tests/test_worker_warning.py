"""The warning when no worker consumes the queue (app/stall.py): on the run page and
its live updates, and once from `follow_run` instead of waiting silently."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import timedelta

from flask.testing import FlaskClient

from app import stall
from app.config import load_settings
from app.demo import follow_run
from app.engine.models import RunStatus
from tests.support.fixtures import Harness, steps, wait_until
from tests.support.web import paused_run

WARNING = "no worker has picked this run up"


def overdue() -> float:
    """Seconds past which a due run is reported (max(30, 2 * sweep interval)), plus one."""
    return stall.stall_after(load_settings().sweep_interval) + 1


def test_a_due_run_nobody_consumes_shows_the_warning(harness: Harness, signed_in: FlaskClient):
    run_id = harness.service.create_run("nobody will run me")
    assert WARNING not in signed_in.get(f"/runs/{run_id}").text  # just queued: not yet
    before = signed_in.get(f"/runs/{run_id}/live").json
    harness.clock.advance(overdue())
    page = signed_in.get(f"/runs/{run_id}").text
    assert WARNING in page and "agentloop worker" in page
    # A page left open picks it up: the state changes and the summary is sent again.
    live = signed_in.get(f"/runs/{run_id}/live", query_string={"state": before["state"]}).json
    assert live["state"] != before["state"]
    assert WARNING in live["sections"]["summary"]


def test_a_progressing_run_shows_no_warning(harness: Harness, signed_in: FlaskClient):
    harness.planner.script = [steps("noop", "noop", "noop")]
    run_id = harness.service.create_run("keep going")
    while harness.dispatcher.sent:
        harness.clock.advance(overdue() / 3)  # slow iterations, but each one claimed
        harness.step()
        assert WARNING not in signed_in.get(f"/runs/{run_id}").text
    assert harness.service.status(run_id).run.status == RunStatus.COMPLETED
    harness.clock.advance(overdue())
    assert WARNING not in signed_in.get(f"/runs/{run_id}").text  # finished: nothing due


def test_a_paused_or_leased_run_is_not_waiting_for_a_worker(
    harness: Harness, signed_in: FlaskClient
):
    run_id = paused_run(harness)
    harness.clock.advance(overdue())
    assert WARNING not in signed_in.get(f"/runs/{run_id}").text
    run = harness.service.status(run_id).run
    leased = replace(
        run,
        status="running",
        lease_owner="w",
        lease_expires_at=harness.clock() + timedelta(seconds=60),
    )
    assert stall.warning(leased, harness.clock(), 15.0) is None


def test_follow_without_a_worker_warns_once_instead_of_hanging(harness: Harness):
    run_id = harness.service.create_run("follow me, nobody runs me")
    harness.clock.advance(overdue())
    warnings: list[str] = []
    result: list[int] = []
    follower = threading.Thread(
        target=lambda: result.append(
            follow_run(harness.service, run_id, ask=None, color=False, warn=warnings.append)
        ),
        daemon=True,
    )
    follower.start()
    wait_until(lambda: warnings, timeout=10, what="the warning from follow_run")
    assert WARNING in warnings[0] and "agentloop worker" in warnings[0]
    harness.service.cancel(run_id, by="tests")  # the run ends: the follower returns
    follower.join(timeout=10)
    assert not follower.is_alive()
    assert result == [1] and len(warnings) == 1
