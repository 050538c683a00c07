"""A real browser (Debian's chromium, driven by Playwright) against the web app
served over HTTP, with a real Celery worker advancing the run: sign in, submit
the form, watch the run page reach the approval live, approve, see it complete.
Then what sign-out and roles mean in a browser: a session cookie copied before
sign-out is refused after it, and a viewer sees no button it cannot use.

Screenshots of the form, the run page and the approval page are saved to
test-artifacts/ (and, with AGENTLOOP_UPDATE_SCREENSHOTS=1, to docs/screenshots/).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator

import pytest

from app.config import load_settings
from app.demo import DEMO_TASK
from app.engine.models import RunStatus
from app.notify import approval_link
from app.store.accounts import Role
from app.web import create_app
from tests.conftest import ROOT
from tests.support.fixtures import Harness, steps
from tests.support.web import PASSWORD, LiveWeb, free_port

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
    # Four eyes: ada (an operator) starts the run, bob (an approver) approves it.
    user, approver = make_user("ada", role=Role.OPERATOR), make_user("bob")
    # The shipped runbooks (deploy_pr), not the test suite's.
    start_worker(env={"AGENTLOOP_RUNBOOKS_DIR": ""})
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))

    page.goto(live_web.url + "/")
    assert "/login" in page.url
    sign_in_with(page, live_web.url, user.name)

    page.click("text=New run")
    page.fill("#task", DEMO_TASK)
    page.select_option("#planner", "offline")
    page.fill("#approvers", approver.name)
    page.fill("#timeout", "300")
    page.fill("#retry_base", "0.5")
    page.fill("#retry_max_backoff", "5")
    shoot(page, "new-run-form")
    page.click("button:has-text('Start the run')")

    page.wait_for_selector("#run")
    run_id = page.url.rsplit("/", 1)[-1]
    page.evaluate("window.__notReloaded = true")
    page.wait_for_selector("#run[data-status=paused]", timeout=90_000)
    page.wait_for_selector("#pending:has-text('Only the run')")
    assert page.evaluate("window.__notReloaded") is True  # it updated live, in place
    assert page.locator("#pending button[data-action=approve]").count() == 0  # not hers
    page.click("button:has-text('Sign out')")

    sign_in_with(page, live_web.url, approver.name)
    page.goto(f"{live_web.url}/runs/{run_id}")
    page.wait_for_selector("#pending button[data-action=approve]")
    assert page.locator("#timeline li[data-kind=plan]").count() >= 1
    assert "deploy" in page.locator("#pending").inner_text()
    shoot(page, "run-page")

    pending = live_web.service.status(run_id).pending_approval
    settings = live_web.app.config["AGENTLOOP_SETTINGS"]
    link = approval_link(settings, pending.id, approver.name, pending.args_hash)
    review = context.new_page()
    review.goto(link)
    review.wait_for_selector("#approval")
    assert "Deploy the build to staging" in review.inner_text("#approval")
    shoot(review, "approval-page")
    review.close()
    assert live_web.service.status(run_id).run.status == RunStatus.PAUSED  # GET changed nothing

    page.click("#pending button[data-action=approve]")
    page.wait_for_selector(".flash:has-text('Decision recorded')")
    # The first deploy fails for a missing env var, the agent sets it and asks again:
    # an approval covers only the call as approved. Approve each as it comes, live.
    page.evaluate("window.__notReloaded = true")
    approvals = 1
    while True:
        page.wait_for_selector(
            "#run[data-status=completed], #pending button[data-action=approve]",
            timeout=120_000,
        )
        if page.locator("#run[data-status=completed]").count():
            break
        assert page.evaluate("window.__notReloaded") is True
        assert approvals < 4, "asked for approval again and again"
        page.click("#pending button[data-action=approve]")
        page.wait_for_selector(".flash:has-text('Decision recorded')")
        page.evaluate("window.__notReloaded = true")
        approvals += 1
    assert page.evaluate("window.__notReloaded") is True
    assert approvals == 2
    page.wait_for_selector("#summary .report.markdown")  # rendered, not a <pre>
    assert "PR #42" in page.inner_text("#summary")
    assert page.locator("#timeline li[data-kind=retry]").count() >= 1
    assert page.locator("#plans article.plan").count() >= 2  # re-planned around the env var
    shoot(page, "run-completed")
    assert problems == [], problems
    context.close()


# --- sessions and roles in a real browser (issue 9) -------------------------------------------


@pytest.fixture
def served(harness: Harness) -> Iterator[str]:
    """The app over the in-process harness, served by werkzeug on a free port (runs
    are advanced by harness.drain() in the test, no worker needed)."""
    from werkzeug.serving import make_server

    port = free_port()
    settings = load_settings(base_url=f"http://127.0.0.1:{port}")
    app = create_app(
        {
            "AGENTLOOP_SETTINGS": settings,
            "AGENTLOOP_SERVICE": harness.service,
            "RATELIMIT_STORAGE_URI": "memory://",
        }
    )
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    server.shutdown()


def sign_in_with(page, url: str, name: str) -> None:
    page.goto(url + "/login")
    page.fill("#name", name)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector("h1:has-text('Runs')")


def test_a_cookie_copied_before_sign_out_no_longer_signs_in(browser, served: str, make_user):
    user = make_user("copycat", role=Role.OPERATOR)
    context = browser.new_context()
    page = context.new_page()
    sign_in_with(page, served, user.name)
    stolen = [c for c in context.cookies() if c["name"] == "session"]
    assert stolen, context.cookies()
    page.click("button:has-text('Sign out')")
    page.wait_for_selector(".flash:has-text('You are signed out')")
    context.close()

    replay = browser.new_context()
    replay.add_cookies(stolen)
    page = replay.new_page()
    page.goto(served + "/")
    assert "/login" in page.url  # sent to sign in: the old cookie is worth nothing
    assert page.locator("h1").inner_text() == "Sign in"
    assert page.locator("button:has-text('Sign out')").count() == 0
    replay.close()


def test_a_viewer_sees_no_button_it_cannot_use(browser, served: str, harness: Harness, make_user):
    viewer = make_user("viewer", role=Role.VIEWER)
    harness.planner.script = [steps("noop", "noop")]
    run_id = harness.service.create_run(
        "waits for a person", config={"approval_required": ["noop"]}, created_by="tests"
    )
    harness.drain()
    assert harness.service.status(run_id).run.status == RunStatus.PAUSED
    context = browser.new_context()
    page = context.new_page()
    sign_in_with(page, served, viewer.name)
    assert page.locator("a:has-text('New run')").count() == 0
    page.goto(f"{served}/runs/{run_id}")
    page.wait_for_selector("#run[data-status=paused]")
    page.wait_for_selector("#pending")  # the pause is shown ...
    for action in ("approve", "reject", "cancel", "retry", "skip", "mark_done"):
        assert page.locator(f"[data-action={action}]").count() == 0, action  # ... no buttons
    assert page.locator("#pending form").count() == 0
    assert page.locator("a:has-text('New run')").count() == 0
    assert page.locator("a:has-text('Users')").count() == 0
    context.close()
