"""kombu transports agentloop uses in place of kombu's own, and why.

Both are small subclasses put in place by URL scheme (`TRANSPORT_ALIASES`) from
`celery_broker_settings` (app/queues.py), which every process that publishes or
consumes — worker, beat, web app, CLI, bench — runs when it loads celeryconfig. They
sit together so that what agentloop changes in kombu is read in one place.

The embedded broker, `filesystem://`: kombu's filesystem channel creates a
message's file under its final name and then writes it, while a consumer moves
and reads every file with that name that it lists — without the writer's lock. A
consumer polling every 50 ms can read a file still empty and die on the JSON
("Unrecoverable error: JSONDecodeError"), which stopped the demo's worker
mid-run. Here a message is written under a name no consumer picks up and renamed
into place when complete: a rename within one folder is atomic, so a reader sees
a whole message or none.

Redis, `redis://` and `rediss://`: kombu's channel builds a new `redis.Redis`
client for almost every operation (a publish, recording a delivered message as
unacknowledged, an ack), and building one costs ~100 µs (redis-py fills its
table of response callbacks each time): three a Celery hop. A client is only a
thread-safe front of its connection pool, so here a channel keeps one for its
pool and builds another only when the pool was replaced (after a fork or a
reconnect, kombu drops the channel's pools). The client that waits in BRPOP is
kombu's own, on a pool of its own, and unchanged.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from time import monotonic
from typing import Any

from kombu.transport import TRANSPORT_ALIASES, _transport_cache, filesystem
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

ALIAS = "filesystem"
REDIS_ALIASES = ("redis", "rediss")


class Channel(filesystem.Channel):
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = final + ".partial"  # not "<queue>.msg": consumers skip it
        with open(partial, "wb") as f:
            f.write(str_to_bytes(dumps(payload)))  # type: ignore[no-untyped-call]
        os.replace(partial, final)


class Transport(filesystem.Transport):
    Channel = Channel


class RedisChannel(kombu_redis.Channel):
    _shared_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """The client passed, or the channel's own for its current pool."""
        yield client or self.shared_client()

    def shared_client(self) -> Any:
        pool = self.pool  # kombu builds a new one after _disconnect_pools()
        client = self._shared_client
        if client is None or client.connection_pool is not pool:
            client = self._shared_client = self._create_client()  # type: ignore[no-untyped-call]
        return client


class RedisTransport(kombu_redis.Transport):
    Channel = RedisChannel


def use_atomic_filesystem_transport() -> None:
    """Make `filesystem://` URLs use this transport, in the process that calls it."""
    _use(ALIAS, "Transport")


def use_shared_client_redis_transport() -> None:
    """Make `redis://` and `rediss://` URLs use RedisTransport, in the process that
    calls it."""
    for alias in REDIS_ALIASES:
        _use(alias, "RedisTransport")


def _use(alias: str, transport: str) -> None:
    TRANSPORT_ALIASES[alias] = f"{__name__}:{transport}"
    # kombu remembers what an alias resolved to: a connection made before this call
    # (say, a test's) would otherwise pin kombu's own transport for the process.
    _transport_cache.pop(alias, None)
