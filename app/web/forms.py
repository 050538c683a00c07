"""Forms: CSRF through flask-wtf; the run's options are validated by RunConfig
itself, and its messages are shown next to the field they concern."""

from __future__ import annotations

import json
from typing import Any

from flask_wtf import FlaskForm
from pydantic import ValidationError
from wtforms import HiddenField, SelectField, StringField, TextAreaField
from wtforms.fields.choices import SelectChoice
from wtforms.validators import Length

from app.engine.models import DEFAULT_APPROVAL_REQUIRED, MAX_TASK_CHARS, RunConfig

# Form field -> where its value goes in RunConfig.
CONFIG_FIELDS: dict[str, tuple[str, ...]] = {
    "planner": ("planner",),
    "approval_required": ("approval_required",),
    "approvers": ("approvers",),
    "max_iterations": ("max_iterations",),
    "timeout": ("timeout",),
    "max_retries": ("retry_policy", "max_retries"),
    "retry_base": ("retry_policy", "base"),
    "retry_factor": ("retry_policy", "factor"),
    "retry_max_backoff": ("retry_policy", "max_backoff"),
}
DEFAULTS = RunConfig()


class NewRunForm(FlaskForm):  # type: ignore[misc]
    task = TextAreaField(
        "Task",
        description="What the agent should do, in plain words.",
        validators=[Length(max=MAX_TASK_CHARS)],
    )
    planner = SelectField(
        "Planner",
        choices=[
            SelectChoice("auto", "auto (Claude when an API key is set, else offline)"),
            SelectChoice("offline", "offline (runbooks, no network)"),
            SelectChoice("anthropic", "anthropic (Claude)"),
        ],
        default="auto",
    )
    approval_required = StringField(
        "Tools that need approval",
        default=", ".join(DEFAULT_APPROVAL_REQUIRED),
        description="Comma-separated tool names; the run pauses before each call.",
    )
    approvers = StringField(
        "Approvers",
        description="Comma-separated user names or emails; empty for the default approvers.",
    )
    max_iterations = StringField("Max iterations", default=str(DEFAULTS.max_iterations))
    timeout = StringField("Timeout (seconds, whole run)", default=f"{DEFAULTS.timeout:g}")
    max_retries = StringField("Retries per step", default=str(DEFAULTS.retry_policy.max_retries))
    retry_base = StringField("First backoff (s)", default=f"{DEFAULTS.retry_policy.base:g}")
    retry_factor = StringField("Backoff factor", default=f"{DEFAULTS.retry_policy.factor:g}")
    retry_max_backoff = StringField(
        "Longest backoff (s)", default=f"{DEFAULTS.retry_policy.max_backoff:g}"
    )

    def config(self) -> dict[str, Any]:
        """The options as RunConfig input; empty fields keep RunConfig's defaults."""
        config: dict[str, Any] = {}
        for name, path in CONFIG_FIELDS.items():
            value = (getattr(self, name).data or "").strip()
            if name == "approvers":
                value = [v.strip() for v in value.split(",") if v.strip()]
            elif not value and name != "approval_required":
                continue
            target = config
            for key in path[:-1]:
                target = target.setdefault(key, {})
            target[path[-1]] = value
        return config

    def check_config(self) -> RunConfig | None:
        """RunConfig from the fields, or None with each problem put on its field."""
        try:
            return RunConfig.model_validate(self.config())
        except ValidationError as exc:
            for error in exc.errors():
                self.field_for(tuple(str(p) for p in error["loc"])).errors.append(
                    _message(error["msg"])
                )
            return None

    def field_for(self, loc: tuple[str, ...]) -> Any:
        for name, path in CONFIG_FIELDS.items():
            if loc[: len(path)] == path:
                return getattr(self, name)
        # A check across the retry fields (the cap below the first backoff).
        return self.retry_max_backoff if loc[:1] == ("retry_policy",) else self.task


def _message(msg: str) -> str:
    return msg.removeprefix("Value error, ")


class DecisionForm(FlaskForm):  # type: ignore[misc]
    """Approve (optionally with edited args), reject with a reason, or — for an
    unknown outcome — retry, skip or mark done. Bound to one approval."""

    approval_id = HiddenField()
    action = HiddenField()
    args = TextAreaField("Args (JSON)")
    reason = TextAreaField("Reason", validators=[Length(max=2000)])


class CancelForm(FlaskForm):  # type: ignore[misc]
    pass


def edited_args(text: str | None, original: dict[str, Any]) -> dict[str, Any] | None:
    """The args a person edited, or None when they left them as shown.

    Raises ValueError with a message for the page when the text is not a JSON object."""
    if not text or not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the args are not valid JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(value, dict):
        raise ValueError('the args must be a JSON object, like {"env": "staging"}')
    return None if value == original else value
