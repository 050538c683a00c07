"""The service layer the transports (Celery tasks, Flask views, the CLI) call.

One class, AgentService, assembled from one part per concern, each in its own
module: `runs` (create_run), `iteration` (advance: one iteration, and what the
slow work in `work` and the planner's `context` need), `decisions` (approve,
reject, resolve, cancel, expire), `queries` (read models), `healing` (the
sweep), `retention` (prune), `export` (export, import, search), `fork` (fork_run,
lineage: time travel). `base` holds
what they share: the collaborators and the one write path.
"""

from __future__ import annotations

from app.errors import Conflict, Forbidden, InvalidInput, NotFound, ServiceError
from app.service.decisions import Decisions
from app.service.export import Export
from app.service.fork import Forks, Lineage
from app.service.healing import Healing
from app.service.iteration import Iteration
from app.service.ports import Dispatcher, Notice, Notifier, PlannerFactory, notice_for
from app.service.queries import ApprovalView, Queries, RunPage, RunView
from app.service.retention import Retention
from app.service.runs import Runs

__all__ = [
    "AgentService",
    "ApprovalView",
    "Conflict",
    "Dispatcher",
    "Forbidden",
    "InvalidInput",
    "Lineage",
    "NotFound",
    "Notice",
    "Notifier",
    "PlannerFactory",
    "RunPage",
    "RunView",
    "ServiceError",
    "notice_for",
]


class AgentService(Runs, Iteration, Decisions, Queries, Healing, Retention, Export, Forks):
    """create_run, advance, approve, reject, decide, cancel, expire_approvals,
    status, list_runs, approval, record_event, sweep, prune, search_runs, export_run,
    import_run, fork_run, lineage. Raises ServiceError's subclasses (app/errors.py)
    for what the caller must show."""
