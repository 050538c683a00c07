"""What a Celery hop costs on Redis, beyond the round trips.

The Redis transport (app/broker.py): a channel keeps one redis.Redis client for its
connection pool instead of building one per publish, per delivery recorded as
unacknowledged and per ack, and still works once its connections were dropped.
Through a Celery app configured as every agentloop process is (app/queues.py), on
connections of the test's own and a queue of its own in the suite's Redis db.

Publishing an iteration (tasks.CeleryDispatcher) finds each Celery setting it reads
at the first look.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.utils.collections import DictAttribute
from kombu import Connection, Consumer

from app.config import load_settings
from app.engine.routing import WorkKind
from app.queues import Queues, celery_broker_settings
from tests.conftest import REDIS_URL

QUEUE = f"agentloop-test-redis-client-{os.getpid()}"
CLIENT_NAME = f"agentloop-test-dropped-{os.getpid()}"


@pytest.fixture
def app(redis_db: int) -> Iterator[Celery]:
    settings = load_settings(broker_url=REDIS_URL, queue=QUEUE)
    app = Celery("agentloop-test-redis-client", set_as_current=False)
    app.conf.update(
        celery_broker_settings(settings),
        # Celery prefers the environment's CELERY_BROKER_URL to broker_url.
        broker_read_url=REDIS_URL,
        broker_write_url=REDIS_URL,
        task_serializer="json",
        accept_content=["json"],
    )
    yield app
    app.close()
    admin = redis.Redis.from_url(REDIS_URL)
    for queue in Queues.of(settings).all:
        admin.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
    admin.close()


@pytest.fixture
def clients_built(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every redis.Redis built from now on (kombu's prefixed client is one too)."""
    built: list[object] = []
    init = redis.Redis.__init__

    def counted(self: redis.Redis, *args: Any, **kwargs: Any) -> None:
        built.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(redis.Redis, "__init__", counted)
    return built


def publish(app: Celery, conn: Connection, tick: int) -> None:
    """An iteration message, as tasks.CeleryDispatcher publishes one."""
    app.send_task(
        "agentloop.advance",
        args=("redis-client-test", tick),
        kwargs={"kind": "tool"},
        queue=QUEUE,
        producer=app.amqp.Producer(conn),
    )


def hops(app: Celery, n: int) -> None:
    """`n` publishes, then `n` deliveries taken as a worker takes them (BRPOP, recorded
    as unacknowledged) and acked; on connections of their own."""
    with app.connection_for_write() as conn:
        for tick in range(n):
            publish(app, conn, tick)
    acked: list[Any] = []
    with app.connection_for_read() as conn:
        queue = app.amqp.queues[QUEUE]
        with Consumer(conn, queues=[queue], callbacks=[lambda _, m: acked.append(m.ack())]):
            while len(acked) < n:
                conn.drain_events(timeout=5)


def test_a_channel_builds_no_redis_client_per_publish_or_ack(app: Celery, clients_built):
    hops(app, 1)  # kombu's own first use of anything (queues declared, scripts loaded)
    built = {}
    for n in (1, 10):
        clients_built.clear()
        hops(app, n)
        built[n] = len(clients_built)
    assert built[10] == built[1]  # kombu alone: one more client per publish, delivery, ack


def test_a_publish_after_the_brokers_connections_were_dropped_goes_through(app: Celery):
    admin = redis.Redis.from_url(REDIS_URL)
    with app.connection_for_write(transport_options={"client_name": CLIENT_NAME}) as conn:
        publish(app, conn, 1)
        dropped = [c["id"] for c in admin.client_list() if c["name"] == CLIENT_NAME]
        for client_id in dropped:
            admin.client_kill_filter(_id=client_id)
        publish(app, conn, 2)
    assert dropped
    assert admin.llen(QUEUE) == 2
    admin.close()


def test_a_channel_whose_pools_were_dropped_works_on_its_new_pool(app: Celery):
    """kombu drops a channel's pools after a fork; the next operation builds new ones."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        publish(app, conn, 1)
        channel._disconnect_pools()
        publish(app, conn, 2)
        with channel.conn_or_acquire() as client:
            assert client.connection_pool is channel.pool
            assert client.llen(QUEUE) == 2


def test_an_enqueue_finds_each_celery_setting_it_reads_at_the_first_look(
    app: Celery, monkeypatch: pytest.MonkeyPatch
):
    """Celery looks a setting up in celeryconfig (a module) only after missing it in
    the first map, and a miss there costs exceptions; pinned, a publish never gets
    that far."""
    from tasks import CeleryDispatcher

    dispatcher = CeleryDispatcher(max_countdown=60)
    dispatcher.queues = Queues.of(load_settings(queue=QUEUE))  # the test's own queue
    dispatcher.enqueue("settings-test", 1, delay=1, kind=WorkKind.TOOL)  # Celery's first use
    looked_up: list[str] = []
    lookup = DictAttribute.__getitem__
    monkeypatch.setattr(
        DictAttribute, "__getitem__", lambda self, key: looked_up.append(key) or lookup(self, key)
    )
    dispatcher.enqueue("settings-test", 2, delay=1, kind=WorkKind.TOOL)
    dispatcher.enqueue("settings-test", 3, delay=0, kind=WorkKind.TOOL)
    assert looked_up == []
