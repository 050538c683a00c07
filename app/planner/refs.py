"""References from a step's arguments to earlier steps' results.

A planner cannot know what a step will return when it writes the plan, so an
argument may name an earlier step's result instead of a literal value:

    ${steps.3.result}                  the whole result of the step at position 3
    ${steps.3.result.url}              a key of that result (a dict)
    ${steps.3.result.items.0.id}       keys and list indexes, separated by dots

`3` is the step's position: positions are numbered across the whole run (a
re-plan continues the numbering), so a position names exactly one step.

- An argument whose whole value is one reference becomes the referenced value
  itself, with its JSON type (a number stays a number, a dict a dict).
- A reference inside a longer string is replaced by its text: strings as they
  are, anything else as compact JSON ("deploy ${steps.2.result.sha} now").
- `$${steps.` writes a literal `${steps.` (no reference).
- Only `${steps.` starts a reference, so shell text such as `${HOME}` is left
  alone. Keys may use letters, digits, `_` and `-`.

A step may refer to completed steps and to earlier steps of its own plan,
never to itself or a later step: `check_refs` says which references are
wrong, `resolve_refs` substitutes the values just before a step runs.
Everything here is pure: no I/O, no state.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from app.engine.models import PlannedStep

_KEY = r"[A-Za-z0-9_-]+"
# (?<!\$) skips the escaped form `$${steps.`.
_REF = re.compile(rf"(?<!\$)\$\{{steps\.(\d+)\.result((?:\.{_KEY})*)\}}")
_STARTED = re.compile(r"(?<!\$)\$\{steps\.")
_ESCAPED = "$${steps."
_OPENING = "${steps."  # in every reference and every match of _STARTED

ArgPath = tuple[str | int, ...]


class RefError(ValueError):
    """A reference that cannot be resolved; the message names it and says why."""


@dataclass(frozen=True)
class Ref:
    """One reference found in a step's arguments."""

    text: str  # as written, e.g. "${steps.3.result.url}"
    position: int  # the step it refers to
    path: tuple[str, ...]  # keys / indexes inside that step's result
    where: ArgPath  # where in the arguments it was found, e.g. ("env", "URL")


def find_refs(args: Any) -> list[Ref]:
    """Every well-formed reference in `args` (dicts and lists are walked)."""
    return [ref for where, text in _strings(args, ()) for ref in _refs_in(text, where)]


def check_refs(
    steps: list[PlannedStep],
    available_positions: set[int],
    *,
    first_position: int | None = None,
) -> list[str]:
    """Problems with the references of a proposed plan; empty when all are valid.

    `available_positions` are steps whose results exist (completed steps).
    When `first_position` is given, the proposed steps will take positions
    first_position, first_position + 1, ... and each may also refer to the
    ones before it. A reference to an unknown, a later or its own step is an
    error, and so is a malformed `${steps....}`.
    """
    problems: list[str] = []
    for index, step in enumerate(steps):
        label = f"step {index + 1} of your plan ({step.tool})"
        # A range, not a set: building a set per step made a long plan's check quadratic.
        earlier = (
            range(0) if first_position is None else range(first_position, first_position + index)
        )
        problems += [f"{label}: {msg}" for msg in _malformed(step.args)]
        for ref in find_refs(step.args):
            if ref.position not in available_positions and ref.position not in earlier:
                allowed = available_positions | set(earlier)
                problems.append(f"{label}: {_unavailable(ref, allowed, first_position, index)}")
    return problems


def resolve_refs(args: Mapping[str, Any], results: Mapping[int, Any]) -> dict[str, Any]:
    """A copy of `args` with every reference replaced by the value it names.

    `results` maps a step position to that step's result. Raises RefError
    naming the reference when a step has no result or the path is missing.
    """
    return {key: _resolve(value, results) for key, value in args.items()}


# --- finding ----------------------------------------------------------------------


def _strings(value: Any, where: ArgPath) -> Iterable[tuple[ArgPath, str]]:
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(item, (*where, str(key)))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _strings(item, (*where, index))


def _refs_in(text: str, where: ArgPath) -> list[Ref]:
    if _OPENING not in text:  # most strings: no regular expression run for them
        return []
    return [
        Ref(
            text=match.group(0),
            position=int(match.group(1)),
            path=tuple(part for part in match.group(2).split(".") if part),
            where=where,
        )
        for match in _REF.finditer(text)
    ]


def _malformed(args: Any) -> list[str]:
    """`${steps.` openings that are not a complete, well-formed reference."""
    problems = []
    for where, text in _strings(args, ()):
        if _OPENING not in text:
            continue
        starts = {m.start() for m in _STARTED.finditer(text)}
        good = {m.start() for m in _REF.finditer(text)}
        for start in sorted(starts - good):
            shown = text[start : start + 60]
            problems.append(
                f"argument {_show_where(where)}: {shown!r} is not a valid reference; "
                "write ${steps.<position>.result} or ${steps.<position>.result.<key>...} "
                "(or $${steps. for a literal)"
            )
    return problems


def _unavailable(ref: Ref, allowed: set[int], first_position: int | None, index: int) -> str:
    if first_position is not None and ref.position >= first_position + index:
        which = "itself" if ref.position == first_position + index else "a later step"
        return (
            f"{ref.text} refers to {which} (position {ref.position}); a step can only "
            "use the results of completed steps and of earlier steps of the plan"
        )
    known = ", ".join(str(p) for p in sorted(allowed)) or "none"
    return (
        f"{ref.text} refers to position {ref.position}, which is not a completed step "
        f"or an earlier step of this plan (usable positions: {known})"
    )


def _show_where(where: ArgPath) -> str:
    return ".".join(str(part) for part in where) or "(args)"


# --- resolving --------------------------------------------------------------------


def _resolve(value: Any, results: Mapping[int, Any]) -> Any:
    if isinstance(value, str):
        return _resolve_string(value, results)
    if isinstance(value, Mapping):
        return {key: _resolve(item, results) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_resolve(item, results) for item in value]
    return value


def _resolve_string(text: str, results: Mapping[int, Any]) -> Any:
    whole = _REF.fullmatch(text)
    if whole is not None:
        return _lookup(_refs_in(text, ())[0], results)

    def substitute(match: re.Match[str]) -> str:
        found = _lookup(_refs_in(match.group(0), ())[0], results)
        return found if isinstance(found, str) else json.dumps(found, default=str)

    return _REF.sub(substitute, text).replace(_ESCAPED, "${steps.")


def _lookup(ref: Ref, results: Mapping[int, Any]) -> Any:
    if ref.position not in results:
        raise RefError(f"{ref.text}: step {ref.position} has no result (it has not completed)")
    value = results[ref.position]
    for depth, part in enumerate(ref.path):
        value = _step_into(ref, value, part, ref.path[:depth])
    return value


def _step_into(ref: Ref, value: Any, part: str, before: tuple[str, ...]) -> Any:
    at = ".".join(("result", *before))
    if isinstance(value, Mapping):
        if part in value:
            return value[part]
        keys = ", ".join(sorted(str(k) for k in value)) or "none"
        note = " (the stored result was truncated)" if value.get("truncated") is True else ""
        raise RefError(f"{ref.text}: {at} has no key {part!r} (keys: {keys}){note}")
    if isinstance(value, list):
        if part.isdigit() and int(part) < len(value):
            return value[int(part)]
        raise RefError(
            f"{ref.text}: {at} is a list of {len(value)}; {part!r} is not an index in it"
        )
    raise RefError(f"{ref.text}: {at} is a {type(value).__name__}, not a dict or list")
