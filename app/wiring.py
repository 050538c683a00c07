"""The composition root: builds the service from settings. Nothing runs at import."""

from __future__ import annotations

from pathlib import Path

from app import notify
from app.config import Settings
from app.planner.factory import PlannerFactory, default_planner_kind
from app.service import AgentService, Dispatcher, Notice, Notifier
from app.service.permissions import ApprovalPolicy
from app.store.repo import DatabaseClock, Store, make_engine
from app.tools.registry import ToolRegistry, load_registry


def _examples_dir() -> Path:
    """The sample projects: examples/ of a checkout, else the copy a wheel ships in app/."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "examples", here / "examples"):
        if (candidate / "shop" / "build.py").is_file():
            return candidate
    return here / "examples"


EXAMPLES_DIR = _examples_dir()


def build_registry(settings: Settings) -> ToolRegistry:
    """The tools `settings` name: the built-ins, AGENTLOOP_TOOL_MODULES, and (unless
    AGENTLOOP_ENTRY_POINTS=false) installed plug-ins. Raises ValueError naming what
    cannot be loaded, or both sources of a tool registered twice."""
    tools = load_registry(settings.all_tool_modules, entry_points=settings.entry_points)
    if "shell" in tools:
        tools.declare_safe("shell", [("argv", c) for c in settings.safe_command_prefixes])
    if settings.mcp_config is not None:
        from app.tools.mcp import register_mcp_tools

        register_mcp_tools(tools, settings.mcp_config)
    return tools


class NoNotices:
    """The notifier when no channel is configured: a notice nobody can receive costs
    nothing, not even a message (a burst of pauses would otherwise queue thousands)."""

    def notify(self, notice: Notice, run_id: str) -> None:
        return None


def build_service(settings: Settings, dispatcher: Dispatcher, notifier: Notifier) -> AgentService:
    """An AgentService wired to the database, tools and planners named in `settings`;
    notices go to `notifier` only when a channel (email, Slack) is configured.

    Raises ValueError when a configured tool module cannot be loaded.
    """
    outbox = (settings.data_dir / "outbox").resolve()
    outbox.mkdir(parents=True, exist_ok=True)
    store = Store(make_engine(settings.resolved_database_url))
    tools = build_registry(settings)
    return AgentService(
        store=store,
        tools=tools,
        dispatcher=dispatcher,
        notifier=notifier if notify.configured(settings) else NoNotices(),
        planners=PlannerFactory(settings),
        default_planner=default_planner_kind(settings),
        workspaces=settings.workspaces,
        tool_settings={
            "examples_dir": str(EXAMPLES_DIR),
            "slack_webhook_url": settings.slack_webhook_url,
            "outbox_dir": str(outbox),
            "data_dir": str(settings.data_dir.resolve()),
        },
        lease_grace=settings.lease_grace,
        llm_timeout=settings.llm_timeout,
        sweep_grace=settings.sweep_grace,
        nudge_timeout=settings.nudge_timeout,
        clock=DatabaseClock(store),
        policy=ApprovalPolicy(
            approvers=settings.default_approvers,
            allow_self_approval=settings.allow_self_approval,
        ),
    )
