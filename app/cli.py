"""The `agentloop` command: a thin adapter from the terminal to the service layer."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, NoReturn, ParamSpec, TypeVar

import click

from app.config import ConfigError, Settings, load_settings, redact_url
from app.engine.models import Decision, RunStatus
from app.errors import NotFound
from app.service import AgentService, Lineage, ServiceError
from app.service.inputs import Problem, Problems
from app.service.permissions import Actor
from app.store.accounts import AccountError, Accounts, Role, User
from app.store.repo import StoreUnavailable
from app.timeline import format_event, format_run_header, format_step

P = ParamSpec("P")
R = TypeVar("R")


class BrokerUnavailable(Exception):
    pass


def friendly_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn expected failures into one clear line and exit status 2 — no traceback."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except Problems as exc:
            click.echo(f"agentloop: {_counted(exc.problems)}:", err=True)
            for problem in exc.problems:
                click.echo(f"  - {problem}", err=True)
            raise SystemExit(2) from None
        except (ConfigError, StoreUnavailable, BrokerUnavailable, ServiceError) as exc:
            message = exc.args[0] if exc.args else str(exc)
            click.echo(f"agentloop: {message}", err=True)
            raise SystemExit(2) from None

    return wrapper


def _counted(problems: list[Problem]) -> str:
    return f"{len(problems)} problem{'s' * (len(problems) != 1)}; nothing was done"


def check_broker(settings: Settings) -> None:
    """Raise BrokerUnavailable (one line: which URL, what to do) unless the broker answers."""
    from tasks import celery_app

    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=3)
    except Exception as exc:
        url = redact_url(settings.resolved_broker_url)
        raise BrokerUnavailable(
            f"cannot reach the broker at {url}: {str(exc).rstrip('.')}. Start it "
            "(redis-server) or set CELERY_BROKER_URL; leave it unset for the embedded "
            "filesystem broker."
        ) from None


def connect(*, broker: bool = True) -> tuple[Settings, AgentService]:
    """Settings and a service, after checking the database (and broker) answer."""
    from app import tracing
    from app.wiring import build_service
    from tasks import CeleryDispatcher, CeleryNotifier

    settings = load_settings()
    # A cancel or decision from here joins the run's trace, when OTEL_EXPORTER_OTLP_ENDPOINT
    # is set (the SDK exports what is buffered when the command exits).
    tracing.setup("agentloop-cli")
    try:
        service = build_service(
            settings, CeleryDispatcher(settings.max_countdown), CeleryNotifier()
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    service.store.check(redact_url(settings.resolved_database_url))
    if broker:
        check_broker(settings)
    return settings, service


@click.group()
def main() -> None:
    """agentloop: hand an agent a multi-step task and trust it to finish."""


@main.command()
@click.argument("task")
@click.option(
    "--planner",
    type=click.Choice(["auto", "offline", "anthropic"]),
    default=None,
    help="Overrides the config's planner; auto when neither names one.",
)
@click.option("--runbook", default=None, help="Offline planner: force this runbook.")
# Given as typed: the service checks them with everything else, so a mistake here is
# listed with every other problem of the run at once.
@click.option("--max-iterations", default=None, help="A whole number.")
@click.option("--timeout", default=None, help="Seconds for the whole run.")
@click.option("--approval-required", default=None, help="Comma-separated tool names.")
@click.option("--config", "config_json", default=None, help="Run config as JSON.")
@click.option(
    "--idempotency-key",
    default=None,
    help="Run the same command again with the same key: you get the run the first one "
    "made, not a second run.",
)
@click.option("--follow/--no-follow", default=False, help="Print the timeline as it grows.")
@friendly_errors
def run(
    task: str,
    planner: str | None,
    runbook: str | None,
    max_iterations: str | None,
    timeout: str | None,
    approval_required: str | None,
    config_json: str | None,
    idempotency_key: str | None,
    follow: bool,
) -> None:
    """Start a run for TASK (a worker must be running: `agentloop worker`).

    Options override the same fields of --config."""
    _, service = connect()
    config, unread = _config_option(config_json)
    options = {
        "planner": planner,
        "runbook": runbook,
        "max_iterations": max_iterations,
        "timeout": timeout,
        "approval_required": approval_required,
    }
    config.update({k: v for k, v in options.items() if v is not None})
    if unread is not None:  # the rest is checked too: every problem in one answer
        raise Problems([unread, *service.run_problems(task, config)])
    run_id = service.create_run(
        task, config=config, created_by=_actor(service), idempotency_key=idempotency_key
    )
    view = service.status(run_id)
    click.echo(f"run {run_id} created (planner: {view.run.planner})")
    if follow:
        _follow_to_the_end(service, run_id)


@main.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: run, steps, events.")
@friendly_errors
def status(run_id: str, as_json: bool) -> None:
    """Print a run, its steps and its whole timeline."""
    _, service = connect(broker=False)
    view = service.status(run_id)
    if as_json:
        from app.engine.redact import redact, secret_values
        from app.service.export import approval_json, event_json, run_json, step_json

        pending = view.pending_approval
        secrets = secret_values(view.run.context or {}, view.steps)
        shown = {
            "run": run_json(view.run),
            "steps": [step_json(s) for s in view.steps],
            "events": [event_json(e) for e in view.events],
            "pending_approval": None if pending is None else approval_json(pending),
        }
        click.echo(json.dumps(redact(shown, secrets), indent=2))
        return
    click.echo(format_run_header(view.run))
    _echo_lineage(service.lineage(run_id))
    click.echo("\nsteps:")
    for step in view.steps:
        click.echo(format_step(step))
    click.echo("\ntimeline:")
    for event in view.events:
        click.echo(format_event(event, color=sys.stdout.isatty()))
    if view.pending_approval is not None:
        pending = view.pending_approval
        click.echo(f"\nwaiting for a person ({pending.kind}): {pending.reason}")
    if view.run.report:
        click.echo("\nreport:\n" + view.run.report)


@main.command()
@click.argument("run_id")
@click.option("--args", "args_json", default=None, help="Approve with these args (JSON).")
@click.option("--comment", default="")
@friendly_errors
def approve(run_id: str, args_json: str | None, comment: str) -> None:
    """Approve the step a paused run waits on."""
    _, service = connect()
    args = _parse_json(args_json, "--args") if args_json else None
    service.approve(run_id, by=_actor(service), args=args, comment=comment, channel="cli")
    click.echo(f"approved; run {run_id} resumes")


@main.command()
@click.argument("run_id")
@click.option("--reason", required=True, help="Why; the agent re-plans around it.")
@friendly_errors
def reject(run_id: str, reason: str) -> None:
    """Reject the step a paused run waits on."""
    _, service = connect()
    service.reject(run_id, by=_actor(service), reason=reason, channel="cli")
    click.echo(
        f"rejected; run {run_id} re-plans around the reason, or ends as rejected if the "
        f"planner has no other way (`agentloop follow {run_id}`)"
    )


@main.command()
@click.argument("run_id")
@click.argument("decision", type=click.Choice(["retry", "skip", "done"]))
@click.option("--comment", default="")
@friendly_errors
def resolve(run_id: str, decision: str, comment: str) -> None:
    """Decide about a step whose outcome is unknown (its worker died mid-tool)."""
    _, service = connect()
    chosen = Decision.MARK_DONE if decision == "done" else Decision(decision)
    service.decide(run_id, chosen, by=_actor(service), comment=comment, channel="cli")
    click.echo(f"{decision}; run {run_id} resumes")


@main.command()
@click.argument("run_id")
@click.option("--reason", default="", help="Why (kept with the run, and told to its people).")
@friendly_errors
def cancel(run_id: str, reason: str) -> None:
    """Cancel a queued, running or paused run."""
    _, service = connect(broker=False)
    service.cancel(run_id, by=_actor(service), reason=reason)
    click.echo(f"run {run_id} cancelled")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--beat/--no-beat", default=False, help="Also run the sweep schedule (beat).")
@click.option(
    "--queues",
    default="tools,planner,notify",
    show_default=True,
    help="What this worker does: tools (prefork), planner (threads), notify; comma-separated.",
)
@click.pass_context
@friendly_errors
def worker(ctx: click.Context, beat: bool, queues: str) -> None:
    """Start a Celery worker (extra arguments go to `celery worker`). A worker of the
    planner alone runs a thread pool (planner calls wait on the network); give
    --pool and --concurrency to choose otherwise."""
    from app.queues import Queues

    names = Queues.of(load_settings()).by_name
    chosen = [q.strip() for q in queues.split(",") if q.strip()]
    if unknown := [q for q in chosen if q not in names]:
        raise click.UsageError(f"unknown queue(s) {', '.join(unknown)}: use {', '.join(names)}")
    settings, _ = connect()
    argv = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--loglevel=INFO"]
    argv.append("--queues=" + ",".join(names[q] for q in chosen))
    if "tools" not in chosen and not any(a.startswith(("--pool", "-P")) for a in ctx.args):
        argv += ["--pool=threads", "--concurrency=50"]
    if beat:
        schedule = settings.data_dir.resolve() / "celerybeat-schedule"
        argv += ["--beat", f"--schedule={schedule}"]
    os.execv(sys.executable, argv + list(ctx.args))


@main.command()
@click.option(
    "--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait for replies."
)
def health(timeout: float) -> None:
    """For a supervisor: exit 0 when workers answer and consume this deployment's
    queues (tools, planner, notify); otherwise exit 1 with one line saying what is wrong."""
    from app.queues import Queues

    try:
        settings = load_settings()
        check_broker(settings)
        problem = _no_consumer(list(Queues.of(settings).by_name.values()), timeout)
    except (ConfigError, BrokerUnavailable) as exc:
        problem = str(exc.args[0] if exc.args else exc)
    if problem:
        click.echo(f"agentloop health: {problem}", err=True)
        raise SystemExit(1)


def _no_consumer(wanted: list[str], timeout: float) -> str | None:
    """None when, for each of the `wanted` queues, some worker asked over the broker
    says it consumes it."""
    from tasks import celery_app

    replies = celery_app.control.inspect(timeout=timeout).active_queues() or {}
    if not replies:
        return f"no worker answered within {timeout:g} s: start one with `agentloop worker`"
    consumed = {q.get("name") for queues in replies.values() for q in queues}
    if missing := [queue for queue in wanted if queue not in consumed]:
        return (
            f"no worker consumes the queue(s) {', '.join(missing)} "
            f"({len(replies)} answered, for other queues)"
        )
    click.echo(f"ok: {', '.join(sorted(replies))} consume {', '.join(wanted)}")
    return None


@main.group()
def db() -> None:
    """Database schema."""


@db.command()
@friendly_errors
def upgrade() -> None:
    """Apply migrations up to the latest schema."""
    from app.store.migrate import upgrade as migrate

    settings = load_settings()
    url = settings.resolved_database_url
    try:
        migrate(url)
    except Exception as exc:
        raise StoreUnavailable(_migrate_failure(url, exc)) from None
    click.echo(f"database at {redact_url(url)} is at the latest schema")


def _migrate_failure(url: str, exc: Exception) -> str:
    """One line: why `db upgrade` failed and what to do (createdb for a missing database)."""
    from sqlalchemy.engine import make_url

    shown = redact_url(url)
    first_line = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [""])[0]
    if "does not exist" in first_line and url.startswith("postgresql"):
        parsed = make_url(url)
        argv = ["createdb"]
        if parsed.host:
            argv += ["-h", parsed.host]
        if parsed.port:
            argv += ["-p", str(parsed.port)]
        if parsed.username:
            argv += ["-U", parsed.username]
        argv.append(parsed.database or "agentloop")
        return (
            f"the database at {shown} does not exist: create it with `{' '.join(argv)}` "
            "(or ask your database administrator), then run `agentloop db upgrade` again"
        )
    return (
        f"cannot migrate the database at {shown}: {first_line.rstrip('.')}. "
        "Start it or set DATABASE_URL."
    )


@main.command("tools")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: every field and the schema.")
@friendly_errors
def tools_command(as_json: bool) -> None:
    """List the tools a run may use, where each comes from, its flags and arguments."""
    from app.wiring import build_registry

    settings = load_settings()
    try:
        registry = build_registry(settings)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    listed = [_tool_entry(registry, t.name) for t in registry]
    if as_json:
        click.echo(json.dumps(listed, indent=2, default=str))
        return
    for entry in listed:
        flags = [
            "needs approval" if entry["requires_approval"] else "no approval",
            "idempotent" if entry["idempotent"] else "not idempotent",
            f"timeout {entry['timeout']:g} s",
        ]
        if entry["safe_calls"]:
            flags.append(f"{len(entry['safe_calls'])} safe calls")
        click.echo(f"{entry['name']}  [{entry['source']}]  {', '.join(flags)}")
        click.echo(f"    {entry['description']}")
        properties = entry["schema"].get("properties", {})
        required = set(entry["schema"].get("required", []))
        for arg, schema in properties.items():
            kind = schema.get("type") or "|".join(
                str(s.get("type", "?")) for s in schema.get("anyOf", [])
            )
            marker = "" if arg in required else "?"
            click.echo(f"    - {arg}{marker}: {kind or 'any'}  {schema.get('description', '')}")
    click.echo(f"\n{len(listed)} tools")


def _tool_entry(registry: Any, name: str) -> dict[str, Any]:
    tool = registry.get(name)
    return {
        "name": tool.name,
        "source": registry.source(name) or "unknown",
        "description": tool.description,
        "requires_approval": tool.requires_approval,
        "idempotent": tool.idempotent,
        "timeout": tool.timeout,
        "safe_calls": [list(call) for call in tool.safe_calls],
        "schema": tool.args_model.model_json_schema(),
    }


@main.command()
@friendly_errors
def demo() -> None:
    """Run the deploy scenario end to end on embedded defaults."""
    from app.demo import run_demo

    raise SystemExit(run_demo(load_settings()))


def _config_option(text: str | None) -> tuple[dict[str, Any], Problem | None]:
    """--config as a dict, or an empty one and the problem with it."""
    if not text:
        return {}, None
    try:
        return _parse_json(text, "--config"), None
    except ConfigError as exc:
        return {}, Problem("--config", str(exc).removeprefix("--config "))


def _parse_json(text: str, option: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{option} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{option} must be a JSON object")
    return value


def _actor(service: AgentService) -> Actor:
    """The person at the terminal. With AGENTLOOP_USER: that user, with their role (and
    four eyes). Otherwise this machine's account, as an admin: whoever can reach the
    database can do anything anyway — but still not approve a run they started."""
    name = os.environ.get("AGENTLOOP_USER")
    if not name:
        return Actor(name=_whoami(), role=Role.ADMIN)
    found = Accounts(service.store.engine).by_name(name)
    if found is None or found.disabled:
        raise ConfigError(f"AGENTLOOP_USER={name} names no enabled user (`agentloop user list`)")
    return Actor.of(found)


def _whoami() -> str:
    return os.environ.get("AGENTLOOP_USER") or os.environ.get("USER") or "cli"


@main.group()
def user() -> None:
    """People who sign in to the web app and call the JSON API."""


@user.command("add")
@click.argument("name")
@click.option("--email", default=None, help="Where approval emails for NAME are sent.")
@click.option(
    "--role",
    type=click.Choice([r.value for r in Role]),
    default=Role.OPERATOR.value,
    show_default=True,
    help="viewer: read; operator: create and cancel own runs; approver: decide; admin: all.",
)
@click.option(
    "--password",
    prompt=True,
    hide_input=True,
    confirmation_prompt=True,
    envvar="AGENTLOOP_NEW_PASSWORD",
    help="Prompted for when not given (or set AGENTLOOP_NEW_PASSWORD).",
)
@click.option("--token/--no-token", default=False, help="Also create and print an API token.")
@friendly_errors
def user_add(name: str, email: str | None, role: str, password: str, token: bool) -> None:
    """Create a user who can sign in (passwords are stored hashed)."""
    accounts = _accounts()
    created = _account_change(
        lambda: accounts.add_user(name, password, email=email, role=Role(role), by=_whoami())
    )
    shown = f" <{created.email}>" if created.email else ""
    click.echo(f"user {created.name}{shown} created ({created.role})")
    if token:
        click.echo("API token (shown once; send it as 'Authorization: Bearer TOKEN'):")
        click.echo(accounts.issue_token(created.id, label="created with user add", by=_whoami()))


@user.command("list")
@friendly_errors
def user_list() -> None:
    """Every user, with role and state."""
    for found in _accounts().list_users():
        state = "disabled" if found.disabled else "enabled"
        click.echo(f"{found.name:<24} {found.role:<9} {state:<9} {found.email or ''}")


@user.command("role")
@click.argument("name")
@click.argument("role", type=click.Choice([r.value for r in Role]))
@friendly_errors
def user_role(name: str, role: str) -> None:
    """Give NAME another role."""
    changed = _account_change(lambda: _accounts().set_role(name, Role(role), by=_whoami()))
    click.echo(f"user {changed.name} is now {changed.role}")


@user.command("disable")
@click.argument("name")
@friendly_errors
def user_disable(name: str) -> None:
    """Disable NAME: their sessions and API tokens stop working at once."""
    _account_change(lambda: _accounts().set_disabled(name, True, by=_whoami()))
    click.echo(f"user {name} is disabled; their sessions and tokens no longer work")


@user.command("enable")
@click.argument("name")
@friendly_errors
def user_enable(name: str) -> None:
    """Enable NAME again (they sign in anew)."""
    _account_change(lambda: _accounts().set_disabled(name, False, by=_whoami()))
    click.echo(f"user {name} is enabled")


@user.command("password")
@click.argument("name")
@click.option(
    "--password",
    prompt="New password",
    hide_input=True,
    confirmation_prompt=True,
    envvar="AGENTLOOP_NEW_PASSWORD",
    help="Prompted for when not given (or set AGENTLOOP_NEW_PASSWORD).",
)
@friendly_errors
def user_password(name: str, password: str) -> None:
    """Set NAME's password; every session signed in with the old one ends."""
    _account_change(lambda: _accounts().set_password(name, password, by=_whoami()))
    click.echo(f"password of {name} changed; their earlier sessions have ended")


@user.group("token")
def user_token() -> None:
    """API tokens: create, list, revoke."""


@user_token.command("create")
@click.argument("name")
@click.option("--label", default="cli", help="What the token is for.")
@friendly_errors
def token_create(name: str, label: str) -> None:
    """Create and print a new API token for NAME (shown once)."""
    accounts = _accounts()
    found = _existing(accounts, name)
    click.echo(accounts.issue_token(found.id, label=label, by=_whoami()))


@user_token.command("list")
@click.argument("name")
@friendly_errors
def token_list(name: str) -> None:
    """NAME's tokens (their ids, labels and last use; never the tokens)."""
    accounts = _accounts()
    _existing(accounts, name)
    for token in accounts.tokens(name):
        used = f"{token.last_used_at:%Y-%m-%d %H:%M} UTC" if token.last_used_at else "never"
        click.echo(f"{token.id:>6}  {token.label:<30} created {token.created_at:%Y-%m-%d}, "
                   f"last used {used}")  # fmt: skip


@user_token.command("revoke")
@click.argument("name")
@click.option("--id", "token_id", type=int, default=None, help="One token (see `token list`).")
@click.option("--all", "every", is_flag=True, help="Every token of NAME.")
@friendly_errors
def token_revoke(name: str, token_id: int | None, every: bool) -> None:
    """Revoke NAME's token --id N, or --all of them: they stop working at once."""
    if (token_id is None) == (not every):
        raise ConfigError("say which: --id N (see `agentloop user token list NAME`) or --all")
    revoked = _account_change(
        lambda: _accounts().revoke_tokens(name, token_id=token_id, by=_whoami())
    )
    click.echo(f"{revoked} token(s) of {name} revoked")


def _accounts() -> Accounts:
    _, service = connect(broker=False)
    return Accounts(service.store.engine)


def _existing(accounts: Accounts, name: str) -> User:
    found = accounts.by_name(name)
    if found is None:
        raise NotFound(f"no user named {name!r}; create one with `agentloop user add {name}`")
    return found


T = TypeVar("T")


def _account_change(change: Callable[[], T]) -> T:
    """Run an account change; its refusal is one line, exit status 2."""
    try:
        return change()
    except AccountError as exc:
        raise ConfigError(str(exc)) from None


# --- daily use: list, follow, export, import, prune -----------------------------------


@main.command("runs")
@click.option(
    "--status",
    "status_filter",
    type=click.Choice([s.value for s in RunStatus]),
    default=None,
    help="Only runs with this status.",
)
@click.option("--since", default=None, help="Created since: an age (2d, 12h) or an ISO time.")
@click.option("--search", default=None, help="Only runs whose task contains TEXT.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@friendly_errors
def runs_command(
    status_filter: str | None, since: str | None, search: str | None, limit: int, as_json: bool
) -> None:
    """List runs, newest first."""
    from app.service.export import run_summary_json
    from app.service.retention import parse_since

    _, service = connect(broker=False)
    after = parse_since(since, service.clock()) if since else None
    found = service.search_runs(status=status_filter, since=after, search=search, limit=limit)
    if as_json:
        click.echo(json.dumps([run_summary_json(r) for r in found], indent=2))
        return
    for r in found:
        task = r.task if len(r.task) <= 60 else r.task[:59] + "…"
        by = f"  (by {r.ended_by})" if r.ended_by else ""
        click.echo(f"{r.id}  {r.status:<9}  {r.created_at:%Y-%m-%d %H:%M}  {task}{by}")
    click.echo(f"{len(found)} run(s)")


@main.command()
@click.argument("run_id")
@friendly_errors
def follow(run_id: str) -> None:
    """Print a run's timeline as it grows, until it ends or pauses for a person."""
    _, service = connect(broker=False)
    service.status(run_id)  # NotFound before anything is printed
    _follow_to_the_end(service, run_id)


def _follow_to_the_end(service: AgentService, run_id: str) -> NoReturn:
    """Print the run's timeline as it grows; exit with what its end means (a pause
    for a person ends the following too)."""
    from app.demo import follow_run

    raise SystemExit(follow_run(service, run_id, ask=None, color=sys.stdout.isatty()))


@main.command("export")
@click.argument("run_id")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "md"]),
    default="json",
    show_default=True,
    help="json: importable with `agentloop import`; md: to read.",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="A file.")
@friendly_errors
def export_command(run_id: str, fmt: str, output: str | None) -> None:
    """A run's whole history: the run, its config, steps, events and approvals."""
    from app.service.export import export_markdown

    _, service = connect(broker=False)
    document = service.export_run(run_id)
    text = (
        json.dumps(document, indent=2, sort_keys=True) + "\n"
        if fmt == "json"
        else export_markdown(document)
    )
    if output:
        with open(output, "w", encoding="utf-8") as out:
            out.write(text)
        click.echo(f"run {run_id} exported to {output}", err=True)
    else:
        click.echo(text, nl=False)


@main.command("import")
@click.argument("file", type=click.File("r", encoding="utf-8"))
@friendly_errors
def import_command(file: Any) -> None:
    """Make a new run from an export (`-` for standard input); nothing is executed.

    A finished run keeps its status; one exported queued, running or paused is
    imported as cancelled, so nothing can resume it here."""
    _, service = connect(broker=False)
    try:
        document = json.load(file)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file.name} is not valid JSON: {exc}") from None
    made = service.import_run(document, by=_whoami())
    click.echo(
        f"run {made.run_id} imported from run {made.original_id} "
        f"({made.original_status}); status {made.status}"
    )


@main.command()
@click.option("--older-than", required=True, help="Finished more than this long ago: 30d, 12h.")
@click.option(
    "--status",
    "statuses",
    default=None,
    help="Comma-separated, of completed, failed, rejected, cancelled (default: all four).",
)
@click.option("--dry-run", is_flag=True, help="Print what would be removed; remove nothing.")
@friendly_errors
def prune(older_than: str, statuses: str | None, dry_run: bool) -> None:
    """Remove finished runs older than --older-than, with their steps, events, approvals
    and workspaces. Queued, running and paused runs are never removed."""
    from app.service.retention import parse_age

    _, service = connect(broker=False)
    report = service.prune(
        older_than=parse_age(older_than),
        statuses=statuses.split(",") if statuses else None,
        dry_run=dry_run,
    )
    for r in report.runs:
        finished = f"{r.finished_at:%Y-%m-%d %H:%M}" if r.finished_at else "?"
        click.echo(f"{'would remove' if dry_run else 'removed'} {r.id}  {r.status:<9}  "
                   f"finished {finished}  {r.task[:60]}")  # fmt: skip
    verb = "would remove" if dry_run else "removed"
    click.echo(
        f"{verb} {len(report.runs)} run(s) finished before {report.cutoff:%Y-%m-%d %H:%M} UTC "
        f"({', '.join(report.statuses)}): {report.steps} steps, {report.events} events, "
        f"{report.approvals} approvals, {report.workspaces} workspace folder(s)"
    )


# --- time travel: fork and replay (app/service/fork.py, app/replay.py) ------------------


@main.command()
@click.argument("run_id")
@click.option(
    "--from-step",
    "from_step",
    type=int,
    required=True,
    help="N, as `agentloop status` numbers the steps: the fork keeps steps 1 to N "
    "(N must have completed) and plans what follows.",
)
@click.option("--instruction", default=None, help="Added to the task for the fork's planner.")
@click.option("--follow/--no-follow", default=False, help="Print the fork's timeline as it grows.")
@friendly_errors
def fork(run_id: str, from_step: int, instruction: str | None, follow: bool) -> None:
    """Start a new run from RUN_ID's history through step N. Nothing done through N
    runs again; every later step is planned anew and asks for approval as usual."""
    _, service = connect()
    fork_id = service.fork_run(
        run_id, from_step=from_step, by=_actor(service), instruction=instruction
    )
    click.echo(f"run {fork_id} forked from run {run_id} at step {from_step}")
    if follow:
        _follow_to_the_end(service, fork_id)


@main.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: the run and its iterations.")
@friendly_errors
def replay(run_id: str, as_json: bool) -> None:
    """Print RUN_ID's decisions iteration by iteration, from its events: what it saw,
    what it chose and why, the people asked and the errors. Nothing is executed."""
    from app.replay import format_turn, turn_json, turns
    from app.service.export import run_summary_json

    _, service = connect(broker=False)
    view = service.status(run_id)
    lineage = service.lineage(run_id)
    played = turns(view.events)
    if as_json:
        shown = {
            "run": {
                **run_summary_json(view.run),
                "parent_run_id": lineage.parent_id,
                "forked_from_step": lineage.forked_from_step,
                "forks": [f.id for f in lineage.forks],
            },
            "iterations": [turn_json(t) for t in played],
        }
        click.echo(json.dumps(shown, indent=2))
        return
    click.echo(format_run_header(view.run))
    _echo_lineage(lineage)
    for turn in played:
        click.echo("\n" + format_turn(turn, color=sys.stdout.isatty()))


def _echo_lineage(lineage: Lineage) -> None:
    """Where the run was forked from, and its forks (nothing for a run with neither)."""
    if lineage.parent_id is not None:
        gone = "" if lineage.parent is not None else " (no longer here)"
        click.echo(f"forked from run {lineage.parent_id}{gone} at step {lineage.forked_from_step}")
    for forked in lineage.forks:
        click.echo(f"fork: run {forked.id} from step {forked.forked_from_step} ({forked.status})")


if __name__ == "__main__":
    main()
