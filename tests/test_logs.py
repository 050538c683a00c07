"""Structured logs (app/logs.py): one JSON line per iteration with the run id,
iteration, step and tool, from the in-process service and from a real worker; the
formatters; and the embedded broker's "No hostname was supplied" noise gone."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest
from kombu import Connection

from app import logs
from app.engine.models import RunStatus
from tests.support.fixtures import Harness, steps, wait_until


class Lines(logging.Handler):
    """Every record, formatted as the worker formats it (JSON)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logs.JsonFormatter())
        self.addFilter(logs.ContextFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def parsed(self) -> list[dict]:
        return [json.loads(line) for line in self.lines]


@pytest.fixture
def captured() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("app")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(previous)


def test_each_iteration_logs_a_json_line_with_its_run_step_and_tool(
    harness: Harness, captured: Lines
):
    harness.planner.script = [steps("noop", "noop")]
    run_id = harness.service.create_run("log my iterations")
    iterations = harness.drain()
    assert harness.service.status(run_id).run.status == RunStatus.COMPLETED
    mine = [
        line
        for line in captured.parsed()
        if line["logger"] == "app.service.iteration" and line["run_id"] == run_id
    ]
    assert len(mine) == iterations >= 4  # plan, two steps, verify
    for line in mine:
        assert {"ts", "level", "logger", "message", "run_id", "iteration", "step", "tool"} <= set(
            line
        )
        assert isinstance(line["iteration"], int)
    executed = [line for line in mine if line["action"] == "execute"]
    assert [(line["step"], line["tool"]) for line in executed] == [(1, "noop"), (2, "noop")]
    assert all(line["step"] is None for line in mine if line["action"] == "plan")
    # Nothing of this run's leaks into lines logged after its iterations.
    logging.getLogger("app.test").warning("after the run")
    assert captured.parsed()[-1]["run_id"] is None


def test_the_context_reaches_every_line_logged_during_an_iteration(captured: Lines):
    with logs.context(run_id="r-1", iteration=3, step=2, tool="build"):
        logging.getLogger("app.tools.example").warning("inside %s", "the tool")
    line = captured.parsed()[-1]
    assert line["message"] == "inside the tool"
    assert (line["run_id"], line["iteration"], line["step"], line["tool"]) == ("r-1", 3, 2, "build")
    assert logs.current() == dict.fromkeys(logs.CONTEXT_FIELDS)


def test_the_json_formatter_writes_one_parseable_line():
    formatter = logs.JsonFormatter()
    try:
        raise ValueError('bad "quote"\nand a newline')
    except ValueError:
        record = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "failed: %s", ("ünïcode",), sys.exc_info(),
            extra={"custom": object(), "count": 3},
        )  # fmt: skip
    text = formatter.format(record)
    assert "\n" not in text
    line = json.loads(text)
    assert line["level"] == "ERROR" and line["logger"] == "x"
    assert line["message"] == "failed: ünïcode"
    assert line["ts"].endswith("Z") and "T" in line["ts"]
    assert line["count"] == 3 and isinstance(line["custom"], str)
    assert "ValueError" in line["exc"]
    assert line["run_id"] is None and "iteration" in line


def test_the_format_follows_the_terminal_and_the_environment(monkeypatch: pytest.MonkeyPatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv(logs.FORMAT_VARIABLE, raising=False)
    assert isinstance(logs.formatter(Tty()), logs.HumanFormatter)
    assert isinstance(logs.formatter(io.StringIO()), logs.JsonFormatter)
    monkeypatch.setenv(logs.FORMAT_VARIABLE, "json")
    assert isinstance(logs.formatter(Tty()), logs.JsonFormatter)
    monkeypatch.setenv(logs.FORMAT_VARIABLE, "human")
    assert isinstance(logs.formatter(io.StringIO()), logs.HumanFormatter)
    record = logging.makeLogRecord({"name": "n", "levelname": "INFO", "msg": "hello"})
    with logs.context(run_id="r-2", step=1, tool="noop"):
        assert logs.HumanFormatter().format(record).endswith("hello  [run r-2 step 1 noop]")


def test_the_embedded_broker_says_nothing_about_a_hostname(caplog: pytest.LogCaptureFixture):
    import tasks  # noqa: F401  (installs the filter, as every worker and CLI does)

    with caplog.at_level(logging.DEBUG):
        Connection("filesystem://").as_uri()
        Connection("filesystem://")._info()
    assert not [r for r in caplog.records if "hostname" in r.getMessage()]


def found_all(worker) -> list[dict]:
    return [json.loads(x) for x in worker.output().splitlines() if x.startswith("{")]


def test_a_real_worker_writes_json_lines_with_the_run_id(start_worker, live_service):
    worker = start_worker(beat=False, env={"AGENTLOOP_LOG_FORMAT": "json"})
    run_id = live_service.create_run("noop chain")
    wait_until(
        lambda: live_service.status(run_id).run.status == RunStatus.COMPLETED,
        what="the run to complete",
    )

    def iteration_lines() -> list[dict]:
        lines = [json.loads(x) for x in worker.output().splitlines() if x.startswith("{")]
        return [x for x in lines if x["run_id"] == run_id and x["logger"].startswith("app.")]

    found = wait_until(iteration_lines, what="the worker's lines for the run")
    assert any(x["action"] == "execute" and x["tool"] == "noop" for x in found), found
    # Celery's success line (and Flower's Result) names the step each iteration ran.
    results = [x["message"] for x in found_all(worker) if "succeeded in" in x["message"]]
    assert any("execute step 1 (noop)" in m for m in results), results
    assert all(x["process"] and x["ts"] for x in found)
    assert "No hostname was supplied" not in worker.output()
