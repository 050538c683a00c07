"""The `agentloop` command: clear one-line errors, and the run/status/decide cycle."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from app.cli import main
from app.engine.models import RunStatus


@pytest.fixture
def cli(database_url, redis_db):
    return CliRunner()


def test_an_unreachable_database_is_one_clear_line(cli):
    result = cli.invoke(
        main, ["status", "x"], env={"DATABASE_URL": "postgresql://u:hunter2@127.0.0.1:1/db"}
    )
    assert result.exit_code == 2
    assert "cannot use the database at postgresql+psycopg2://u:***@127.0.0.1:1/db" in result.output
    assert "hunter2" not in result.output and "Traceback" not in result.output


def test_an_unreachable_broker_is_one_clear_line(cli):
    result = cli.invoke(
        main, ["run", "noop chain"], env={"CELERY_BROKER_URL": "redis://127.0.0.1:1/0"}
    )
    assert result.exit_code == 2
    assert "cannot reach the broker at redis://127.0.0.1:1/0" in result.output


def test_invalid_configuration_names_the_setting(cli):
    result = cli.invoke(main, ["status", "x"], env={"AGENTLOOP_LEASE_GRACE": "-1"})
    assert result.exit_code == 2
    assert "invalid configuration: lease_grace" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", ""], "the task is empty"),
        (["run", "noop chain", "--max-iterations", "0"], "max_iterations"),
        (["run", "noop chain", "--config", "{not json"], "--config: is not valid JSON"),
        (["status", "no-such-run"], "no run with id 'no-such-run'"),
        (["approve", "no-such-run"], "no run with id 'no-such-run'"),
        (["reject", "no-such-run"], "Missing option '--reason'"),
    ],
)
def test_bad_input_gets_a_clear_error(cli, args, message):
    result = cli.invoke(main, args)
    assert result.exit_code == 2
    assert message in result.output


def test_run_status_and_cancel(cli, live_service):
    created = cli.invoke(main, ["run", "noop chain", "--planner", "offline"])
    assert created.exit_code == 0, created.output
    run_id = created.output.split()[1]
    assert "(planner: offline)" in created.output
    status = cli.invoke(main, ["status", run_id])
    assert status.exit_code == 0 and "task: noop chain" in status.output
    assert cli.invoke(main, ["cancel", run_id]).exit_code == 0
    assert live_service.status(run_id).run.status == RunStatus.CANCELLED
    again = cli.invoke(main, ["approve", run_id])
    assert again.exit_code == 2 and "cancelled, not waiting for a decision" in again.output


def test_the_config_names_the_planner_unless_an_option_does(cli, live_service):
    """`--config '{"planner": ...}'` was overridden by --planner's default."""
    asked = cli.invoke(main, ["run", "noop chain", "--config", '{"planner": "anthropic"}'])
    assert asked.exit_code == 2 and "needs ANTHROPIC_API_KEY" in asked.output
    forced = cli.invoke(
        main, ["run", "noop chain", "--config", '{"planner": "anthropic"}', "--planner", "offline"]
    )
    assert forced.exit_code == 0 and "(planner: offline)" in forced.output


def test_a_run_command_repeated_with_its_idempotency_key_makes_one_run(cli, live_service):
    first = cli.invoke(main, ["run", "noop chain", "--idempotency-key", "nightly-1"])
    again = cli.invoke(main, ["run", "noop chain", "--idempotency-key", "nightly-1"])
    assert first.exit_code == again.exit_code == 0, first.output + again.output
    assert first.output.split()[1] == again.output.split()[1]
