"""The run's memory as people read it: one line per event in a terminal; on the run
page, an iteration's events as one group, each step's attempts and waits on a
waterfall, read with a bound so a page costs the same at event 50 as at 5,000."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from itertools import takewhile

from app.engine.models import DECISION_STATUSES, Step
from app.store.records import EventRecord, RunRecord
from app.store.repo import Store

STYLE = {
    "plan": ("PLAN", "\033[1;35m"),
    "decision": ("DECIDE", "\033[35m"),
    "tool_call": ("CALL", "\033[36m"),
    "observation": ("OBSERVE", "\033[32m"),
    "error": ("ERROR", "\033[1;31m"),
    "retry": ("RETRY", "\033[33m"),
    "approval": ("HUMAN", "\033[1;33m"),
    "llm_call": ("LLM", "\033[34m"),
    "status": ("STATUS", "\033[1m"),
}
RESET = "\033[0m"


def format_event(event: EventRecord, *, color: bool = False) -> str:
    label, ansi = STYLE.get(event.kind, (event.kind.upper(), ""))
    stamp = event.created_at.strftime("%H:%M:%S.%f")[:-3]
    text = f"{stamp}  #{event.iteration:<3} {label:<8} {event.message}"
    return f"{ansi}{text}{RESET}" if color and ansi else text


def format_step(step: Step) -> str:
    line = (
        f"  {step.position:>2}. [{step.status:<9}] {step.description} "
        f"({step.tool}, plan v{step.plan_version}, attempts {step.attempts})"
    )
    return line + (f"\n      error: {step.error}" if step.error else "")


def format_run_header(run: RunRecord) -> str:
    cost = f"${run.cost_usd:.4f}, {run.tokens_total} tokens" if run.tokens_total else "no LLM cost"
    lines = [
        f"run {run.id}  [{run.status}]  planner: {run.planner}  iteration {run.iteration}",
        f"task: {run.task}",
        f"created {run.created_at:%Y-%m-%d %H:%M:%S} UTC, {cost}",
    ]
    if outcome := format_outcome(run):
        lines.append(outcome)
    elif run.error:
        lines.append(f"error: {run.error}")
    return "\n".join(lines)


def format_outcome(run: RunRecord) -> str | None:
    """How a run a person's decision ended reads (who, why), or None for any other:
    a decision, never shown as an error."""
    if run.status not in DECISION_STATUSES:
        return None
    why = run.end_reason or "no reason given"
    return f"{run.status} by {run.ended_by or 'a person'}: {why} (a decision, not a failure)"


# --- the run page: groups of events, a waterfall of steps, bounded reads ---------------

# The page shows the run's last TIMELINE_EVENTS events (earlier ones are a link
# away) and a live update carries at most LIVE_EVENTS: what a page costs does not
# grow with the run. A step keeps its last STEP_EVENTS events for the waterfall
# and its history: 20 retries (the most a run may allow) of a call, an error and
# a wait are 60.
TIMELINE_EVENTS = 50
LIVE_EVENTS = 50
STEP_EVENTS = 64
PLAN_VERSIONS = 20
# The waterfall's x axis in SVG user units (the SVG stretches to the page's width).
AXIS = 1000.0
# A bar never thinner than this, so a 3 ms attempt in a 3 h run can still be seen.
MIN_BAR = 2.0


@dataclass(frozen=True)
class EventGroup:
    """One iteration's events as they happened one after the other: a planner call,
    a step's call and its outcome, or a person's decision."""

    iteration: int
    events: list[EventRecord]

    @property
    def id(self) -> int:
        return self.events[0].id

    @property
    def started_at(self) -> datetime:
        return self.events[0].created_at

    @property
    def ended_at(self) -> datetime:
        return self.events[-1].created_at

    @property
    def step_id(self) -> int | None:
        return next((e.step_id for e in self.events if e.step_id is not None), None)

    @property
    def tool(self) -> str | None:
        tools = (e.data.get("tool") for e in self.events if isinstance(e.data, dict))
        return next((t for t in tools if isinstance(t, str)), None)

    @property
    def kinds(self) -> list[str]:
        return list(dict.fromkeys(e.kind for e in self.events))


def group_events(events: list[EventRecord]) -> list[EventGroup]:
    """Consecutive events of the same iteration, one group each, in order."""
    groups: list[EventGroup] = []
    for event in events:
        if groups and groups[-1].iteration == event.iteration:
            groups[-1].events.append(event)
        else:
            groups.append(EventGroup(iteration=event.iteration, events=[event]))
    return groups


@dataclass(frozen=True)
class Bar:
    """A span of one step's life: an attempt (ok, failed or still running), a
    backoff wait before the next attempt, or a wait for a person."""

    kind: str  # ok | failed | running | backoff | wait
    start: datetime
    end: datetime
    attempt: int | None = None
    x: float = 0.0
    width: float = 0.0

    @property
    def seconds(self) -> float:
        return max(0.0, (self.end - self.start).total_seconds())


@dataclass(frozen=True)
class WaterfallRow:
    step: Step
    bars: list[Bar]

    @property
    def started_at(self) -> datetime | None:
        """When the step's first shown attempt or wait began (None before any)."""
        return self.bars[0].start if self.bars else None

    @property
    def ended_at(self) -> datetime | None:
        return max(bar.end for bar in self.bars) if self.bars else None


@dataclass(frozen=True)
class Waterfall:
    start: datetime
    end: datetime
    rows: list[WaterfallRow]


def waterfall(
    steps: list[Step], step_events: list[EventRecord], *, start: datetime, end: datetime
) -> Waterfall:
    """Each step's attempts, backoff waits and waits for a person on one time axis
    from `start` (the run's creation) to `end` (its end, or now). The axis reaches
    the newest event even when this machine's clock is behind the worker's."""
    end = max([end, *(e.created_at for e in step_events)])
    by_step: dict[int, list[EventRecord]] = defaultdict(list)
    for event in step_events:
        if event.step_id is not None:
            by_step[int(event.step_id)].append(event)
    total = max((end - start).total_seconds(), 1e-3)
    rows = [
        WaterfallRow(
            step=step,
            bars=[_placed(b, start, total) for b in _bars(by_step.get(step.id, []), end)],
        )
        for step in steps
    ]
    return Waterfall(start=start, end=end, rows=rows)


def _bars(events: list[EventRecord], end: datetime) -> list[Bar]:
    """Spans from a step's events: a call opens an attempt and its observation or
    error closes it; a retry event waits its delay; a pause waits for a decision.
    What is still open runs until `end`."""
    bars: list[Bar] = []
    attempt: EventRecord | None = None
    waiting: EventRecord | None = None
    for event in events:
        data = event.data if isinstance(event.data, dict) else {}
        if event.kind == "tool_call":
            attempt = event
        elif event.kind in ("observation", "error") and attempt is not None:
            kind = "ok" if event.kind == "observation" else "failed"
            bars.append(_attempt(attempt, kind, event.created_at))
            attempt = None
        elif event.kind == "retry" and isinstance(data.get("delay"), int | float):
            wait = timedelta(seconds=float(data["delay"]))
            bars.append(Bar("backoff", event.created_at, event.created_at + wait))
        elif event.kind == "approval" and "decision" in data and waiting is not None:
            bars.append(Bar("wait", waiting.created_at, event.created_at))
            waiting = None
        elif event.kind == "approval" and "decision" not in data:
            waiting = event
    if attempt is not None:
        bars.append(_attempt(attempt, "running", end))
    if waiting is not None:
        bars.append(Bar("wait", waiting.created_at, end))
    return bars


def _attempt(call: EventRecord, kind: str, end: datetime) -> Bar:
    number = call.data.get("attempt") if isinstance(call.data, dict) else None
    return Bar(kind, call.created_at, end, attempt=number if isinstance(number, int) else None)


def _placed(bar: Bar, start: datetime, total: float) -> Bar:
    """The bar with its x and width on the axis, clamped to it."""
    x = min(AXIS - MIN_BAR, max(0.0, (bar.start - start).total_seconds() / total * AXIS))
    width = min(AXIS - x, max(MIN_BAR, bar.seconds / total * AXIS))
    return replace(bar, x=round(x, 1), width=round(width, 1))


@dataclass(frozen=True)
class PageEvents:
    """What the run page reads of a run's events, bounded whatever the run's length:
    the shown stretch of the timeline, its plans and each step's recent events."""

    groups: list[EventGroup]
    earlier: int | None  # show events before this id, when there are any
    latest: int  # the run's newest event id (0 without events): live updates go on from it
    plans: list[EventRecord]
    step_events: list[EventRecord]


def read_page(store: Store, run_id: str, *, before: int | None = None) -> PageEvents:
    """The last TIMELINE_EVENTS events (before `before`, when given), the plans and
    each step's last STEP_EVENTS events."""
    with store.transaction() as tx:
        newest = tx.recent_events(run_id, 1)
        wanted = TIMELINE_EVENTS + 1  # one more: are there earlier ones?
        shown = (
            tx.events_before(run_id, before, wanted) if before else tx.recent_events(run_id, wanted)
        )
        more = len(shown) > TIMELINE_EVENTS
        shown = shown[1:] if more else shown
        return PageEvents(
            groups=group_events(shown),
            earlier=shown[0].id if more else None,
            latest=newest[0].id if newest else 0,
            plans=tx.events_of_kind(run_id, "plan", PLAN_VERSIONS),
            step_events=tx.recent_step_events(run_id, STEP_EVENTS),
        )


@dataclass(frozen=True)
class NewEvents:
    """A live update's events: the groups they fall in (the first one whole again
    when it continues the group the page ends with), and whether more are waiting."""

    groups: list[EventGroup]
    last: int
    more: bool


def read_new(store: Store, run_id: str, *, after: int) -> NewEvents:
    """At most LIVE_EVENTS events after `after`, grouped; a group the page already
    shows part of comes whole (up to TIMELINE_EVENTS), so the page replaces it."""
    with store.transaction() as tx:
        new = tx.events_after(run_id, after, LIVE_EVENTS + 1)
        more = len(new) > LIVE_EVENTS
        new = new[:LIVE_EVENTS]
        if not new:
            return NewEvents(groups=[], last=after, more=False)
        before = tx.events_before(run_id, after + 1, TIMELINE_EVENTS) if after else []
    same = list(takewhile(lambda e: e.iteration == new[0].iteration, reversed(before)))
    return NewEvents(groups=group_events([*reversed(same), *new]), last=new[-1].id, more=more)
