"""The run page as a story people can scan (issue 12 item 5): an iteration's events
as one group with times since the run began, a waterfall of each step's attempts,
backoff waits and waits for a person, and a page whose first response and live
updates stay within a fixed number of bytes however long the run.

The long runs are written through the store (as a worker would write them, one
iteration's events at a time), not through 5,000 iterations of a worker.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from flask.testing import FlaskClient

from app import timeline
from app.engine.actions import NewEvent
from app.engine.models import EventKind, RunStatus
from app.store.records import EventRecord
from app.store.repo import Store
from tests.support.fixtures import Harness, steps
from tests.support.web import paused_run
from tests.test_browser import served, shoot, sign_in_with  # noqa: F401 (served: the fixture)

# The budgets, in bytes, for a run of three steps (measured: 68 KB, 1.8 KB and 36 KB at
# 5,000 events; see the README's "The run page at 5,000 events"). The page fits in
# PAGE_BUDGET, a live update with only the new events in LIVE_BUDGET, one that
# re-renders the sections as well in SECTIONS_BUDGET, however long the run.
PAGE_BUDGET = 80_000
LIVE_BUDGET = 4_000
SECTIONS_BUDGET = 45_000
# What may differ between runs of 500 and 5,000 events, where every bound is reached
# (the last 50 events, each step's last 64): wider numbers only (ids, iterations,
# "+41 min 15 s" for "+4 min 5 s").
WIDER_NUMBERS = 1_500


def long_run(harness: Harness, store: Store, events: int) -> str:
    """A run of three steps whose steps were tried, failed and retried until the
    run holds `events` events (each iteration: a call, an error, a backoff wait)."""
    harness.planner.script = [steps("noop", "flaky", "noop")]
    run_id = harness.service.create_run("a long run")
    harness.step()  # the plan
    view = harness.service.status(run_id)
    missing = events - len(view.events)
    when = harness.clock()
    with store.transaction() as tx:
        for n in range(missing // 3 + 1):
            step = view.steps[n % len(view.steps)]
            batch = [
                NewEvent(
                    kind=EventKind.TOOL_CALL, step_id=step.id, message=f"calling {step.tool}",
                    data={"tool": step.tool, "args": {}, "attempt": n // 3 + 1},
                ),
                NewEvent(
                    kind=EventKind.ERROR, step_id=step.id, message=f"{step.tool} failed",
                    data={"error_class": "transient", "detail": "x" * 200},
                ),
                NewEvent(
                    kind=EventKind.RETRY, step_id=step.id, message="retry in 1.00 s",
                    data={"retry": n // 3 + 1, "delay": 1.0},
                ),
            ][: min(3, missing - 3 * n)]  # fmt: skip
            if batch:
                when += timedelta(seconds=1.5)
                tx.insert_events(run_id, view.run.iteration + 1 + n, batch, when)
    assert len(harness.service.status(run_id).events) == events
    harness.dispatcher.sent.clear()  # the events above stand for its work: no more of it
    return run_id


def sizes(client: FlaskClient, run_id: str) -> dict[str, int]:
    """The page's bytes, a live update's (after the last event but one) with only the
    new events, and one that re-renders the sections too."""
    page = client.get(f"/runs/{run_id}")
    state = re.search(r'data-state="([^"]+)"', page.text)
    last = re.search(r'data-after="(\d+)"', page.text)
    assert page.status_code == 200 and state and last
    after = int(last.group(1)) - 1
    live = client.get(f"/runs/{run_id}/live?after={after}&state={state.group(1)}")
    sections = client.get(f"/runs/{run_id}/live?after={after}&state=")
    assert "sections" not in live.json and "sections" in sections.json
    assert f'id="event-{after + 1}"' in live.json["events"]
    return {"page": len(page.data), "live": len(live.data), "sections": len(sections.data)}


def test_the_page_and_its_live_updates_stay_within_a_byte_budget(
    signed_in, harness: Harness, store: Store
):
    measured = {n: sizes(signed_in, long_run(harness, store, n)) for n in (50, 500, 5_000)}
    print("\nrun page bytes by events in the run:", measured)  # for the README
    for n, size in measured.items():
        assert size["page"] <= PAGE_BUDGET, (n, size)
        assert size["live"] <= LIVE_BUDGET, (n, size)
        assert size["sections"] <= SECTIONS_BUDGET, (n, size)
    for part in ("page", "live", "sections"):
        assert abs(measured[5_000][part] - measured[500][part]) < WIDER_NUMBERS, part
    # A live update is one new event and its group at any length; the page and the
    # sections grow from 50 events only until each step's waterfall row is full.
    assert abs(measured[5_000]["live"] - measured[50]["live"]) < WIDER_NUMBERS


def test_a_client_far_behind_gets_bounded_updates_and_is_told_to_ask_again(
    signed_in, harness: Harness, store: Store
):
    run_id = long_run(harness, store, 200)
    seen: list[int] = []
    after, rounds = 0, 0
    while True:
        body = signed_in.get(f"/runs/{run_id}/live?after={after}&state=x").json
        ids = [int(i) for i in re.findall(r'id="event-(\d+)"', body["events"])]
        assert len(ids) <= timeline.LIVE_EVENTS + timeline.TIMELINE_EVENTS
        seen += [i for i in ids if i > after]
        after, rounds = body["last_event"], rounds + 1
        if not body["more"]:
            break
    assert rounds == 4  # 200 events, 50 an update
    assert seen == [e.id for e in harness.service.status(run_id).events]


def test_an_iterations_events_are_one_group_with_relative_times(signed_in, harness: Harness):
    harness.planner.script = [steps("flaky")]
    run_id = harness.service.create_run("flaky", config={"planner": "offline"})
    harness.drain()
    view = harness.service.status(run_id)
    page = signed_in.get(f"/runs/{run_id}").text
    groups = re.findall(r'<li class="group" id="group-(\d+)" data-iteration="(\d+)">', page)
    iterations = [int(i) for _, i in groups]
    assert iterations == sorted(set(iterations)), "one group per iteration, in order"
    assert len(groups) < len(view.events)  # grouped, not one row per event
    # The failed attempt and its backoff wait share their iteration's group.
    retry = next(e for e in view.events if e.kind == "retry")
    group = group_html(page, retry.iteration)
    assert 'data-kind="tool_call"' in group and 'data-kind="retry"' in group
    assert "<code>flaky</code>" in group and "step 1: run flaky" in group
    assert "backoff 2.00 s" in group
    # Times since the run began; the moment itself in datetime and the title.
    start = view.run.created_at
    assert f'datetime="{retry.created_at.isoformat()}"' in page
    offset = (retry.created_at - start).total_seconds()
    assert f">+{offset:.1f} s</time>" in page
    assert retry.created_at.strftime("%Y-%m-%d %H:%M:%S.") in page
    # One data toggle a group, none an event.
    assert page.count('<details class="group-data">') <= len(groups)
    assert "<summary>data</summary>" not in page


def group_html(page: str, iteration: int) -> str:
    """The timeline group of one iteration, as the page renders it."""
    start = page.index(f'data-iteration="{iteration}">')
    ends = [page.find(mark, start) for mark in ('<li class="group"', "</ol>\n  </section>")]
    return page[start : min(end for end in ends if end != -1)]


def test_earlier_events_are_a_link_away(signed_in, harness: Harness, store: Store):
    run_id = long_run(harness, store, 120)
    ids = [e.id for e in harness.service.status(run_id).events]
    page = signed_in.get(f"/runs/{run_id}").text
    shown = [int(i) for i in re.findall(r'id="event-(\d+)"', page)]
    assert shown == ids[-timeline.TIMELINE_EVENTS :]
    link = re.search(r'href="([^"]+before=(\d+))#timeline">Show earlier events', page)
    assert link and int(link.group(2)) == shown[0]
    earlier = signed_in.get(link.group(1).replace("&amp;", "&")).text
    shown = [int(i) for i in re.findall(r'id="event-(\d+)"', earlier)]
    assert shown == ids[-2 * timeline.TIMELINE_EVENTS : -timeline.TIMELINE_EVENTS]
    assert "Show the latest events" in earlier and "Show earlier events" in earlier
    assert signed_in.get(f"/runs/{run_id}?before=x").status_code == 400


def test_a_new_event_of_the_last_group_comes_with_its_whole_group(signed_in, harness: Harness):
    run_id = paused_run(harness)
    view = harness.service.status(run_id)
    pause = view.events[-1]
    assert pause.kind == "approval" and pause.step_id is not None
    harness.service.approve(run_id, by="tests")  # a decision: same iteration, a new event
    body = signed_in.get(f"/runs/{run_id}/live?after={pause.id}&state=x").json
    earlier = [e for e in view.events if e.iteration == pause.iteration]
    assert body["events"].count('<li class="group"') == 1
    for event in earlier:  # sent again, so the page replaces the group it has
        assert f'id="event-{event.id}"' in body["events"]
    assert "decided approve" in body["events"]


def test_the_waterfall_shows_attempts_backoff_and_waits(signed_in, harness: Harness):
    harness.planner.script = [steps("flaky", "noop")]
    run_id = harness.service.create_run("wait", config={"approval_required": ["noop"]})
    harness.drain()
    assert harness.service.status(run_id).run.status == RunStatus.PAUSED
    harness.clock.advance(30)  # a person takes their time
    page = signed_in.get(f"/runs/{run_id}").text
    waterfall = page[page.index('id="waterfall"') : page.index('id="plans"')]
    bars = re.findall(r'<rect class="bar bar-(\w+)" data-kind="\w+" x="([\d.]+)" y="1" '
                      r'width="([\d.]+)"', waterfall)  # fmt: skip
    kinds = [kind for kind, _, _ in bars]
    assert kinds.count("failed") == 1 and kinds.count("backoff") == 1 and "ok" in kinds
    assert kinds.count("wait") == 1  # still waiting: until now
    for _, x, width in bars:
        assert float(x) >= 0 and float(x) + float(width) <= timeline.AXIS + 0.1
    wait = next((float(x), float(w)) for kind, x, w in bars if kind == "wait")
    assert wait[0] + wait[1] == pytest.approx(timeline.AXIS, abs=0.2)  # it runs until now
    assert "style=" not in waterfall  # the CSP allows no style attributes
    spans = re.findall(r'<span class="wf-dur">([^<]+)</span>', waterfall)
    assert spans == ["2.0 s", "30.0 s"]  # flaky: a failure and its backoff; noop: the wait


def test_bars_from_a_steps_events():
    start = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)

    def at(seconds: float, what: str, **data: object) -> EventRecord:
        when = start + timedelta(seconds=seconds)
        return EventRecord(
            id=int(seconds * 10), run_id="r", iteration=1, step_id=7, kind=what,
            message="", data=dict(data), created_at=when,
        )  # fmt: skip

    events = [
        at(0, "tool_call", attempt=1),
        at(1, "error"),
        at(1, "retry", delay=4.0),
        at(5, "tool_call", attempt=2),
        at(6, "error"),
        at(6, "approval", kind="needs_human"),
        at(9, "approval", decision="retry", kind="needs_human"),
        at(10, "tool_call", attempt=3),
    ]
    bars = timeline._bars(events, end=start + timedelta(seconds=20))
    found = [(b.kind, b.attempt, b.seconds) for b in bars]
    assert found == [
        ("failed", 1, 1.0),
        ("backoff", None, 4.0),
        ("failed", 2, 1.0),
        ("wait", None, 3.0),
        ("running", 3, 10.0),  # still running at the end of the axis
    ]
    # A web server whose clock is behind the worker's still shows the newest events.
    behind = timeline.waterfall([], events, start=start, end=start + timedelta(seconds=2))
    assert behind.end == events[-1].created_at


@pytest.mark.e2e
def test_live_updates_keep_the_grouped_timeline_whole_in_a_browser(
    browser, request: pytest.FixtureRequest, harness: Harness, make_user
):
    url: str = request.getfixturevalue("served")  # tests/test_browser.py's
    person = make_user("watcher")
    harness.planner.script = [steps("flaky", "noop")]
    run_id = harness.service.create_run(
        "fail once, then wait for a person", config={"approval_required": ["noop"]}
    )
    harness.drain()  # flaky fails, waits its backoff, succeeds; noop waits for approval
    pause = harness.service.status(run_id).events[-1]
    assert pause.kind == "approval"
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    sign_in_with(page, url, person.name)
    page.goto(f"{url}/runs/{run_id}")
    page.wait_for_selector("#run[data-status=paused]")
    for kind in ("failed", "backoff", "ok", "wait"):  # drawn, with a width on the page
        box = page.locator(f"#waterfall rect.bar-{kind}").first.bounding_box()
        assert box is not None and box["width"] > 0, kind
    assert page.locator("#timeline > li.group").first.locator("time").first.inner_text()[0] == "+"
    page.evaluate("window.__notReloaded = true")

    harness.service.approve(run_id, by="tests")
    harness.drain()
    page.wait_for_selector("#run[data-status=completed]")
    page.wait_for_selector("#live:has-text('finished')")
    assert page.evaluate("window.__notReloaded") is True  # updated in place
    # The decision joined the group of the pause (one iteration); later ones followed.
    paused_group = page.locator(f"#timeline > li.group:has(#event-{pause.id})")
    assert paused_group.locator("li[data-kind=approval]").count() == 2
    shown = page.eval_on_selector_all("#timeline li.event", "items => items.map(i => i.id)")
    events = harness.service.status(run_id).events
    assert shown == [f"event-{e.id}" for e in events]  # each once, in order, none missing
    assert page.locator("#waterfall rect.bar-wait").count() == 1  # closed by the decision
    assert page.locator("#waterfall rect.bar-ok").count() == 2
    shoot(page, "run-timeline")
    assert problems == [], problems
    context.close()
