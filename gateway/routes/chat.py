"""``POST /v1/chat/completions`` (and Azure's deployment route), ``GET /v1/models``.

Every prompt and every completion passes the safety engine (``gateway.chat`` says how);
what was flagged goes to the audit store, with the request's metadata; every request
leaves its metadata (never its text) in the audit store's request log and its timings in
``/metrics``.

- A blocked prompt: HTTP 400 in Azure OpenAI's shape, ``{"error": {"code":
  "content_filter", "param": "prompt", "message", "innererror": {"code":
  "ResponsibleAIPolicyViolation", "content_filter_result": {...}}}}``; no upstream call.
- A prompt blocked only because a classifier failed (the policy fails closed): 503
  ``safety_check_failed``, so clients retry instead of rewording.
- A prompt the engine's queue cannot take: 429 ``engine_overloaded`` with ``Retry-After``
  (``gateway.errors``); no upstream call. A completion's check is never refused this way
  (its prompt was admitted): it waits its turn in the queue.
- A blocked completion: its choice's ``finish_reason`` is ``content_filter`` and its
  content is withheld (``null``); ``content_filter_reasons`` says why.
- Azure's route ``/openai/deployments/{deployment}/chat/completions?api-version=...``
  takes the deployment as the model and Azure's ``api-key`` header.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from gateway.audit import FlaggedItem, RequestRecord, flagged_item
from gateway.auth import Principal, Role, require
from gateway.chat import (
    NOT_IN_TURNS,
    ChatCompletionRequest,
    PromptText,
    StreamGuard,
    completion_text,
    prompt_texts,
    usage_dict,
    worst_reasons,
)
from gateway.content_filter import FilterResults, filter_results, merge
from gateway.errors import ApiError, InvalidRequest, error_body
from gateway.safety.engine import EngineOverloaded
from gateway.safety.policy import Policy
from gateway.safety.taxonomy import Direction
from gateway.safety.verdict import Verdict
from gateway.state import AppState, app_state
from gateway.upstreams import FORWARDED_PARAMS

router = APIRouter(tags=["chat"])

Developer = Annotated[Principal, Depends(require(Role.DEVELOPER))]
State = Annotated[AppState, Depends(app_state)]
CONTENT_FILTER_MESSAGE = (
    "The prompt was blocked by safegate's content filter: {reasons}. "
    "Rephrase the request; see content_filter_result for each category."
)


class ModelObject(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelObject]


class AzureChatCompletionRequest(ChatCompletionRequest):
    """Azure's body: the deployment in the path names the model."""

    model: str = Field(default="", max_length=128)


@router.get("/v1/models")
async def list_models(principal: Developer, state: State) -> ModelList:
    state.upstreams.refresh()
    return ModelList(
        data=[
            ModelObject(id=m.id, created=m.created, owned_by=m.owned_by)
            for m in state.upstreams.models()
        ]
    )


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, principal: Developer, state: State
) -> Response:
    return await _complete(body, request=request, principal=principal, state=state)


@router.post("/openai/deployments/{deployment}/chat/completions", response_model=None)
async def azure_chat_completions(
    deployment: str,
    body: AzureChatCompletionRequest,
    request: Request,
    principal: Developer,
    state: State,
    api_version: Annotated[str | None, Query(alias="api-version")] = None,
) -> Response:
    if api_version is None:
        raise InvalidRequest(
            "api-version query parameter is required (e.g. ?api-version=2024-10-21)",
            param="api-version",
            code="missing_api_version",
        )
    body.model = deployment
    return await _complete(body, request=request, principal=principal, state=state)


@dataclass
class _Run:
    """One request's bookkeeping: what to audit, what to time."""

    state: AppState
    principal: Principal
    request_id: str
    model: str
    policy: Policy
    stream: bool
    started: float = field(default_factory=time.perf_counter)
    items: list[FlaggedItem] = field(default_factory=list)
    categories: set[str] = field(default_factory=set)
    latency_ms: dict[str, float] = field(default_factory=dict)

    def timed(self, stage: str, seconds: float) -> None:
        self.latency_ms[stage] = round(self.latency_ms.get(stage, 0.0) + seconds * 1000, 3)
        self.state.metrics.observe_stage(stage, seconds)

    def saw(self, verdict: Verdict, *, text: str, source: str) -> None:
        self.state.metrics.observe_verdict(verdict)
        if not verdict.flagged:
            return
        self.categories.update(label.value for label in verdict.flagged_labels)
        self.items.append(
            flagged_item(
                verdict,
                text=text,
                request_id=self.request_id,
                key_id=self.principal.key_id,
                model=self.model,
                source=source,
            )
        )

    async def finish(
        self, *, status: int, blocked: str | None, usage: Mapping[str, int] | None
    ) -> None:
        """Write the audit records; shielded so a client that hangs up loses none."""
        self.latency_ms["total"] = round((time.perf_counter() - self.started) * 1000, 3)
        record = RequestRecord(
            request_id=self.request_id,
            key_id=self.principal.key_id,
            model=self.model,
            route="chat.completions",
            status=status,
            blocked=blocked,
            categories=tuple(sorted(self.categories)),
            latency_ms=dict(self.latency_ms),
            prompt_tokens=usage.get("prompt_tokens") if usage else None,
            completion_tokens=usage.get("completion_tokens") if usage else None,
            stream=self.stream,
        )
        with anyio.CancelScope(shield=True):
            await self.state.audit.record(self.items, request=record)


async def _complete(
    body: ChatCompletionRequest, *, request: Request, principal: Principal, state: AppState
) -> Response:
    _enforce_limits(body, state)
    policy = state.policies.get(principal.policy)
    model = await state.upstreams.resolve(body.model)
    run = _Run(
        state=state,
        principal=principal,
        request_id=request.state.request_id,
        model=model,
        policy=policy,
        stream=body.stream,
    )
    texts = prompt_texts(body)
    try:
        verdicts = await _check_prompt(run, texts)
    except EngineOverloaded:
        await run.finish(status=429, blocked=None, usage=None)
        raise
    prompt_results = [
        {
            "prompt_index": 0,
            "content_filter_results": merge(filter_results(v) for v in verdicts.values()),
        }
    ]
    blocked = {source: v for source, v in verdicts.items() if v.blocked}
    if blocked:
        await run.finish(status=_blocked_status(blocked), blocked="prompt", usage=None)
        return _prompt_blocked(blocked, prompt_results)
    messages = [message.to_upstream() for message in body.messages]
    params = body.upstream_params(forwarded=FORWARDED_PARAMS)
    if body.stream:
        return await _stream(run, body, messages, params, prompt_results)
    upstream_started = time.perf_counter()
    try:
        response = await state.upstreams.complete(model, messages, **params)
    except ApiError as error:
        state.metrics.upstream_errors.labels(model, error.code or "upstream_error").inc()
        await run.finish(status=error.status, blocked=None, usage=None)
        raise
    run.timed("upstream", time.perf_counter() - upstream_started)
    choices, any_blocked = await _check_choices(run, response.choices)
    usage = usage_dict(getattr(response, "usage", None))
    await run.finish(status=200, blocked="completion" if any_blocked else None, usage=usage)
    body_out: dict[str, Any] = {
        "id": getattr(response, "id", None) or f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(getattr(response, "created", None) or time.time()),
        "model": model,
        "choices": choices,
        "usage": usage,
        "prompt_filter_results": prompt_results,
        "system_fingerprint": getattr(response, "system_fingerprint", None),
    }
    return JSONResponse(body_out)


def _enforce_limits(body: ChatCompletionRequest, state: AppState) -> None:
    limits = state.settings.chat
    if len(body.messages) > limits.max_messages:
        raise InvalidRequest(
            f"messages has {len(body.messages)} items; at most {limits.max_messages} are "
            "allowed (SAFEGATE_CHAT__MAX_MESSAGES)",
            param="messages",
            code="too_many_messages",
        )
    tools = len(body.tools or ())
    if tools > limits.max_tools:
        raise InvalidRequest(
            f"tools has {tools} items; at most {limits.max_tools} are allowed "
            "(SAFEGATE_CHAT__MAX_TOOLS)",
            param="tools",
            code="too_many_tools",
        )
    texts = prompt_texts(body)
    total = sum(len(text.text) for text in texts)
    if total > limits.max_prompt_chars:
        raise InvalidRequest(
            f"the request holds {total} characters the model would read (messages, tools, "
            f"response_format, stop); at most {limits.max_prompt_chars} are allowed "
            "(SAFEGATE_CHAT__MAX_PROMPT_CHARS)",
            param="messages",
            code="prompt_too_long",
        )
    for text in texts:
        if len(text.text) > limits.max_message_chars:
            raise InvalidRequest(
                f"{text.source} has {len(text.text)} characters; at most "
                f"{limits.max_message_chars} are allowed (SAFEGATE_CHAT__MAX_MESSAGE_CHARS)",
                param=text.source,
                code="message_too_long",
            )
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(body, name)
        if value is not None and value > limits.max_tokens:
            raise InvalidRequest(
                f"{name} is {value}; at most {limits.max_tokens} is allowed "
                "(SAFEGATE_CHAT__MAX_TOKENS)",
                param=name,
                code="max_tokens_too_large",
            )
    if body.n is not None and body.n > limits.max_choices:
        raise InvalidRequest(
            f"n is {body.n}; at most {limits.max_choices} choices are allowed "
            "(SAFEGATE_CHAT__MAX_CHOICES)",
            param="n",
            code="too_many_choices",
        )


async def _check_prompt(run: _Run, texts: list[PromptText]) -> dict[str, Verdict]:
    started = time.perf_counter()
    reports = await run.state.batcher.detect([t.text for t in texts]) if texts else []
    verdicts: dict[str, Verdict] = {}
    for text, report in zip(texts, reports, strict=True):
        verdict = run.state.engine.decide(
            report,
            direction=Direction.PROMPT,
            policy=run.policy,
            ignore=() if text.document else NOT_IN_TURNS,
        )
        verdicts[text.source] = verdict
        run.saw(verdict, text=text.text, source=text.source)
    run.timed("prompt_check", time.perf_counter() - started)
    return verdicts


def _only_failures(verdict: Verdict) -> bool:
    """Blocked because a member failed, with no label that blocked on its own."""
    return not any(
        verdict.labels[label].action.value == "block" for label in verdict.flagged_labels
    )


def _blocked_status(blocked: Mapping[str, Verdict]) -> int:
    return 503 if all(_only_failures(v) for v in blocked.values()) else 400


def _prompt_blocked(
    blocked: Mapping[str, Verdict], prompt_results: list[dict[str, Any]]
) -> JSONResponse:
    reasons = worst_reasons(blocked)
    if _blocked_status(blocked) == 503:
        body = error_body(
            "the safety check could not run, so the request was refused (the policy fails "
            f"closed): {'; '.join(reasons)}",
            type="service_unavailable",
            code="safety_check_failed",
        )
        return JSONResponse(body, status_code=503)
    error: dict[str, Any] = {
        "message": CONTENT_FILTER_MESSAGE.format(reasons="; ".join(reasons)),
        "type": "invalid_request_error",
        "param": "prompt",
        "code": "content_filter",
        "status": 400,
        "innererror": {
            "code": "ResponsibleAIPolicyViolation",
            "content_filter_result": prompt_results[0]["content_filter_results"],
            "reasons": reasons,
        },
    }
    return JSONResponse({"error": error}, status_code=400)


async def _check_completion(run: _Run, text: str) -> Verdict:
    """One completion text (or stream window) through the engine, under the run's policy."""
    started = time.perf_counter()
    limit = run.state.engine.max_text_chars
    pieces = [text[i : i + limit] for i in range(0, len(text), limit)] or [text]
    # Never shed: the prompt was admitted and the upstream has answered; refusing now
    # would waste the answer and cut a stream short.
    reports = await run.state.batcher.detect(pieces, sheddable=False)
    verdicts = [
        run.state.engine.decide(r, direction=Direction.COMPLETION, policy=run.policy)
        for r in reports
    ]
    run.timed("completion_check", time.perf_counter() - started)
    blocked = [v for v in verdicts if v.blocked]
    return blocked[0] if blocked else max(verdicts, key=lambda v: len(v.flagged_labels))


async def _check_choices(run: _Run, choices: Any) -> tuple[list[dict[str, Any]], bool]:
    out: list[dict[str, Any]] = []
    any_blocked = False
    for choice in choices:
        message = choice.message
        text = completion_text(message)
        index = int(getattr(choice, "index", len(out)))
        verdict = await _check_completion(run, text) if text.strip() else None
        if verdict is not None:
            run.saw(verdict, text=text, source=f"choices[{index}]")
        entry: dict[str, Any] = {
            "index": index,
            "message": _message_dict(message),
            "finish_reason": getattr(choice, "finish_reason", None) or "stop",
            "logprobs": None,
            "content_filter_results": filter_results(verdict) if verdict else _safe_results(),
        }
        if verdict is not None and verdict.blocked:
            any_blocked = True
            entry["message"] = {"role": "assistant", "content": None}
            entry["finish_reason"] = "content_filter"
            entry["content_filter_reasons"] = list(verdict.reasons)
        out.append(entry)
    return out, any_blocked


def _message_dict(message: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"role": "assistant", "content": getattr(message, "content", None)}
    calls = getattr(message, "tool_calls", None)
    if calls:
        data["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": call.function.arguments},
            }
            for call in calls
        ]
    return data


def _safe_results() -> FilterResults:
    """Annotations for an empty completion: nothing detected, nothing filtered."""
    return {
        **{
            c: {"filtered": False, "severity": "safe"}
            for c in ("hate", "sexual", "violence", "self_harm")
        },
        "profanity": {"filtered": False, "detected": False},
        "pii": {"filtered": False, "detected": False, "kinds": []},
        "custom_blocklists": {"filtered": False, "details": []},
    }


# -- streaming ------------------------------------------------------------------------------


def _sse(data: Mapping[str, Any]) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@dataclass
class _ToolCallBuffer:
    id: str = ""
    name: str = ""
    arguments: str = ""


async def _stream(
    run: _Run,
    body: ChatCompletionRequest,
    messages: list[dict[str, Any]],
    params: dict[str, Any],
    prompt_results: list[dict[str, Any]],
) -> Response:
    state = run.state
    upstream_started = time.perf_counter()
    try:
        chunks = await state.upstreams.stream(run.model, messages, **params)
        iterator = aiter(chunks)
        first = await anext(iterator, None)
    except ApiError as error:
        state.metrics.upstream_errors.labels(run.model, error.code or "upstream_error").inc()
        await run.finish(status=error.status, blocked=None, usage=None)
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(
        _events(run, first, iterator, prompt_results, upstream_started, include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(
    run: _Run,
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
    tools: dict[int, dict[int, _ToolCallBuffer]] = {}
    finish: dict[int, str] = {}
    usage: dict[str, int] | None = None
    blocked_any = False
    first_token = False
    status = 200

    def guard_for(index: int) -> StreamGuard:
        if index not in guards:
            guards[index] = StreamGuard(
                check=lambda text: _check_completion(run, text),
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
        if guard.blocked is not None:
            run.saw(guard.blocked, text=guard.checked_windows[-1], source=f"choices[{index}]")
        for window, verdict in zip(guard.checked_windows, guard.verdicts, strict=True):
            if verdict is not guard.blocked:
                run.saw(verdict, text=window, source=f"choices[{index}]")

    finished = False

    async def write_audit() -> None:
        """Write the audit records once: before ``[DONE]``, or when the stream breaks."""
        nonlocal finished
        if finished:
            return
        finished = True
        for index, guard in sorted(guards.items()):
            record(index, guard)
        await run.finish(status=status, blocked="completion" if blocked_any else None, usage=usage)

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
        run.timed("upstream", time.perf_counter() - upstream_started)
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
                verdict = await _check_completion(run, text)
                guard.verdicts.append(verdict)
                guard.checked_windows.append(text)
                if verdict.blocked:
                    guard.blocked = verdict
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
            last = guard.verdicts[-1] if guard.verdicts else None
            yield final_chunk(index, finish.get(index, "stop"), last)
        if include_usage and usage is not None:
            yield _sse({**head, "choices": [], "usage": usage})
        # The audit records are durable (database or spool) before the client hears the
        # stream is complete: a crash after [DONE] loses nothing.
        await write_audit()
        yield b"data: [DONE]\n\n"
    except ApiError as error:
        status = error.status
        run.state.metrics.upstream_errors.labels(run.model, error.code or "upstream_error").inc()
        yield _sse(error_body(error.message, type=error.type, param=error.param, code=error.code))
    finally:
        await write_audit()
