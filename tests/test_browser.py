"""A real browser (Debian's chromium, driven by Playwright) against the web app
served over HTTP, with a real Celery worker advancing the run: sign in, submit
the form, watch the run page reach the approval live, approve, see it complete.

Screenshots of the form, the run page and the approval page are saved to
test-artifacts/ (and, with AGENTLOOP_UPDATE_SCREENSHOTS=1, to docs/screenshots/).
"""

from __future__ import annotations

import os
import shutil

import pytest

from app.demo import DEMO_TASK
from app.engine.models import RunStatus
from app.notify import approval_link
from tests.conftest import ROOT
from tests.support.web import PASSWORD, LiveWeb

pytestmark = pytest.mark.e2e

ARTIFACTS = ROOT / "test-artifacts"
DOCS = ROOT / "docs" / "screenshots"


def shoot(page, name: str) -> None:
    """Save a screenshot as a test artifact; with AGENTLOOP_UPDATE_SCREENSHOTS=1 also
    refresh the README's copy (so a plain test run leaves the tree clean)."""
    ARTIFACTS.mkdir(exist_ok=True)
    target = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_size > 10_000  # a real rendering, not an empty page
    if os.environ.get("AGENTLOOP_UPDATE_SCREENSHOTS") == "1":
        DOCS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(target, DOCS / target.name)


def test_a_person_runs_the_deploy_scenario_in_a_browser(
    browser, live_web: LiveWeb, start_worker, make_user
):
    user = make_user("ada")
    # The shipped runbooks (deploy_pr), not the test suite's.
    start_worker(env={"AGENTLOOP_RUNBOOKS_DIR": ""})
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))

    page.goto(live_web.url + "/")
    assert "/login" in page.url
    page.fill("#name", user.name)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector("h1:has-text('Runs')")

    page.click("text=New run")
    page.fill("#task", DEMO_TASK)
    page.select_option("#planner", "offline")
    page.fill("#approvers", user.name)
    page.fill("#timeout", "300")
    page.fill("#retry_base", "0.5")
    page.fill("#retry_max_backoff", "5")
    shoot(page, "new-run-form")
    page.click("button:has-text('Start the run')")

    page.wait_for_selector("#run")
    run_id = page.url.rsplit("/", 1)[-1]
    page.evaluate("window.__notReloaded = true")
    page.wait_for_selector("#run[data-status=paused]", timeout=90_000)
    page.wait_for_selector("#pending button[data-action=approve]")
    assert page.evaluate("window.__notReloaded") is True  # it updated live, in place
    assert page.locator("#timeline li[data-kind=plan]").count() >= 1
    assert "deploy" in page.locator("#pending").inner_text()
    shoot(page, "run-page")

    pending = live_web.service.status(run_id).pending_approval
    settings = live_web.app.config["AGENTLOOP_SETTINGS"]
    link = approval_link(settings, pending.id, user.name, pending.args_hash)
    review = context.new_page()
    review.goto(link)
    review.wait_for_selector("#approval")
    assert "Deploy the build to staging" in review.inner_text("#approval")
    shoot(review, "approval-page")
    review.close()
    assert live_web.service.status(run_id).run.status == RunStatus.PAUSED  # GET changed nothing

    page.click("#pending button[data-action=approve]")
    page.wait_for_selector(".flash:has-text('Decision recorded')")
    page.evaluate("window.__notReloaded = true")
    page.wait_for_selector("#run[data-status=completed]", timeout=120_000)
    assert page.evaluate("window.__notReloaded") is True
    page.wait_for_selector("#summary pre.report")
    assert "PR #42" in page.inner_text("#summary")
    assert page.locator("#timeline li[data-kind=retry]").count() >= 1
    assert page.locator("#plans article.plan").count() >= 2  # re-planned around the env var
    shoot(page, "run-completed")
    assert problems == [], problems
    context.close()
