"""`agentloop replay`: a run's decisions, iteration by iteration, read from its events.

Each iteration (app/timeline.group_events: a planner call, a step's call and its
outcome, or a person's decision) becomes one Turn: what the loop saw
(tool results and what a person said), what it chose (a plan, a step's call with
its args, a retry), why (the planner's reasoning, the decision it recorded), the
people involved (approvals asked and given) and the errors. Nothing is executed
and nothing is invented: every line is an event's own message or data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from app.service.export import jsonable
from app.store.records import EventRecord
from app.timeline import RESET, STYLE, group_events


@dataclass
class Turn:
    """One iteration's decisions (filled in event by event, see _file)."""

    iteration: int
    started_at: datetime
    saw: list[str] = field(default_factory=list)
    chose: list[str] = field(default_factory=list)
    why: list[str] = field(default_factory=list)
    people: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    status: list[str] = field(default_factory=list)
    spent: list[str] = field(default_factory=list)
    event_ids: list[int] = field(default_factory=list)


# The sections of a turn, in the order they are printed (the order things happen in
# an iteration: the reasoning, the choice, what came back), with their labels.
SECTIONS = (
    ("status", "status"),
    ("why", "why"),
    ("chose", "chose"),
    ("saw", "saw"),
    ("people", "people"),
    ("errors", "errors"),
    ("spent", "spent"),
)


def turns(events: list[EventRecord]) -> list[Turn]:
    """The run's iterations as turns, in order."""
    return [_turn(group.events) for group in group_events(events)]


def _turn(events: list[EventRecord]) -> Turn:
    turn = Turn(iteration=events[0].iteration, started_at=events[0].created_at)
    for event in events:
        turn.event_ids.append(event.id)
        _file(turn, event)
    return turn


def _file(turn: Turn, event: EventRecord) -> None:
    """Put the event in the section of the turn it speaks to."""
    data = event.data if isinstance(event.data, dict) else {}
    match event.kind:
        case "plan":
            turn.chose.append(event.message)
            reasoning = data.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                turn.why.append(reasoning)
        case "decision":
            # A plan's decision event repeats its reasoning: say it once.
            if event.message not in turn.why:
                turn.why.append(event.message)
        case "tool_call":
            args = json.dumps(data.get("args", {}), sort_keys=True, default=str)
            turn.chose.append(f"{event.message} with args {args}")
        case "retry":
            turn.chose.append(event.message)
        case "observation":
            turn.saw.append(event.message)
        case "approval":
            turn.people.append(event.message)
        case "error":
            turn.errors.append(event.message)
        case "llm_call":
            turn.spent.append(event.message)
        case _:
            turn.status.append(event.message)


def format_turn(turn: Turn, *, color: bool = False) -> str:
    """One block: the iteration, then each non-empty section's lines."""
    stamp = turn.started_at.strftime("%Y-%m-%d %H:%M:%S")
    title = f"iteration {turn.iteration}  ({stamp} UTC)"
    lines = [f"\033[1m{title}{RESET}" if color else title]
    for name, label in SECTIONS:
        for i, text in enumerate(getattr(turn, name)):
            shown = f"{label + ':' if i == 0 else '':<8} {_one_line(text)}"
            ansi = STYLE.get(_STYLE_OF[name], ("", ""))[1]
            lines.append("  " + (f"{ansi}{shown}{RESET}" if color and ansi else shown))
    return "\n".join(lines)


# Which event kind's colour (app/timeline.STYLE) each section borrows.
_STYLE_OF = {
    "status": "status",
    "saw": "observation",
    "why": "decision",
    "chose": "tool_call",
    "people": "approval",
    "errors": "error",
    "spent": "llm_call",
}


def _one_line(text: str) -> str:
    return " ".join(text.split())


def turn_json(turn: Turn) -> dict[str, Any]:
    """A turn for `agentloop replay --json`."""
    return {
        "iteration": turn.iteration,
        "started_at": jsonable(turn.started_at),
        **{name: list(getattr(turn, name)) for name, _ in SECTIONS},
        "event_ids": list(turn.event_ids),
    }
