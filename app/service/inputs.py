"""Checks of what people send: text and JSON the database cannot hold, and
idempotency keys."""

from __future__ import annotations

import logging
from typing import Any

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
