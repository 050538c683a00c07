"""What the pages say stays true: a step waiting for a person is badged as
waiting, not "pending"; a finished run shows when it finished, not a deadline; the
flash after a decision ("the step runs") goes when the live page sees the run end."""

from __future__ import annotations

import re

from flask.testing import FlaskClient

from app.engine.models import RunStatus
from app.service.permissions import Actor
from tests.support.fixtures import Harness
from tests.support.pages import Site, site  # noqa: F401 - a fixture
from tests.support.web import paused_run
from tests.test_browser import (
    served,  # noqa: F401 - a fixture
    sign_in_with,
)


def badges(page: str) -> list[str]:
    """The steps' badges on a run page, in order."""
    head = r'<li class="step[^"]*"[^>]*>\s*<div class="step-head">'
    return re.findall(head + r'.*?<span class="badge [^"]*">([^<]+)</span>', page, re.S)


def test_a_step_waiting_for_approval_says_so(signed_in: FlaskClient, harness: Harness):
    run_id = paused_run(harness)
    page = signed_in.get(f"/runs/{run_id}").text
    assert badges(page) == ["awaiting approval", "pending"]
    assert "<dt>Deadline</dt>" in page  # still running: the deadline matters


def test_a_finished_run_shows_when_it_finished_not_a_deadline(
    signed_in: FlaskClient, harness: Harness
):
    run_id = paused_run(harness)
    harness.service.cancel(run_id, by="tests")
    page = signed_in.get(f"/runs/{run_id}").text
    assert "<dt>Deadline</dt>" not in page and "<dt>Finished</dt>" in page
    assert "awaiting approval" not in page


def test_the_resume_flash_goes_when_the_run_ends(browser, site: Site):  # noqa: F811
    run_id = paused_run(site.harness, created_by="ada", approvers=[site.admin.name])
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    sign_in_with(page, site.url, site.admin.name)
    page.goto(f"{site.url}/runs/{run_id}")
    page.click("#pending button[data-action=approve]")
    page.wait_for_selector(".flash:has-text('Decision recorded')")
    site.harness.drain()  # the worker's part: step 1 runs, step 2 asks in turn
    site.harness.service.approve(run_id, by=Actor.of(site.admin), channel="cli")
    site.harness.drain()  # ... and runs: the run completes
    assert site.harness.service.status(run_id).run.status == RunStatus.COMPLETED
    page.wait_for_selector("#run[data-status=completed]")
    page.wait_for_selector(".flash", state="detached")
    context.close()
