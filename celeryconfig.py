"""Celery settings, derived from agentloop's settings (app/config.py).

At-least-once delivery: a message is acknowledged after its iteration, and
requeued when the worker child dies; duplicates are harmless because every
message carries the run's tick. PostgreSQL is the source of truth; a message is
only a nudge to look at the database.
"""

from app.config import load_settings

_settings = load_settings()

broker_url = _settings.resolved_broker_url
broker_connection_retry_on_startup = True
# Redis redelivers an unacknowledged message after visibility_timeout: every
# countdown (capped by max_countdown) and every step stays well under it.
broker_transport_options: dict[str, object] = {
    "visibility_timeout": _settings.broker_visibility_timeout,
}
if _settings.uses_filesystem_broker:
    # Messages appear whole or not at all (app/broker.py): kombu's own filesystem
    # channel lets a consumer read a file it is still writing.
    from app.broker import use_atomic_filesystem_transport

    use_atomic_filesystem_transport()
    # The embedded broker is a pair of folders; kombu expects them to exist.
    _settings.broker_dir.mkdir(parents=True, exist_ok=True)
    _folder = str(_settings.broker_dir)
    broker_transport_options.update(
        data_folder_in=_folder,
        data_folder_out=_folder,
        processed_folder=_folder + "-processed",
        # Exchange bindings; kombu's default is ./control in the working directory.
        control_folder=_folder + "-control",
        store_processed=False,
        polling_interval=_settings.filesystem_polling_interval,
    )

task_default_queue = _settings.queue
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
task_ignore_result = True
task_serializer = "json"
accept_content = ["json"]
# A hard backstop only: tools enforce their own timeouts well below it.
task_time_limit = 1800
worker_hijack_root_logger = False
# SIGTERM is a warm shutdown: the running step finishes and saves, within
# AGENTLOOP_SHUTDOWN_GRACE seconds, even when the supervisor signals the whole
# process group (app/shutdown.py).
imports = ("app.shutdown",)
# A broker blip must never cut a running tool off mid-effect: the database is the
# truth, so the step finishes and saves, and the message redelivered after the
# reconnect is a stale-tick no-op. (With True, an 8 s Redis outage interrupted
# non-idempotent effects halfway.)
worker_cancel_long_running_tasks_on_connection_loss = False

beat_schedule = {
    "agentloop-sweep": {"task": "agentloop.sweep", "schedule": _settings.sweep_interval},
    "agentloop-expire-approvals": {
        "task": "agentloop.expire_approvals",
        "schedule": _settings.expire_interval,
    },
}
if _settings.retention_age is not None:
    # Retention (AGENTLOOP_RETENTION): old finished runs are pruned on beat.
    beat_schedule["agentloop-prune"] = {
        "task": "agentloop.prune",
        "schedule": _settings.retention_interval,
    }
