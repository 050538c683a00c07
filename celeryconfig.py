"""Celery settings, derived from agentloop's settings (app/config.py).

At-least-once delivery: a message is acknowledged after its iteration, and
requeued when the worker child dies; duplicates are harmless because every
message carries the run's tick. PostgreSQL is the source of truth; a message is
only a nudge to look at the database.
"""

from app.config import load_settings
from app.queues import celery_broker_settings

_settings = load_settings()

broker_connection_retry_on_startup = True
# The broker URL, the queues (tools, planner, notify) and what the broker needs:
# Redis, RabbitMQ or the embedded filesystem broker (app/queues.py).
globals().update(celery_broker_settings(_settings))

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
