"""One typed settings object, read from the environment (and `.env`).

Embedded defaults need no servers: SQLite in `.agentloop/` and kombu's
filesystem broker. Set DATABASE_URL / CELERY_BROKER_URL for PostgreSQL / Redis.
"""

from __future__ import annotations

import shlex
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The tools every deployment has. The demo tools (app.tools.demo) are not among
# them: `agentloop demo` adds them, anyone else asks with AGENTLOOP_TOOL_MODULES.
DEFAULT_TOOL_MODULES = ("app.tools.builtin",)
DEMO_TOOL_MODULE = "app.tools.demo"

# URL schemes each setting accepts, and what to write instead.
DATABASE_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg2", "sqlite")
BROKER_SCHEMES = (
    "redis",
    "rediss",
    "redis+socket",
    "sentinel",
    "filesystem",
    "memory",
    "amqp",
    "pyamqp",
)


class ConfigError(Exception):
    """Configuration that cannot work; the message says what to change."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="AGENTLOOP_", env_file=".env", extra="ignore", populate_by_name=True
    )

    data_dir: Path = Path(".agentloop")
    database_url: str = Field(
        "", validation_alias=AliasChoices("DATABASE_URL", "AGENTLOOP_DATABASE_URL")
    )
    broker_url: str = Field(
        "", validation_alias=AliasChoices("CELERY_BROKER_URL", "AGENTLOOP_BROKER_URL")
    )
    # Extra tool modules (comma-separated), loaded after the built-ins.
    tool_modules: str = ""
    # Whether tools and runbooks of installed plug-in packages (entry points in the
    # groups agentloop.tools and agentloop.runbooks) are loaded.
    entry_points: bool = True
    workspace_root: Path | None = None
    # More offline planner runbooks, used besides the shipped ones (app/planner/runbooks).
    runbooks_dir: Path | None = None
    # MCP servers whose tools join the registry (TOML or JSON, see docs/mcp.md); none when unset.
    mcp_config: Path | None = None
    # How long past a step's timeout a lease is kept before another worker may recover it.
    lease_grace: float = Field(30.0, gt=0, le=3600)
    # Longest countdown handed to the broker; longer waits stay in next_run_at.
    max_countdown: float = Field(300.0, gt=0, le=1800)
    # How late a due run must be before the sweep re-enqueues it.
    sweep_grace: float = Field(30.0, gt=0, le=3600)
    sweep_interval: float = Field(15.0, gt=0, le=3600)
    # How long a nudge the sweep published may wait in the queue before it is taken
    # for lost (the broker lost it too) and the run is nudged again.
    nudge_timeout: float = Field(120.0, gt=0, le=24 * 3600)
    broker_visibility_timeout: int = Field(3600, ge=60)
    # The Celery queue every agentloop task goes to (tests use one per session).
    queue: str = Field("agentloop", pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    filesystem_polling_interval: float = Field(0.05, gt=0, le=10)
    slack_webhook_url: str = Field(
        "", validation_alias=AliasChoices("SLACK_WEBHOOK_URL", "AGENTLOOP_SLACK_WEBHOOK_URL")
    )
    anthropic_api_key: str = Field(
        "", validation_alias=AliasChoices("ANTHROPIC_API_KEY", "AGENTLOOP_ANTHROPIC_API_KEY")
    )
    anthropic_base_url: str = Field(
        "", validation_alias=AliasChoices("ANTHROPIC_BASE_URL", "AGENTLOOP_ANTHROPIC_BASE_URL")
    )
    llm_timeout: float = Field(120.0, gt=0, le=1800)
    secret_key: str = Field("dev-only-change-me", min_length=8)
    flower_url: str = "http://127.0.0.1:5555"
    # Where people reach the web app; links in emails and Slack messages start here.
    base_url: str = "http://127.0.0.1:8000"
    # Email notifications and approval links; no email is sent while smtp_host is empty.
    smtp_host: str = ""
    smtp_port: int = Field(25, ge=1, le=65535)
    smtp_from: str = "agentloop@localhost"
    smtp_timeout: float = Field(10.0, gt=0, le=120)
    # Approvers (comma-separated emails or user names) of every run: a floor that a
    # run's config may add to, never replace.
    approvers: str = ""
    # Whether the person who started a run may approve its steps (four eyes: no).
    allow_self_approval: bool = False
    # Shell commands that need no approval, separated by ';' (each a prefix of the
    # argv: "pytest" allows "pytest -q", not "rm"). Every other command asks a person.
    safe_commands: str = ""

    @property
    def safe_command_prefixes(self) -> list[tuple[str, ...]]:
        return [tuple(shlex.split(c)) for c in self.safe_commands.split(";") if c.strip()]

    # How long an approval waits (and an approval link stays valid), in seconds.
    approval_ttl: float = Field(24 * 3600.0, gt=0, le=30 * 24 * 3600)
    # What the beat task does with an approval nobody decided in time.
    approval_expiry: Literal["reject", "fail"] = "reject"
    expire_interval: float = Field(60.0, gt=0, le=3600)
    # Retention on beat: finished runs older than this age (30d, 12h: as `agentloop prune
    # --older-than`) are removed with their history and workspaces; empty: never.
    retention: str = ""
    # The finished statuses beat prunes (comma-separated, as `prune --status`); empty: all.
    retention_statuses: str = ""
    retention_interval: float = Field(3600.0, gt=0, le=7 * 24 * 3600)

    @field_validator("retention", "retention_statuses")
    @classmethod
    def _retention(cls, value: str, info: ValidationInfo) -> str:
        """Refused at start-up, not at the first prune: an age `prune` reads, statuses
        it accepts (never an active or paused one)."""
        value = value.strip()
        if not value:
            return value
        from app.errors import InvalidInput
        from app.service.retention import finished_statuses, parse_age

        try:
            if info.field_name == "retention":
                parse_age(value)
            else:
                finished_statuses(value.split(","))
        except InvalidInput as exc:
            raise ValueError(str(exc)) from None
        return value

    @property
    def retention_age(self) -> timedelta | None:
        """How old a finished run beat prunes; None: retention is off."""
        from app.service.retention import parse_age

        return parse_age(self.retention) if self.retention else None

    @property
    def retention_status_list(self) -> list[str] | None:
        return self.retention_statuses.split(",") if self.retention_statuses else None

    @field_validator("runbooks_dir", "workspace_root", "mcp_config", mode="before")
    @classmethod
    def _empty_path_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        value = value.strip()
        if value:
            check_url(
                "DATABASE_URL",
                value,
                DATABASE_SCHEMES,
                "postgresql://USER@HOST/NAME or sqlite:///PATH, or leave it unset for SQLite "
                "in AGENTLOOP_DATA_DIR",
            )
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        value = value.strip()
        if value:
            check_url(
                "CELERY_BROKER_URL",
                value,
                BROKER_SCHEMES,
                "redis://HOST:6379/0, or leave it unset for the embedded filesystem broker",
            )
        return value

    @cached_property
    def resolved_database_url(self) -> str:
        if not self.database_url:
            return f"sqlite:///{(self.data_dir / 'agentloop.db').resolve()}"
        return with_psycopg2(self.database_url)

    @cached_property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def uses_filesystem_broker(self) -> bool:
        return self.resolved_broker_url.startswith("filesystem://")

    @property
    def broker_dir(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def workspaces(self) -> Path:
        return (self.workspace_root or self.data_dir / "workspaces").resolve()

    @property
    def default_approvers(self) -> tuple[str, ...]:
        return tuple(a.strip() for a in self.approvers.split(",") if a.strip())

    @property
    def all_tool_modules(self) -> list[str]:
        """The built-in tool modules, then AGENTLOOP_TOOL_MODULES (each once)."""
        extra = [m.strip() for m in self.tool_modules.split(",") if m.strip()]
        return list(dict.fromkeys([*DEFAULT_TOOL_MODULES, *extra]))

    def with_demo_tools(self) -> Settings:
        """These settings with the demo tools added (what `agentloop demo` runs with)."""
        if DEMO_TOOL_MODULE in self.all_tool_modules:
            return self
        modules = ",".join([DEMO_TOOL_MODULE, *self.all_tool_modules[len(DEFAULT_TOOL_MODULES) :]])
        return self.model_copy(update={"tool_modules": modules})


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment; raises ConfigError with a readable message."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(_problem(err) for err in exc.errors())
        raise ConfigError(f"invalid configuration: {problems}") from None


def _problem(err: Any) -> str:
    """One validation error as a phrase; a URL error already names its variable."""
    error = err.get("ctx", {}).get("error")
    if isinstance(error, BadURL):
        return str(error)
    return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"


class BadURL(ValueError):
    """A URL setting that cannot work; the message names the variable."""


def check_url(variable: str, url: str, schemes: tuple[str, ...], example: str) -> None:
    """Raise BadURL (naming `variable`, never the password) unless `url` has one of `schemes`."""
    scheme, sep, rest = url.partition("://")
    shown = redact_url(url) if sep else url
    if not sep or not scheme:
        raise BadURL(f"{variable}={shown!r} is not a URL: use {example}")
    if scheme.lower() not in schemes:
        raise BadURL(
            f"{variable}={shown!r}: agentloop does not support {scheme}:// "
            f"(supported: {', '.join(s + '://' for s in schemes)}); use {example}"
        )
    if scheme.lower().startswith("postgres") and not rest.strip("/"):
        raise BadURL(f"{variable}={shown!r} names no server or database: use {example}")


def with_psycopg2(url: str) -> str:
    """SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; we ship psycopg2."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url.removeprefix(prefix)
    return url


def redact_url(url: str) -> str:
    """A URL fit for an error message: the password replaced by ***."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url
