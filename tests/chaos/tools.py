"""Counter tools and fault hooks for the chaos suite, loaded by workers through
AGENTLOOP_TOOL_MODULES=tests.chaos.tools.

Every call appends to a ledger in the run's workspace (`ledger.log`, appended
with O_APPEND and fsync'd before the tool goes on, so a SIGKILL right after
still leaves the line):

    START <key> <pid> <label>     the tool was entered
    EFFECT <key> <label>          the side effect was applied
    DEDUP <key> <label>           an idempotent call found its effect already applied
    END <key> <pid>               the tool returned or raised (not written when killed)

One-shot faults are armed by the test as files `<fault>.<run_id>` in
CHAOS_FAULTS_DIR; the first process to delete the file fires it:

    kill-before-tool   SIGKILL the pool child at tool entry (claim committed, no START)
    kill-after-tool    SIGKILL right after EFFECT, before the tool returns
    kill-at-publish    after this run's next EFFECT, SIGKILL the child in the dispatcher,
                       between the commit of the outcome and the publish of the next step
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
from pathlib import Path

from pydantic import BaseModel, Field

from app.tools.registry import ToolContext, ToolResult, tool

LEDGER = "ledger.log"


class CountArgs(BaseModel):
    label: str = Field("effect", min_length=1, max_length=60, pattern=r"^[A-Za-z0-9_.-]+$")
    hold_ms: int = Field(0, ge=0, le=120_000, description="hold before the effect")
    hold_first_only: bool = Field(False, description="hold only on the key's first start")


def faults_dir() -> Path | None:
    folder = os.environ.get("CHAOS_FAULTS_DIR")
    return Path(folder) if folder else None


def fire(fault: str, run_id: str) -> bool:
    """Whether a one-shot fault armed for this run fires here (consumes it)."""
    folder = faults_dir()
    if folder is None:
        return False
    try:
        (folder / f"{fault}.{run_id}").unlink()
    except FileNotFoundError:
        return False
    return True


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def append(workspace: Path, line: str) -> None:
    """Append one line durably; the lock makes a read-check-append atomic."""
    fd = os.open(workspace / LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(workspace: Path):  # type: ignore[no-untyped-def]
    with open(workspace / ".ledger.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_ledger(workspace: Path) -> list[list[str]]:
    path = workspace / LEDGER
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def _hold(ctx: ToolContext, args: CountArgs, earlier_starts: int) -> None:
    if args.hold_ms <= 0 or (args.hold_first_only and earlier_starts > 0):
        return
    release = ctx.workspace / "release"
    deadline = time.monotonic() + args.hold_ms / 1000
    while time.monotonic() < deadline and not release.exists():
        time.sleep(0.02)


def _count(args: CountArgs, ctx: ToolContext, *, idempotent: bool) -> ToolResult:
    key, pid = ctx.idempotency_key, os.getpid()
    if fire("kill-before-tool", ctx.run_id):
        die()
    earlier = sum(1 for e in read_ledger(ctx.workspace) if e[:2] == ["START", key])
    append(ctx.workspace, f"START {key} {pid} {args.label}")
    try:
        _hold(ctx, args, earlier)
        with locked(ctx.workspace):
            applied = any(e[:2] == ["EFFECT", key] for e in read_ledger(ctx.workspace))
            if idempotent and applied:
                append(ctx.workspace, f"DEDUP {key} {args.label}")
            else:
                append(ctx.workspace, f"EFFECT {key} {args.label}")
        if fire("kill-after-tool", ctx.run_id):
            die()
        if fire("kill-at-publish-armed", ctx.run_id) and (folder := faults_dir()):
            (folder / f"kill-at-publish.{ctx.run_id}").touch()
    finally:
        append(ctx.workspace, f"END {key} {pid}")
    return ToolResult(result={"label": args.label, "pid": pid}, summary=f"counted {args.label}")


def _variant(name: str, *, idempotent: bool, timeout: float, approval: bool = False):  # type: ignore[no-untyped-def]
    kind = "idempotent" if idempotent else "non-idempotent"

    def fn(args: CountArgs, ctx: ToolContext) -> ToolResult:
        return _count(args, ctx, idempotent=idempotent)

    return tool(
        name=name,
        description=f"A {kind} counter effect (timeout {timeout:g} s).",
        args=CountArgs,
        idempotent=idempotent,
        timeout=timeout,
        requires_approval=approval,
    )(fn)


# Short timeouts keep the lease (timeout + grace) short, so a killed worker's step
# is recovered within seconds; `_slow` ones outlast a broker or database outage;
# `_short` ones are made to overrun.
TOOLS = [
    _variant("count", idempotent=False, timeout=2.5),
    _variant("idem_count", idempotent=True, timeout=2.5),
    _variant("count_slow", idempotent=False, timeout=25),
    _variant("idem_count_slow", idempotent=True, timeout=25),
    _variant("count_short", idempotent=False, timeout=1),
    _variant("idem_count_short", idempotent=True, timeout=1),
    _variant("guarded_count", idempotent=False, timeout=4, approval=True),
]


def _install_publish_fault() -> None:
    """In a worker: SIGKILL the child between the commit of an outcome and the
    publish of the next iteration, when `kill-at-publish.<run>` is armed."""
    import tasks

    dispatcher = tasks.CeleryDispatcher
    original = dispatcher.enqueue
    if getattr(original, "_chaos", False):
        return

    def enqueue(self: object, run_id: str, tick: int, delay: float, kind: object) -> None:
        if fire("kill-at-publish", run_id):
            die()
        original(self, run_id, tick, delay, kind)  # type: ignore[arg-type]

    enqueue._chaos = True  # type: ignore[attr-defined]
    dispatcher.enqueue = enqueue  # type: ignore[method-assign]


if faults_dir() is not None:  # only in the chaos suite's workers
    _install_publish_fault()
