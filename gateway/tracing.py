"""OpenTelemetry tracing: a span per request and per stage, with nothing of the content.

Off by default (``SAFEGATE_TRACING__ENABLED``). Off, the app holds the API's no-op tracer:
the SDK is never imported, no provider is installed and no span is recorded. On,
``build_tracing`` makes the app its own ``TracerProvider`` (the process's global provider
is left alone), sampled by ``ParentBased(TraceIdRatioBased(sample_ratio))``, whose
``BatchSpanProcessor`` sends spans by OTLP/HTTP from a worker thread (or to the exporter a
test passes); the app's lifespan flushes and shuts it down. ``RequestSpans`` opens each
request's span, a child of the caller's when it sends a W3C ``traceparent``::

    POST /v1/chat/completions   SERVER  http.request.method, http.route,
    |                                   http.response.status_code, safegate.request_id,
    |                                   safegate.key_id, gen_ai.request.model,
    |                                   safegate.stream, safegate.outcome
    +-- prompt_check                    safegate.messages, .texts, .chars and the checks'
    |                                   findings (below)
    +-- upstream                CLIENT  gen_ai.request.model, safegate.stream,
    |                                   safegate.upstream.status, gen_ai.usage.*_tokens
    +-- completion_check                safegate.checks (a stream's increments), .chars,
    |                                   findings; a stream's one span spans its checking
    +-- audit                           safegate.flagged_items, .status, .blocked_stage,
    |                                   gen_ai.request.model
    POST /v1/moderations        SERVER
    +-- moderation_check                safegate.texts, .chars, findings
    +-- audit

A check's findings: ``safegate.action`` (``allow``, ``annotate`` or ``block``: the worst
of its texts), ``safegate.flagged`` and ``safegate.blocked_labels`` (label names),
``safegate.score.<label>`` (each label's highest score, ``/`` and ``-`` written ``_``) and
``safegate.failed_members``. Attributes hold sizes, scores, actions, names and ids:
never a prompt's or a completion's text, a key's secret, a URL's path or query. A stage
that raises ends with status ERROR described by the exception's type alone (its message
may quote content); a ``gateway.errors.ApiError`` adds its code and status.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import ApiError
from gateway.safety.verdict import Action, Verdict

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    from gateway.audit import FlaggedItem, RequestRecord
    from gateway.config import TracingSettings

DEFAULT_SERVICE_NAME = "safegate"  # when neither the settings nor OTEL_SERVICE_NAME name it
INSTRUMENTATION = "safegate.gateway"

Attributes = Mapping[str, AttributeValue]

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACE_HEADERS = (b"traceparent", b"tracestate")
# Span names stay few: a method outside HTTP's own is _OTHER, its span named HTTP (as the
# conventions say).
_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)


class Tracing:
    """The app's tracer and, when tracing is on, the SDK provider behind it."""

    def __init__(self, tracer: Tracer, provider: TracerProvider | None = None) -> None:
        self.tracer = tracer
        self.provider = provider

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def flush(self) -> None:
        """Export the spans ended so far (the batch processor sends them every few seconds)."""
        if self.provider is not None:
            self.provider.force_flush()

    def shutdown(self) -> None:
        """Flush and stop the exporter; blocks up to the exporter's timeout (run off the loop)."""
        if self.provider is not None:
            self.provider.shutdown()


def build_tracing(settings: TracingSettings, *, exporter: SpanExporter | None = None) -> Tracing:
    """The no-op tracer when tracing is off; else a provider exporting by OTLP/HTTP.

    ``exporter`` replaces the OTLP exporter (tests pass the SDK's ``InMemorySpanExporter``).
    The endpoint is ``settings.endpoint``, else what ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
    or ``OTEL_EXPORTER_OTLP_ENDPOINT`` say, else ``http://localhost:4318/v1/traces``; the
    service name ``settings.service_name``, else ``OTEL_SERVICE_NAME``, else ``safegate``.
    """
    if not settings.enabled:
        return Tracing(trace.NoOpTracer())
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=settings.endpoint, timeout=settings.export_timeout_s)
    name = settings.service_name or os.environ.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME
    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: name}),
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
        shutdown_on_exit=False,  # the app's lifespan shuts it down
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider.get_tracer(INSTRUMENTATION), provider)


class RequestSpans:
    """Pure ASGI: one SERVER span per HTTP request, current while the app (and a streamed
    body) runs, named ``{method} {route template}``; installed only when tracing is on.

    Sits inside ``RequestContext``, whose request id it reads. A 5xx, or an exception
    that escapes the app, ends the span as failed.
    """

    def __init__(self, app: ASGIApp, *, tracer: Tracer) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"] if scope["method"] in _METHODS else "_OTHER"
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in _TRACE_HEADERS
        }
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        name = "HTTP" if method == "_OTHER" else method
        with stage(
            self.tracer,
            name,
            {"http.request.method": method},
            kind=SpanKind.SERVER,
            parent=_PROPAGATOR.extract(carrier),
        ) as span:
            try:
                await self.app(scope, receive, send_status)
            finally:
                if span.is_recording():
                    _describe_request(span, scope, name=name, status=status)


def _describe_request(span: Span, scope: Scope, *, name: str, status: int) -> None:
    route = getattr(scope.get("route"), "path", None)  # the template, never the raw path
    if route:
        span.update_name(f"{name} {route}")
        span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    state = scope.get("state", {})
    if "request_id" in state:
        span.set_attribute("safegate.request_id", state["request_id"])
    principal = state.get("principal")
    if principal is not None:
        span.set_attribute("safegate.key_id", principal.key_id)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))


@contextmanager
def stage(
    tracer: Tracer,
    name: str,
    attributes: Attributes | None = None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    parent: Context | None = None,
) -> Iterator[Span]:
    """A span around one stage, current while it runs; an exception ends it as failed,
    described by its type alone."""
    with tracer.start_as_current_span(
        name,
        context=parent,
        kind=kind,
        attributes=attributes,
        record_exception=False,  # an exception's message and traceback may quote content
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except BaseException as error:
            failed(span, error)
            raise


def start_stage(
    tracer: Tracer,
    name: str,
    attributes: Attributes | None = None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
) -> Span:
    """A stage that outlives one ``with`` (a stream's upstream and checking), a child of
    the current span and never itself current; ``end_stage`` ends it."""
    return tracer.start_span(
        name,
        kind=kind,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    )


def end_stage(
    span: Span, attributes: Attributes | None = None, *, error: BaseException | None = None
) -> None:
    """End a span from ``start_stage`` once; later calls do nothing."""
    if not span.is_recording():
        return
    if attributes:
        span.set_attributes(attributes)
    if error is not None:
        failed(span, error)
    span.end()


def failed(span: Span, error: BaseException) -> None:
    """Mark ``span`` failed by ``error``'s type; a cancellation is noted, not an error."""
    span.set_attribute("error.type", type(error).__name__)
    if isinstance(error, ApiError):
        span.set_attribute("safegate.error.code", error.code or error.type)
        span.set_attribute("safegate.error.status", error.status)
    if isinstance(error, Exception):
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))


def describe(span: Span, verdicts: Iterable[Verdict], **sizes: int) -> None:
    """Set on ``span`` what a check read (``sizes``: ``texts=3, chars=120``) and found;
    nothing is computed when the span does not record."""
    if not span.is_recording():
        return
    span.set_attributes({f"safegate.{name}": value for name, value in sizes.items()})
    span.set_attributes(verdict_attributes(verdicts))


def verdict_attributes(verdicts: Iterable[Verdict]) -> dict[str, AttributeValue]:
    """The action, labels flagged and blocked, each label's highest score and the members
    that failed, over ``verdicts``. Never text: a verdict holds none."""
    actions: set[str] = set()
    scores: dict[str, float] = {}
    flagged: set[str] = set()
    blocked: set[str] = set()
    failures: set[str] = set()
    for verdict in verdicts:
        actions.add(verdict.action)
        for label, result in verdict.labels.items():
            scores[label.value] = max(scores.get(label.value, 0.0), result.score)
            if result.flagged:
                flagged.add(label.value)
                if result.action is Action.BLOCK:
                    blocked.add(label.value)
        failures.update(report.member for report in verdict.members if report.error)
    attributes: dict[str, AttributeValue] = {
        "safegate.action": next((a for a in ("block", "annotate") if a in actions), "allow"),
        "safegate.flagged": sorted(flagged),
        "safegate.blocked_labels": sorted(blocked),
        "safegate.failed_members": sorted(failures),
    }
    for name, score in sorted(scores.items()):
        attributes[f"safegate.score.{name.replace('/', '_').replace('-', '_')}"] = round(score, 6)
    return attributes


def audit_attributes(items: Sequence[FlaggedItem], record: RequestRecord) -> Attributes:
    """The audit write's span: how many flagged texts, the request's model and status."""
    return {
        "gen_ai.request.model": record.model,
        "safegate.flagged_items": len(items),
        "safegate.status": record.status,
        "safegate.blocked_stage": record.blocked or "none",
    }
