"""Checks of what people send: text and JSON the database cannot hold, and
idempotency keys; and the form every problem of a request takes, so that all of
them are reported at once."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from app.engine import sanitize
from app.errors import InvalidInput

log = logging.getLogger(__name__)


MAX_IDEMPOTENCY_KEY_CHARS = 200
MAX_RUN_ID_CHARS = 32  # the column's width


def check_text(text: str, what: str) -> str:
    """`text` from a person, or InvalidInput saying what it holds that cannot be kept."""
    if problem := sanitize.text_problem(text):
        raise InvalidInput(f"{what} {problem}")
    return text


def check_json(value: Any, what: str) -> None:
    """InvalidInput naming every part of `value` (from a person) that cannot be kept."""
    if found := sanitize.problems(value, what=what):
        raise InvalidInput("; ".join(found[:5]))


def scoped_key(key: str | None, created_by: str | None) -> str | None:
    """An idempotency key is the creator's own: two people may use the same one."""
    if key is None:
        return None
    key = check_text(key.strip(), "the idempotency key")
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS:
        raise InvalidInput(
            f"the idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters"
        )
    return f"{created_by or ''}\x1f{key}"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a request: where (`field`, a dotted path into it such as
    "task" or "config.retry_policy.base") and what, in words."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class Problems(InvalidInput):
    """Every problem a request has, at once (never only the first)."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(str(p) for p in self.problems))


def validation_problems(exc: ValidationError, *, prefix: str = "") -> list[Problem]:
    """pydantic's errors as Problems, each at its field under `prefix`."""
    found = []
    for error in exc.errors():
        path = ".".join([*([prefix] if prefix else []), *(str(p) for p in error["loc"])])
        message = str(error["msg"]).removeprefix("Value error, ")
        found.append(Problem(path or "request", message))
    return found
