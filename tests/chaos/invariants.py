"""A chaos case: the runs it created, a person who answers pauses, and the
invariants checked after the fault.

The six promises (issue 8), checked from the outside (the private database and
the counter tools' ledgers), never from what a worker says about itself:

  a  no effect twice: per idempotency key (and per logical step) at most one
     EFFECT; a non-idempotent tool starts at most once per key, plus once per
     `retry` a person decided
  b  no guarded step ran without an approval a person decided
  c  every run terminal or explicitly paused within a bounded time
  d  no run lost: every created run exists and ends terminal or paused
  e  the timeline is consistent with itself and with the ledger
  f  the workers serve a new run afterwards

Cases may also expect more, reported under their own letters:

  g  healthy: every run completed and no person was asked about an outcome
     (for faults the system promises to absorb: broker and database blips, ...)
  h  no tool was interrupted: every START has its END (no worker was killed)
  p  every request a person made was answered with success or a refusal
     (Conflict, InvalidInput, NotFound), never an internal error
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import bindparam, create_engine, text
from sqlalchemy.engine import Engine

from app.engine.models import Decision
from tests.chaos.tools import read_ledger
from tests.support.private_services import ChaosEnv

PERSON = "chaos-person"
NON_IDEMPOTENT = {"count", "count_slow", "count_short", "guarded_count"}
GUARDED = {"guarded_count"}
TERMINAL = {"completed", "failed", "rejected", "cancelled"}
REFUSALS = {"Conflict", "InvalidInput", "NotFound", "ServiceError"}
INVARIANTS = "abcdefghp"
REPORT = Path(
    os.environ.get("CHAOS_REPORT") or Path(tempfile.gettempdir()) / f"chaos-{os.getpid()}.json"
)
SUMMARIES: list[dict[str, Any]] = []  # every case of this session, for the terminal summary


def trials() -> int:
    return max(1, int(os.environ.get("CHAOS_TRIALS", "1")))


@dataclass
class Case:
    name: str
    env: ChaosEnv
    service: Any
    runs: list[str] = field(default_factory=list)
    decisions: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    faults: Counter[str] = field(default_factory=Counter)
    violations: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    started: float = field(default_factory=time.monotonic)
    settle_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.engine: Engine = create_engine(self.env.database_url, pool_pre_ping=True)

    # --- driving ---------------------------------------------------------------------

    def create(self, task: str, **config: Any) -> str:
        run_id: str = self.service.create_run(task, config=config or None, created_by="chaos")
        self.runs.append(run_id)
        return run_id

    def fault(self, what: str, n: int = 1) -> None:
        self.faults[what] += n

    def violate(self, invariant: str, evidence: str) -> None:
        self.violations[invariant].append(evidence)

    def ledger(self, run_id: str) -> list[list[str]]:
        return read_ledger(self.env.workspace(run_id))

    def wait_for_start(self, run_id: str, *, timeout: float = 60) -> int:
        """The pid of the process that started the run's first tool call."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.ledger(run_id):
                if entry[0] == "START":
                    return int(entry[2])
            time.sleep(0.02)
        pytest.fail(f"{self.name}: run {run_id} never started its tool within {timeout:g} s")

    def query(self, sql: str, **params: Any) -> list[Any]:
        """Rows for this case's runs (`:ids`); retried while the database is away."""
        stmt = text(sql).bindparams(bindparam("ids", expanding=True))
        deadline = time.monotonic() + 60
        while True:
            try:
                with self.engine.connect() as conn:
                    return list(conn.execute(stmt, {"ids": self.runs or [""], **params}))
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def statuses(self) -> dict[str, str]:
        return {r.id: r.status for r in self.query("SELECT id, status FROM runs WHERE id IN :ids")}

    def settle(self, *, timeout: float, person: bool = True, max_decisions: int = 4) -> None:
        """Wait until every run is terminal or paused (c); a person answers each pause
        on the way (approve; for an unknown outcome: mark done if the ledger shows the
        effect, else retry), at most `max_decisions` times per run."""
        begin = time.monotonic()
        deadline = begin + timeout
        while True:
            status = self.statuses()
            open_runs = [r for r in self.runs if status.get(r) not in TERMINAL]
            waiting = [r for r in open_runs if status.get(r) == "paused"]
            if person:
                for run_id in waiting:
                    if len(self.decisions[run_id]) < max_decisions:
                        self.person(run_id)
            answered = all(
                status.get(r) == "paused"
                and (not person or len(self.decisions[r]) >= max_decisions)
                for r in open_runs
            )
            if not open_runs or (answered and self._still_paused(open_runs)):
                break
            if time.monotonic() > deadline:
                stuck = Counter(status.get(r, "missing") for r in open_runs)
                self.violate(
                    "c",
                    f"{len(open_runs)} run(s) neither terminal nor paused after {timeout:g} s "
                    f"({dict(stuck)}): " + "; ".join(self.describe(r) for r in open_runs[:3]),
                )
                break
            time.sleep(0.25)
        self.settle_seconds += time.monotonic() - begin

    def _still_paused(self, run_ids: list[str]) -> bool:
        status = self.statuses()
        return all(status.get(r) == "paused" for r in run_ids)

    def person(self, run_id: str) -> None:
        from app.engine.models import Decision

        rows = self.query(
            "SELECT a.id, a.kind, s.idempotency_key FROM approvals a JOIN steps s "
            "ON s.id = a.step_id WHERE a.run_id IN :ids AND a.run_id = :run "
            "AND a.status = 'pending'",
            run=run_id,
        )
        if not rows:
            return
        approval = rows[0]
        if approval.kind == "approval":
            decision = Decision.APPROVE
        else:
            applied = any(
                e[:2] == ["EFFECT", approval.idempotency_key] for e in self.ledger(run_id)
            )
            decision = Decision.MARK_DONE if applied else Decision.RETRY
        if self.answer(
            "decide",
            lambda: self.service.decide(
                run_id,
                decision,
                by=PERSON,
                comment="checked the ledger",
                approval_id=approval.id,
            ),
        ):
            self.decisions[run_id].append(f"{approval.kind}:{decision}")

    def answer(self, what: str, request: Any) -> bool:
        """Make a person's request; a refusal is an answer, anything else violates (p)."""
        try:
            request()
        except Exception as exc:
            if type(exc).__name__ not in REFUSALS:
                self.violate("p", f"{what} answered {type(exc).__name__}: {exc}"[:400])
            return False
        return True

    def describe(self, run_id: str) -> str:
        rows = self.query(
            "SELECT kind, message FROM events WHERE run_id IN :ids AND run_id = :run "
            "ORDER BY id DESC LIMIT 3",
            run=run_id,
        )
        status = self.statuses().get(run_id, "missing")
        last = " | ".join(f"{r.kind}: {r.message[:160]}" for r in reversed(rows))
        return f"run {run_id} {status}, last events: {last}"

    # --- checking --------------------------------------------------------------------

    def check(
        self,
        *,
        healthy: bool = False,
        uninterrupted: bool = False,
        served_by: bool = True,
        database_crashed: bool = False,
    ) -> dict[str, Any]:
        """Check the invariants, report the counts, fail the test on any violation.

        `database_crashed`: the case crashed PostgreSQL. A step that may run twice
        (idempotent) is marked running with an asynchronous commit, which such a crash
        may lose: its tool then runs again with one tool_call event for two starts (a
        deliberate trade, saving a disk flush per iteration). A non-idempotent step's
        mark waits for the disk and stays checked."""
        data = self._load()
        self._no_run_lost(data)
        self._no_effect_twice(data)
        self._no_unapproved_guarded_step(data)
        self._timeline_consistent(data, lost_marks_allowed=database_crashed)
        if healthy:
            self._healthy(data)
        if uninterrupted:
            self._uninterrupted(data)
        if served_by:
            self._serves_a_new_run()
        summary = self._summary(data)
        self._report(summary)
        if self.violations:
            lines = [f"chaos case {self.name} broke {len(self.violations)} invariant(s):"]
            for letter in sorted(self.violations):
                found = self.violations[letter]
                lines.append(f"  ({letter}) {len(found)} violation(s), e.g.:")
                lines += [f"      - {v}" for v in found[:4]]
            pytest.fail("\n".join(lines), pytrace=False)
        return summary

    def _load(self) -> dict[str, Any]:
        runs = {r.id: r for r in self.query("SELECT * FROM runs WHERE id IN :ids")}
        steps = self.query("SELECT * FROM steps WHERE run_id IN :ids ORDER BY id")
        events = self.query("SELECT * FROM events WHERE run_id IN :ids ORDER BY id")
        approvals = self.query("SELECT * FROM approvals WHERE run_id IN :ids ORDER BY created_at")
        by_step: dict[int, list[Any]] = defaultdict(list)
        for e in events:
            if e.step_id is not None:
                by_step[e.step_id].append(e)
        return {
            "runs": runs,
            "steps": steps,
            "events": events,
            "events_by_step": by_step,
            "approvals": approvals,
            "ledgers": {r: self.ledger(r) for r in self.runs},
        }

    def _no_run_lost(self, data: dict[str, Any]) -> None:  # (d)
        pending = Counter(a.run_id for a in data["approvals"] if a.status == "pending")
        for run_id in self.runs:
            row = data["runs"].get(run_id)
            if row is None:
                self.violate("d", f"run {run_id} was created but does not exist")
            elif row.status not in TERMINAL | {"paused"}:
                self.violate("d", f"run {run_id} ended {row.status}: {self.describe(run_id)}")
            elif row.status == "paused" and pending[run_id] != 1:
                self.violate(
                    "d", f"run {run_id} is paused with {pending[run_id]} pending approvals"
                )

    def _retries_by_step(self, data: dict[str, Any]) -> Counter[int]:
        return Counter(
            a.step_id
            for a in data["approvals"]
            if a.decision == Decision.RETRY and a.decided_by == PERSON
        )

    def _no_effect_twice(self, data: dict[str, Any]) -> None:  # (a)
        retries = self._retries_by_step(data)
        step_of = {s.idempotency_key: s for s in data["steps"]}
        for run_id, ledger in data["ledgers"].items():
            effects = Counter(e[1] for e in ledger if e[0] == "EFFECT")
            keys_by_label: dict[str, set[str]] = defaultdict(set)
            for e in ledger:
                if e[0] == "EFFECT":
                    keys_by_label[e[2]].add(e[1])
            starts = Counter(e[1] for e in ledger if e[0] == "START")
            for key, n in effects.items():
                if n > 1:
                    self.violate("a", f"run {run_id}: key {key} took effect {n} times")
            for label, keys in keys_by_label.items():
                if len(keys) > 1:
                    self.violate(
                        "a", f"run {run_id}: step {label!r} took effect under {len(keys)} keys"
                    )
            for key, n in starts.items():
                step = step_of.get(key)
                if step is None:
                    self.violate("a", f"run {run_id}: a tool started with unknown key {key}")
                    continue
                allowed = 1 + retries[step.id]
                if step.tool in NON_IDEMPOTENT and n > allowed:
                    events = data["events_by_step"][step.id]
                    trail = " | ".join(e.message[:120] for e in events[:6])
                    self.violate(
                        "a",
                        f"run {run_id}: non-idempotent {step.tool} (key {key}) started {n} times, "
                        f"{allowed} allowed ({retries[step.id]} retry decided by a person); "
                        f"events: {trail}",
                    )

    def _no_unapproved_guarded_step(self, data: dict[str, Any]) -> None:  # (b)
        approved: dict[int, Any] = {}
        for a in data["approvals"]:
            if a.decision == Decision.APPROVE and a.decided_by == PERSON:
                approved[a.step_id] = a
        started_keys = {
            e[1] for ledger in data["ledgers"].values() for e in ledger if e[0] == "START"
        }
        for step in data["steps"]:
            run = data["runs"].get(step.run_id)
            config = run.config if run is not None else {}
            guarded = step.tool in GUARDED or step.tool in (config.get("approval_required") or ())
            if not guarded:
                continue
            events = data["events_by_step"][step.id]
            calls = [e for e in events if e.kind == "tool_call"]
            if not calls and step.idempotency_key not in started_keys:
                continue
            carried = any("approval carried over" in e.message for e in events)
            decision = next(
                (
                    e
                    for e in events
                    if e.kind == "approval" and (e.data or {}).get("decision") == "approve"
                    and (e.data or {}).get("by") == PERSON
                ),
                None,
            )  # fmt: skip
            if step.id not in approved and not carried:
                self.violate(
                    "b",
                    f"run {step.run_id}: guarded step {step.position} ({step.tool}) ran "
                    f"({len(calls)} call(s)) without a person's approval",
                )
            elif calls and decision is not None and calls[0].id < decision.id:
                self.violate(
                    "b",
                    f"run {step.run_id}: guarded step {step.position} was called (event "
                    f"{calls[0].id}) before it was approved (event {decision.id})",
                )

    def _timeline_consistent(
        self, data: dict[str, Any], *, lost_marks_allowed: bool
    ) -> None:  # (e)
        ids = [e.id for e in data["events"]]
        if ids != sorted(set(ids)):
            self.violate("e", "event ids are not strictly increasing")
        starts = Counter(
            e[1] for ledger in data["ledgers"].values() for e in ledger if e[0] == "START"
        )
        effects = {e[1] for ledger in data["ledgers"].values() for e in ledger if e[0] == "EFFECT"}
        plan_of = {r.id: r.plan_version for r in data["runs"].values()}
        for step in data["steps"]:
            run = data["runs"].get(step.run_id)
            events = data["events_by_step"][step.id]
            where = f"run {step.run_id} step {step.position} ({step.tool}, {step.status})"
            calls = [e for e in events if e.kind == "tool_call"]
            attempts = [(e.data or {}).get("attempt") for e in calls]
            if len(calls) != step.attempts or attempts != list(range(1, len(calls) + 1)):
                self.violate(
                    "e", f"{where}: {step.attempts} attempt(s) but tool_call attempts {attempts}"
                )
            lost_mark = lost_marks_allowed and step.tool not in NON_IDEMPOTENT
            if starts[step.idempotency_key] > len(calls) and not lost_mark:
                self.violate(
                    "e",
                    f"{where}: the tool started {starts[step.idempotency_key]} times, "
                    f"{len(calls)} tool_call event(s)",
                )
            decided = {
                (e.data or {}).get("decision")
                for e in events
                if e.kind == "approval" and (e.data or {}).get("decision")
            }
            messages = [e.message for e in events]
            if step.status == "completed":
                observed = any(e.kind == "observation" and "succeeded" in e.message for e in events)
                if not observed and "mark_done" not in decided:
                    self.violate("e", f"{where}: completed with no success event nor mark_done")
                if observed and step.idempotency_key not in effects:
                    self.violate("e", f"{where}: reported success but the ledger has no EFFECT")
            elif step.status == "failed":
                if not any(e.kind in ("error", "approval") for e in events):
                    self.violate("e", f"{where}: failed with no error event; events: {messages}")
            elif step.status == "skipped" and "skip" not in decided:
                self.violate("e", f"{where}: skipped with no skip decision")
            elif step.status == "rejected" and "reject" not in decided:
                self.violate("e", f"{where}: rejected with no reject decision")
            elif (
                step.status == "running"
                and run is not None
                and run.status not in ("queued", "running", "cancelled")
            ):
                self.violate("e", f"{where}: still running in a {run.status} run")
            if (
                run is not None
                and run.status == "completed"
                and step.plan_version == plan_of[step.run_id]
                and step.status not in ("completed", "skipped")
            ):
                self.violate("e", f"{where}: the run completed with this step {step.status}")
        closing = {
            "completed": "run completed",
            "cancelled": "run cancelled",
            "rejected": "run rejected",
            "failed": "",
        }
        by_run: dict[str, list[str]] = defaultdict(list)
        for e in data["events"]:
            by_run[e.run_id].append(e.message)
        pending = Counter(a.run_id for a in data["approvals"] if a.status == "pending")
        for run in data["runs"].values():
            if run.status in closing and not any(closing[run.status] in m for m in by_run[run.id]):
                self.violate("e", f"run {run.id} is {run.status} with no event saying so")
            if run.status == "failed" and not (run.error or "").strip():
                self.violate("e", f"run {run.id} failed with no recorded error")
            if run.status != "paused" and pending[run.id]:
                self.violate("e", f"run {run.id} is {run.status} with a pending approval")

    def _healthy(self, data: dict[str, Any]) -> None:  # (g)
        for run in data["runs"].values():
            if run.status != "completed":
                self.violate("g", f"run {run.id} ended {run.status}: {run.error or ''}"[:400])
        asked = [a for a in data["approvals"] if a.kind != "approval"]
        for a in asked:
            applied = any(
                e[0] == "EFFECT" and e[1] == s.idempotency_key
                for s in data["steps"]
                if s.id == a.step_id
                for e in data["ledgers"].get(a.run_id, [])
            )
            self.violate(
                "g",
                f"run {a.run_id}: a person was asked about an unknown outcome "
                f"(effect {'applied' if applied else 'not applied'}): {a.reason[:200]}",
            )

    def _uninterrupted(self, data: dict[str, Any]) -> None:  # (h)
        for run_id, ledger in data["ledgers"].items():
            open_calls: Counter[tuple[str, str]] = Counter()
            for e in ledger:
                if e[0] == "START":
                    open_calls[(e[1], e[2])] += 1
                elif e[0] == "END":
                    open_calls[(e[1], e[2])] -= 1
            for (key, pid), n in open_calls.items():
                if n > 0:
                    self.violate("h", f"run {run_id}: the tool call {key} in pid {pid} never ended")

    def _serves_a_new_run(self) -> None:  # (f)
        begin = time.monotonic()
        try:
            run_id = self.service.create_run("chaos one idem_count holding 0ms", created_by="chaos")
        except Exception as exc:
            self.violate("f", f"creating a new run raised {type(exc).__name__}: {exc}")
            return
        while time.monotonic() - begin < 90:
            with self.engine.connect() as conn:
                row = conn.execute(
                    text("SELECT status, error FROM runs WHERE id = :id"), {"id": run_id}
                ).first()
            if row is not None and row.status in TERMINAL:
                if row.status != "completed":
                    self.violate("f", f"the new run {run_id} ended {row.status}: {row.error}")
                return
            time.sleep(0.1)
        self.violate("f", f"the new run {run_id} was not served within 90 s")

    # --- reporting -------------------------------------------------------------------

    def _summary(self, data: dict[str, Any]) -> dict[str, Any]:
        ledger = [e for lines in data["ledgers"].values() for e in lines]
        kinds = Counter(e[0] for e in ledger)
        pauses = Counter(a.kind for a in data["approvals"])
        return {
            "case": self.name,
            "result": "FAIL" if self.violations else "PASS",
            "trials": trials(),
            "runs": len(self.runs),
            "status": dict(Counter(r.status for r in data["runs"].values())),
            "starts": kinds["START"],
            "effects": kinds["EFFECT"],
            "dedups": kinds["DEDUP"],
            "tool_calls": sum(1 for e in data["events"] if e.kind == "tool_call"),
            "events": len(data["events"]),
            "pauses": dict(pauses),
            "decisions": dict(Counter(d for ds in self.decisions.values() for d in ds)),
            "faults": dict(self.faults),
            "violations": {k: len(v) for k, v in sorted(self.violations.items())},
            "evidence": {k: v[:5] for k, v in sorted(self.violations.items())},
            "settle_s": round(self.settle_seconds, 1),
            "seconds": round(time.monotonic() - self.started, 1),
        }

    def _report(self, summary: dict[str, Any]) -> None:
        SUMMARIES.append(summary)
        print(one_line(summary))
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        REPORT.write_text(json.dumps(SUMMARIES, indent=2, default=str))  # this session's

    def close(self) -> None:
        self.engine.dispose()


def one_line(s: dict[str, Any]) -> str:
    broken = " ".join(f"{k}:{v}" for k, v in s["violations"].items()) or "-"
    return (
        f"CHAOS {s['result']} {s['case']}: runs={s['runs']} {s['status']} "
        f"starts={s['starts']} effects={s['effects']} dedups={s['dedups']} "
        f"tool_calls={s['tool_calls']} pauses={s['pauses']} decisions={s['decisions']} "
        f"faults={s['faults']} broken=[{broken}] {s['seconds']}s"
    )


def all_terminal(case: Case, run_ids: Iterable[str]) -> bool:
    status = case.statuses()
    return all(status.get(r) in TERMINAL for r in run_ids)
