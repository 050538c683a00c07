"""What neither the database nor strict JSON can hold, found or made harmless.

PostgreSQL refuses a NUL character in text and in JSONB, Python cannot encode a
lone surrogate (half of a UTF-16 pair) as UTF-8, JSON has no Infinity or NaN,
and JSON nested thousands deep exhausts the recursion of every encoder. Input
from a person (task, config, comment, reason) is refused with a message naming
the problem (`problems`); output from a model or a tool is kept, with those
pieces replaced (`scrub`), so a run never fails on the bytes it observed.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

from pydantic import BaseModel

from app.engine.actions import Transition

# Deeper than any plan, result or config needs; well within every JSON encoder.
MAX_DEPTH = 64
REPLACEMENT = "\ufffd"  # U+FFFD, the Unicode replacement character
TOO_DEEP = f"[nested deeper than {MAX_DEPTH} levels: cut here]"


def text_problem(text: str) -> str | None:
    """Why `text` cannot be stored as it is, or None."""
    if "\x00" in text:
        return "contains a NUL character (\\u0000)"
    if not _encodable(text):
        return "contains a lone surrogate (half of a UTF-16 pair) that is not valid Unicode"
    return None


def problems(value: Any, *, what: str, depth: int = 0) -> list[str]:
    """What in `value` (JSON-like: dicts, lists, strings, numbers) cannot be stored,
    each naming where: e.g. "config.runbook: contains a NUL character"."""
    if depth > MAX_DEPTH:
        return [f"{what}: nested deeper than {MAX_DEPTH} levels"]
    if isinstance(value, str):
        problem = text_problem(value)
        return [f"{what}: {problem}"] if problem else []
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{what}: {value} is not a finite number"]
    if isinstance(value, dict):
        found: list[str] = []
        for key, item in value.items():
            name = str(key)
            if isinstance(key, str) and (problem := text_problem(key)):
                found.append(f"{what}: a key {problem}")
                name = scrub_text(key)
            found += problems(item, what=f"{what}.{name}", depth=depth + 1)
        return found
    if isinstance(value, list | tuple):
        return [
            problem
            for index, item in enumerate(value)
            for problem in problems(item, what=f"{what}[{index}]", depth=depth + 1)
        ]
    return []


def scrub_text(text: str) -> str:
    """`text` with NULs and lone surrogates replaced by U+FFFD."""
    if "\x00" in text:
        text = text.replace("\x00", REPLACEMENT)
    if not _encodable(text):
        text = "".join(REPLACEMENT if "\ud800" <= c <= "\udfff" else c for c in text)
    return text


def scrub(value: Any, depth: int = 0) -> Any:
    """`value` fit for the database: text scrubbed, non-finite numbers spelt out as
    strings, anything nested deeper than MAX_DEPTH replaced by a note. Returns
    `value` itself when nothing needed changing (the common case)."""
    return value if _clean(value, depth) else _scrubbed(value, depth)


def _clean(value: Any, depth: int) -> bool:
    """Whether `value` needs no scrubbing: one pass that only looks (every
    transition is checked, nearly all are clean); ASCII text always encodes."""
    if isinstance(value, str):
        return "\x00" not in value and (value.isascii() or _encodable(value))
    if isinstance(value, dict):
        return depth < MAX_DEPTH and all(
            _clean(k, depth) and _clean(v, depth + 1) for k, v in value.items()
        )
    if isinstance(value, list | tuple):
        return depth < MAX_DEPTH and all(_clean(item, depth + 1) for item in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return True


def _scrubbed(value: Any, depth: int) -> Any:
    """`value` rebuilt whole (taken only once something in it needs replacing)."""
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict | list | tuple) and depth >= MAX_DEPTH:
        return TOO_DEEP
    if isinstance(value, dict):
        return {_scrubbed(k, depth): _scrubbed(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrubbed(item, depth + 1) for item in value]
    return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# The fields of each part of a transition whose values may come from outside.
EVENT_FIELDS = ("message", "data")
STEP_UPDATE_FIELDS = ("result", "error", "args", "context_updates")
NEW_STEP_FIELDS = ("description", "tool", "args")
RUN_FIELDS = ("report", "error", "context_updates")


def scrub_transition(transition: Transition) -> Transition:
    """`transition` with every value that came from outside (a model's plan and
    report, a tool's result and error, the messages that quote them) fit for the
    database; itself when all of it already was (checked first, building nothing)."""
    if _transition_clean(transition):
        return transition
    changes: dict[str, Any] = {
        "events": [_scrub_fields(e, *EVENT_FIELDS) for e in transition.events],
        "step_updates": [_scrub_fields(u, *STEP_UPDATE_FIELDS) for u in transition.step_updates],
        "new_steps": [_scrub_fields(p, *NEW_STEP_FIELDS) for p in transition.new_steps],
        **{name: scrub(getattr(transition, name)) for name in RUN_FIELDS},
        "human_request": transition.human_request
        and _scrub_fields(transition.human_request, "reason"),
    }
    if all(_same(changes[name], getattr(transition, name)) for name in changes):
        return transition
    return transition.model_copy(update=changes)


def _transition_clean(t: Transition) -> bool:
    return (
        _fields_clean(t, RUN_FIELDS)
        and all(_fields_clean(e, EVENT_FIELDS) for e in t.events)
        and all(_fields_clean(u, STEP_UPDATE_FIELDS) for u in t.step_updates)
        and all(_fields_clean(p, NEW_STEP_FIELDS) for p in t.new_steps)
        and (t.human_request is None or _clean(t.human_request.reason, 0))
    )


def _fields_clean(model: BaseModel, names: tuple[str, ...]) -> bool:
    return all(_clean(getattr(model, name), 0) for name in names)


def _same(new: Any, old: Any) -> bool:
    """Identity, item by item for lists: scrub returns what needed no change as is."""
    if isinstance(new, list) and isinstance(old, list):
        return all(a is b for a, b in zip(new, old, strict=True))
    return new is old


Model = TypeVar("Model", bound=BaseModel)


def _scrub_fields(model: Model, *names: str) -> Model:
    if _fields_clean(model, names):
        return model
    return model.model_copy(update={name: scrub(getattr(model, name)) for name in names})
