"""A streamed LiteLLM answer, filtered as safegate's own chat stream filters it.

``FilteredStream`` takes litellm's ``ModelResponseStream`` chunks and gives back chunks
that hold only checked text: each choice's content goes through a ``StreamGuard``
(``gateway.chat.stream_guard``: small increments checked before release, the whole
completion checked at the end, or Azure's asynchronous mode when the policy asks for
it); tool calls and finish reasons are held back to the end and the tool calls checked
whole. A failing check raises ``GuardrailError`` (``content_filter``): the proxy sends it
as the stream's last event. Other delta fields (reasoning, audio) are not checked, so
not sent. New chunks keep the upstream's id, created, model and hidden params.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from litellm.types.utils import Delta, ModelResponseStream, StreamingChoices

from gateway.chat.content_filter import FilterResults, filter_results, merge
from gateway.chat.stream_guard import Check, StreamGuard
from gateway.config import ChatSettings
from gateway.integrations.litellm_errors import refusal
from gateway.safety.policy import Policy
from gateway.safety.verdict import Verdict


@dataclass
class _ToolCall:
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class _Choice:
    guard: StreamGuard
    calls: dict[int, _ToolCall] = field(default_factory=dict)
    finish_reason: str | None = None


class FilteredStream:
    """One streamed answer: content released as its checks pass, tool calls and finish
    reasons held back to the end (as safegate's own chat stream does)."""

    def __init__(self, *, check: Check, chat: ChatSettings, policy: Policy) -> None:
        self.check = check
        self.chat = chat
        self.policy = policy
        self.choices: dict[int, _Choice] = {}
        self.template: ModelResponseStream | None = None
        self.usage: object | None = None

    def verdicts(self) -> dict[str, Verdict]:
        return {
            f"choices[{index}].window[{n}]": verdict
            for index, choice in sorted(self.choices.items())
            for n, (_, verdict) in enumerate(choice.guard.checks())
        }

    async def take(self, chunk: ModelResponseStream) -> list[ModelResponseStream]:
        self.template = self.template or chunk
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            self.usage = usage
        out: list[ModelResponseStream] = []
        for choice in chunk.choices:
            index = choice.index if isinstance(choice.index, int) else 0
            state = self._choice(index)
            delta = choice.delta
            piece = getattr(delta, "content", None)
            if isinstance(piece, str) and piece:
                released = await state.guard.feed(piece)
                self._raise_if_blocked(index, state)
                if released is not None and released.text:
                    results = filter_results(released.verdict) if released.verdict else None
                    out.append(self._chunk(index, content=released.text, results=results))
            for call in getattr(delta, "tool_calls", None) or ():
                position = getattr(call, "index", None)
                buffer = state.calls.setdefault(
                    position if isinstance(position, int) else 0, _ToolCall()
                )
                buffer.id = getattr(call, "id", None) or buffer.id
                function = getattr(call, "function", None)
                if function is not None:
                    buffer.name += getattr(function, "name", None) or ""
                    buffer.arguments += getattr(function, "arguments", None) or ""
            if choice.finish_reason:
                state.finish_reason = choice.finish_reason
        return out

    async def finish(self) -> list[ModelResponseStream]:
        out: list[ModelResponseStream] = []
        for index, state in sorted(self.choices.items()):
            released = await state.guard.flush()
            self._raise_if_blocked(index, state)
            if released is not None and released.text:
                results = filter_results(released.verdict) if released.verdict else None
                out.append(self._chunk(index, content=released.text, results=results))
            if state.calls:
                text = "\n".join(f"{c.name} {c.arguments}" for c in state.calls.values())
                await state.guard.check_text(text)
                self._raise_if_blocked(index, state)
                calls = [
                    {
                        "index": position,
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                    for position, call in sorted(state.calls.items())
                ]
                out.append(self._chunk(index, tool_calls=calls))
            results = merge(filter_results(v) for _, v in state.guard.checks()) or None
            out.append(
                self._chunk(index, finish_reason=state.finish_reason or "stop", results=results)
            )
        if self.usage is not None:
            out.append(self._chunk(None, usage=self.usage))
        return out

    def _choice(self, index: int) -> _Choice:
        if index not in self.choices:
            self.choices[index] = _Choice(
                StreamGuard(
                    check=self.check,
                    window_chars=self.chat.stream_window_chars,
                    overlap_chars=self.chat.stream_overlap_chars,
                    increment_chars=self.chat.stream_increment_chars,
                    mode=self.policy.stream_mode,
                )
            )
        return self.choices[index]

    def _raise_if_blocked(self, index: int, state: _Choice) -> None:
        verdict = state.guard.blocked
        if verdict is None:
            return
        part = {f"choices[{index}]": verdict}
        error = refusal(part, part, policy=self.policy, param="completion")
        if error is not None:
            raise error

    def _chunk(
        self,
        index: int | None,
        *,
        content: str | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
        finish_reason: str | None = None,
        results: FilterResults | None = None,
        usage: object | None = None,
    ) -> ModelResponseStream:
        """A chunk like the upstream's (id, created, model) with only checked content."""
        template = self.template
        choices: list[StreamingChoices] = []
        if index is not None:
            choice = StreamingChoices(
                index=index,
                delta=Delta(role="assistant", content=content, tool_calls=tool_calls),
                finish_reason=finish_reason,
            )
            if results is not None:
                choice.content_filter_results = results  # type: ignore[attr-defined]
            choices.append(choice)
        extra: dict[str, Any] = {} if usage is None else {"usage": usage}
        chunk = ModelResponseStream(
            choices=choices,
            id=getattr(template, "id", None),
            created=getattr(template, "created", None),
            model=getattr(template, "model", None),
            **extra,
        )
        hidden = getattr(template, "_hidden_params", None)
        if isinstance(hidden, dict):
            chunk._hidden_params = dict(hidden)
        return chunk


async def close_stream(stream: object) -> None:
    """Stop reading an upstream stream the guardrail has cut."""
    if isinstance(stream, AsyncIterator):
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
