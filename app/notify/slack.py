"""Slack through an incoming webhook: one JSON POST per message."""

from __future__ import annotations

import json
import urllib.request

TIMEOUT = 10.0


class SlackRefused(Exception):
    """The webhook answered, but not with success."""


def post_slack(webhook_url: str, text: str, *, timeout: float = TIMEOUT) -> None:
    """POST {"text": ...}. Raises OSError (incl. urllib's URLError, HTTPError) or SlackRefused."""
    if not webhook_url.startswith(("https://", "http://")):
        raise SlackRefused("the Slack webhook URL must start with https:// (or http://)")
    body = json.dumps({"text": text, "unfurl_links": False}).encode()
    request = urllib.request.Request(
        webhook_url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    # The scheme is checked above: urlopen would also open file:// URLs.
    with urllib.request.urlopen(request, timeout=timeout) as response:
        status = response.status
        answer = response.read(200).decode(errors="replace")
    if status != 200:
        raise SlackRefused(f"Slack answered {status}: {answer}")
