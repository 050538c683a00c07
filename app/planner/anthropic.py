"""Claude as the planner, through the official `anthropic` SDK.

Planning is tool use. The registered tools are described to the model as tool
definitions it may only use inside a plan, and the plan comes back as a forced
call of `submit_plan` (to verify: `finish`). Its input is validated with
pydantic, then its step references (refs.py), then each step's tool and args
against the registry (`check`). An answer that fails any of these goes back to
the model as an `is_error` tool_result, up to config.max_plan_repairs times in
one plan() call; past that the outcome is PlanInvalid with the last answer.

Verification uses one forced tool, `finish`, whose input is discriminated by
`done`: {"done": true, "report": ...} or {"done": false, "steps": [...]}. One
tool rather than tool_choice "any" over two: a forced tool is called exactly
once, with one schema to validate and one repair path, and pydantic's
discriminated union says precisely what is missing ("report: Field required").

The SDK never retries or sleeps here (max_retries=0): a rate limit, overload,
5xx or timeout becomes PlannerUnavailable with the server's retry-after, and
the loop's own countdown does the waiting. What a person must fix (the key,
the model, the request) becomes PlannerFatal with a message saying what to fix.

API version notes (anthropic SDK 2.x sends anthropic-version 2026-10-21):
- No `temperature`: that API version rejects sampling parameters with a 400
  even at their defaults (and the SDK's create() no longer takes them), so the
  run config has no temperature option.
- Some models reject forced tool_choice (Claude Sonnet 5.5 does). For those,
  and for any model whose 400 says so, the request falls back to
  tool_choice "auto"; the prompt and the repair loop still insist on the
  answer tool.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import anthropic
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from app.engine.actions import (
    LlmUsage,
    NoAlternative,
    PlanFinished,
    PlanInvalid,
    PlannerFatal,
    PlannerUnavailable,
    PlanOutcome,
    PlanProduced,
)
from app.engine.models import PlannedStep, PlanSteps
from app.engine.redact import redact
from app.planner.base import PlanCheck, PlanRequest
from app.planner.pricing import MTOK, cost_usd, price_for
from app.planner.prompt import (
    ANSWER_TOOLS,
    FINISH,
    SUBMIT_PLAN,
    completed_positions,
    next_position,
    system_blocks,
    tool_definitions,
    user_prompt,
)
from app.planner.refs import check_refs

# Models known to answer a forced tool_choice with a 400 (checked by name prefix).
NO_FORCED_TOOL_CHOICE = ("claude-sonnet-5-5",)
# Status codes worth another try later, as the SDK's own retry policy has them.
TRANSIENT_STATUS = frozenset({408, 409, 429})
REPORT_CHARS = 100_000

Problems = list[str]


# --- what the answer tools must contain ----------------------------------------------


class SubmitPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reasoning: str = Field("", max_length=2000)
    steps: PlanSteps


class SubmitNoAlternative(BaseModel):
    """No plan: nothing without the step a person rejected can do the task."""

    model_config = ConfigDict(extra="forbid")

    reasoning: str = Field("", max_length=2000)
    no_alternative: str = Field(min_length=1, max_length=2000)


class FinishDone(BaseModel):
    model_config = ConfigDict(extra="forbid")

    done: Literal[True]
    report: str = Field(min_length=1, max_length=REPORT_CHARS)
    reasoning: str = Field("", max_length=2000)
    steps: list[Any] = Field(default_factory=list)

    @field_validator("steps")
    @classmethod
    def _no_steps(cls, steps: list[Any]) -> list[Any]:
        if steps:
            raise ValueError("must be empty when done is true (set done to false to add steps)")
        return steps


class FinishMore(BaseModel):
    model_config = ConfigDict(extra="forbid")

    done: Literal[False]
    steps: PlanSteps
    reasoning: str = Field("", max_length=2000)
    report: str = ""


FINISH_INPUT: TypeAdapter[FinishDone | FinishMore] = TypeAdapter(
    Annotated[FinishDone | FinishMore, Field(discriminator="done")]
)


# --- the planner --------------------------------------------------------------------


class AnthropicPlanner:
    """Plans, re-plans and verifies with Claude. Construction opens no connection."""

    name = "claude (anthropic)"

    def __init__(
        self, *, api_key: str, base_url: str | None = None, timeout: float = 120.0
    ) -> None:
        # max_retries=0: the SDK would otherwise sleep in the worker between retries;
        # the loop's Celery countdown does the waiting instead.
        self._client = anthropic.Anthropic(
            api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout
        )
        self._timeout = timeout
        # Models that answered a forced tool_choice with a 400 during this process.
        self._auto_choice: set[str] = set()

    def close(self) -> None:
        self._client.close()

    def plan(self, request: PlanRequest, *, check: PlanCheck) -> PlanOutcome:
        """One plan, re-plan or verification, with up to max_plan_repairs repairs.

        Whatever the API answers ends as one of the PlanOutcome types, with the
        usage of every answer that said (or let us estimate) what it cost.
        """
        if clash := sorted(set(ANSWER_TOOLS) & {t.name for t in request.tools}):
            return PlannerFatal(
                error=f"a registered tool is named {clash[0]!r}, which the planner uses "
                "for its answers: rename the tool"
            )
        chat = _Conversation.open(request, auto_choice=self._forced_unsupported(request))
        usage: list[LlmUsage] = []
        last: _Answer | None = None
        problems: Problems = []
        for repair in range(request.config.max_plan_repairs + 1):
            if last is not None:
                chat.add_repair(last, problems)
            max_tokens, exhausted = _max_tokens(request, usage)
            if exhausted is not None:
                return PlannerFatal(error=exhausted, usage=usage)
            chat.max_tokens = max_tokens
            purpose = _purpose(request, repair)
            try:
                reply, size = self._send(chat)
            except anthropic.APIError as exc:
                return _api_failure(exc, request, timeout=self._timeout, usage=usage)
            try:
                last = _read_answer(reply, model=chat.model, request_bytes=size, purpose=purpose)
            except _Unreadable as exc:
                if exc.usage is not None:
                    usage.append(exc.usage)
                return PlannerUnavailable(
                    error=f"unexpected answer from the Anthropic API {exc}", usage=usage
                )
            usage.append(last.usage)
            verdict = _judge(last, request, check, expected=chat.answer_tool, max_tokens=max_tokens)
            if not isinstance(verdict, list):
                return verdict.model_copy(update={"usage": usage})
            problems = verdict
        return PlanInvalid(
            error=_clean_text(
                f"no valid plan after {len(usage)} answer(s): " + "; ".join(problems)
            ),
            raw=_raw(last),
            usage=usage,
        )

    def _forced_unsupported(self, request: PlanRequest) -> bool:
        model = request.config.model
        return model in self._auto_choice or model.startswith(NO_FORCED_TOOL_CHOICE)

    def _send(self, chat: _Conversation) -> tuple[_Reply, int]:
        """One API call; on a 400 refusing forced tool_choice, once more with "auto"."""
        try:
            return self._create(chat.body())
        except anthropic.BadRequestError as exc:
            if chat.auto_choice or not _rejects_forced_choice(exc):
                raise
            self._auto_choice.add(chat.model)
            chat.auto_choice = True
            return self._create(chat.body())

    def _create(self, body: dict[str, Any]) -> tuple[_Reply, int]:
        # The raw response: an answer is read here (_read_answer), never trusted to have
        # the shape the SDK's Message type promises.
        response = self._client.messages.with_raw_response.create(**body)
        http = response.http_response
        reply = _Reply(
            status=http.status_code,
            content_type=http.headers.get("content-type", ""),
            body=http.content,
        )
        return reply, request_size(body)


def request_size(body: Mapping[str, Any]) -> int:
    """Bytes of the JSON body, encoded the way the SDK sends it (compact, UTF-8)."""
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return len(text.encode())


def _purpose(request: PlanRequest, repair: int) -> str:
    return request.purpose if repair == 0 else f"{request.purpose} (repair {repair})"


# --- budgets --------------------------------------------------------------------------


def _max_tokens(request: PlanRequest, usage: list[LlmUsage]) -> tuple[int, str | None]:
    """The next call's max_tokens: the config's, capped to what the run's budgets have
    left after this plan()'s earlier calls; or why no call may be made at all."""
    cap = request.config.max_tokens
    if request.tokens_left is not None:
        tokens = request.tokens_left - sum(u.total_tokens for u in usage)
        if tokens < 1:
            return 0, _exhausted(f"{max(tokens, 0)} tokens left", usage)
        cap = min(cap, tokens)
    if request.usd_left is not None and not math.isnan(request.usd_left):
        dollars = request.usd_left - sum(u.cost_usd for u in usage)
        # The dearest output rate the model has, so the cap never pays for less than it says.
        price = price_for(request.config.model)
        rate = max(price.rates.output, price.long.output if price.long else 0.0)
        affordable = dollars * MTOK / rate if rate > 0 else math.inf
        if affordable < 1:
            return 0, _exhausted(f"${max(dollars, 0.0):.6f} left", usage)
        if math.isfinite(affordable):
            cap = min(cap, math.floor(affordable + 1e-6))
    return cap, None


def _exhausted(left: str, usage: list[LlmUsage]) -> str:
    spent = f" after {len(usage)} call(s) of this plan" if usage else ""
    return (
        f"the run's budget is exhausted{spent} ({left}, not enough for one more planner "
        "call): raise budget_tokens or budget_usd in the run config"
    )


# --- reading an answer ----------------------------------------------------------------

# Nesting deeper than this is no plan the API would send; the limit also keeps every
# later walk over the answer (pydantic, the registry's check, the store) far from
# Python's recursion limit.
MAX_DEPTH = 64
# A token count past this is clamped: still over any budget, and the sum of a run's
# counts still fits the store's BIGINT.
MAX_COUNT = 10**12
# Rough size of a token, to estimate a count the answer did not give.
BYTES_PER_TOKEN = 4
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,199}")
TOOL_USE_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")
BAD_CHARS = re.compile("[\x00\ud800-\udfff]")


@dataclass(frozen=True)
class _Reply:
    """What came back over HTTP with a 2xx status, unread."""

    status: int
    content_type: str
    body: bytes


@dataclass(frozen=True)
class _Answer:
    """A readable answer: a JSON object whose content is a list. Blocks are kept as
    received (the objects among them); nothing else about them is trusted."""

    model: str
    stop_reason: str | None
    blocks: list[dict[str, Any]]
    usage: LlmUsage

    def calls(self) -> list[dict[str, Any]]:
        return [block for block in self.blocks if block.get("type") == "tool_use"]


class _Unreadable(Exception):
    """An answer that is no message; `usage` when it still said what it cost."""

    def __init__(self, reason: str, usage: LlmUsage | None = None) -> None:
        super().__init__(reason)
        self.usage = usage


def _read_answer(reply: _Reply, *, model: str, request_bytes: int, purpose: str) -> _Answer:
    kind = _clean_text(reply.content_type.split(";")[0].strip())[:80] or "no content-type"
    where = f"({reply.status}, {kind})"
    try:
        text = reply.body.decode("utf-8")
    except UnicodeDecodeError:
        raise _Unreadable(f"{where}: the body is not UTF-8 text") from None
    try:
        data = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise _Unreadable(f"{where}: the body is JSON nested too deeply to read") from None
    except ValueError as exc:
        reason = str(exc).split("\n")[0][:120]
        raise _Unreadable(f"{where}: the body is not JSON ({reason}): {_snippet(text)}") from None
    if _depth(data) > MAX_DEPTH:
        raise _Unreadable(f"{where}: the body is JSON nested deeper than {MAX_DEPTH} levels")
    if not isinstance(data, dict):
        raise _Unreadable(f"{where}: the body is a JSON {_json_type(data)}, not a message")
    if data.get("type") == "error":
        error: dict[str, Any] = data["error"] if isinstance(data.get("error"), dict) else {}
        detail = f"{error.get('type', 'error')}: {error.get('message', '')}"
        raise _Unreadable(f"{where}: an error instead of a message: {_snippet(detail)}")
    answered = data.get("model")
    if not (isinstance(answered, str) and MODEL_ID.fullmatch(answered)):
        answered = model
    content = data.get("content")
    usage = None
    if "usage" in data or isinstance(content, list):
        usage = _read_usage(
            data.get("usage"),
            model=answered,
            purpose=purpose,
            request_bytes=request_bytes,
            answer_bytes=len(reply.body),
        )
    if not isinstance(content, list):
        raise _Unreadable(
            f"{where}: the message's content is a JSON {_json_type(content)}, not a list", usage
        )
    assert usage is not None
    stop_reason = data.get("stop_reason")
    stop_reason = stop_reason if isinstance(stop_reason, str) else None
    # Kept with the call's usage (its llm_call event, the planner span): clean and short.
    stopped = _clean_text(stop_reason)[:80] if stop_reason is not None else None
    return _Answer(
        model=answered,
        stop_reason=stop_reason,
        blocks=[block for block in content if isinstance(block, dict)],
        usage=usage.model_copy(update={"stop_reason": stopped}),
    )


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large")
    return value


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth > MAX_DEPTH:
                return depth
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _snippet(text: str, limit: int = 120) -> str:
    short = text if len(text) <= limit else text[:limit] + "…"
    return repr(_clean_text(short))


def _read_usage(
    counts: Any, *, model: str, purpose: str, request_bytes: int, answer_bytes: int
) -> LlmUsage:
    """The answer's token counts; what it does not give readably is estimated from the
    bytes sent and received, so a run's budget never undercounts a call."""
    given = counts if isinstance(counts, dict) else {}
    estimated = False

    def count(name: str, *, estimate: int | None) -> int:
        nonlocal estimated
        value = given.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            number = None
        elif isinstance(value, float):
            number = math.ceil(value) if math.isfinite(value) and value >= 0 else None
        else:
            number = value if value >= 0 else None
        if number is not None:
            return min(number, MAX_COUNT)
        if estimate is None:  # an optional count: absent or null is zero
            if value is not None:
                estimated = True
            return 0
        estimated = True
        return min(max(1, estimate), MAX_COUNT)

    input_tokens = count("input_tokens", estimate=request_bytes // BYTES_PER_TOKEN)
    output_tokens = count("output_tokens", estimate=answer_bytes // BYTES_PER_TOKEN)
    cache_creation = count("cache_creation_input_tokens", estimate=None)
    cache_read = count("cache_read_input_tokens", estimate=None)
    if estimated:
        input_tokens = max(input_tokens, request_bytes // BYTES_PER_TOKEN)
    usage = LlmUsage(
        model=model,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_creation_tokens=cache_creation,
        cache_read_tokens=cache_read,
        purpose=f"{purpose} (usage estimated)" if estimated else purpose,
        request_bytes=request_bytes,
    )
    return usage.model_copy(update={"cost_usd": cost_usd(usage.model, usage)})


def _clean_text(text: str) -> str:
    """Text any store and the API accept: NULs and lone surrogates become U+FFFD."""
    return BAD_CHARS.sub("\ufffd", text)


def _clean(value: Any) -> Any:
    """A JSON value (at most MAX_DEPTH deep) with every string cleaned."""
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, dict):
        return {_clean_text(str(key)): _clean(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_clean(item) for item in value]
    return value


def _bad_text(value: Any, path: str) -> str | None:
    """Where a string in `value` holds a NUL or a lone surrogate, which no database
    column and no API request can carry; None when there is none."""
    if isinstance(value, str):
        return path if BAD_CHARS.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{path}.{_clean_text(str(key))}" if path else _clean_text(str(key))
            if BAD_CHARS.search(str(key)):
                return inner
            if found := _bad_text(item, inner):
                return found
    if isinstance(value, list):
        for i, item in enumerate(value):
            if found := _bad_text(item, f"{path}.{i}" if path else str(i)):
                return found
    return None


# --- the conversation ---------------------------------------------------------------


@dataclass
class _Conversation:
    """The request being built: a fixed prefix, then the turns of the repair loop.

    Every turn added here is one the API accepts: roles alternate, no turn is empty,
    no text block is blank, a tool_use goes back only with an object input and an id
    not used before, and every string is clean (_clean_text).
    """

    model: str
    fixed: dict[str, Any]
    answer_tool: str
    auto_choice: bool
    max_tokens: int
    messages: list[dict[str, Any]] = field(default_factory=list)
    tool_use_ids: set[str] = field(default_factory=set)

    @classmethod
    def open(cls, request: PlanRequest, *, auto_choice: bool) -> _Conversation:
        config = request.config
        fixed = {
            "model": config.model,
            "system": system_blocks(),
            "tools": tool_definitions(request.tools, approval_required=config.approval_required),
        }
        # A second redaction pass over the finished text: cheap, and secrets never leave.
        text = redact(user_prompt(request), request.secrets)
        return cls(
            model=config.model,
            fixed=fixed,
            answer_tool=FINISH if request.purpose == "verify" else SUBMIT_PLAN,
            auto_choice=auto_choice,
            max_tokens=config.max_tokens,
            messages=[{"role": "user", "content": [{"type": "text", "text": text}]}],
        )

    def body(self) -> dict[str, Any]:
        choice: dict[str, Any] = (
            {"type": "auto"} if self.auto_choice else {"type": "tool", "name": self.answer_tool}
        )
        choice["disable_parallel_tool_use"] = True
        return {
            **self.fixed,
            "max_tokens": self.max_tokens,
            "tool_choice": choice,
            "messages": list(self.messages),
        }

    def add_repair(self, answer: _Answer, problems: Problems) -> None:
        """The model's answer (what of it the API accepts back), then what was wrong."""
        content = self._sendable(answer)
        calls = [block for block in content if block["type"] == "tool_use"]
        feedback: list[dict[str, Any]] = [
            {
                "type": "tool_result",
                "tool_use_id": call["id"],
                "is_error": True,
                "content": self._about_call(call["name"], problems),
            }
            for call in calls
        ]
        if not any(call["name"] == self.answer_tool for call in calls):
            feedback.append({"type": "text", "text": self._fix_text(answer, problems)})
        if calls or any(block["type"] == "text" for block in content):
            self.messages.append({"role": "assistant", "content": content})
            self.messages.append({"role": "user", "content": feedback})
        else:
            # Nothing of the answer can go back: no assistant turn, so no second user
            # turn either; the feedback joins the last user turn.
            last = self.messages[-1]
            last["content"] = [*last["content"], *feedback]

    def _sendable(self, answer: _Answer) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = []
        for block in answer.blocks:
            kind = block.get("type")
            if kind == "text":
                text = block.get("text")
                if isinstance(text, str) and _clean_text(text).strip():
                    blocks.append({"type": "text", "text": _clean_text(text)})
            elif kind == "tool_use":
                ident, name, tool_input = block.get("id"), block.get("name"), block.get("input")
                if (
                    isinstance(ident, str)
                    and TOOL_USE_ID.fullmatch(ident)
                    and ident not in self.tool_use_ids
                    and isinstance(name, str)
                    and TOOL_NAME.fullmatch(name)
                    and isinstance(tool_input, dict)
                ):
                    self.tool_use_ids.add(ident)
                    blocks.append(
                        {"type": "tool_use", "id": ident, "name": name, "input": _clean(tool_input)}
                    )
            elif kind in ("thinking", "redacted_thinking"):
                # Exactly as received, or not at all (a signature covers the exact text).
                keys = ("thinking", "signature") if kind == "thinking" else ("data",)
                values = [block.get(key) for key in keys]
                if all(isinstance(v, str) and v and not BAD_CHARS.search(v) for v in values):
                    blocks.append({"type": kind, **dict(zip(keys, values, strict=True))})
        if not any(block["type"] in ("text", "tool_use") for block in blocks):
            return []  # thinking alone is no turn
        return blocks

    def _fix_text(self, answer: _Answer, problems: Problems) -> str:
        """Feedback when the answer tool's call cannot be answered with a tool_result."""
        unsent = [c for c in answer.calls() if c.get("name") == self.answer_tool]
        if unsent and isinstance(unsent[0].get("input"), dict):
            # Called, but its id could not go back (malformed or used before).
            problems = [*problems, "give each tool call a new, well-formed id"]
        return _fix_request(self.answer_tool, problems)

    def _about_call(self, name: str, problems: Problems) -> str:
        if name == self.answer_tool:
            return _fix_request(self.answer_tool, problems)
        if name in ANSWER_TOOLS:
            return f"Not now: answer by calling `{self.answer_tool}`, not `{name}`."
        return f"`{name}` cannot be called directly: put it in a step of `{self.answer_tool}`."


def _fix_request(answer_tool: str, problems: Problems) -> str:
    listed = "\n".join(f"- {_clean_text(problem)}" for problem in problems)
    return (
        f"Your answer was not accepted:\n{listed}\n"
        f"Call `{answer_tool}` again with the complete, corrected input."
    )


def _raw(answer: _Answer | None) -> Any:
    if answer is None:
        return None
    return {"stop_reason": _clean(answer.stop_reason), "content": _clean(answer.blocks)}


# --- judging an answer --------------------------------------------------------------


def _judge(
    answer: _Answer, request: PlanRequest, check: PlanCheck, *, expected: str, max_tokens: int
) -> PlanProduced | PlanFinished | NoAlternative | PlannerFatal | Problems:
    """The outcome an answer gives, or the problems to send back to the model."""
    if answer.stop_reason == "refusal":
        return PlannerFatal(
            error="the model declined to plan this task (stop_reason refusal): "
            "rephrase the task or choose another model"
        )
    problems: Problems = []
    if answer.stop_reason == "max_tokens":
        capped = max_tokens < request.config.max_tokens
        problems.append(
            f"your answer was cut off at max_tokens ({max_tokens}"
            + (", all the run's budget has left" if capped else "")
            + "): submit a shorter plan (fewer steps, shorter descriptions)"
            + ("" if capped else " or raise max_tokens in the config")
        )
    call = next((b for b in answer.calls() if b.get("name") == expected), None)
    if call is None:
        return [*problems, _missing_call(answer, expected)]
    data = call.get("input")
    if not isinstance(data, dict):
        return [
            *problems,
            f"the input of `{expected}` must be a JSON object, not a JSON {_json_type(data)}",
        ]
    if (where := _bad_text(data, "")) is not None:
        return [
            *problems,
            f"{expected} input: {where or '(input)'}: contains a NUL character or invalid "
            "Unicode (a lone surrogate); use plain text",
        ]
    verdict = _parse_input(expected, data)
    if isinstance(verdict, list):
        return problems + verdict
    steps = verdict.steps if isinstance(verdict, PlanProduced) else []
    problems = _check_steps(steps, request, check)
    return problems or verdict


def _missing_call(answer: _Answer, expected: str) -> str:
    called = [_clean_text(str(b.get("name")))[:64] for b in answer.calls()]
    if called:
        return f"you called {', '.join(called)}; answer by calling `{expected}`"
    return f"you answered without calling `{expected}`; answer only by calling it"


def _parse_input(
    expected: str, data: object
) -> PlanProduced | PlanFinished | NoAlternative | Problems:
    try:
        if expected == SUBMIT_PLAN and isinstance(data, dict) and "no_alternative" in data:
            if "steps" in data:
                return [f"{SUBMIT_PLAN} input: give either steps or no_alternative, not both"]
            none = SubmitNoAlternative.model_validate(data)
            return NoAlternative(reason=none.no_alternative)
        if expected == SUBMIT_PLAN:
            plan = SubmitPlan.model_validate(data)
            return PlanProduced(steps=plan.steps, reasoning=plan.reasoning)
        answer = FINISH_INPUT.validate_python(data)
    except ValidationError as exc:
        tagged = expected == FINISH
        return [
            f"{expected} input: {_location(err['loc'], tagged=tagged)}: {err['msg']}"
            for err in exc.errors()
        ]
    if isinstance(answer, FinishDone):
        return PlanFinished(report=answer.report)
    return PlanProduced(steps=answer.steps, reasoning=answer.reasoning)


def _location(loc: tuple[int | str, ...], *, tagged: bool) -> str:
    # A discriminated union puts its tag (done: 1 / 0) first; the model never wrote it.
    parts = loc[1:] if tagged and loc and isinstance(loc[0], int) else loc
    return ".".join(str(part) for part in parts) or "(input)"


def _check_steps(steps: list[PlannedStep], request: PlanRequest, check: PlanCheck) -> Problems:
    if not steps:
        return []
    refs = check_refs(steps, completed_positions(request), first_position=next_position(request))
    return refs + check(steps)


# --- API errors ---------------------------------------------------------------------


def _rejects_forced_choice(exc: anthropic.BadRequestError) -> bool:
    text = _error_parts(exc)[1].lower()
    return "tool_choice" in text or "forced tool" in text


def _api_failure(
    exc: anthropic.APIError, request: PlanRequest, *, timeout: float, usage: list[LlmUsage]
) -> PlannerUnavailable | PlannerFatal:
    """Who must act on an API error: the loop (transient) or a person (fatal)."""
    if isinstance(exc, anthropic.APITimeoutError):
        return PlannerUnavailable(
            error=f"the Anthropic API did not answer within {timeout:g} s", usage=usage
        )
    if isinstance(exc, anthropic.APIConnectionError):
        reason = _clean_text(str(exc))[:500]
        return PlannerUnavailable(error=f"cannot reach the Anthropic API: {reason}", usage=usage)
    if not isinstance(exc, anthropic.APIStatusError):
        # e.g. a response body the SDK could not parse: most likely a proxy's hiccup.
        reason = _clean_text(str(exc))[:500]
        return PlannerUnavailable(
            error=f"unexpected answer from the Anthropic API: {reason}", usage=usage
        )
    kind, message = _error_parts(exc)
    # The error body is whatever the server sent: cleaned and cut, as it goes into events.
    detail = _clean_text(f"{exc.status_code} {kind[:100]}: {message}")
    if len(detail) > 500:
        detail = detail[:500] + "…"
    if exc.status_code in TRANSIENT_STATUS or exc.status_code >= 500:
        wait = retry_after(exc.response.headers)
        return PlannerUnavailable(error=detail, retry_after=wait, usage=usage)
    return PlannerFatal(error=_what_to_fix(exc.status_code, detail, request), usage=usage)


def _error_parts(exc: anthropic.APIStatusError) -> tuple[str, str]:
    """(error type, message) from the error body, whatever the SDK version exposes."""
    body = exc.body if isinstance(exc.body, Mapping) else {}
    error = body.get("error") if isinstance(body.get("error"), Mapping) else body
    kind = error.get("type") if isinstance(error, Mapping) else None
    message = error.get("message") if isinstance(error, Mapping) else None
    return str(kind or "error"), str(message or exc.message)


def _what_to_fix(status: int, detail: str, request: PlanRequest) -> str:
    model = request.config.model
    if status == 401:
        return f"ANTHROPIC_API_KEY was refused ({detail}): check the key"
    if status == 403:
        return (
            f"the API key may not do this ({detail}): check the key's workspace and "
            f"permissions, or choose another model than {model!r} in the run config"
        )
    if status == 404:
        return (
            f"model {model!r} or the API endpoint was not found ({detail}): set a current "
            "model in the run config, and check ANTHROPIC_BASE_URL if it is set"
        )
    if status == 402 or "credit balance" in detail.lower():
        return f"the Anthropic account cannot pay for this call ({detail}): check billing"
    if status == 413:
        return f"the request was too large ({detail}): lower the budgets in app/planner/prompt.py"
    return (
        f"the Anthropic API rejected the request ({detail}): check the run config "
        f"(model {model!r}, max_tokens {request.config.max_tokens})"
    )


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asked us to wait: retry-after-ms, retry-after seconds or date.

    Never negative, never more than MAX_RETRY_AFTER; a value that is no finite number
    of seconds (nan, inf, garbage) counts as absent.
    """
    millis = _seconds(headers.get("retry-after-ms"))
    if millis is not None:
        return _bounded_wait(millis / 1000)
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _seconds(value)
    if seconds is not None:
        return _bounded_wait(seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return _bounded_wait((when - datetime.now(UTC)).total_seconds())


# A server asking for a longer wait is not believed: the loop looks again after this.
MAX_RETRY_AFTER = 3600.0


def _seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) else None


def _bounded_wait(seconds: float) -> float:
    return min(max(0.0, seconds), MAX_RETRY_AFTER)
