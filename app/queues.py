"""The queues agentloop's tasks travel on, and the broker settings they need.

Three queues, named after AGENTLOOP_QUEUE (`agentloop` by default):

* `<queue>`: tool iterations, and what beat sends (sweep, expiry);
* `<queue>.plan`: planner iterations, which wait on the network for minutes and
  belong on a thread pool with many threads, away from the tools' prefork pool;
* `<queue>.notify`: email and Slack notices, so a burst of them never delays an
  iteration.

Redis (and the embedded filesystem broker) or RabbitMQ. On RabbitMQ the queues
are quorum queues (replicated, no visibility timeout: an unacknowledged message
returns when its consumer's connection closes) behind a topic exchange, so
countdowns use RabbitMQ's native delayed delivery instead of waiting, unacked,
in a worker; global QoS, which quorum queues lack, is off (Celery detects them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from app.config import Settings
from app.engine.routing import WorkKind

AMQP_SCHEMES = ("amqp://", "pyamqp://", "amqps://")


@dataclass(frozen=True)
class Queues:
    tools: str
    plan: str
    notify: str

    @classmethod
    def of(cls, settings: Settings) -> Queues:
        return cls(
            tools=settings.queue, plan=f"{settings.queue}.plan", notify=f"{settings.queue}.notify"
        )

    def for_work(self, kind: WorkKind) -> str:
        return self.plan if kind is WorkKind.PLAN else self.tools

    @property
    def all(self) -> tuple[str, str, str]:
        return (self.tools, self.plan, self.notify)

    @property
    def iterations(self) -> tuple[str, str]:
        return (self.tools, self.plan)

    @property
    def by_name(self) -> dict[str, str]:
        """The names `agentloop worker --queues` takes, and the queues they stand for."""
        return {"tools": self.tools, "planner": self.plan, "notify": self.notify}


def uses_amqp(settings: Settings) -> bool:
    return settings.resolved_broker_url.startswith(AMQP_SCHEMES)


def countdown(settings: Settings, delay: float) -> float | None:
    """The broker countdown for an iteration due in `delay` seconds (capped: longer
    waits stay in next_run_at). RabbitMQ's delayed delivery counts whole seconds and
    refuses less than one: rounded up there (an iteration is never early)."""
    if delay <= 0:
        return None
    capped = min(delay, settings.max_countdown)
    return float(math.ceil(capped)) if uses_amqp(settings) else capped


def celery_broker_settings(settings: Settings) -> dict[str, Any]:
    """Celery settings that depend on the broker and the queue names (celeryconfig.py
    holds the rest); the same for workers and for every process that publishes."""
    queues = Queues.of(settings)
    conf: dict[str, Any] = {
        "broker_url": settings.resolved_broker_url,
        # A worker started without --queues consumes all three.
        "task_queues": [_queue(name, exchange=name) for name in queues.all],
        "task_default_queue": queues.tools,
        "task_routes": {"agentloop.notify": {"queue": queues.notify}},
    }
    if uses_amqp(settings):
        conf.update(_rabbitmq(queues))
    elif settings.uses_filesystem_broker:
        conf["broker_transport_options"] = _filesystem(settings)
    else:
        conf["broker_transport_options"] = _redis(settings)
    return conf


def _queue(name: str, *, exchange: str, topic: bool = False, quorum: bool = False) -> Any:
    """A kombu queue bound to `exchange` by its own name."""
    from kombu.entity import Exchange, Queue

    return Queue(  # type: ignore[no-untyped-call]
        name,
        Exchange(exchange, type="topic" if topic else "direct"),  # type: ignore[no-untyped-call]
        routing_key=name,
        queue_arguments={"x-queue-type": "quorum"} if quorum else None,
    )


def _rabbitmq(queues: Queues) -> dict[str, Any]:
    return {
        # One topic exchange (delayed delivery needs topic) and quorum queues.
        "task_queues": [
            _queue(name, exchange=queues.tools, topic=True, quorum=True) for name in queues.all
        ],
        "task_default_exchange": queues.tools,
        "task_default_exchange_type": "topic",
        "task_default_routing_key": queues.tools,
        "task_default_queue_type": "quorum",
        # Quorum queues have no global QoS: Celery switches to per-consumer prefetch.
        "worker_detect_quorum_queues": True,
        "broker_native_delayed_delivery_queue_type": "quorum",
        # A dead connection is noticed within a few heartbeats; its unacknowledged
        # messages go back to the queue at once (there is no visibility timeout).
        "broker_heartbeat": 30,
        # Confirmed publishes: a publish that returned is in the queue.
        "broker_transport_options": {"confirm_publish": True},
    }


def _redis(settings: Settings) -> dict[str, Any]:
    """Redis, through a channel that keeps one client (app/broker.py)."""
    from app.broker import use_shared_client_redis_transport

    use_shared_client_redis_transport()
    # Redis redelivers an unacknowledged message after visibility_timeout: every
    # countdown (capped by max_countdown) and every step stays well under it.
    return {"visibility_timeout": settings.broker_visibility_timeout}


def _filesystem(settings: Settings) -> dict[str, Any]:
    """The embedded broker: a pair of folders, messages written whole (app/broker.py)."""
    from app.broker import use_atomic_filesystem_transport

    use_atomic_filesystem_transport()
    settings.broker_dir.mkdir(parents=True, exist_ok=True)  # kombu expects them to exist
    folder = str(settings.broker_dir)
    return {
        "data_folder_in": folder,
        "data_folder_out": folder,
        "processed_folder": folder + "-processed",
        # Exchange bindings; kombu's default is ./control in the working directory.
        "control_folder": folder + "-control",
        "store_processed": False,
        "polling_interval": settings.filesystem_polling_interval,
        "visibility_timeout": settings.broker_visibility_timeout,
    }
