"""Tools for the test suite, loaded by workers through AGENTLOOP_TOOL_MODULES.

They do small real things in the run's workspace so a test can see from the
outside how often a tool ran and whether its effect was applied.
"""

from __future__ import annotations

import os
import time

from pydantic import BaseModel, Field

from app.engine.models import ErrorClass
from app.tools.registry import ToolContext, ToolError, ToolResult, tool


class NoArgs(BaseModel):
    pass


class Hold(BaseModel):
    hold: float = Field(0.0, ge=0, le=60, description="seconds to wait for workspace/release")


class Failures(BaseModel):
    failures: int = Field(1, ge=0, le=10)


class DeleteArgs(BaseModel):
    path: str = Field(min_length=1, description="what to delete (nothing is deleted)")


def effects_log(ctx: ToolContext) -> str:
    return str(ctx.workspace / "effects.log")


def _append(ctx: ToolContext, line: str) -> None:
    with open(effects_log(ctx), "a") as log:
        log.write(line + "\n")


def _hold(ctx: ToolContext, seconds: float) -> None:
    """Block like a long deploy would, until the test drops workspace/release."""
    release = ctx.workspace / "release"
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not release.exists():
        time.sleep(0.05)


@tool(name="noop", description="Does nothing.", args=NoArgs, idempotent=True)
def noop(args: NoArgs, ctx: ToolContext) -> ToolResult:
    return ToolResult(result={"ok": True}, summary="nothing done")


@tool(name="effect", description="A non-idempotent side effect.", args=Hold, timeout=8)
def effect(args: Hold, ctx: ToolContext) -> ToolResult:
    _append(ctx, f"start {os.getpid()} {ctx.idempotency_key}")
    _hold(ctx, args.hold)
    _append(ctx, f"effect {ctx.idempotency_key}")
    return ToolResult(result={"applied": True}, summary="effect applied")


@tool(
    name="idem_effect",
    description="An idempotent side effect keyed by the idempotency key.",
    args=Hold,
    idempotent=True,
    timeout=8,
)
def idem_effect(args: Hold, ctx: ToolContext) -> ToolResult:
    _append(ctx, f"start {os.getpid()} {ctx.idempotency_key}")
    _hold(ctx, args.hold)
    done = f"effect {ctx.idempotency_key}"
    with open(effects_log(ctx)) as log:
        if done in log.read().splitlines():
            return ToolResult(result={"applied": False}, summary="already applied")
    _append(ctx, done)
    return ToolResult(result={"applied": True}, summary="effect applied")


@tool(
    name="flaky", description="Fails transiently `failures` times.", args=Failures, idempotent=True
)
def flaky(args: Failures, ctx: ToolContext) -> ToolResult:
    counter = ctx.workspace / "flaky.count"
    seen = int(counter.read_text()) if counter.exists() else 0
    if seen < args.failures:
        counter.write_text(str(seen + 1))
        raise ToolError(f"flaky failure {seen + 1}", ErrorClass.TRANSIENT)
    return ToolResult(result={"after_failures": seen}, summary="worked")


@tool(
    name="delete",
    description="Deletes a path (for the tests: only records that it ran). Sensitive by name: "
    "the default approval_required list guards it, the tool itself sets no flag.",
    args=DeleteArgs,
)
def delete(args: DeleteArgs, ctx: ToolContext) -> ToolResult:
    _append(ctx, f"delete {args.path} {ctx.idempotency_key}")
    return ToolResult(result={"deleted": args.path}, summary=f"deleted {args.path}")


TOOLS = [noop, effect, idem_effect, flaky, delete]
