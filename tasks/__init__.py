"""Celery tasks: thin adapters from messages to service calls.

`agentloop.advance(run_id, tick)` is one iteration of one run; it re-enqueues
itself through the service's dispatcher, with a countdown, after its commit.
`agentloop.sweep()` (Celery beat) re-enqueues runs whose message was lost;
`agentloop.prune()` (beat, with AGENTLOOP_RETENTION) removes old finished runs.
"""

from __future__ import annotations

import logging
import threading
from functools import cache
from typing import Any

from amqp.exceptions import ChannelError
from celery import Celery, Task
from celery.signals import (
    setup_logging,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
)
from sqlalchemy.exc import OperationalError

from app import logs
from app.config import load_settings
from app.engine.routing import WorkKind
from app.queues import Queues, countdown
from app.service import AgentService, Notice

log = logging.getLogger(__name__)

celery_app = Celery("agentloop")
celery_app.config_from_object("celeryconfig")
logs.quiet_noise()  # kombu's "No hostname was supplied" on every publish to the embedded broker


class CeleryDispatcher:
    """Publishes iterations on the queue of their kind of work (app/queues.py); long
    waits are capped here and kept in next_run_at."""

    def __init__(self, max_countdown: float) -> None:
        self.settings = load_settings().model_copy(update={"max_countdown": max_countdown})
        self.queues = Queues.of(self.settings)
        pin_publish_settings(celery_app)

    def enqueue(self, run_id: str, tick: int, delay: float, kind: WorkKind) -> None:
        # Flower and the worker log show the shadow name instead of agentloop.advance.
        advance.apply_async(
            args=(run_id, tick),
            kwargs={"kind": str(kind)},
            queue=self.queues.for_work(kind),
            countdown=countdown(self.settings, delay),
            shadow=advance_label(run_id, tick),
        )

    def queue_depth(self) -> int | None:
        depths = [queue_depth(celery_app, queue) for queue in self.queues.iterations]
        return None if None in depths else sum(d for d in depths if d is not None)


# What Celery 5.7 reads from its configuration on every publish (apply_async,
# send_task, the message's argsrepr and kwargsrepr, the producer pool).
PUBLISH_SETTINGS = (
    "task_always_eager",
    "task_send_sent_event",
    "task_repr_maxlevels",
    "broker_pool_acquire_timeout",
)


def pin_publish_settings(app: Celery) -> None:
    """Copy the settings every publish reads, as they resolve now, into the first
    map of the app's configuration: Celery looks a setting up under three spellings
    in three maps (one of them celeryconfig, a module), by exceptions, before it
    reaches a default: ~10 µs a look-up, six a publish. Pinned, each is one dict
    hit; the values are the same, and a later change still overrides them."""
    app.conf.update({key: app.conf[key] for key in PUBLISH_SETTINGS})


def advance_label(run_id: str, tick: int) -> str:
    """What an iteration is called in Flower: the run and the tick it advances (the
    step is chosen only when the message is consumed; the task's result names it)."""
    return f"agentloop.advance[{run_id} tick {tick}]"


def queue_depth(app: Celery, queue: str) -> int | None:
    """Messages waiting in `queue` (not those a worker holds); None if the broker
    cannot say."""
    try:
        with app.connection_for_write() as conn:
            declared = conn.default_channel.queue_declare(queue=queue, passive=True)
    except ChannelError:
        return 0  # the broker has no such queue: nothing waits in it
    except Exception:
        log.warning("cannot read the length of queue %s", queue, exc_info=True)
        return None
    return int(declared.message_count)


class CeleryNotifier:
    """Hands notices to the `agentloop.notify` task on the notify queue (celeryconfig's
    task_routes), which retries with countdowns. Used only when a channel is
    configured (app/wiring.py): otherwise a notice costs no message at all."""

    def notify(self, notice: Notice, run_id: str) -> None:
        notify.apply_async(args=(str(notice), run_id))


@setup_logging.connect
def structured_logs(loglevel: int | str | None = None, **_: object) -> None:
    """Worker and beat log JSON lines (human ones on a terminal) through app/logs.py;
    connecting this signal keeps Celery from configuring logging itself."""
    logs.setup(loglevel or None)


@worker_init.connect
def serve_metrics(**_: object) -> None:
    """The worker's /metrics, when AGENTLOOP_WORKER_METRICS_PORT is set (app/metrics.py)."""
    from app import metrics

    metrics.serve_worker_metrics()


@worker_init.connect
def start_tracing(**_: object) -> None:
    """OpenTelemetry, when OTEL_EXPORTER_OTLP_ENDPOINT is set (app/tracing.py): before
    the pool forks, so publishing and consuming carry each run's trace context."""
    from app import tracing

    tracing.setup("agentloop-worker")


@worker_process_init.connect
def trace_pool_child(**_: object) -> None:
    """In each pool child: tracing (again, for pools that do not fork) and its SQL."""
    from app import tracing

    if tracing.setup("agentloop-worker"):
        try:
            tracing.instrument_engines(service().store.engines)
        except Exception:  # the first task reports what is wrong with the service
            log.warning("tracing: no SQL spans (the service cannot be built)", exc_info=True)


@worker_process_shutdown.connect
def flush_traces(**_: object) -> None:
    """Export the spans still buffered before a pool child exits."""
    from app import tracing

    tracing.flush()


_building = threading.Lock()


def service() -> AgentService:
    """Built on first use in each worker process, once: the threads of a thread pool
    all ask at once when a burst arrives, and each used to build a service of its
    own, with pools of its own (64 threads opened 84 connections, and PostgreSQL
    ran out). Importing this module connects to nothing."""
    with _building:
        return _built_service()


@cache
def _built_service() -> AgentService:
    from app.wiring import build_service

    settings = load_settings()
    return build_service(settings, CeleryDispatcher(settings.max_countdown), CeleryNotifier())


class AdvanceTask(Task):  # type: ignore[misc]  # Celery is untyped
    """agentloop.advance's class: a retry (the database was away before the claim) is
    published on the queue of the message's kind of work. Celery's own retry follows
    the routing key the message arrived with, and after RabbitMQ's delayed delivery
    that key no longer names its queue: a planner message went to the tools' queue."""

    def retry(self, *args: Any, **options: Any) -> Any:
        kind = (self.request.kwargs or {}).get("kind")
        queues = Queues.of(load_settings())
        options.setdefault("queue", queues.for_work(WorkKind(kind)) if kind else queues.tools)
        return super().retry(*args, **options)


@celery_app.task(
    base=AdvanceTask,
    name="agentloop.advance",
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(OperationalError,),
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=10,
)
def advance(run_id: str, tick: int, kind: str | None = None) -> str:
    """One iteration. `kind`: the work the queue it came on is for (plan, tool); a
    message without one (published before queues were split) is done where it lands.
    If the database is away before the claim, Celery delivers this message again with
    backoff; the service records any other failure itself.

    Returns what it did (`execute step 3 (deploy)`): no result is stored, but the
    worker logs it and sends it in the task-succeeded event Flower shows as Result."""
    return service().advance(run_id, tick, kind=WorkKind(kind) if kind else None)


@celery_app.task(name="agentloop.sweep", acks_late=True)
def sweep() -> int:
    return service().sweep()


def notify_queue() -> str:
    return Queues.of(load_settings()).notify


@celery_app.task(name="agentloop.notify", bind=True, acks_late=True, max_retries=8)
def notify(self: Task, notice: str, run_id: str) -> None:
    """Deliver a notice by email and Slack; failures are retried with backoff and
    recorded as events, and never touch the run's status."""
    from app.notify import DeliveryFailed, deliver

    try:
        deliver(service(), Notice(notice), run_id, attempt=self.request.retries + 1)
    except DeliveryFailed as exc:
        raise self.retry(
            countdown=min(300, 2 ** (self.request.retries + 1)), queue=notify_queue()
        ) from exc


@celery_app.task(name="agentloop.prune", acks_late=True)
def prune() -> int:
    """Beat, when AGENTLOOP_RETENTION is set: remove finished runs older than that, as
    `agentloop prune` does (never a queued, running or paused run)."""
    from app.config import load_settings

    settings = load_settings()
    if settings.retention_age is None:
        return 0  # retention was switched off after beat sent this
    report = service().prune(
        older_than=settings.retention_age, statuses=settings.retention_status_list
    )
    return len(report.runs)


@celery_app.task(name="agentloop.expire_approvals", acks_late=True)
def expire_approvals() -> int:
    """Beat: settle approvals nobody decided in time, as configured (reject or fail)."""
    settings = load_settings()
    return service().expire_approvals(ttl=settings.approval_ttl, policy=settings.approval_expiry)
