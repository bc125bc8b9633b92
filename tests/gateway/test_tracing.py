"""Tracing (``gateway.tracing``): each request's span and its stages' spans, read from the
SDK's in-memory exporter (and, once, from an OTLP/HTTP collector on a local socket), with
the chat tests' real engine and stub upstreams; and what no span may ever hold: content."""

from __future__ import annotations

import gzip
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway.config import Settings, TracingSettings
from gateway.tracing import RequestSpans, build_tracing
from tests.gateway.conftest import EngineFactory, ready_client
from tests.gateway.test_chat import ANSWER, HATE, QUESTION, stub_upstreams

# A caller's W3C trace context (the example of the Trace Context spec).
CALLER_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN_ID = "b7ad6b7169203331"
# A phrase only the prompt holds: no span may carry it, nor the texts around it.
CANARY = "my order number is QX-7741-ZEBRA"
CANARY_PROMPT = f"{QUESTION} By the way, {CANARY}."


def _settings(tmp_path: Path, **tracing: Any) -> Settings:
    return Settings(
        home=tmp_path / "home",
        upstreams={"file": stub_upstreams(tmp_path)},
        tracing=TracingSettings(**tracing),
    )


def _client(
    tmp_path: Path, factory: EngineFactory, exporter: InMemorySpanExporter, **tracing: Any
) -> TestClient:
    """A started app whose spans (from here on: not its readiness polls) go to ``exporter``."""
    client = ready_client(_settings(tmp_path, **tracing), factory, span_exporter=exporter)
    client.app.state.runtime.tracing.flush()  # type: ignore[attr-defined]
    exporter.clear()
    return client


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def traced(
    tmp_path: Path, engine_factory: EngineFactory, exporter: InMemorySpanExporter
) -> Iterator[TestClient]:
    client = _client(tmp_path, engine_factory, exporter, enabled=True)
    yield client
    client.__exit__(None, None, None)


def _spans(client: TestClient, exporter: InMemorySpanExporter) -> tuple[ReadableSpan, ...]:
    client.app.state.runtime.tracing.flush()  # type: ignore[attr-defined]
    return exporter.get_finished_spans()


def _request(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    (span,) = [s for s in spans if s.name == name]
    return span


def _stages(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> dict[str, ReadableSpan]:
    """The parent's children by name, checked to be in its trace and in start order."""
    children = sorted(
        (s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id),
        key=lambda s: s.start_time or 0,
    )
    assert all(c.context.trace_id == parent.context.trace_id for c in children)
    return {c.name: c for c in children}


def _ask(content: str = QUESTION, model: str = "support", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def _attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def _streamed(client: TestClient, body: dict[str, Any], **headers: str) -> str:
    with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
        assert response.status_code == 200, response.read()
        return "".join(response.iter_text())


# -- the spans of one request ------------------------------------------------------------------


def test_a_chat_is_a_request_span_with_one_child_per_stage(
    traced: TestClient, exporter: InMemorySpanExporter
) -> None:
    response = traced.post("/v1/chat/completions", json=_ask())
    assert response.status_code == 200, response.text
    spans = _spans(traced, exporter)
    request = _request(spans, "POST /v1/chat/completions")
    assert request.kind is SpanKind.SERVER
    assert request.parent is None
    attributes = _attributes(request)
    assert attributes["http.request.method"] == "POST"
    assert attributes["http.route"] == "/v1/chat/completions"
    assert attributes["http.response.status_code"] == 200
    assert attributes["safegate.request_id"] == response.headers["x-request-id"]
    assert attributes["safegate.key_id"]
    assert attributes["gen_ai.request.model"] == "support"
    assert attributes["safegate.stream"] is False
    assert attributes["safegate.outcome"] == "completed"

    stages = _stages(spans, request)
    assert list(stages) == ["prompt_check", "upstream", "completion_check", "audit"]
    prompt = _attributes(stages["prompt_check"])
    assert prompt["safegate.messages"] == 1
    assert prompt["safegate.texts"] == 1
    assert prompt["safegate.chars"] == len(QUESTION)
    assert prompt["safegate.action"] == "allow"
    assert prompt["safegate.flagged"] == ()
    assert 0.0 <= prompt["safegate.score.hate"] < 0.5
    assert "safegate.score.self_harm_intent" in prompt
    upstream = stages["upstream"]
    assert upstream.kind is SpanKind.CLIENT
    assert _attributes(upstream)["gen_ai.request.model"] == "support"
    assert _attributes(upstream)["safegate.upstream.status"] == 200
    assert _attributes(upstream)["gen_ai.usage.output_tokens"] > 0
    completion = _attributes(stages["completion_check"])
    assert completion["safegate.choices"] == 1
    assert completion["safegate.checks"] == 1
    assert completion["safegate.chars"] == len(ANSWER)
    assert completion["safegate.action"] == "allow"
    audit = _attributes(stages["audit"])
    assert audit["safegate.flagged_items"] == 0
    assert audit["safegate.status"] == 200
    assert audit["safegate.blocked_stage"] == "none"
    assert all(s.status.status_code is StatusCode.UNSET for s in spans)


def test_a_streamed_chat_traces_its_checking_as_one_span_with_its_increments(
    traced: TestClient, exporter: InMemorySpanExporter
) -> None:
    assert _streamed(traced, _ask(stream=True)).endswith("data: [DONE]\n\n")
    spans = _spans(traced, exporter)
    request = _request(spans, "POST /v1/chat/completions")
    assert _attributes(request)["safegate.stream"] is True
    assert _attributes(request)["safegate.outcome"] == "completed"
    stages = _stages(spans, request)
    assert list(stages) == ["prompt_check", "upstream", "completion_check", "audit"]
    assert _attributes(stages["upstream"])["safegate.stream"] is True
    assert _attributes(stages["upstream"])["safegate.upstream.status"] == 200
    checking = _attributes(stages["completion_check"])
    # Released a few words at a time: many increments, then the whole completion once more.
    assert checking["safegate.checks"] > 5
    assert checking["safegate.chars"] > len(ANSWER)  # each increment is read with context
    assert checking["safegate.choices"] == 1
    assert checking["safegate.stream_mode"] == "sync"
    assert checking["safegate.action"] == "allow"
    # The stream's checking lasts as long as the upstream's answer, and ends before the audit.
    assert stages["completion_check"].end_time >= stages["upstream"].end_time  # type: ignore[operator]
    assert stages["completion_check"].end_time <= stages["audit"].start_time  # type: ignore[operator]


def test_a_blocked_prompt_shows_the_block_and_no_upstream_span(
    traced: TestClient, exporter: InMemorySpanExporter
) -> None:
    response = traced.post("/v1/chat/completions", json=_ask(HATE, model="down"))
    assert response.status_code == 400
    spans = _spans(traced, exporter)
    request = _request(spans, "POST /v1/chat/completions")
    assert _attributes(request)["http.response.status_code"] == 400
    assert _attributes(request)["safegate.outcome"] == "prompt_blocked"
    assert request.status.status_code is StatusCode.UNSET  # the caller's error, not ours
    stages = _stages(spans, request)
    assert list(stages) == ["prompt_check", "audit"]
    prompt = _attributes(stages["prompt_check"])
    assert prompt["safegate.action"] == "block"
    assert "hate" in prompt["safegate.flagged"]
    assert "hate" in prompt["safegate.blocked_labels"]
    assert prompt["safegate.score.hate"] >= 0.5
    audit = _attributes(stages["audit"])
    assert audit["safegate.flagged_items"] == 1
    assert audit["safegate.status"] == 400
    assert audit["safegate.blocked_stage"] == "prompt"


def test_a_harmful_completion_shows_the_block_on_its_check(
    traced: TestClient, exporter: InMemorySpanExporter
) -> None:
    response = traced.post("/v1/chat/completions", json=_ask(model="hateful"))
    assert response.json()["choices"][0]["finish_reason"] == "content_filter"
    spans = _spans(traced, exporter)
    request = _request(spans, "POST /v1/chat/completions")
    assert _attributes(request)["safegate.outcome"] == "completion_blocked"
    stages = _stages(spans, request)
    completion = _attributes(stages["completion_check"])
    assert completion["safegate.action"] == "block"
    assert "hate" in completion["safegate.blocked_labels"]
    assert _attributes(stages["audit"])["safegate.blocked_stage"] == "completion"


def test_a_failing_upstream_ends_its_span_as_an_error_named_by_type_only(
    traced: TestClient, exporter: InMemorySpanExporter
) -> None:
    response = traced.post("/v1/chat/completions", json=_ask(model="down"))
    assert response.status_code == 502
    spans = _spans(traced, exporter)
    request = _request(spans, "POST /v1/chat/completions")
    assert _attributes(request)["safegate.outcome"] == "failed"
    assert request.status.status_code is StatusCode.ERROR
    upstream = _stages(spans, request)["upstream"]
    assert upstream.status.status_code is StatusCode.ERROR
    assert upstream.status.description == "UpstreamFailed"  # not the upstream's message
    assert upstream.events == ()  # no exception event: its message and traceback stay out
    attributes = _attributes(upstream)
    assert attributes["error.type"] == "UpstreamFailed"
    assert attributes["safegate.error.code"] == "upstream_error"
    assert attributes["safegate.upstream.status"] == 502


def test_moderation_traces_its_engine_check_and_audit(
    traced: TestClient, exporter: InMemorySpanExporter
) -> None:
    response = traced.post("/v1/moderations", json={"input": [HATE, QUESTION]})
    assert response.status_code == 200, response.text
    spans = _spans(traced, exporter)
    request = _request(spans, "POST /v1/moderations")
    assert _attributes(request)["safegate.request_id"] == response.headers["x-request-id"]
    stages = _stages(spans, request)
    assert list(stages) == ["moderation_check", "audit"]
    check = _attributes(stages["moderation_check"])
    assert check["safegate.texts"] == 2
    assert check["safegate.chars"] == len(HATE) + len(QUESTION)
    assert check["safegate.action"] == "block"
    assert "hate" in check["safegate.flagged"]
    audit = _attributes(stages["audit"])
    assert audit["safegate.flagged_items"] == 1
    assert audit["gen_ai.request.model"] == "safegate-moderation-1"


# -- what no span holds ------------------------------------------------------------------------


def _every_value(span: ReadableSpan) -> Iterator[str]:
    yield span.name
    yield span.status.description or ""
    for value in (span.attributes or {}).values():
        yield from (str(v) for v in value) if isinstance(value, tuple) else (str(value),)
    for event in span.events:
        yield event.name
        yield from (str(v) for v in (event.attributes or {}).values())


def test_no_span_holds_the_prompt_or_the_completion(
    traced: TestClient, exporter: InMemorySpanExporter
) -> None:
    assert traced.post("/v1/chat/completions", json=_ask(CANARY_PROMPT)).status_code == 200
    _streamed(traced, _ask(CANARY_PROMPT, stream=True))
    blocked = _ask(f"{HATE} {CANARY}")
    assert traced.post("/v1/chat/completions", json=blocked).status_code == 400
    assert traced.post("/v1/chat/completions", json=_ask(CANARY_PROMPT, model="rogue")).is_success
    assert (
        traced.post("/v1/chat/completions", json=_ask(CANARY_PROMPT, model="down")).status_code
        == 502
    )
    azure = "/openai/deployments/support/chat/completions?api-version=2024-10-21"
    assert traced.post(
        azure, json={"messages": [{"role": "user", "content": CANARY_PROMPT}]}
    ).is_success
    assert traced.post("/v1/moderations", json={"input": [CANARY_PROMPT, HATE]}).is_success
    spans = _spans(traced, exporter)
    assert len({s.context.trace_id for s in spans}) == 7
    assert "POST /openai/deployments/{deployment}/chat/completions" in {s.name for s in spans}
    secret = traced.headers["Authorization"].removeprefix("Bearer ")
    forbidden = [CANARY, QUESTION, HATE, ANSWER[:40], ANSWER[-40:], "api-version", secret]
    for span in spans:
        for value in _every_value(span):
            for text in forbidden:
                assert text not in value, f"span {span.name!r} holds {text!r}"


def test_a_request_span_is_named_by_its_route_template_never_its_path(
    traced: TestClient, exporter: InMemorySpanExporter
) -> None:
    assert traced.get("/v1/blocklists/payroll-codenames").status_code == 404
    assert traced.get("/v1/no/such/path").status_code == 404
    assert traced.request("PURGE", "/v1/models").status_code == 405
    spans = _spans(traced, exporter)
    assert sorted(s.name for s in spans) == ["GET", "GET /v1/blocklists/{name}", "HTTP /v1/models"]
    for span in spans:
        for value in _every_value(span):
            assert "payroll" not in value
            assert "no/such" not in value
            assert "PURGE" not in value


# -- off by default ----------------------------------------------------------------------------


def test_tracing_is_off_by_default_no_spans_no_sdk_provider(
    tmp_path: Path, engine_factory: EngineFactory, exporter: InMemorySpanExporter
) -> None:
    assert Settings().tracing.enabled is False
    client = ready_client(
        Settings(home=tmp_path / "home", upstreams={"file": stub_upstreams(tmp_path)}),
        engine_factory,
        span_exporter=exporter,
    )
    try:
        assert client.post("/v1/chat/completions", json=_ask()).status_code == 200
        assert client.post("/v1/moderations", json={"input": HATE}).status_code == 200
        tracing = client.app.state.runtime.tracing  # type: ignore[attr-defined]
        assert tracing.provider is None
        assert isinstance(tracing.tracer, trace.NoOpTracer)
        assert all(m.cls is not RequestSpans for m in client.app.user_middleware)  # type: ignore[attr-defined]
    finally:
        client.__exit__(None, None, None)


def test_an_app_with_tracing_off_never_imports_the_sdk(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from gateway.app import create_app\n"
        "from gateway.config import Settings\n"
        f"create_app(Settings(home={str(tmp_path / 'home')!r}))\n"
        "print(sorted({m for m in sys.modules if m.startswith(('opentelemetry.sdk', "
        "'opentelemetry.exporter'))}))\n"
    )
    done = subprocess.run(  # noqa: S603 - this interpreter, a fixed script
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip().splitlines()[-1] == "[]"


# -- the caller's trace, sampling --------------------------------------------------------------


def test_a_callers_traceparent_makes_the_request_its_child(
    traced: TestClient, exporter: InMemorySpanExporter
) -> None:
    headers = {"traceparent": f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"}
    assert traced.post("/v1/chat/completions", json=_ask(), headers=headers).status_code == 200
    _streamed(traced, _ask(stream=True), **headers)
    spans = _spans(traced, exporter)
    assert {s.context.trace_id for s in spans} == {int(CALLER_TRACE_ID, 16)}
    requests = [s for s in spans if s.kind is SpanKind.SERVER]
    assert len(requests) == 2
    for request in requests:
        assert request.parent is not None
        assert request.parent.span_id == int(CALLER_SPAN_ID, 16)
        assert request.parent.is_remote
        assert len(_stages(spans, request)) == 4


def test_sample_ratio_zero_records_only_what_a_sampled_caller_asks_for(
    tmp_path: Path, engine_factory: EngineFactory, exporter: InMemorySpanExporter
) -> None:
    client = _client(tmp_path, engine_factory, exporter, enabled=True, sample_ratio=0.0)
    try:
        assert client.post("/v1/moderations", json={"input": QUESTION}).status_code == 200
        assert _spans(client, exporter) == ()
        sampled = {"traceparent": f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"}
        response = client.post("/v1/moderations", json={"input": QUESTION}, headers=sampled)
        assert response.status_code == 200
        names = sorted(s.name for s in _spans(client, exporter))
        assert names == ["POST /v1/moderations", "audit", "moderation_check"]
    finally:
        client.__exit__(None, None, None)


# -- export by OTLP/HTTP -----------------------------------------------------------------------


class _Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP collector: keeps each export's path and decoded request."""

    received: list[tuple[str, ExportTraceServiceRequest]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        self.received.append((self.path, request))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[str, list[tuple[str, ExportTraceServiceRequest]]]]:
    received: list[tuple[str, ExportTraceServiceRequest]] = []
    handler = type("Collector", (_Collector,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()


def _exported(received: list[tuple[str, ExportTraceServiceRequest]]) -> dict[str, Any]:
    paths = {path for path, _ in received}
    names: list[str] = []
    services: set[str] = set()
    for _, request in received:
        for resource_spans in request.resource_spans:
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    services.add(attribute.value.string_value)
            for scope_spans in resource_spans.scope_spans:
                names.extend(span.name for span in scope_spans.spans)
    return {"paths": paths, "names": sorted(names), "services": services}


def test_spans_go_out_by_otlp_to_the_standard_endpoint_and_service_name(
    tmp_path: Path,
    engine_factory: EngineFactory,
    collector: tuple[str, list[tuple[str, ExportTraceServiceRequest]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, received = collector
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "gateway-eu-1")
    client = ready_client(_settings(tmp_path, enabled=True), engine_factory)
    response = client.post("/v1/chat/completions", json=_ask(CANARY_PROMPT))
    assert response.status_code == 200
    client.__exit__(None, None, None)  # the lifespan flushes what is left
    exported = _exported(received)
    assert exported["paths"] == {"/v1/traces"}
    assert exported["services"] == {"gateway-eu-1"}
    for stage in ("POST /v1/chat/completions", "prompt_check", "upstream", "audit"):
        assert stage in exported["names"]
    wire = b"".join(request.SerializeToString() for _, request in received)
    assert CANARY.encode() not in wire
    assert QUESTION.encode() not in wire


def test_the_settings_endpoint_and_service_name_win_over_the_environment(
    collector: tuple[str, list[tuple[str, ExportTraceServiceRequest]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, received = collector
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-the-environment")
    tracing = build_tracing(
        TracingSettings(enabled=True, endpoint=f"{url}/otlp/traces", service_name="safegate-eu")
    )
    with tracing.tracer.start_as_current_span("probe"):
        pass
    tracing.shutdown()
    assert _exported(received) == {
        "paths": {"/otlp/traces"},
        "names": ["probe"],
        "services": {"safegate-eu"},
    }


def test_tracing_settings_come_from_safegate_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFEGATE_TRACING__ENABLED", "true")
    monkeypatch.setenv("SAFEGATE_TRACING__SAMPLE_RATIO", "0.25")
    monkeypatch.setenv("SAFEGATE_TRACING__ENDPOINT", "http://collector:4318/v1/traces")
    assert Settings().tracing.model_dump() == {
        "enabled": True,
        "service_name": None,
        "endpoint": "http://collector:4318/v1/traces",
        "sample_ratio": 0.25,
        "export_timeout_s": 10.0,
    }
    with pytest.raises(ValueError, match="sample_ratio"):
        TracingSettings(sample_ratio=1.5)
