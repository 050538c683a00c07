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
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import anthropic
from anthropic.types import Message
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from app.engine.actions import (
    LlmUsage,
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
from app.planner.pricing import cost_usd
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
        """One plan, re-plan or verification, with up to max_plan_repairs repairs."""
        if clash := sorted(set(ANSWER_TOOLS) & {t.name for t in request.tools}):
            return PlannerFatal(
                error=f"a registered tool is named {clash[0]!r}, which the planner uses "
                "for its answers: rename the tool"
            )
        chat = _Conversation.open(request, auto_choice=self._forced_unsupported(request))
        usage: list[LlmUsage] = []
        last: Message | None = None
        problems: Problems = []
        for repair in range(request.config.max_plan_repairs + 1):
            if last is not None:
                chat.add_repair(last, problems)
            try:
                last, size = self._send(chat)
            except anthropic.APIError as exc:
                return _api_failure(exc, request, timeout=self._timeout, usage=usage)
            usage.append(_usage(last, purpose=_purpose(request, repair), request_bytes=size))
            verdict = _judge(last, request, check, expected=chat.answer_tool)
            if not isinstance(verdict, list):
                return verdict.model_copy(update={"usage": usage})
            problems = verdict
        return PlanInvalid(
            error=f"no valid plan after {len(usage)} answer(s): " + "; ".join(problems),
            raw=_raw(last),
            usage=usage,
        )

    def _forced_unsupported(self, request: PlanRequest) -> bool:
        model = request.config.model
        return model in self._auto_choice or model.startswith(NO_FORCED_TOOL_CHOICE)

    def _send(self, chat: _Conversation) -> tuple[Message, int]:
        """One API call; on a 400 refusing forced tool_choice, once more with "auto"."""
        try:
            return self._create(chat.body())
        except anthropic.BadRequestError as exc:
            if chat.auto_choice or not _rejects_forced_choice(exc):
                raise
            self._auto_choice.add(chat.model)
            chat.auto_choice = True
            return self._create(chat.body())

    def _create(self, body: dict[str, Any]) -> tuple[Message, int]:
        message = self._client.messages.create(**body)
        return message, request_size(body)


def request_size(body: Mapping[str, Any]) -> int:
    """Bytes of the JSON body, encoded the way the SDK sends it (compact, UTF-8)."""
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return len(text.encode())


def _purpose(request: PlanRequest, repair: int) -> str:
    return request.purpose if repair == 0 else f"{request.purpose} (repair {repair})"


# --- the conversation -------------------------------------------------------------


@dataclass
class _Conversation:
    """The request being built: a fixed prefix, then the turns of the repair loop."""

    model: str
    fixed: dict[str, Any]
    answer_tool: str
    auto_choice: bool
    messages: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def open(cls, request: PlanRequest, *, auto_choice: bool) -> _Conversation:
        config = request.config
        fixed = {
            "model": config.model,
            "max_tokens": config.max_tokens,
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
            messages=[{"role": "user", "content": [{"type": "text", "text": text}]}],
        )

    def body(self) -> dict[str, Any]:
        choice: dict[str, Any] = (
            {"type": "auto"} if self.auto_choice else {"type": "tool", "name": self.answer_tool}
        )
        choice["disable_parallel_tool_use"] = True
        return {**self.fixed, "tool_choice": choice, "messages": list(self.messages)}

    def add_repair(self, answer: Message, problems: Problems) -> None:
        """The model's answer, then what was wrong with it."""
        content = [_block_param(block) for block in answer.content]
        if content:
            self.messages.append({"role": "assistant", "content": content})
        self.messages.append({"role": "user", "content": self._feedback(answer, problems)})

    def _feedback(self, answer: Message, problems: Problems) -> list[dict[str, Any]]:
        calls = [block for block in answer.content if block.type == "tool_use"]
        if not calls:
            return [{"type": "text", "text": _fix_request(self.answer_tool, problems)}]
        # Every tool_use must be answered by a tool_result with its id.
        return [
            {
                "type": "tool_result",
                "tool_use_id": call.id,
                "is_error": True,
                "content": self._about_call(call.name, problems),
            }
            for call in calls
        ]

    def _about_call(self, name: str, problems: Problems) -> str:
        if name == self.answer_tool:
            return _fix_request(self.answer_tool, problems)
        if name in ANSWER_TOOLS:
            return f"Not now: answer by calling `{self.answer_tool}`, not `{name}`."
        return f"`{name}` cannot be called directly: put it in a step of `{self.answer_tool}`."


def _fix_request(answer_tool: str, problems: Problems) -> str:
    listed = "\n".join(f"- {problem}" for problem in problems)
    return (
        f"Your answer was not accepted:\n{listed}\n"
        f"Call `{answer_tool}` again with the complete, corrected input."
    )


def _block_param(block: Any) -> dict[str, Any]:
    """A response block as a request block; thinking blocks go back exactly as received."""
    if block.type == "tool_use":
        return {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
    if block.type == "text":
        return {"type": "text", "text": block.text}
    dumped: dict[str, Any] = block.model_dump(mode="json", exclude_none=True)
    return dumped


def _raw(message: Message | None) -> Any:
    if message is None:
        return None
    return {
        "stop_reason": message.stop_reason,
        "content": [block.model_dump(mode="json", exclude_none=True) for block in message.content],
    }


# --- judging an answer --------------------------------------------------------------


def _judge(
    answer: Message, request: PlanRequest, check: PlanCheck, *, expected: str
) -> PlanProduced | PlanFinished | PlannerFatal | Problems:
    """The outcome an answer gives, or the problems to send back to the model."""
    if answer.stop_reason == "refusal":
        return PlannerFatal(
            error="the model declined to plan this task (stop_reason refusal): "
            "rephrase the task or choose another model"
        )
    problems: Problems = []
    if answer.stop_reason == "max_tokens":
        problems.append(
            f"your answer was cut off at max_tokens ({request.config.max_tokens}): submit a "
            "shorter plan (fewer steps, shorter descriptions) or raise max_tokens in the config"
        )
    call = next((b for b in answer.content if b.type == "tool_use" and b.name == expected), None)
    if call is None:
        return [*problems, _missing_call(answer, expected)]
    verdict = _parse_input(expected, call.input)
    if isinstance(verdict, list):
        return problems + verdict
    steps = verdict.steps if isinstance(verdict, PlanProduced) else []
    problems = _check_steps(steps, request, check)
    return problems or verdict


def _missing_call(answer: Message, expected: str) -> str:
    called = [b.name for b in answer.content if b.type == "tool_use"]
    if called:
        return f"you called {', '.join(called)}; answer by calling `{expected}`"
    return f"you answered without calling `{expected}`; answer only by calling it"


def _parse_input(expected: str, data: object) -> PlanProduced | PlanFinished | Problems:
    try:
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


# --- usage and API errors ---------------------------------------------------------


def _usage(answer: Message, *, purpose: str, request_bytes: int) -> LlmUsage:
    counts = answer.usage
    usage = LlmUsage(
        model=answer.model,
        input_tokens=counts.input_tokens,
        output_tokens=counts.output_tokens,
        cache_creation_tokens=counts.cache_creation_input_tokens or 0,
        cache_read_tokens=counts.cache_read_input_tokens or 0,
        purpose=purpose,
        request_bytes=request_bytes,
    )
    return usage.model_copy(update={"cost_usd": cost_usd(usage.model, usage)})


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
        return PlannerUnavailable(error=f"cannot reach the Anthropic API: {exc}", usage=usage)
    if not isinstance(exc, anthropic.APIStatusError):
        # e.g. a response body the SDK could not parse: most likely a proxy's hiccup.
        return PlannerUnavailable(
            error=f"unexpected answer from the Anthropic API: {exc}", usage=usage
        )
    kind, message = _error_parts(exc)
    detail = f"{exc.status_code} {kind}: {message}"
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
    """Seconds the server asked us to wait: retry-after-ms, retry-after seconds or date."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
