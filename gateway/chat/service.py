"""The filtered chat completion, start to end, for one request.

``ChatService.start`` runs::

    limits -> the key's quotas (gateway.access.quotas) -> prompt check (every text the model reads)
           -> upstream (litellm)
           -> completion check (whole, or streamed in increments by ``gateway.chat.streaming``)
           -> usage (gateway.chat.metering), Azure content_filter annotations, audit records,
              metrics

and returns what the route renders: a ``PromptBlocked`` error, a ``ChatCompletion``, or a
``Streaming`` body of server-sent events.

- A blocked prompt: HTTP 400 in Azure OpenAI's shape, ``{"error": {"code":
  "content_filter", "param": "prompt", "message", "innererror": {"code":
  "ResponsibleAIPolicyViolation", "content_filter_result": {...}}}}``; no upstream call.
- A prompt blocked only because a classifier failed (the policy fails closed): 503
  ``safety_check_failed``, so clients retry instead of rewording.
- A prompt the engine's queue cannot take: 429 ``engine_overloaded`` with ``Retry-After``
  (``gateway.safety.batcher``); no upstream call.
- A key past a token quota or budget: 429 ``quota_exceeded`` with ``Retry-After`` at the
  quota's reset; a key with a budget and a model litellm cannot price: 403
  ``budget_unenforceable``; neither reaches the engine or the upstream.
- A blocked completion: its choice's ``finish_reason`` is ``content_filter`` and its
  content is withheld (``null``); ``content_filter_reasons`` says why.

What was flagged goes to the audit store with the request's metadata (never its text in
the request log), before the response or the stream's ``[DONE]`` leaves.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind

from gateway.access import Principal
from gateway.audit import FlaggedItem, flagged_item, request_record
from gateway.chat.content_filter import FilterResults, filter_results, merge
from gateway.chat.metering import Answer, Metered, meter, priced
from gateway.chat.prompt import (
    PromptText,
    completion_text,
    prompt_texts,
    usage_dict,
    worst_reasons,
)
from gateway.chat.schemas import (
    NOT_IN_TURNS,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    FunctionCall,
    PromptFilterResult,
    ToolCallOut,
    Usage,
)
from gateway.chat.upstreams import FORWARDED_PARAMS
from gateway.errors import ApiError, InvalidRequest, error_body
from gateway.safety.engine import EngineOverloaded
from gateway.safety.policy import Policy
from gateway.safety.taxonomy import Direction
from gateway.safety.verdict import Verdict
from gateway.state import AppState
from gateway.tracing import audit_attributes, describe, end_stage, stage, start_stage

# litellm maps a 400 to ContentPolicyViolationError by its wording: "request was rejected as
# a result of the safety system" on OpenAI-style routes, "ResponsibleAIPolicyViolation" on
# Azure routes. The message carries both, so LiteLLM clients' content-policy fallbacks
# trigger as they do for Azure's own filter.
CONTENT_FILTER_MESSAGE = (
    "The request was rejected as a result of the safety system (ResponsibleAIPolicyViolation): "
    "safegate's content filter blocked the prompt ({reasons}). Rephrase the request; see "
    "content_filter_result for each category."
)
# An upstream's token counts, as OpenTelemetry's GenAI conventions name them on its span.
_USAGE_ATTRIBUTES = {
    "prompt_tokens": "gen_ai.usage.input_tokens",
    "completion_tokens": "gen_ai.usage.output_tokens",
}


@dataclass(frozen=True)
class PromptBlocked:
    """The prompt failed its check: an error body and its status (400, or 503)."""

    status: int
    body: dict[str, Any]


@dataclass(frozen=True)
class Streaming:
    """A stream that passed its prompt check: server-sent events to send as they come."""

    events: AsyncIterator[bytes]


@dataclass
class ChatRun:
    """One request's bookkeeping: what to audit, what to time, what to trace."""

    state: AppState
    principal: Principal
    request_id: str
    model: str
    policy: Policy
    stream: bool
    origin: str | None = None  # the caller's safegate-origin (gateway.origin)
    pricing_model: str = ""  # the litellm model string tokens are counted and priced for
    messages: Sequence[Mapping[str, Any]] = ()  # what the upstream is sent (for counting)
    started: float = field(default_factory=time.perf_counter)
    items: list[FlaggedItem] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)
    completion_verdicts: list[Verdict] = field(default_factory=list)
    completion_chars: int = 0  # read by the completion checks (a stream's overlaps included)
    # The request's span (``gateway.tracing.RequestSpans``), current when the run is made.
    request_span: Span = field(default_factory=trace.get_current_span)
    upstream_span: Span = INVALID_SPAN

    def timed(self, stage: str, seconds: float) -> None:
        self.latency_ms[stage] = round(self.latency_ms.get(stage, 0.0) + seconds * 1000, 3)
        self.state.metrics.observe_stage(stage, seconds)

    def saw(self, verdict: Verdict, *, text: str, source: str) -> None:
        self.state.metrics.observe_verdict(verdict)
        if not verdict.flagged:
            return
        self.items.append(
            flagged_item(
                verdict,
                text=text,
                request_id=self.request_id,
                key_id=self.principal.key_id,
                model=self.model,
                source=source,
                origin=self.origin,
            )
        )

    async def finish(
        self, *, status: int, blocked: str | None, answer: Answer | None
    ) -> Metered | None:
        """Measure the usage (``answer``: what the upstream returned; ``None`` when it was
        never reached), write the audit records and count the tokens against the key's
        quotas; shielded so a client that hangs up loses none."""
        with anyio.CancelScope(shield=True):
            metered = (
                None
                if answer is None
                else await asyncio.to_thread(
                    meter, self.pricing_model, answer, messages=self.messages
                )
            )
            await self._record(status=status, blocked=blocked, metered=metered)
        return metered

    async def _record(self, *, status: int, blocked: str | None, metered: Metered | None) -> None:
        self.latency_ms["total"] = round((time.perf_counter() - self.started) * 1000, 3)
        record = request_record(
            request_id=self.request_id,
            key_id=self.principal.key_id,
            model=self.model,
            route="chat.completions",
            status=status,
            blocked=blocked,
            items=self.items,
            latency_ms=self.latency_ms,
            stream=self.stream,
            origin=self.origin,
            usage=metered,
            created_at=self.state.quotas.now(),
        )
        end_stage(self.upstream_span)  # a stream cut short: its upstream ends with it
        outcome = f"{blocked}_blocked" if blocked else "completed" if status == 200 else "failed"
        self.request_span.set_attributes(
            {
                "gen_ai.request.model": self.model,
                "safegate.stream": self.stream,
                "safegate.outcome": outcome,
            }
        )
        audit = audit_attributes(self.items, record)
        with stage(self.state.tracer, "audit", audit), anyio.CancelScope(shield=True):
            await self.state.audit.record(self.items, request=record)
        if metered is not None:
            key_id = self.principal.key_id
            self.state.quotas.spend(
                key_id, tokens=metered.total_tokens, cost_usd=metered.cost_usd, at=record.created_at
            )
            self.state.metrics.observe_tokens(
                key_id=key_id,
                model=self.model,
                prompt=metered.prompt_tokens,
                completion=metered.completion_tokens,
            )

    async def check_completion(self, text: str) -> Verdict:
        """One completion text (or stream window) through the engine, under the policy."""
        started = time.perf_counter()
        self.completion_chars += len(text)
        limit = self.state.engine.max_text_chars
        pieces = [text[i : i + limit] for i in range(0, len(text), limit)] or [text]
        # Never shed: the prompt was admitted and the upstream has answered; refusing now
        # would waste the answer and cut a stream short.
        reports = await self.state.batcher.detect(pieces, sheddable=False)
        verdicts = [
            self.state.engine.decide(r, direction=Direction.COMPLETION, policy=self.policy)
            for r in reports
        ]
        self.timed("completion_check", time.perf_counter() - started)
        blocked = [v for v in verdicts if v.blocked]
        verdict = blocked[0] if blocked else max(verdicts, key=lambda v: len(v.flagged_labels))
        self.completion_verdicts.append(verdict)
        return verdict

    def describe_completion_checks(self, span: Span, *, choices: int) -> None:
        describe(
            span,
            self.completion_verdicts,
            choices=choices,
            checks=len(self.completion_verdicts),
            chars=self.completion_chars,
        )

    def upstream_started(self) -> float:
        """The upstream call begins: its span opens (a stream's ends after its last chunk)."""
        self.upstream_span = start_stage(
            self.state.tracer,
            "upstream",
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": self.model,
                "safegate.stream": self.stream,
            },
            kind=SpanKind.CLIENT,
        )
        return time.perf_counter()

    def upstream_answered(self, started: float, *, usage: Mapping[str, int] | None) -> None:
        self.timed("upstream", time.perf_counter() - started)
        tokens = {
            _USAGE_ATTRIBUTES[k]: n for k, n in (usage or {}).items() if k in _USAGE_ATTRIBUTES
        }
        end_stage(self.upstream_span, {"safegate.upstream.status": 200, **tokens})

    def upstream_failed(self, error: ApiError) -> None:
        self.state.metrics.upstream_errors.labels(self.model, error.code or "upstream_error").inc()
        end_stage(self.upstream_span, {"safegate.upstream.status": error.status}, error=error)


class ChatService:
    """Filtered chat completions over the app's engine, upstreams and audit store."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    async def start(
        self,
        body: ChatCompletionRequest,
        *,
        principal: Principal,
        request_id: str,
        origin: str | None = None,
    ) -> PromptBlocked | ChatCompletion | Streaming:
        texts = prompt_texts(body)
        self._enforce_limits(body, texts)
        model = await self.state.upstreams.resolve(body.model)
        reachable = self.state.upstreams.litellm_models(model)
        run = ChatRun(
            state=self.state,
            principal=principal,
            request_id=request_id,
            model=model,
            policy=self.state.policies.get(principal.policy),
            stream=body.stream,
            origin=origin,
            pricing_model=reachable[0],
        )
        await self._check_quota(run, reachable)
        try:
            verdicts = await self._check_prompt(run, texts, messages=len(body.messages))
        except EngineOverloaded:
            await run.finish(status=429, blocked=None, answer=None)
            raise
        prompt_results = [
            PromptFilterResult(
                prompt_index=0,
                content_filter_results=merge(filter_results(v) for v in verdicts.values()),
            )
        ]
        blocked = {source: v for source, v in verdicts.items() if v.blocked}
        if blocked:
            outcome = _prompt_blocked(blocked, prompt_results[0].content_filter_results)
            await run.finish(status=outcome.status, blocked="prompt", answer=None)
            return outcome
        messages = [message.to_upstream() for message in body.messages]
        run.messages = messages
        params = body.upstream_params(forwarded=FORWARDED_PARAMS)
        if body.stream:
            from gateway.chat.streaming import open_stream

            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            if self.state.upstreams.reports_stream_usage(model):
                params["stream_options"] = {"include_usage": True}  # for the usage record
            else:  # a provider that takes no stream_options: the usage is counted instead
                params.pop("stream_options", None)
            return Streaming(
                await open_stream(
                    run,
                    messages,
                    params,
                    prompt_results=prompt_results,
                    include_usage=include_usage,
                )
            )
        return await self._complete(run, messages, params, prompt_results)

    async def _complete(
        self,
        run: ChatRun,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        prompt_results: list[PromptFilterResult],
    ) -> ChatCompletion:
        upstream_started = run.upstream_started()
        try:
            response = await self.state.upstreams.complete(run.model, messages, **params)
        except ApiError as error:
            run.upstream_failed(error)
            await run.finish(status=error.status, blocked=None, answer=None)
            raise
        usage = usage_dict(getattr(response, "usage", None))
        run.upstream_answered(upstream_started, usage=usage)
        with stage(self.state.tracer, "completion_check") as span:
            choices, any_blocked = await _check_choices(run, response.choices)
            run.describe_completion_checks(span, choices=len(choices))
        answer = Answer(
            usage=usage,
            completions=[completion_text(choice.message) for choice in response.choices],
        )
        metered = await run.finish(
            status=200, blocked="completion" if any_blocked else None, answer=answer
        )
        return ChatCompletion(
            id=getattr(response, "id", None) or f"chatcmpl-{uuid.uuid4().hex}",
            object="chat.completion",
            created=int(getattr(response, "created", None) or time.time()),
            model=run.model,
            choices=choices,
            usage=Usage(**metered.usage()) if metered else None,
            prompt_filter_results=prompt_results,
            system_fingerprint=getattr(response, "system_fingerprint", None),
        )

    async def _check_quota(self, run: ChatRun, reachable: Sequence[str]) -> None:
        """The key's token quotas and budget (``gateway.access.quotas``), before any work."""
        quota = run.principal.quota
        try:
            await self.state.quotas.check(
                key_id=run.principal.key_id,
                name=run.principal.name,
                quota=quota,
                priced=(
                    quota.monthly_budget_usd is None or await asyncio.to_thread(priced, reachable)
                ),
            )
        except ApiError as error:  # over quota (429), budget unenforceable (403), 503
            await run.finish(status=error.status, blocked=None, answer=None)
            raise

    def _enforce_limits(self, body: ChatCompletionRequest, texts: list[PromptText]) -> None:
        limits = self.state.settings.chat
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
        total = sum(len(text.text) for text in texts)
        if total > limits.max_prompt_chars:
            raise InvalidRequest(
                f"the request holds {total} characters the model would read (messages, "
                f"tools, response_format, stop); at most {limits.max_prompt_chars} are "
                "allowed (SAFEGATE_CHAT__MAX_PROMPT_CHARS)",
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

    async def _check_prompt(
        self, run: ChatRun, texts: list[PromptText], *, messages: int
    ) -> dict[str, Verdict]:
        started = time.perf_counter()
        sizes = {
            "safegate.messages": messages,
            "safegate.texts": len(texts),
            "safegate.chars": sum(len(t.text) for t in texts),
        }
        with stage(self.state.tracer, "prompt_check", sizes) as span:
            reports = await self.state.batcher.detect([t.text for t in texts]) if texts else []
            verdicts: dict[str, Verdict] = {}
            for text, report in zip(texts, reports, strict=True):
                verdict = self.state.engine.decide(
                    report,
                    direction=Direction.PROMPT,
                    policy=run.policy,
                    ignore=() if text.document else NOT_IN_TURNS,
                )
                verdicts[text.source] = verdict
                run.saw(verdict, text=text.text, source=text.source)
            describe(span, verdicts.values())
        run.timed("prompt_check", time.perf_counter() - started)
        return verdicts


def _only_failures(verdict: Verdict) -> bool:
    """Blocked because a member failed, with no label that blocked on its own."""
    return not any(
        verdict.labels[label].action.value == "block" for label in verdict.flagged_labels
    )


def _prompt_blocked(blocked: Mapping[str, Verdict], results: FilterResults) -> PromptBlocked:
    reasons = worst_reasons(blocked)
    if all(_only_failures(v) for v in blocked.values()):
        body = error_body(
            "the safety check could not run, so the request was refused (the policy fails "
            f"closed): {'; '.join(reasons)}",
            type="service_unavailable",
            code="safety_check_failed",
        )
        return PromptBlocked(503, body)
    error: dict[str, Any] = {
        "message": CONTENT_FILTER_MESSAGE.format(reasons="; ".join(reasons)),
        "type": "invalid_request_error",
        "param": "prompt",
        "code": "content_filter",
        "status": 400,
        "innererror": {
            "code": "ResponsibleAIPolicyViolation",
            "content_filter_result": results,
            "reasons": reasons,
        },
    }
    return PromptBlocked(400, {"error": error})


async def _check_choices(run: ChatRun, choices: Any) -> tuple[list[Choice], bool]:
    out: list[Choice] = []
    any_blocked = False
    for choice in choices:
        message = choice.message
        text = completion_text(message)
        index = int(getattr(choice, "index", len(out)))
        verdict = await run.check_completion(text) if text.strip() else None
        if verdict is not None:
            run.saw(verdict, text=text, source=f"choices[{index}]")
        results = filter_results(verdict) if verdict else safe_results()
        if verdict is not None and verdict.blocked:
            any_blocked = True
            out.append(
                Choice(
                    index=index,
                    message=AssistantMessage(role="assistant", content=None),
                    finish_reason="content_filter",
                    logprobs=None,
                    content_filter_results=results,
                    content_filter_reasons=list(verdict.reasons),
                )
            )
            continue
        out.append(
            Choice(
                index=index,
                message=_assistant_message(message),
                finish_reason=getattr(choice, "finish_reason", None) or "stop",
                logprobs=None,
                content_filter_results=results,
            )
        )
    return out, any_blocked


def _assistant_message(message: Any) -> AssistantMessage:
    calls = getattr(message, "tool_calls", None)
    if not calls:
        return AssistantMessage(role="assistant", content=getattr(message, "content", None))
    return AssistantMessage(
        role="assistant",
        content=getattr(message, "content", None),
        tool_calls=[
            ToolCallOut(
                id=call.id,
                type="function",
                function=FunctionCall(name=call.function.name, arguments=call.function.arguments),
            )
            for call in calls
        ],
    )


def safe_results() -> FilterResults:
    """Annotations for an empty completion: nothing detected, nothing filtered."""
    return {
        **{
            c: {"filtered": False, "severity": "safe"}
            for c in ("hate", "sexual", "violence", "self_harm")
        },
        "profanity": {"filtered": False, "detected": False},
        "pii": {"filtered": False, "detected": False, "kinds": []},
        "custom_blocklists": {"filtered": False, "details": []},
        "language": {"filtered": False, "detected": None, "low_confidence": False},
    }
