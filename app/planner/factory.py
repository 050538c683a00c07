"""Which planner a run uses: Claude when an API key is configured, else offline."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from app.config import Settings
from app.planner.base import Planner

OFFLINE = "offline"
ANTHROPIC = "anthropic"


def default_planner_kind(settings: Settings) -> str:
    """`anthropic` when ANTHROPIC_API_KEY is set, `offline` otherwise."""
    return ANTHROPIC if settings.anthropic_api_key else OFFLINE


def runbook_dirs(settings: Settings) -> list[Path]:
    """Where the offline planner's runbooks come from, searched in this order:
    AGENTLOOP_RUNBOOKS_DIR, installed plug-ins (`agentloop.runbooks` entry points,
    unless AGENTLOOP_ENTRY_POINTS=false), then the shipped runbooks. Each adds to the
    others; a runbook name may be used only once."""
    from app.planner.offline import RUNBOOKS_DIR
    from app.tools.registry import runbook_dirs_from_entry_points

    dirs = [settings.runbooks_dir] if settings.runbooks_dir is not None else []
    if settings.entry_points:
        dirs += runbook_dirs_from_entry_points()
    dirs.append(RUNBOOKS_DIR)
    unique: dict[Path, None] = {}
    for directory in dirs:
        unique.setdefault(directory.resolve(), None)
    return list(unique)


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

            return OfflinePlanner(runbook_dirs(self.settings))
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
