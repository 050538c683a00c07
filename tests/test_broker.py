"""The embedded broker (app/broker.py): a consumer never reads half a message."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from queue import Empty

import pytest
from kombu import Connection
from kombu.transport import TRANSPORT_ALIASES

from app.broker import ALIAS, use_atomic_filesystem_transport

MESSAGES = 300
PAYLOAD = {"body": "x" * 200_000}  # large: writing it takes a while


def connect(folder: Path) -> Connection:
    options = {"data_folder_in": str(folder), "data_folder_out": str(folder)}
    return Connection("filesystem://", transport_options=options)


def produce(folder: Path, atomic: bool) -> None:
    if atomic:
        use_atomic_filesystem_transport()
    with connect(folder) as conn:
        for _ in range(MESSAGES):
            conn.default_channel._put("q", PAYLOAD)


def race(folder: Path, *, atomic: bool) -> tuple[int, list[BaseException]]:
    """A producer process and a consumer on one folder, as the demo's CLI and its
    worker are (processes: a thread would hold the GIL through the whole write)."""
    errors: list[BaseException] = []
    received = 0
    producer = multiprocessing.get_context("fork").Process(target=produce, args=(folder, atomic))
    producer.start()
    with connect(folder) as conn:
        channel = conn.default_channel
        while received < MESSAGES and not errors:
            try:
                assert channel._get("q") == PAYLOAD
                received += 1
            except Empty:
                if not producer.is_alive() and not any(folder.glob("*.msg")):
                    break
            except Exception as exc:  # kombu's channel: JSONDecodeError of an empty file
                errors.append(exc)
    producer.join()
    return received, errors


@pytest.fixture
def atomic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(TRANSPORT_ALIASES, ALIAS, TRANSPORT_ALIASES[ALIAS])
    use_atomic_filesystem_transport()


def test_a_consumer_polling_while_messages_are_written_reads_each_whole(atomic, tmp_path: Path):
    with connect(tmp_path) as conn:
        assert type(conn.default_channel).__module__ == "app.broker"
    received, errors = race(tmp_path, atomic=True)
    assert (received, errors) == (MESSAGES, [])
    assert list(tmp_path.iterdir()) == []  # nothing partial left behind
