"""What a model call costs, from its token counts.

Rates are USD per million tokens (MTok), as published on Anthropic's pricing
page (platform.claude.com/docs/en/about-claude/pricing) when this table was
written; update the table when they change. Cache writes are the 5-minute
ephemeral kind (the only kind the planner asks for): 1.25x the input rate.
Cache reads are 0.1x the input rate unless the page lists a lower one.

A model is found by its longest matching name prefix, so dated ids
("claude-sonnet-4-20250514") and aliases ("claude-sonnet-4-0") share a row.
An unknown model is priced at the most expensive rates in the table, so a
per-run dollar budget errs on the side of stopping early.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

MTOK = 1_000_000


@dataclass(frozen=True)
class Rates:
    """USD per MTok."""

    input: float
    output: float
    cache_write: float
    cache_read: float

    @classmethod
    def standard(cls, input: float, output: float, *, cache_read: float | None = None) -> Rates:
        read = input * 0.1 if cache_read is None else cache_read
        return cls(input=input, output=output, cache_write=input * 1.25, cache_read=read)


@dataclass(frozen=True)
class Price:
    """A model's rates; `long` applies to every token of a request whose prompt
    (input + cache writes + cache reads) exceeds `long_threshold` tokens."""

    rates: Rates
    long: Rates | None = None
    long_threshold: int = 0


def _flat(input: float, output: float, *, cache_read: float | None = None) -> Price:
    return Price(Rates.standard(input, output, cache_read=cache_read))


PRICES: dict[str, Price] = {
    "claude-fable-5-1": _flat(10, 50, cache_read=0.25),
    "claude-mythos-5-1": _flat(10, 50, cache_read=0.25),
    "claude-fable-5": _flat(10, 50),
    "claude-mythos-5": _flat(10, 50),
    "claude-opus-5-5": _flat(4, 20, cache_read=0.20),
    "claude-opus-5": _flat(5, 25),
    "claude-opus-4-8": _flat(5, 25),
    "claude-opus-4-7": _flat(5, 25),
    "claude-opus-4-6": _flat(5, 25),
    "claude-opus-4-5": _flat(5, 25),
    "claude-opus-4-1": _flat(15, 75),
    "claude-opus-4": _flat(15, 75),
    "claude-sonnet-5-5": _flat(2, 10, cache_read=0.10),
    "claude-sonnet-5": _flat(2, 10),
    "claude-sonnet-4-6": _flat(3, 15),
    "claude-sonnet-4-5": _flat(3, 15),
    "claude-sonnet-4": _flat(3, 15),
    "claude-3-7-sonnet": _flat(3, 15),
    "claude-haiku-5-5": Price(
        rates=Rates(input=0.10, output=0.50, cache_write=0.125, cache_read=0.01),
        long=Rates(input=0.50, output=2.50, cache_write=0.625, cache_read=0.05),
        long_threshold=100_000,
    ),
    "claude-haiku-4-5": _flat(1, 5),
    "claude-3-5-haiku": _flat(0.80, 4),
}

# Unknown models: the highest rates above, so budgets stop a run early rather than late.
DEFAULT_PRICE = _flat(15, 75)


class TokenCounts(Protocol):
    """The token fields of app.engine.actions.LlmUsage."""

    @property
    def input_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...
    @property
    def cache_creation_tokens(self) -> int: ...
    @property
    def cache_read_tokens(self) -> int: ...


def price_for(model: str) -> Price:
    """The row whose name is the longest prefix of `model` (at a '-' boundary)."""
    matches = [name for name in PRICES if model == name or model.startswith(name + "-")]
    return PRICES[max(matches, key=len)] if matches else DEFAULT_PRICE


def cost_usd(model: str, usage: TokenCounts) -> float:
    """USD for one call of `model` with these token counts."""
    price = price_for(model)
    prompt = usage.input_tokens + usage.cache_creation_tokens + usage.cache_read_tokens
    rates = price.rates
    if price.long is not None and prompt > price.long_threshold:
        rates = price.long
    total = (
        usage.input_tokens * rates.input
        + usage.output_tokens * rates.output
        + usage.cache_creation_tokens * rates.cache_write
        + usage.cache_read_tokens * rates.cache_read
    )
    return total / MTOK
