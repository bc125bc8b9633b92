"""A filtered stream: upstream chunks in, server-sent events out, nothing unchecked.

Each choice's content goes through its own ``StreamGuard`` (``gateway.chat.stream_guard``:
small increments checked before release, the whole completion checked at the end, or
Azure's asynchronous mode when the policy asks for it). Tool calls are gathered and
checked whole before they are sent. A choice whose check fails ends with
``finish_reason: "content_filter"`` and nothing after it. The audit records are written
before ``[DONE]``; when the client goes away or the upstream fails mid-stream, they are
written as the stream closes.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.chat.content_filter import filter_results
from gateway.chat.metering import Answer
from gateway.chat.prompt import usage_dict
from gateway.chat.schemas import PromptFilterResult
from gateway.chat.service import ChatRun
from gateway.chat.stream_guard import StreamGuard
from gateway.errors import ApiError, error_body
from gateway.safety.verdict import Verdict
from gateway.tracing import end_stage, start_stage


def _sse(data: Mapping[str, Any]) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@dataclass
class _ToolCallBuffer:
    id: str = ""
    name: str = ""
    arguments: str = ""


async def open_stream(
    run: ChatRun,
    messages: list[dict[str, Any]],
    params: dict[str, Any],
    *,
    prompt_results: list[PromptFilterResult],
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """Call the upstream and wait for its first chunk (so a failing upstream is an error
    status, not a broken 200), then return the events to send."""
    upstream_started = run.upstream_started()
    try:
        chunks = await run.state.upstreams.stream(run.model, messages, **params)
        iterator = aiter(chunks)
        first = await anext(iterator, None)
    except ApiError as error:
        run.upstream_failed(error)
        await run.finish(status=error.status, blocked=None, answer=None)
        raise
    results = [result.model_dump(mode="json") for result in prompt_results]
    return _events(run, first, iterator, results, upstream_started, include_usage)


async def _events(
    run: ChatRun,
    first: Any,
    iterator: AsyncIterator[Any],
    prompt_results: list[dict[str, Any]],
    upstream_started: float,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    settings = run.state.settings.chat
    chunk_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    head = {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": run.model,
    }
    guards: dict[int, StreamGuard] = {}
    # One span for the stream's checking, from its first chunk to its audit records.
    checking = start_stage(
        run.state.tracer, "completion_check", {"safegate.stream_mode": run.policy.stream_mode}
    )
    tools: dict[int, dict[int, _ToolCallBuffer]] = {}
    received: dict[int, list[str]] = {}  # everything the upstream sent, for counting tokens
    finish: dict[int, str] = {}
    usage: dict[str, int] | None = None
    blocked_any = False
    first_token = False
    status = 200

    def guard_for(index: int) -> StreamGuard:
        if index not in guards:
            guards[index] = StreamGuard(
                check=run.check_completion,
                window_chars=settings.stream_window_chars,
                overlap_chars=settings.stream_overlap_chars,
                increment_chars=settings.stream_increment_chars,
                mode=run.policy.stream_mode,
            )
        return guards[index]

    def content_chunk(index: int, text: str, verdict: Verdict | None) -> bytes:
        nonlocal first_token
        if not first_token:
            first_token = True
            run.timed("first_token", time.perf_counter() - run.started)
        choice: dict[str, Any] = {
            "index": index,
            "delta": {"role": "assistant", "content": text},
            "finish_reason": None,
            "logprobs": None,
        }
        if verdict is not None:
            choice["content_filter_results"] = filter_results(verdict)
        return _sse({**head, "choices": [choice]})

    def final_chunk(index: int, reason: str, verdict: Verdict | None) -> bytes:
        choice: dict[str, Any] = {
            "index": index,
            "delta": {},
            "finish_reason": reason,
            "logprobs": None,
        }
        if verdict is not None:
            choice["content_filter_results"] = filter_results(verdict)
            if verdict.blocked:
                choice["content_filter_reasons"] = list(verdict.reasons)
        return _sse({**head, "choices": [choice]})

    def record(index: int, guard: StreamGuard) -> None:
        for window, verdict in guard.checks():
            run.saw(verdict, text=window, source=f"choices[{index}]")

    finished = False

    async def write_audit() -> dict[str, int] | None:
        """Write the audit records once: before ``[DONE]``, or when the stream breaks.
        Returns the usage to report to the client (the upstream's, or counted)."""
        nonlocal finished
        if finished:
            return None
        finished = True
        run.describe_completion_checks(checking, choices=len(guards))
        end_stage(checking)
        for index, guard in sorted(guards.items()):
            record(index, guard)
        completions = ["".join(received[index]) for index in sorted(received)]
        completions += [
            f"{call.name} {call.arguments}" for calls in tools.values() for call in calls.values()
        ]
        metered = await run.finish(
            status=status,
            blocked="completion" if blocked_any else None,
            answer=Answer(usage=usage, completions=completions),
        )
        return None if metered is None else metered.usage()

    try:
        yield _sse({**head, "choices": [], "prompt_filter_results": prompt_results})
        chunk = first
        while chunk is not None:
            if getattr(chunk, "usage", None) is not None:
                usage = usage_dict(chunk.usage)
            for choice in getattr(chunk, "choices", None) or ():
                index = int(getattr(choice, "index", 0) or 0)
                guard = guard_for(index)
                if guard.blocked is not None:
                    continue
                delta = getattr(choice, "delta", None)
                piece = getattr(delta, "content", None) if delta is not None else None
                if piece:
                    received.setdefault(index, []).append(piece)
                    released = await guard.feed(piece)
                    if released is not None and released.text:
                        yield content_chunk(index, released.text, released.verdict)
                for call in (getattr(delta, "tool_calls", None) or ()) if delta is not None else ():
                    buffer = tools.setdefault(index, {}).setdefault(
                        int(getattr(call, "index", 0) or 0), _ToolCallBuffer()
                    )
                    buffer.id = getattr(call, "id", None) or buffer.id
                    function = getattr(call, "function", None)
                    if function is not None:
                        buffer.name += getattr(function, "name", None) or ""
                        buffer.arguments += getattr(function, "arguments", None) or ""
                if getattr(choice, "finish_reason", None):
                    finish[index] = choice.finish_reason
                if guard.blocked is not None:
                    blocked_any = True
                    yield final_chunk(index, "content_filter", guard.blocked)
            if guards and all(g.blocked is not None for g in guards.values()):
                break  # every choice was cut off: stop reading the upstream
            chunk = await anext(iterator, None)
        run.upstream_answered(upstream_started, usage=usage)
        for index, guard in sorted(guards.items()):
            if guard.blocked is not None:
                continue
            released = await guard.flush()
            if guard.blocked is not None:
                blocked_any = True
                yield final_chunk(index, "content_filter", guard.blocked)
                continue
            if released is not None and released.text:
                yield content_chunk(index, released.text, released.verdict)
            calls = tools.get(index)
            if calls:
                text = "\n".join(f"{c.name} {c.arguments}" for c in calls.values())
                verdict = await guard.check_text(text)
                if verdict.blocked:
                    blocked_any = True
                    yield final_chunk(index, "content_filter", verdict)
                    continue
                delta_calls = [
                    {
                        "index": position,
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": c.arguments},
                    }
                    for position, c in sorted(calls.items())
                ]
                yield _sse(
                    {
                        **head,
                        "choices": [
                            {
                                "index": index,
                                "delta": {"role": "assistant", "tool_calls": delta_calls},
                                "finish_reason": None,
                                "logprobs": None,
                            }
                        ],
                    }
                )
            yield final_chunk(index, finish.get(index, "stop"), guard.last_verdict)
        # The audit records are durable (database or spool) before the client hears the
        # stream is complete: a crash after [DONE] loses nothing.
        reported = await write_audit()
        if include_usage and reported is not None:
            yield _sse({**head, "choices": [], "usage": reported})
        yield b"data: [DONE]\n\n"
    except ApiError as error:
        status = error.status
        run.upstream_failed(error)
        yield _sse(error_body(error.message, type=error.type, param=error.param, code=error.code))
    finally:
        await write_audit()
