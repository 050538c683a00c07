"""Two tools: write a note in the run's workspace, publish it to a notice board.

agentloop loads a module's `TOOLS` list: through AGENTLOOP_TOOL_MODULES=agentloop_notes.tools,
or through the `agentloop.tools` entry point in this package's pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from app.engine.models import ErrorClass
from app.tools.registry import Tool, ToolContext, ToolError, ToolResult, tool

NAME = r"^[a-z0-9][a-z0-9_-]{0,39}$"


class WriteNoteArgs(BaseModel):
    # The planner sees this model's JSON schema: describe every field, forbid extras.
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME, description="The note's name, e.g. release-42.")
    text: str = Field(min_length=1, max_length=10_000, description="The note, in markdown.")


@tool(
    name="write_note",
    description="Write a markdown note into the run's workspace (notes/NAME.md). "
    "Writing the same note again changes nothing, so it is idempotent.",
    args=WriteNoteArgs,
    idempotent=True,
    timeout=10,
)
def write_note(args: WriteNoteArgs, ctx: ToolContext) -> ToolResult:
    notes = ctx.workspace / "notes"
    notes.mkdir(parents=True, exist_ok=True)
    path = notes / f"{args.name}.md"
    path.write_text(args.text + "\n")
    return ToolResult(
        result={"path": str(path), "bytes": path.stat().st_size},
        summary=f"wrote note {args.name} ({len(args.text)} characters)",
    )


class PublishNoteArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME, description="A note written earlier with write_note.")


@tool(
    name="publish_note",
    description="Copy a note written with write_note to the notice board (the directory "
    "in the env var NOTICE_BOARD). People see it at once: it needs approval, and it is "
    "not idempotent.",
    args=PublishNoteArgs,
    requires_approval=True,
    idempotent=False,
    timeout=30,
    summarize=lambda args: f"publish note {args.get('name')} to the notice board",
)
def publish_note(args: PublishNoteArgs, ctx: ToolContext) -> ToolResult:
    note = ctx.workspace / "notes" / f"{args.name}.md"
    if not note.is_file():
        # PERMANENT (the default): retrying cannot help; the planner re-plans.
        raise ToolError(f"there is no note named {args.name}; write it first with write_note")
    board = ctx.env.get("NOTICE_BOARD")
    if not board:
        # A runbook's recovery rule can match this message and set the variable.
        raise ToolError("missing env var NOTICE_BOARD: where notes are published")
    board_dir = Path(board)
    if not board_dir.is_dir():
        # TRANSIENT and not applied: nothing was copied, so retrying is safe even
        # though the tool is not idempotent. Without not_applied=True the run would
        # pause for a person (outcome unknown).
        raise ToolError(
            f"the notice board {board} is not mounted yet",
            ErrorClass.TRANSIENT,
            not_applied=True,
        )
    published = board_dir / note.name
    shutil.copyfile(note, published)
    return ToolResult(
        result={"published": str(published)},
        summary=f"published note {args.name} to {board}",
    )


TOOLS: list[Tool] = [write_note, publish_note]
