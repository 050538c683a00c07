"""The offline planner: follows runbooks (TOML files), needs no network.

A runbook says which tasks it handles (`match`, a regex whose named groups
become template variables), the steps that do the task, and `[[recover]]`
rules: when a failed step's error matches a rule's `error` regex, the rule's
`insert` steps run before the failed step is retried.

Templates in descriptions and args:

    "{pr}"                  a variable: a group of `match`, or of the rule's `error`
    "{pr:int}"              the whole value becomes an integer (the group must be digits)
    "{env_defaults[name]}"  the [env_defaults] entry named by the variable `name`
    "{{" / "}}"             literal braces

Every placeholder is checked when the runbook is loaded, so a typo is a load
error naming the file, not a failed run.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, assert_never

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.engine.actions import (
    Failure,
    NoAlternative,
    PlanFinished,
    PlanInvalid,
    PlannerFatal,
    PlanOutcome,
    PlanProduced,
)
from app.engine.models import MAX_STEPS_PER_PLAN, JSONDict, PlannedStep, RunConfig
from app.planner.base import PlanCheck, PlanRequest, StepView

RUNBOOKS_DIR = Path(__file__).resolve().parent / "runbooks"
CLAUDE_HINT = "set ANTHROPIC_API_KEY to let Claude plan arbitrary tasks"

_TOKEN = re.compile(
    r"\{\{|\}\}"
    r"|\{(?P<var>[A-Za-z_]\w*)(?:\[(?P<key>[A-Za-z_]\w*)\])?(?::(?P<conv>int))?\}"
)


class RunbookError(ValueError):
    """A runbook that cannot be used; the message names the file and the problem."""


class TemplateError(ValueError):
    """A template that cannot be filled in (a missing variable or table entry)."""


# --- templates --------------------------------------------------------------------


def render(
    template: Any, variables: Mapping[str, str], tables: Mapping[str, Mapping[str, str]]
) -> Any:
    """`template` (a string, or dicts and lists of them) with its placeholders filled in.

    Raises TemplateError when a variable, a table or a table entry is missing,
    or when an `:int` value is not digits.
    """
    if isinstance(template, str):
        return _render_text(template, variables, tables)
    if isinstance(template, dict):
        return {k: render(v, variables, tables) for k, v in template.items()}
    if isinstance(template, list):
        return [render(v, variables, tables) for v in template]
    return template


def _render_text(
    text: str, variables: Mapping[str, str], tables: Mapping[str, Mapping[str, str]]
) -> str | int:
    if "{" not in text and "}" not in text:  # every token has one: nothing to fill in
        return text
    whole = _TOKEN.fullmatch(text)
    if whole is not None and whole["conv"] == "int":
        value = _lookup(whole, variables, tables)
        if not value.isdigit():
            raise TemplateError(f"{text}: {value!r} is not a whole number")
        return int(value)

    def fill(token: re.Match[str]) -> str:
        if token[0] in ("{{", "}}"):
            return token[0][0]
        return _lookup(token, variables, tables)

    return _TOKEN.sub(fill, text)


def _lookup(
    token: re.Match[str], variables: Mapping[str, str], tables: Mapping[str, Mapping[str, str]]
) -> str:
    var, key = token["var"], token["key"]
    if key is None:
        if var not in variables:
            raise TemplateError(f"no value for {{{var}}}")
        return variables[var]
    if key not in variables:
        raise TemplateError(f"no value for {{{key}}} in {token[0]}")
    table = tables.get(var, {})
    if variables[key] not in table:
        raise TemplateError(f"no [{var}] entry for {variables[key]}")
    return table[variables[key]]


def _placeholders(template: Any) -> Iterator[tuple[str, re.Match[str]]]:
    """(the string, a placeholder in it) for every placeholder in `template`."""
    if isinstance(template, str):
        for token in _TOKEN.finditer(template):
            if token["var"] is not None:
                yield template, token
    elif isinstance(template, dict):
        for value in template.values():
            yield from _placeholders(value)
    elif isinstance(template, list):
        for value in template:
            yield from _placeholders(value)


# --- runbooks ---------------------------------------------------------------------


class RunbookStep(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = Field(min_length=1, max_length=500)
    tool: str = Field(min_length=1, max_length=100)
    args: JSONDict = Field(default_factory=dict)

    def problems(self, variables: set[str], tables: set[str]) -> list[str]:
        """Placeholders that can never be filled in, given these variable and table names."""
        found = []
        for text, token in _placeholders({"description": self.description, "args": self.args}):
            var, key = token["var"], token["key"]
            if key is None and var not in variables:
                found.append(f"{self.tool}: unknown variable {{{var}}} in {text!r}")
            if key is not None and (var not in tables or key not in variables):
                found.append(f"{self.tool}: unknown table or variable in {token[0]!r}")
            if token["conv"] and token[0] != text:
                found.append(f"{self.tool}: {token[0]!r} must be the whole value, not in {text!r}")
        return found


class RecoveryRule(BaseModel):
    """When a failed step's error matches `error`, run `insert`, then retry the step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    error: re.Pattern[str]
    description: str = ""
    insert: list[RunbookStep] = Field(min_length=1)


class Runbook(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=100)
    description: str = Field(min_length=1)
    match: re.Pattern[str]
    # Tasks it handles, as people would type them: shown instead of the pattern when a
    # task matches no runbook, and each checked against `match` when it is loaded.
    examples: list[str] = Field(default_factory=list, max_length=10)
    env_defaults: dict[str, str] = Field(default_factory=dict)
    steps: list[RunbookStep] = Field(min_length=1, max_length=MAX_STEPS_PER_PLAN)
    recover: list[RecoveryRule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _templates_resolve(self) -> Runbook:
        tables = set(self.tables)
        groups = set(self.match.groupindex)
        problems = [p for step in self.steps for p in step.problems(groups, tables)]
        for rule in self.recover:
            rule_vars = groups | set(rule.error.groupindex)
            problems += [p for step in rule.insert for p in step.problems(rule_vars, tables)]
        problems += [
            f"example {example!r} does not match the pattern"
            for example in self.examples
            if self.match.search(example) is None
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def tables(self) -> dict[str, Mapping[str, str]]:
        return {"env_defaults": self.env_defaults}

    def bind(self, task: str) -> dict[str, str] | None:
        """The template variables for `task`, or None if this runbook does not handle it."""
        found = self.match.search(task)
        if found is None:
            return None
        return {k: v for k, v in found.groupdict().items() if v is not None}

    def render_steps(
        self, steps: Sequence[RunbookStep], variables: Mapping[str, str]
    ) -> list[PlannedStep]:
        """Steps with templates filled in. Raises TemplateError or pydantic's ValidationError."""
        tables = self.tables
        return [
            PlannedStep(
                description=str(render(step.description, variables, tables)),
                tool=step.tool,
                args=render(step.args, variables, tables),
            )
            for step in steps
        ]

    def about(self) -> str:
        """What the runbook is for, in words (its pattern is for machines)."""
        shown = " or ".join(f"“{example}”" for example in self.examples[:2])
        return f"{self.description} For example: {shown}" if shown else self.description

    def summary(self) -> str:
        return f"{self.name} ({self.about()})"


def load_runbooks(*directories: Path) -> list[Runbook]:
    """Every `*.toml` runbook in each of `directories`, in that order, by file name.

    Raises RunbookError naming the file for unreadable TOML, an invalid runbook,
    a directory that does not exist, or two runbooks with one name (naming both files).
    """
    runbooks: dict[str, tuple[Path, Runbook]] = {}
    for directory in directories:
        if not directory.is_dir():
            raise RunbookError(f"runbook directory {directory} does not exist")
        for path in sorted(directory.glob("*.toml")):
            runbook = _load_runbook(path)
            if runbook.name in runbooks:
                raise RunbookError(
                    f"{path}: a runbook named {runbook.name!r} already exists "
                    f"({runbooks[runbook.name][0]}); runbook names must be unique"
                )
            runbooks[runbook.name] = (path, runbook)
    return [runbook for _, runbook in runbooks.values()]


def _load_runbook(path: Path) -> Runbook:
    try:
        with path.open("rb") as file:
            return Runbook.model_validate(tomllib.load(file))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RunbookError(f"{path}: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'runbook'}: {err['msg']}"
            for err in exc.errors()
        )
        raise RunbookError(f"{path}: {problems}") from None


# --- the planner ------------------------------------------------------------------


class _NoPlan(Exception):
    """The runbook cannot help; becomes PlannerFatal (a person must act)."""


class _Rejected(Exception):
    """A person rejected a step the runbook has no way around; becomes NoAlternative
    (the run ends as they decided, not as an error)."""


class OfflinePlanner:
    """Plans, re-plans and verifies from runbooks. Deterministic; no network.

    The constructor loads the runbooks and raises RunbookError if one is broken.
    """

    name = "offline (runbook)"

    def __init__(self, runbooks_dir: Path | Sequence[Path] | None = None) -> None:
        """Runbooks from `runbooks_dir` (a directory, or several searched in order);
        the shipped ones when None."""
        if runbooks_dir is None:
            self.runbooks_dirs: tuple[Path, ...] = (RUNBOOKS_DIR,)
        elif isinstance(runbooks_dir, Path):
            self.runbooks_dirs = (runbooks_dir,)
        else:
            self.runbooks_dirs = tuple(runbooks_dir)
        self.runbooks = load_runbooks(*self.runbooks_dirs)

    @property
    def runbooks_dir(self) -> str:
        return ", ".join(str(d) for d in self.runbooks_dirs)

    def plan(self, request: PlanRequest, *, check: PlanCheck) -> PlanOutcome:
        """A plan for request.purpose; PlannerFatal when no runbook can help."""
        try:
            have = {tool.name for tool in request.tools}
            runbook, variables = self._select(request.task, request.config, have)
            outcome = self._answer(runbook, variables, request)
        except _Rejected as exc:
            return NoAlternative(reason=str(exc))
        except _NoPlan as exc:
            return PlannerFatal(error=str(exc))
        if isinstance(outcome, PlanProduced) and (problems := check(outcome.steps)):
            raw = [step.model_dump() for step in outcome.steps]
            return PlanInvalid(error="; ".join(problems), raw=raw)
        return outcome

    def task_problems(self, task: str, config: RunConfig, tools: Collection[str]) -> list[str]:
        """Why this planner could not plan `task` with `tools`, in words (empty when it
        can): checked when a run is created, so it is refused instead of failing."""
        try:
            self._select(task, config, tools)
        except _NoPlan as exc:
            return [str(exc)]
        return []

    def _select(
        self, task: str, config: RunConfig, have: Collection[str]
    ) -> tuple[Runbook, dict[str, str]]:
        """The runbook named by the run's config, else the first whose pattern matches
        and whose tools (all of them in `have`) this deployment has."""
        wanted = config.runbook
        if wanted is not None:
            runbook = next((r for r in self.runbooks if r.name == wanted), None)
            if runbook is None:
                raise _NoPlan(f"there is no runbook named {wanted!r}; {self._available()}")
            variables = runbook.bind(task)
            if variables is None:
                raise _NoPlan(f"runbook {wanted} does not handle this task: {runbook.about()}")
            if missing := _missing_tools(runbook, have):
                raise _NoPlan(_lacks(runbook, missing))
            return runbook, variables
        lacking: list[str] = []
        for runbook in self.runbooks:
            if (variables := runbook.bind(task)) is None:
                continue
            if missing := _missing_tools(runbook, have):
                lacking.append(_lacks(runbook, missing))
                continue  # another runbook may do it with the tools this deployment has
            return runbook, variables
        if lacking:
            raise _NoPlan("; ".join(lacking))
        raise _NoPlan(
            f"no runbook matches this task; {self._available()}. The offline planner only "
            f"follows runbooks: {CLAUDE_HINT}"
        )

    def _available(self) -> str:
        if not self.runbooks:
            return f"no runbooks are installed in {self.runbooks_dir}"
        return "available runbooks: " + "; ".join(r.summary() for r in self.runbooks)

    def _answer(
        self, runbook: Runbook, variables: dict[str, str], request: PlanRequest
    ) -> PlanOutcome:
        match request.purpose:
            case "initial":
                return _initial(runbook, variables)
            case "replan":
                return _replan(runbook, variables, request)
            case "verify":
                return _verify(runbook, variables, request)
            case _:
                assert_never(request.purpose)


def _render(
    runbook: Runbook, steps: Sequence[RunbookStep], variables: Mapping[str, str]
) -> list[PlannedStep]:
    try:
        return runbook.render_steps(steps, variables)
    except (TemplateError, ValidationError) as exc:
        raise _NoPlan(f"runbook {runbook.name}: {exc}") from None


def _initial(runbook: Runbook, variables: Mapping[str, str]) -> PlanProduced:
    shown = ", ".join(f"{k}={v}" for k, v in variables.items()) or "no variables"
    steps = _render(runbook, runbook.steps, variables)
    return PlanProduced(
        steps=steps,
        reasoning=f"runbook {runbook.name} matched: {shown}; following its {len(steps)} steps "
        "(offline planner)",
    )


def _replan(runbook: Runbook, variables: Mapping[str, str], request: PlanRequest) -> PlanProduced:
    """Recovery steps + the failed step again + what was still to do after it."""
    failure = request.failure
    if failure is None:
        raise _NoPlan(f"runbook {runbook.name}: asked to re-plan without a failure")
    if failure.rejection_reason:
        raise _Rejected(_no_alternative(runbook, failure, failure.rejection_reason))
    for rule in runbook.recover:
        found = rule.error.search(failure.error)
        if found is None:
            continue
        groups = {k: v for k, v in found.groupdict().items() if v is not None}
        inserted = _render(runbook, rule.insert, {**variables, **groups})
        if all(_find_done(step, _completed(request)) for step in inserted):
            # The same recovery already ran and the step still fails the same way.
            raise _NoPlan(
                _no_alternative(
                    runbook,
                    failure,
                    f"{failure.error} (even after {', '.join(s.tool for s in inserted)})",
                )
            )
        retried = PlannedStep(description=failure.description, tool=failure.tool, args=failure.args)
        rest = _still_to_do_after(request.current_plan, failure)
        return PlanProduced(
            steps=[*inserted, retried, *rest],
            reasoning=f"runbook {runbook.name}: the error matched recovery rule "
            f"/{rule.error.pattern}/; {rule.description or 'inserting its steps'} "
            f"({', '.join(s.tool for s in inserted)}), then retrying {failure.tool}",
        )
    raise _NoPlan(_no_alternative(runbook, failure, failure.error))


def _missing_tools(runbook: Runbook, have: Collection[str]) -> list[str]:
    """Tools the runbook's steps and recovery rules use that this deployment lacks."""
    used = [step.tool for step in runbook.steps]
    used += [step.tool for rule in runbook.recover for step in rule.insert]
    return sorted({tool for tool in used if tool not in have})


def _lacks(runbook: Runbook, missing: list[str]) -> str:
    return (
        f"runbook {runbook.name} matches the task but uses tools this deployment does not "
        f"have: {', '.join(missing)} (add them with AGENTLOOP_TOOL_MODULES, or a plug-in)"
    )


def _no_alternative(runbook: Runbook, failure: Failure, why: str) -> str:
    return f"runbook {runbook.name} has no alternative to {failure.tool} after: {why}"


def _still_to_do_after(plan: list[StepView], failure: Failure) -> list[PlannedStep]:
    """The pending or skipped steps after the failed one; completed steps are not redone."""
    ordered = sorted(plan, key=lambda s: s.position)
    failed_at = next(
        (
            i
            for i, s in enumerate(ordered)
            if s.status in ("failed", "rejected") and s.tool == failure.tool
        ),
        -1,
    )
    return [
        PlannedStep(description=s.description, tool=s.tool, args=s.args)
        for s in ordered[failed_at + 1 :]
        if s.status in ("pending", "skipped")
    ]


def _verify(runbook: Runbook, variables: Mapping[str, str], request: PlanRequest) -> PlanOutcome:
    """Finished when every runbook step has completed; otherwise a plan of the missing ones."""
    done = _completed(request)
    missing = []
    for step in _render(runbook, runbook.steps, variables):
        found = _find_done(step, done)
        if found is None:
            missing.append(step)
        else:
            done.remove(found)
    if missing:
        return PlanProduced(
            steps=missing,
            reasoning=f"runbook {runbook.name}: not done yet; still to do: "
            + ", ".join(s.tool for s in missing),
        )
    return PlanFinished(report=_report(runbook, request))


def _completed(request: PlanRequest) -> list[StepView]:
    """Every completed step of the run, once each, in order."""
    seen = {
        (s.plan_version, s.position): s
        for s in [*request.completed, *request.current_plan]
        if s.status == "completed"
    }
    # Positions keep increasing across plan versions, so they order the whole run.
    return sorted(seen.values(), key=lambda s: (s.position, s.plan_version))


def _find_done(step: PlannedStep, done: list[StepView]) -> StepView | None:
    """A completed step doing `step`: same tool and args, else same tool (args a person edited)."""
    exact = next((d for d in done if d.tool == step.tool and d.args == step.args), None)
    return exact or next((d for d in done if d.tool == step.tool), None)


def _report(runbook: Runbook, request: PlanRequest) -> str:
    """The report a step wrote (a result with a "report" string), else a list of what ran."""
    done = _completed(request)
    for step in reversed(done):
        if isinstance(step.result, dict) and isinstance(step.result.get("report"), str):
            return str(step.result["report"])
    lines = [f"# {request.task}", "", f"Runbook `{runbook.name}` completed these steps:", ""]
    lines += [f"{i}. {s.description} (`{s.tool}`)" for i, s in enumerate(done, 1)]
    return "\n".join([*lines, ""])
