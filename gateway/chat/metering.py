"""What one chat request used: its prompt and completion tokens, where they come from, and
their cost.

The upstream's own ``usage`` is taken when it reports one (litellm fills it in for a
stream when asked with ``stream_options.include_usage``, which ``gateway.chat.streaming``
does whenever every model of the call takes that option). A usage of zero prompt tokens
is no report (litellm gives zeros for an OpenAI-style answer without usage: no prompt is
zero tokens), and then the tokens are counted here with ``litellm.token_counter`` for the
model: the messages sent, and the completion text the upstream returned (all of it, the
part the filter withheld included, since the upstream produced it). The cost is the
tokens at litellm's price for the model (per prompt and per completion token, from the
price map litellm ships, read once), or ``None`` when the map has no price for it.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from gateway.audit import UsageSource

log = logging.getLogger("safegate.chat")

PRICE_MAP_FILE = "model_prices_and_context_window_backup.json"


@dataclass(frozen=True, slots=True)
class Answer:
    """What the upstream returned that usage is measured from: its ``usage`` (``None`` when
    it sent none) and every completion text it produced, withheld ones included."""

    usage: Mapping[str, int] | None
    completions: Sequence[str]


@dataclass(frozen=True, slots=True)
class Metered:
    """A request's tokens and their cost (``None``: no price for the model)."""

    prompt_tokens: int
    completion_tokens: int
    source: UsageSource
    cost_usd: float | None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def usage(self) -> dict[str, int]:
        """OpenAI's ``usage`` object."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


def reported(usage: Mapping[str, int] | None) -> tuple[int, int] | None:
    """``(prompt, completion)`` from an upstream usage, or ``None`` when it reports none."""
    if not usage or int(usage.get("prompt_tokens") or 0) <= 0:
        return None
    return int(usage["prompt_tokens"]), int(usage.get("completion_tokens") or 0)


def meter(model: str, answer: Answer, *, messages: Sequence[Mapping[str, Any]]) -> Metered:
    """Blocking (token counting is CPU work): the request's tokens and cost for ``model``
    (a litellm model string)."""
    found = reported(answer.usage)
    if found is not None:
        prompt, completion = found
        source = UsageSource.UPSTREAM
    else:
        prompt = count_prompt(model, messages)
        completion = sum(count_text(model, text) for text in answer.completions if text)
        source = UsageSource.COUNTED
    return Metered(
        prompt_tokens=prompt,
        completion_tokens=completion,
        source=source,
        cost_usd=price(model, prompt_tokens=prompt, completion_tokens=completion),
    )


def count_prompt(model: str, messages: Sequence[Mapping[str, Any]]) -> int:
    from litellm import token_counter

    try:
        return int(token_counter(model=model, messages=[dict(m) for m in messages]))
    except Exception as error:  # noqa: BLE001 - a message shape litellm cannot count: its text
        log.warning("token count fell back to text", extra={"error": type(error).__name__})
        return count_text(model, "\n".join(_texts(messages)))


def count_text(model: str, text: str) -> int:
    from litellm import token_counter

    try:
        return int(token_counter(model=model, text=text))
    except Exception:  # noqa: BLE001 - litellm's default tokenizer for a model it cannot place
        return int(token_counter(text=text))


def price(model: str, *, prompt_tokens: int, completion_tokens: int) -> float | None:
    """The tokens' price in USD on ``model`` from litellm's local price map; ``None`` when
    the map has no price for it."""
    entry = _price_entry(model)
    if entry is None:
        return None
    prompt_rate, completion_rate = entry
    return prompt_tokens * prompt_rate + completion_tokens * completion_rate


def priced(models: Sequence[str]) -> bool:
    """Whether litellm's price map prices every model (a budget can be kept on them)."""
    return bool(models) and all(_price_entry(model) is not None for model in models)


def _price_entry(model: str) -> tuple[float, float] | None:
    """(USD per prompt token, per completion token) for ``model``, under its litellm name
    or, for ``provider/name``, under ``name`` when the map lists it for that provider."""
    prices = price_map()
    provider, _, bare = model.partition("/")
    entry = prices.get(model)
    if entry is None and bare:
        candidate = prices.get(bare)
        if isinstance(candidate, dict) and candidate.get("litellm_provider") == provider:
            entry = candidate
    if not isinstance(entry, dict):
        return None
    prompt_rate = entry.get("input_cost_per_token")
    completion_rate = entry.get("output_cost_per_token")
    if not isinstance(prompt_rate, int | float) or not isinstance(completion_rate, int | float):
        return None
    return float(prompt_rate), float(completion_rate)


@functools.cache
def price_map() -> dict[str, Any]:
    """litellm's price map as shipped in its package (never fetched, and unlike
    ``litellm.model_cost`` untouched by the Router, which registers every configured model
    there with no price)."""
    shipped = resources.files("litellm").joinpath(PRICE_MAP_FILE)
    loaded: dict[str, Any] = json.loads(shipped.read_text(encoding="utf-8"))
    return loaded


def _texts(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    texts: list[str] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(
                str(part.get("text") or "") for part in content if isinstance(part, Mapping)
            )
        for call in message.get("tool_calls") or ():
            function = (call.get("function") or {}) if isinstance(call, Mapping) else {}
            texts.append(f"{function.get('name') or ''} {function.get('arguments') or ''}")
    return texts
