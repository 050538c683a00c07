"""The runs list through Flask's test client over the real database: filters by
creator, time and text (the same search as `agentloop runs`), counts on the status
chips, the planner, the run id and how each run ended, the live refresh, and the
no-worker warning."""

from __future__ import annotations

import re
from secrets import token_hex

import pytest
from flask.testing import FlaskClient

from app.engine.actions import PlannerFatal
from app.engine.models import RunStatus
from app.stall import MIN_STALL_SECONDS
from tests.support.fixtures import Harness, steps
from tests.support.pages import Site, site  # noqa: F401 - a fixture
from tests.test_browser import (
    served,  # noqa: F401 - a fixture
    sign_in_with,
)


def rows(page: str) -> list[str]:
    """The run ids listed, in order."""
    return re.findall(r'<tr data-run="([^"]+)"', page)


def chip(page: str, status: str) -> int:
    found = re.search(
        rf'data-status="{status}"[^>]*>{status} <span class="count">(\d+)</span>', page
    )
    assert found, f"no {status} chip"
    return int(found.group(1))


def test_filters_by_creator_text_and_time_with_counts(signed_in: FlaskClient, harness: Harness):
    tag, ada, bob = token_hex(4), f"ada-{token_hex(3)}", f"bob-{token_hex(3)}"
    old = harness.service.create_run(f"old {tag} run", created_by=ada)
    harness.service.cancel(old, by="tests")
    harness.clock.advance(3 * 3600)
    harness.planner.script = [steps("noop")]
    done = harness.service.create_run(f"deploy {tag}", created_by=ada)
    harness.drain()
    harness.clock.advance(1)
    other = harness.service.create_run(f"deploy {tag} elsewhere", created_by=bob)
    assert harness.service.status(done).run.status == RunStatus.COMPLETED

    by_ada = signed_in.get(f"/?by={ada}").text
    assert rows(by_ada) == [done, old]
    assert chip(by_ada, "completed") == 1 and chip(by_ada, "cancelled") == 1
    assert chip(by_ada, "queued") == 0 and "page 1 of 1 · 2 runs" in by_ada
    assert rows(signed_in.get(f"/?q=DEPLOY+{tag}").text) == [other, done]  # case-insensitive
    recent = signed_in.get(f"/?q={tag}&since=2h").text
    assert rows(recent) == [other, done]
    assert chip(recent, "queued") == 1 and chip(recent, "completed") == 1
    assert rows(signed_in.get(f"/?q={tag}&by={bob}&status=queued").text) == [other]
    # Status links keep the other filters.
    failed_chip = re.search(r'<a href="([^"]+)" data-status="failed"', by_ada).group(1)
    assert failed_chip == f"/?status=failed&amp;by={ada}"


def test_each_row_shows_planner_id_and_how_it_ended(signed_in: FlaskClient, harness: Harness):
    tag = token_hex(4)
    harness.planner.script = [PlannerFatal(error=f"the API key was refused {tag}")]
    failed = harness.service.create_run(f"doomed {tag}", created_by="tests")
    harness.drain()
    harness.clock.advance(1)
    harness.planner.script = [steps("noop")]
    completed = harness.service.create_run(f"fine {tag}", created_by="tests")
    harness.drain()
    page = signed_in.get(f"/?q={tag}").text
    assert rows(page) == [completed, failed]
    assert f"<code>{failed[:8]}</code>" in page and f"<code>{completed[:8]}</code>" in page
    assert "<th>Planner</th>" in page and harness.service.status(failed).run.planner in page
    assert f"the API key was refused {tag}" in page  # the error, on the list
    assert "scripted report" in page  # a completed run: its report's first line


def test_a_bad_filter_is_named_not_ignored(signed_in: FlaskClient):
    page = signed_in.get("/?since=yesterday")
    assert page.status_code == 400
    assert 'id="since-error"' in page.text and "neither an age" in page.text
    for beyond in ("99999999999999d", "1000000d", "0001-01-01T00:00+01:00"):
        page = signed_in.get(f"/?since={beyond}")  # past what a datetime holds: named too
        assert page.status_code == 400 and 'id="since-error"' in page.text, beyond
    assert signed_in.get("/?q=a&q=b").status_code == 400
    assert signed_in.get("/?by=" + "x" * 201).status_code == 400


def test_the_live_list_sends_html_only_when_something_changed(
    signed_in: FlaskClient, harness: Harness
):
    tag = token_hex(4)
    first = harness.service.create_run(f"live {tag}", created_by="tests")
    page = signed_in.get(f"/?q={tag}").text
    state = re.search(r'data-state="([^"]+)"', page).group(1)
    live_url = re.search(r'data-live-url="([^"]+)"', page).group(1).replace("&amp;", "&")
    assert live_url == f"/runs/list/live?q={tag}"

    same = signed_in.get(f"{live_url}&state={state}").get_json()
    assert same == {"state": state}  # nothing changed: nothing sent
    harness.service.cancel(first, by="tests")
    changed = signed_in.get(f"{live_url}&state={state}").get_json()
    assert changed["state"] != state
    assert f'data-run="{first}" data-status="cancelled"' in changed["html"]
    harness.clock.advance(1)
    second = harness.service.create_run(f"live {tag} again", created_by="tests")
    newer = signed_in.get(f"{live_url}&state={changed['state']}").get_json()
    assert rows(newer["html"]) == [second, first]


def test_the_list_warns_when_no_worker_takes_runs(signed_in: FlaskClient, harness: Harness):
    run_id = harness.service.create_run("nobody takes me", created_by="tests")
    harness.clock.advance(MIN_STALL_SECONDS + 5)  # due all that time, and never claimed
    page = signed_in.get("/").text
    warning = re.search(r'<p class="run-error worker-warning" role="alert">(.*?)</p>', page, re.S)
    assert warning, "no warning on the list"
    assert "no worker has picked this run up" in warning.group(1)
    harness.drain()  # a worker takes it ...
    assert harness.service.status(run_id).run.status == RunStatus.COMPLETED


@pytest.mark.e2e
def test_the_list_updates_itself_in_a_browser(browser, site: Site):  # noqa: F811
    tag = token_hex(4)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    sign_in_with(page, site.url, site.admin.name)
    page.goto(f"{site.url}/?q={tag}")
    page.wait_for_selector("#list-live:has-text('live')")
    page.evaluate("window.__notReloaded = true")
    run_id = site.harness.service.create_run(f"appears by itself {tag}", created_by="tests")
    page.wait_for_selector(f"tr[data-run='{run_id}'][data-status=queued]")
    site.harness.drain()
    page.wait_for_selector(f"tr[data-run='{run_id}'][data-status=completed]")
    assert page.locator("a[data-status=completed] .count").inner_text() == "1"
    assert page.evaluate("window.__notReloaded") is True  # in place, not reloaded
    context.close()


@pytest.mark.e2e
def test_a_hidden_tab_polls_nothing_until_it_is_shown(browser, site: Site):  # noqa: F811
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    sign_in_with(page, site.url, site.admin.name)
    polls: list[str] = []
    page.on("request", lambda r: polls.append(r.url) if "/runs/list/live" in r.url else None)
    with page.expect_request(lambda r: "/runs/list/live" in r.url):  # the first poll
        page.goto(f"{site.url}/?q={token_hex(4)}")
    pause_ms = int(page.get_attribute("#runs-list", "data-poll") or 3000)
    page.evaluate(
        "Object.defineProperty(document, 'hidden', {configurable: true, get: () => true})"
    )
    polled = len(polls)  # a poll already on its way may still land: it is the last
    page.wait_for_timeout(4 * pause_ms)  # several polls would have been due by now
    assert len(polls) <= polled + 1, polls
    with page.expect_request(lambda r: "/runs/list/live" in r.url):  # shown: it polls at once
        page.evaluate(
            "Object.defineProperty(document, 'hidden', {configurable: true, get: () => false});"
            "document.dispatchEvent(new Event('visibilitychange'))"
        )
    context.close()
