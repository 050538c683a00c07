"""Forms: CSRF through flask-wtf; a new run is validated by the service (RunConfig,
tools, approvers, the planner), and each of its problems is shown next to the field
it concerns — all of them at once."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from flask_wtf import FlaskForm
from wtforms import HiddenField, SelectField, StringField, TextAreaField
from wtforms.fields.choices import SelectChoice
from wtforms.validators import Length

from app.engine.models import DEFAULT_APPROVAL_REQUIRED, MAX_TASK_CHARS, RunConfig
from app.service.inputs import Problem

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
    # No validators of its own: the service checks the task with everything else, so
    # every problem is reported at once.
    task = TextAreaField(
        "Task",
        description="What the agent should do, in plain words.",
        render_kw={"maxlength": MAX_TASK_CHARS},
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

    def show(self, problems: Sequence[Problem]) -> None:
        """Each problem next to the field it concerns; a field the form's own checks
        already flagged keeps only those messages (not the same fault twice)."""
        flagged = {name for name, field in self._fields.items() if field.errors}
        for problem in problems:
            field = self.field_for(problem.field)
            if field.name not in flagged:
                field.errors.append(problem.message)

    def problems(self) -> list[tuple[Any, str]]:
        """(field, message) for every problem on the form, in the order of the fields."""
        return [(f, message) for f in self if f.name != "csrf_token" for message in f.errors]

    def field_for(self, path: str) -> Any:
        """The field a Problem's path ("task", "config.retry_policy.base") is about."""
        head, _, rest = path.partition(".")
        if head != "config":
            return self.task
        loc = tuple(rest.split(".")) if rest else ()
        for name, config_path in CONFIG_FIELDS.items():
            if loc[: len(config_path)] == config_path:
                return getattr(self, name)
        # A check across the retry fields (the cap below the first backoff).
        return self.retry_max_backoff if loc[:1] == ("retry_policy",) else self.task


class DecisionForm(FlaskForm):  # type: ignore[misc]
    """Approve (optionally with edited args), reject with a reason, or — for an
    unknown outcome — retry, skip or mark done. Bound to one approval."""

    approval_id = HiddenField()
    action = HiddenField()
    args = TextAreaField("Args (JSON)")
    reason = TextAreaField("Reason", validators=[Length(max=2000)])


class CancelForm(FlaskForm):  # type: ignore[misc]
    reason = StringField("Why", validators=[Length(max=2000)])


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
