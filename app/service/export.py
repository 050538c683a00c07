"""A run's whole history out (JSON to import, Markdown to read) and back in.

An import makes a new run with a new id and never executes anything: a run that
was finished keeps its status; one exported while queued, running or paused is
imported as cancelled (a paused one would otherwise resume here on an approval,
and run its remaining steps for real), its pending approvals as cancelled. Every
step, event and approval is kept; a last event says where the run came from.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from secrets import token_hex
from typing import Any

from app.engine.actions import NewEvent
from app.engine.models import DECISION_STATUSES, EventKind, RunStatus, Step
from app.engine.redact import redact, secret_values
from app.errors import InvalidInput
from app.service.base import ServiceBase
from app.store.records import ApprovalRecord, EventRecord, RunRecord

EXPORT_FORMAT = "agentloop-run"
EXPORT_VERSION = 1

# Run columns that belong to this deployment's scheduling, not to the history.
_LOCAL_RUN_COLUMNS = {
    "lease_owner",
    "lease_expires_at",
    "next_run_at",
    "nudged_at",
    "idempotency_key",
    "request_hash",
}
_RUN_TIMES = {"deadline", "created_at", "updated_at", "started_at", "finished_at"}
_STEP_COLUMNS = [
    "plan_version", "position", "description", "tool", "args", "status", "attempts",
    "result", "error", "error_class", "approved_args_hash", "idempotency_key",
    "context_updates", "created_at", "updated_at",
]  # fmt: skip
_APPROVAL_COLUMNS = [
    "kind", "status", "reason", "args_hash", "expires_at", "decision", "decided_by",
    "decided_at", "comment", "edited_args", "created_at",
]  # fmt: skip


def jsonable(value: Any) -> Any:
    """Datetimes as ISO 8601 strings, to any depth."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def run_json(run: RunRecord) -> dict[str, Any]:
    return _object(
        {k: v for k, v in dataclasses.asdict(run).items() if k not in _LOCAL_RUN_COLUMNS}
    )


def run_summary_json(run: RunRecord) -> dict[str, Any]:
    """What `agentloop runs --json` prints for a run."""
    keys = ("id", "task", "status", "planner", "created_by", "created_at", "finished_at",
            "iteration", "tokens_total", "cost_usd", "error", "ended_by",
            "end_reason")  # fmt: skip
    return _object({k: getattr(run, k) for k in keys})


def step_json(step: Step) -> dict[str, Any]:
    return _object(step.model_dump(mode="json"))


def event_json(event: EventRecord) -> dict[str, Any]:
    return _object(dataclasses.asdict(event))


def approval_json(approval: ApprovalRecord) -> dict[str, Any]:
    return _object(dataclasses.asdict(approval))


def _object(value: dict[str, Any]) -> dict[str, Any]:
    return {str(k): jsonable(v) for k, v in value.items()}


def _time(value: Any, what: str) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        raise InvalidInput(f"{what} is not an ISO 8601 time: {value!r}") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


@dataclasses.dataclass(frozen=True)
class Imported:
    run_id: str
    status: str
    original_id: str
    original_status: str


class Export(ServiceBase):
    def search_runs(
        self,
        *,
        status: str | None = None,
        since: datetime | None = None,
        search: str | None = None,
        limit: int = 50,
    ) -> list[RunRecord]:
        """Newest first, filtered by status, creation time and the task's text."""
        with self.store.transaction() as tx:
            return tx.find_runs(status=status, since=since, search=search, limit=limit)

    def export_run(self, run_id: str) -> dict[str, Any]:
        """The run's whole history as a JSON-ready document: the run (with its config,
        context and report), every step, every event and every approval. Secrets the
        run knows of are replaced by ***. Raises NotFound."""
        with self.store.transaction() as tx:
            run = tx.get_run(self._known_id(run_id))
            step_rows = tx.step_rows(run_id)
            timeline = tx.all_events(run_id)
            asked = tx.run_approvals(run_id)
        document = {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "exported_at": jsonable(self.clock()),
            "run": run_json(run),
            "steps": [_object(row) for row in step_rows],
            "events": [event_json(e) for e in timeline],
            "approvals": [approval_json(a) for a in asked],
        }
        secrets = secret_values(
            run.context or {}, [Step.model_validate(r) for r in _step_models(step_rows)]
        )
        redacted: dict[str, Any] = redact(document, secrets)
        return redacted

    def import_run(self, document: Any, *, by: str) -> Imported:
        """A new run from an export (see the module's docstring); nothing is executed.
        Raises InvalidInput for a document that is not an export."""
        if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
            raise InvalidInput(f'not an agentloop export (no "format": "{EXPORT_FORMAT}")')
        if document.get("version") != EXPORT_VERSION:
            raise InvalidInput(
                f"export version {document.get('version')!r} is not supported "
                f"(this agentloop reads version {EXPORT_VERSION})"
            )
        try:
            return self._import(document, by)
        except (KeyError, TypeError, AttributeError) as exc:
            raise InvalidInput(f"the export is incomplete or malformed: {exc!r}") from None

    def _import(self, document: dict[str, Any], by: str) -> Imported:
        source = document["run"]
        original_id = str(source["id"])
        original_status = RunStatus(source["status"])
        new_id = token_hex(8)
        now = self.clock()
        status = original_status if original_status.is_terminal else RunStatus.CANCELLED
        values = {
            k: (_time(v, f"run.{k}") if k in _RUN_TIMES else v)
            for k, v in source.items()
            if k not in _LOCAL_RUN_COLUMNS and k != "id"
        }
        values.update(id=new_id, status=status)
        if not original_status.is_terminal:  # cancelled here by the import: a decision
            values["finished_at"] = now
            values["ended_by"] = by
            values["end_reason"] = (
                f"imported while {original_status}; an imported run never executes here"
            )
        with self.store.transaction() as tx:
            tx.insert_run_row(values)
            step_ids: dict[int, int] = {}
            for row in document["steps"]:
                step = {k: row.get(k) for k in _STEP_COLUMNS}
                for k in ("created_at", "updated_at"):
                    step[k] = _time(step[k], f"step.{k}") or now
                step["args"] = step["args"] or {}
                step["attempts"] = step["attempts"] or 0
                step["idempotency_key"] = str(step["idempotency_key"] or "").replace(
                    original_id, new_id, 1
                )
                step_ids[int(row["id"])] = tx.insert_step_row({**step, "run_id": new_id})
            tx.insert_event_rows(
                [
                    {
                        "run_id": new_id,
                        "iteration": int(e["iteration"]),
                        "step_id": step_ids.get(e["step_id"], e["step_id"]),
                        "kind": str(e["kind"]),
                        "message": str(e["message"]),
                        "data": e.get("data") or {},
                        "created_at": _time(e["created_at"], "event.created_at") or now,
                    }
                    for e in document["events"]
                ]
            )
            approval_rows = []
            for a in document["approvals"]:
                row = {k: a.get(k) for k in _APPROVAL_COLUMNS}
                for k in ("expires_at", "decided_at", "created_at"):
                    row[k] = _time(row[k], f"approval.{k}")
                row["created_at"] = row["created_at"] or now
                if row["status"] == "pending":
                    row["status"] = "cancelled"
                row.update(id=token_hex(16), run_id=new_id, step_id=step_ids[int(a["step_id"])])
                approval_rows.append(row)
            tx.insert_approval_rows(approval_rows)
            note = (
                f"imported by {by} from run {original_id} ({original_status}), exported "
                f"{document.get('exported_at', 'at an unknown time')}; nothing is re-executed"
            )
            tx.insert_events(
                new_id,
                int(source.get("iteration") or 0),
                [
                    NewEvent(
                        kind=EventKind.STATUS,
                        message=note,
                        data={
                            "imported_from": original_id,
                            "original_status": str(original_status),
                            "exported_at": document.get("exported_at"),
                        },
                    )
                ],
                now,
            )
        return Imported(new_id, str(status), original_id, str(original_status))


def _step_models(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: r[k] for k in Step.model_fields if k in r} for r in rows]


def export_markdown(document: dict[str, Any]) -> str:
    """An export as people read it."""
    run = document["run"]
    lines = [
        f"# Run {run['id']}: {run['task']}",
        "",
        "| | |",
        "|---|---|",
        f"| status | {run['status']} |",
        f"| planner | {run['planner']} |",
        f"| created | {run['created_at']} by {run.get('created_by') or 'anonymous'} |",
        f"| finished | {run.get('finished_at') or '—'} |",
        f"| iterations | {run['iteration']} |",
        f"| tokens, cost | {run['tokens_total']}, ${run['cost_usd']:.4f} |",
        f"| exported | {document.get('exported_at')} |",
    ]
    if run["status"] in DECISION_STATUSES:  # a person's decision, not an error
        by, why = run.get("ended_by") or "a person", run.get("end_reason") or "no reason given"
        lines += ["", f"**{str(run['status']).capitalize()} by {by}:** {why}"]
    elif run.get("error"):
        lines += ["", f"**Error:** {run['error']}"]
    lines += ["", "## Config", "", "```json", _dump(run.get("config")), "```"]
    lines += ["", "## Steps", ""]
    for s in document["steps"]:
        lines.append(
            f"{s['position']}. **{s['description']}** — `{s['tool']}` "
            f"(plan v{s['plan_version']}, {s['status']}, attempts {s['attempts']})"
        )
        if s.get("args"):
            lines.append(f"   - args: `{_dump(s['args'], indent=None)}`")
        if s.get("error"):
            lines.append(f"   - error [{s.get('error_class')}]: {s['error']}")
        if s.get("result") is not None:
            lines.append(f"   - result: `{_dump(s['result'], indent=None)[:500]}`")
    lines += ["", "## Timeline", "", "| time | iteration | kind | message |", "|---|---|---|---|"]
    for e in document["events"]:
        message = str(e["message"]).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {e['created_at']} | {e['iteration']} | {e['kind']} | {message} |")
    if document["approvals"]:
        lines += ["", "## Approvals", ""]
        for a in document["approvals"]:
            decided = (
                f"{a['decision']} by {a['decided_by']} at {a['decided_at']}"
                if a.get("decision")
                else a["status"]
            )
            comment = f" — {a['comment']}" if a.get("comment") else ""
            lines.append(f"- {a['kind']}: {a['reason']} → {decided}{comment}")
    if run.get("report"):
        lines += ["", "## Report", "", run["report"]]
    return "\n".join(lines) + "\n"


def _dump(value: Any, indent: int | None = 2) -> str:
    import json

    return json.dumps(value, indent=indent, sort_keys=True, default=str)
