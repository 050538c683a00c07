"""Keep secrets out of events and prompts: values the agent set under a
secret-looking name are replaced by *** wherever they appear."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from app.engine.models import PlannedStep, Step

SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|PASS|CREDENTIAL|AUTH", re.IGNORECASE)
MASK = "***"
# Replacing a two-letter "secret" everywhere would wreck a prompt and protect nothing.
MIN_SECRET_LEN = 4


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def secret_values(
    context: Mapping[str, Any], steps: Iterable[Step | PlannedStep] = ()
) -> list[str]:
    """Secret values known to a run: from its context and from set_env steps."""
    found = {str(v) for k, v in context.items() if is_secret_name(k)}
    for step in steps:
        name = step.args.get("name")
        if step.tool == "set_env" and isinstance(name, str) and is_secret_name(name):
            found.add(str(step.args.get("value", "")))
    # Longest first, so a secret that contains another is masked whole.
    return sorted((v for v in found if len(v) >= MIN_SECRET_LEN), key=len, reverse=True)


def redact(value: Any, secrets: Iterable[str]) -> Any:
    """A copy of `value` with every secret replaced by ***.

    Walks dicts (keys and values), lists and tuples to any depth. Longer secrets
    are replaced first, so one that contains another is not half-replaced;
    secrets shorter than MIN_SECRET_LEN are ignored.
    """
    usable = sorted({s for s in secrets if len(s) >= MIN_SECRET_LEN}, key=len, reverse=True)
    if not usable:
        return value
    return _redact(value, re.compile("|".join(re.escape(secret) for secret in usable)))


def _redact(value: Any, pattern: re.Pattern[str]) -> Any:
    if isinstance(value, str):
        return pattern.sub(MASK, value)
    if isinstance(value, Mapping):
        return {_redact(k, pattern): _redact(v, pattern) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(item, pattern) for item in value]
    return value
