"""The run's memory as people read it in a terminal: one line per event."""

from __future__ import annotations

from app.engine.models import Step
from app.store.records import EventRecord, RunRecord

STYLE = {
    "plan": ("PLAN", "\033[1;35m"),
    "decision": ("DECIDE", "\033[35m"),
    "tool_call": ("CALL", "\033[36m"),
    "observation": ("OBSERVE", "\033[32m"),
    "error": ("ERROR", "\033[1;31m"),
    "retry": ("RETRY", "\033[33m"),
    "approval": ("HUMAN", "\033[1;33m"),
    "llm_call": ("LLM", "\033[34m"),
    "status": ("STATUS", "\033[1m"),
}
RESET = "\033[0m"


def format_event(event: EventRecord, *, color: bool = False) -> str:
    label, ansi = STYLE.get(event.kind, (event.kind.upper(), ""))
    stamp = event.created_at.strftime("%H:%M:%S.%f")[:-3]
    text = f"{stamp}  #{event.iteration:<3} {label:<8} {event.message}"
    return f"{ansi}{text}{RESET}" if color and ansi else text


def format_step(step: Step) -> str:
    line = (
        f"  {step.position:>2}. [{step.status:<9}] {step.description} "
        f"({step.tool}, plan v{step.plan_version}, attempts {step.attempts})"
    )
    return line + (f"\n      error: {step.error}" if step.error else "")


def format_run_header(run: RunRecord) -> str:
    cost = f"${run.cost_usd:.4f}, {run.tokens_total} tokens" if run.tokens_total else "no LLM cost"
    lines = [
        f"run {run.id}  [{run.status}]  planner: {run.planner}  iteration {run.iteration}",
        f"task: {run.task}",
        f"created {run.created_at:%Y-%m-%d %H:%M:%S} UTC, {cost}",
    ]
    if run.error:
        lines.append(f"error: {run.error}")
    return "\n".join(lines)
