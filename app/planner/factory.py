"""Which planner a run uses: Claude when an API key is configured, else offline."""

from __future__ import annotations

from functools import cache

from app.config import Settings
from app.planner.base import Planner

OFFLINE = "offline"
ANTHROPIC = "anthropic"


def default_planner_kind(settings: Settings) -> str:
    """`anthropic` when ANTHROPIC_API_KEY is set, `offline` otherwise."""
    return ANTHROPIC if settings.anthropic_api_key else OFFLINE


class PlannerFactory:
    """Builds (and caches) one planner of each kind per process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def __call__(self, kind: str) -> Planner:
        return self._build(kind)

    @cache  # noqa: B019 - one factory per process; the cache lives as long as it
    def _build(self, kind: str) -> Planner:
        if kind == OFFLINE:
            from app.planner.offline import OfflinePlanner

            return OfflinePlanner(self.settings.runbooks_dir)
        if kind == ANTHROPIC:
            if not self.settings.anthropic_api_key:
                raise ValueError("the anthropic planner needs ANTHROPIC_API_KEY")
            from app.planner.anthropic import AnthropicPlanner

            return AnthropicPlanner(
                api_key=self.settings.anthropic_api_key,
                base_url=self.settings.anthropic_base_url or None,
                timeout=self.settings.llm_timeout,
            )
        raise ValueError(f"unknown planner {kind!r}; use offline or anthropic")
