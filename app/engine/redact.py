"""Keep secrets out of events and prompts: values the agent set under a
secret-looking name are replaced by *** wherever they appear."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from app.engine.models import PlannedStep, Step

SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|PASS|CREDENTIAL|AUTH", re.IGNORECASE)
MASK = "***"
# Shorter values would mask ordinary words; such "secrets" are not worth hiding.
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
    """`value` with every occurrence of each secret replaced by ***, recursively."""
    secrets = list(secrets)
    if not secrets:
        return value
    return _redact(value, secrets)


def _redact(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, MASK)
        return value
    if isinstance(value, Mapping):
        return {k: _redact(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v, secrets) for v in value]
    return value
