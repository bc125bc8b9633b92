"""Usage metering and quotas: tokens recorded per request (the upstream's, or counted),
quotas and budgets checked before the upstream is called, the usage report, the admin
route and the token metrics. Upstreams are litellm's ``mock_response`` (which reports
usage) and a real socket on 127.0.0.1 that answers without usage and counts its calls."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import litellm
import pytest
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, text

from gateway.access import KeyStore, Role
from gateway.access.quotas import Quota, QuotaGuard, spent_by_key
from gateway.access.usage import UsageFilter, usage_by_day
from gateway.audit import AuditStore, RequestLogRow, RequestRecord, UsageSource
from gateway.config import Settings
from gateway.db import Database
from gateway.errors import Forbidden, QuotaExceeded, ServiceUnavailable
from safegate.database import make_engine
from tests.gateway.conftest import (
    FREEZE_MARGIN_S,
    FROZEN_TIMEOUTS,
    EngineFactory,
    backend_pid,
    chat_record,
    frozen,
    ready_client,
    tagged,
)

QUESTION = "How do I reset my console?"
ANSWER = "Hold the power button for ten seconds, then wait for the start screen."
BARE_ANSWER = "Unplug the console for a minute and plug it back in."
MOCK_PROMPT_TOKENS = 10  # what litellm's mock_response reports
MOCK_COMPLETION_TOKENS = 20
# 22:00 UTC on the 30th of November: two hours before the day (and the month) turn.
EVENING = datetime(2026, 11, 30, 22, 0, tzinfo=UTC)


class _NoUsage(BaseHTTPRequestHandler):
    """An OpenAI-style upstream that never reports usage; counts the calls it gets."""

    calls = 0

    def do_POST(self) -> None:
        type(self).calls += 1
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
        if body.get("stream"):
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            for piece in BARE_ANSWER.split(" "):
                chunk = {
                    "id": "x",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": "bare",
                    "choices": [{"index": 0, "delta": {"content": piece + " "}}],
                }
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            return
        out = json.dumps(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 1,
                "model": "bare",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": BARE_ANSWER},
                        "finish_reason": "stop",
                    }
                ],
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def bare_server() -> Iterator[type[_NoUsage]]:
    handler = type("Handler", (_NoUsage,), {"calls": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.port = server.server_address[1]  # type: ignore[attr-defined]
    yield handler
    server.shutdown()
    server.server_close()


@dataclass
class FakeClock:
    """The app's clock: tests move it across days and months."""

    moment: datetime = EVENING
    calls: list[datetime] = field(default_factory=list)

    def __call__(self) -> datetime:
        return self.moment


def _upstreams(tmp_path: Path, port: int) -> Path:
    mock = {"api_key": "k", "mock_response": ANSWER}
    config = {
        "models": [
            {"name": "support", "litellm": {"model": "openai/support", **mock}},
            {"name": "priced", "litellm": {"model": "openai/gpt-4o-mini", **mock}},
            {"name": "llama", "litellm": {"model": "ollama/llama3.1", "mock_response": ANSWER}},
            {
                "name": "bare",
                "litellm": {
                    "model": "openai/bare",
                    "api_key": "k",
                    "api_base": f"http://127.0.0.1:{port}/v1",
                },
            },
        ],
        "num_retries": 0,
        "timeout_s": 10,
        "local_adapters": False,
    }
    path = tmp_path / "upstreams.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _app(
    tmp_path: Path,
    factory: EngineFactory,
    port: int,
    clock: FakeClock,
    *,
    database_url: str | None = None,
) -> TestClient:
    settings = Settings(
        home=tmp_path / "home",
        database_url=database_url,
        upstreams={"file": _upstreams(tmp_path, port)},
    )
    return ready_client(settings, factory, now=clock)


@pytest.fixture
def gateway(
    tmp_path: Path, engine_factory: EngineFactory, bare_server: type[_NoUsage], clock: FakeClock
) -> Iterator[TestClient]:
    client = _app(tmp_path, engine_factory, bare_server.port, clock)  # type: ignore[attr-defined]
    yield client
    client.__exit__(None, None, None)


def _key(client: TestClient, name: str = "ci-bot", quota: Quota | None = None) -> str:
    keys: KeyStore = client.app.state.runtime.keys  # type: ignore[attr-defined]
    return keys.create(name, Role.DEVELOPER, quota=quota or Quota()).secret


def _chat(client: TestClient, key: str, model: str = "support", **extra: Any) -> Any:
    body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], **extra}
    return client.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    )


def _rows(client: TestClient) -> list[RequestLogRow]:
    audit: AuditStore = client.app.state.runtime.audit  # type: ignore[attr-defined]
    with audit.database.session() as session:
        rows = session.scalars(select(RequestLogRow).order_by(RequestLogRow.created_at)).all()
        session.expunge_all()
        return list(rows)


def _messages() -> list[dict[str, Any]]:
    return [{"role": "user", "content": QUESTION}]


# -- recording ---------------------------------------------------------------------------


def test_the_upstreams_usage_is_recorded_per_request(gateway: TestClient) -> None:
    response = _chat(gateway, _key(gateway))
    assert response.status_code == 200, response.text
    assert response.json()["usage"] == {
        "prompt_tokens": MOCK_PROMPT_TOKENS,
        "completion_tokens": MOCK_COMPLETION_TOKENS,
        "total_tokens": MOCK_PROMPT_TOKENS + MOCK_COMPLETION_TOKENS,
    }
    [row] = _rows(gateway)
    assert (row.prompt_tokens, row.completion_tokens) == (10, 20)
    assert row.usage_source == UsageSource.UPSTREAM.value
    assert row.cost_usd is None  # litellm has no price for openai/support
    assert row.created_at == EVENING  # the app's clock


def test_tokens_are_counted_when_the_upstream_reports_none(
    gateway: TestClient, bare_server: type[_NoUsage]
) -> None:
    response = _chat(gateway, _key(gateway), model="bare")
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == BARE_ANSWER
    [row] = _rows(gateway)
    prompt = litellm.token_counter(model="openai/bare", messages=_messages())
    completion = litellm.token_counter(model="openai/bare", text=BARE_ANSWER)
    assert row.usage_source == UsageSource.COUNTED.value
    assert (row.prompt_tokens, row.completion_tokens) == (prompt, completion)
    assert completion >= 10  # the whole answer, not a placeholder
    assert response.json()["usage"]["total_tokens"] == prompt + completion
    assert bare_server.calls == 1


def test_a_stream_is_recorded_with_the_usage_the_gateway_asked_for(gateway: TestClient) -> None:
    key = _key(gateway)
    # The client does not ask for usage; the gateway asks the upstream for its record.
    with gateway.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": "support", "messages": _messages(), "stream": True},
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: {")]
    assert response.status_code == 200
    assert not any('"usage"' in event for event in events)  # not sent unasked
    [row] = _rows(gateway)
    assert row.stream is True
    assert row.usage_source == UsageSource.UPSTREAM.value
    # What litellm's mock_response reports on a stream: its own count of the prompt and
    # of the answer (a plain request's mock reports MOCK_PROMPT_TOKENS/..._COMPLETION_...).
    reported = (
        litellm.token_counter(model="openai/support", messages=_messages()),
        litellm.token_counter(model="openai/support", text=ANSWER),
    )
    assert (row.prompt_tokens, row.completion_tokens) == reported
    assert min(reported) >= 10  # the whole prompt and answer, not placeholders


def test_a_stream_without_usage_is_counted_and_reported_when_asked(gateway: TestClient) -> None:
    # ollama takes no stream_options: the gateway cannot ask, so it counts.
    with gateway.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": "llama",
            "messages": _messages(),
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        headers={"Authorization": f"Bearer {_key(gateway)}"},
    ) as response:
        payloads = [
            json.loads(line.removeprefix("data: "))
            for line in response.iter_lines()
            if line.startswith("data: {")
        ]
    text = "".join(
        choice["delta"].get("content") or "" for p in payloads for choice in p["choices"]
    )
    assert text == ANSWER
    [row] = _rows(gateway)
    assert row.usage_source == UsageSource.COUNTED.value
    assert row.prompt_tokens == litellm.token_counter(model="ollama/llama3.1", messages=_messages())
    assert row.completion_tokens == litellm.token_counter(model="ollama/llama3.1", text=ANSWER)
    [usage] = [p["usage"] for p in payloads if p.get("usage")]
    assert usage == {
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "total_tokens": row.prompt_tokens + row.completion_tokens,
    }


def test_a_priced_model_records_litellms_cost(gateway: TestClient) -> None:
    assert _chat(gateway, _key(gateway), model="priced").status_code == 200
    [row] = _rows(gateway)
    prompt_cost, completion_cost = litellm.cost_per_token(
        model="openai/gpt-4o-mini", prompt_tokens=10, completion_tokens=20
    )
    assert row.cost_usd == pytest.approx(prompt_cost + completion_cost)
    assert row.cost_usd > 0


def test_a_prompt_blocked_before_the_upstream_records_no_tokens(gateway: TestClient) -> None:
    hateful = "All Muslims are terrorists and should be thrown out of this country."
    body = {"model": "support", "messages": [{"role": "user", "content": hateful}]}
    key = _key(gateway)
    response = gateway.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 400
    [row] = _rows(gateway)
    assert (row.prompt_tokens, row.completion_tokens, row.usage_source) == (None, None, None)


# -- quotas ------------------------------------------------------------------------------


def test_over_the_daily_quota_is_a_429_naming_it_and_the_upstream_is_not_called(
    gateway: TestClient, bare_server: type[_NoUsage]
) -> None:
    key = _key(gateway, quota=Quota(daily_tokens=40))
    assert _chat(gateway, key).status_code == 200  # 30 tokens
    assert _chat(gateway, key).status_code == 200  # 60: the check saw 30 < 40
    response = _chat(gateway, key, model="bare")
    assert response.status_code == 429
    error = response.json()["error"]
    assert error["code"] == "quota_exceeded"
    assert error["type"] == "insufficient_quota"
    assert (
        "daily token quota of 40 tokens for key 'ci-bot' is used up (60 used)" in (error["message"])
    )
    assert "resets at 2026-12-01T00:00:00Z (in 2 h)" in error["message"]
    assert response.headers["retry-after"] == str(2 * 3600)
    assert bare_server.calls == 0
    refused = _rows(gateway)[-1]
    assert (refused.status, refused.prompt_tokens) == (429, None)


def test_the_day_window_resets_at_midnight_utc_and_the_month_at_the_first(
    gateway: TestClient, clock: FakeClock
) -> None:
    key = _key(gateway, quota=Quota(daily_tokens=30, monthly_tokens=90))
    assert _chat(gateway, key).status_code == 200
    assert _chat(gateway, key).status_code == 429  # 30 of 30 today

    clock.moment = EVENING + timedelta(hours=2, seconds=1)  # 1 December, 00:00:01
    assert _chat(gateway, key).status_code == 200  # a new day, and a new month
    clock.moment += timedelta(days=1)
    assert _chat(gateway, key).status_code == 200
    clock.moment += timedelta(days=1)
    assert _chat(gateway, key).status_code == 200  # 90 of 90 this month
    clock.moment += timedelta(days=1)
    response = _chat(gateway, key)
    assert response.status_code == 429
    message = response.json()["error"]["message"]
    assert "monthly token quota of 90 tokens for key 'ci-bot' is used up (90 used)" in message
    assert "resets at 2027-01-01T00:00:00Z" in message
    seconds = (datetime(2027, 1, 1, tzinfo=UTC) - clock.moment).total_seconds()
    assert response.headers["retry-after"] == str(int(seconds))

    clock.moment = datetime(2027, 1, 1, 0, 0, 5, tzinfo=UTC)
    assert _chat(gateway, key).status_code == 200


def test_a_budget_is_kept_at_litellms_prices(
    gateway: TestClient, bare_server: type[_NoUsage]
) -> None:
    one_request = sum(
        litellm.cost_per_token(model="openai/gpt-4o-mini", prompt_tokens=10, completion_tokens=20)
    )
    assert one_request == pytest.approx(0.0000135)
    key = _key(gateway, quota=Quota(monthly_budget_usd=0.00002))
    assert _chat(gateway, key, model="priced").status_code == 200
    assert _chat(gateway, key, model="priced").status_code == 200
    response = _chat(gateway, key, model="priced")
    assert response.status_code == 429
    message = response.json()["error"]["message"]
    assert "monthly budget of $0.00002 for key 'ci-bot' is spent ($0.000027 used)" in message

    # A model litellm cannot price cannot be kept to a budget: refused before any work.
    response = _chat(gateway, key, model="bare")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "budget_unenforceable"
    assert bare_server.calls == 0


def test_a_quota_set_later_applies_within_the_key_cache(gateway: TestClient) -> None:
    key = _key(gateway)
    assert _chat(gateway, key).status_code == 200
    keys: KeyStore = gateway.app.state.runtime.keys  # type: ignore[attr-defined]
    key_id = next(k.id for k in keys.list() if k.name == "ci-bot")
    keys.set_quota(key_id, Quota(daily_tokens=30))  # this store's cache drops the key
    assert _chat(gateway, key).status_code == 429
    keys.set_quota(key_id, Quota())
    assert _chat(gateway, key).status_code == 200


# -- the admin route and metrics ---------------------------------------------------------


def test_the_usage_route_is_admins_and_totals_per_key_model_and_day(
    gateway: TestClient, clock: FakeClock
) -> None:
    bot = _key(gateway, quota=Quota(daily_tokens=1000))
    other = _key(gateway, name="other-bot")
    assert _chat(gateway, bot).status_code == 200
    assert _chat(gateway, bot).status_code == 200
    assert _chat(gateway, bot, model="priced").status_code == 200
    assert _chat(gateway, other).status_code == 200
    clock.moment += timedelta(days=1)
    assert _chat(gateway, bot).status_code == 200

    refused = gateway.get("/v1/admin/usage", headers={"Authorization": f"Bearer {bot}"})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "insufficient_role"

    response = gateway.get("/v1/admin/usage", params={"key": "ci-bot", "since": "2026-11-01"})
    assert response.status_code == 200, response.text
    body = response.json()
    rows = [
        (r["day"], r["key_name"], r["model"], r["requests"], r["total_tokens"])
        for r in body["data"]
    ]
    assert rows == [
        ("2026-12-01", "ci-bot", "support", 1, 30),
        ("2026-11-30", "ci-bot", "priced", 1, 30),
        ("2026-11-30", "ci-bot", "support", 2, 60),
    ]
    [quota] = body["quotas"]
    assert (quota["key_name"], quota["daily_token_quota"], quota["tokens_today"]) == (
        "ci-bot",
        1000,
        30,
    )
    assert quota["tokens_this_month"] == 30  # December has just begun

    by_model = gateway.get(
        "/v1/admin/usage", params={"model": "support", "since": "2026-11-30", "until": "2026-11-30"}
    ).json()["data"]
    assert sorted((r["key_name"], r["requests"]) for r in by_model) == [
        ("ci-bot", 2),
        ("other-bot", 1),
    ]
    bad = gateway.get("/v1/admin/usage", params={"since": "yesterday"})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "since"
    unknown = gateway.get("/v1/admin/usage", params={"key": "nobody"})
    assert unknown.status_code == 404


def test_metrics_count_tokens_per_key_id_never_the_secret(gateway: TestClient) -> None:
    secret = _key(gateway)
    assert _chat(gateway, secret).status_code == 200
    keys: KeyStore = gateway.app.state.runtime.keys  # type: ignore[attr-defined]
    key_id = next(k.id for k in keys.list() if k.name == "ci-bot")
    metrics = gateway.get("/metrics").text
    assert (
        f'safegate_tokens_total{{key_id="{key_id}",model="support",type="prompt"}} 10.0' in metrics
    )
    assert (
        f'safegate_tokens_total{{key_id="{key_id}",model="support",type="completion"}} 20.0'
        in metrics
    )
    assert secret not in metrics


# -- on SQLite and PostgreSQL ------------------------------------------------------------


def test_quota_and_usage_end_to_end_on_each_database(
    tmp_path: Path,
    engine_factory: EngineFactory,
    bare_server: type[_NoUsage],
    clock: FakeClock,
    database_url: str,
) -> None:
    client = _app(
        tmp_path,
        engine_factory,
        bare_server.port,  # type: ignore[attr-defined]
        clock,
        database_url=database_url,
    )
    try:
        key = _key(client, quota=Quota(daily_tokens=20))
        assert _chat(client, key, model="bare").status_code == 200
        [row] = _rows(client)
        assert row.usage_source == UsageSource.COUNTED.value
        assert row.prompt_tokens + row.completion_tokens >= 20
        assert _chat(client, key).status_code == 429  # the counted tokens used it up
        assert bare_server.calls == 1
        data = client.get("/v1/admin/usage", params={"key": "ci-bot"}).json()["data"]
        assert [(r["day"], r["model"], r["requests"]) for r in data] == [
            ("2026-11-30", "bare", 1),
            ("2026-11-30", "support", 1),
        ]
    finally:
        client.__exit__(None, None, None)


@pytest.fixture
def audit(database: Database, tmp_path: Path) -> Iterator[AuditStore]:
    store = AuditStore(database, spool_dir=tmp_path / "spool", write_timeout_s=60)
    yield store
    asyncio.run(store.close())


def test_usage_by_day_and_quota_windows_on_each_database(
    database: Database, audit: AuditStore
) -> None:
    late = datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC)
    early = datetime(2026, 12, 1, 0, 0, 0, tzinfo=UTC)
    for record in (
        chat_record("key_a", late, cost_usd=0.25),
        chat_record("key_a", early, cost_usd=0.5),
        chat_record("key_a", early + timedelta(hours=3), model="n"),
        chat_record("key_b", early, tokens=(1, 1)),
    ):
        asyncio.run(audit.record([], request=record))
    assert audit.spooled_pending() == 0

    rows = usage_by_day(database, UsageFilter(since=date(2026, 11, 1), until=date(2026, 12, 31)))
    assert [(r.day.isoformat(), r.key_id, r.model, r.requests, r.total_tokens) for r in rows] == [
        ("2026-12-01", "key_a", "m", 1, 15),
        ("2026-12-01", "key_a", "n", 1, 15),
        ("2026-12-01", "key_b", "m", 1, 2),
        ("2026-11-30", "key_a", "m", 1, 15),
    ]
    assert rows[1].cost_usd is None
    assert rows[0].cost_usd == pytest.approx(0.5)

    now = early + timedelta(hours=5)
    guard = QuotaGuard(database, now=lambda: now)

    def check(quota: Quota, *, priced: bool = True) -> None:
        asyncio.run(guard.check(key_id="key_a", name="a", quota=quota, priced=priced))

    spent = asyncio.run(guard.totals("key_a", now=now))
    assert (spent.day_tokens, spent.month_tokens) == (30, 30)  # 30 November is last month
    assert spent.month_cost_usd == pytest.approx(0.5)
    with pytest.raises(QuotaExceeded, match=r"daily token quota of 30 tokens .* \(30 used\)"):
        check(Quota(daily_tokens=30))
    check(Quota(daily_tokens=31))
    with pytest.raises(QuotaExceeded, match=r"monthly budget of \$0\.50 for key 'a' is spent"):
        check(Quota(monthly_budget_usd=0.5))
    with pytest.raises(Forbidden, match="no price for this model"):
        check(Quota(monthly_budget_usd=5), priced=False)
    yesterday = asyncio.run(guard.totals("key_a", now=late))  # another day: read afresh
    assert (yesterday.day_tokens, yesterday.month_tokens) == (15, 15)
    with database.session() as session:  # every key's totals in one grouped query
        totals = spent_by_key(session, ["key_a", "key_b", "key_c"], now=now)
    assert totals["key_a"] == spent
    assert (totals["key_b"].day_tokens, totals["key_b"].month_cost_usd) == (2, 0.0)
    assert (totals["key_c"].day_tokens, totals["key_c"].month_tokens) == (0, 0)


def test_two_replicas_share_the_totals_through_the_database(
    database: Database, tmp_path: Path
) -> None:
    now = EVENING
    ticks = [0.0]
    audit = AuditStore(database, spool_dir=tmp_path / "spool", write_timeout_s=60)
    first = QuotaGuard(database, cache_ttl_s=2.0, now=lambda: now, clock=lambda: ticks[0])
    second = QuotaGuard(database, cache_ttl_s=2.0, now=lambda: now, clock=lambda: ticks[0])
    quota = Quota(daily_tokens=100)
    try:
        asyncio.run(first.check(key_id="key_a", name="a", quota=quota, priced=True))  # caches 0
        asyncio.run(second.check(key_id="key_a", name="a", quota=quota, priced=True))  # and 0
        # The other replica serves 120 tokens and records them; it counts them in its own
        # cached sums at once, so its next check refuses within the cache TTL.
        asyncio.run(audit.record([], request=chat_record("key_a", now, tokens=(100, 20))))
        second.spend("key_a", tokens=120, cost_usd=None, at=now)
        with pytest.raises(QuotaExceeded, match=r"\(120 used\)"):
            asyncio.run(second.check(key_id="key_a", name="a", quota=quota, priced=True))
        # Within its cache TTL the first replica still admits; past it, it reads the rows.
        asyncio.run(first.check(key_id="key_a", name="a", quota=quota, priced=True))
        ticks[0] = 2.5
        with pytest.raises(QuotaExceeded, match=r"\(120 used\)"):
            asyncio.run(first.check(key_id="key_a", name="a", quota=quota, priced=True))
        assert audit.spooled_pending() == 0
    finally:
        asyncio.run(audit.close())


def test_spooled_request_records_keep_their_usage(tmp_path: Path) -> None:
    from gateway.audit.spooled import from_spool_line, to_spool_line

    record = chat_record("key_a", EVENING, cost_usd=0.00125)
    assert from_spool_line(json.loads(json.dumps(to_spool_line(record)))) == record
    older = {
        k: v for k, v in to_spool_line(record).items() if k not in {"usage_source", "cost_usd"}
    }
    restored = from_spool_line(older)  # a line spooled before revision 0006
    assert isinstance(restored, RequestRecord)
    assert (restored.usage_source, restored.cost_usd) == (None, None)


def test_quotas_fail_closed_when_their_totals_cannot_be_read(
    sqlite_database: Database, tmp_path: Path
) -> None:
    quota = Quota(daily_tokens=100)
    ticks = [0.0]
    down = Database("postgresql+psycopg://postgres@127.0.0.1:9/safegate?connect_timeout=2")
    try:
        guard = QuotaGuard(
            down, cache_ttl_s=1.0, outage_grace_s=60.0, now=lambda: EVENING, clock=lambda: ticks[0]
        )
        with pytest.raises(ServiceUnavailable) as raised:
            asyncio.run(guard.check(key_id="key_a", name="a", quota=quota, priced=True))
        assert raised.value.code == "quota_unavailable"
        assert raised.value.headers["Retry-After"] == "5"
        # Totals read before the outage serve within the grace, and no longer.
        guard.database = sqlite_database
        asyncio.run(guard.check(key_id="key_a", name="a", quota=quota, priced=True))
        guard.database = down
        ticks[0] = 30.0
        asyncio.run(guard.check(key_id="key_a", name="a", quota=quota, priced=True))
        ticks[0] = 61.0
        with pytest.raises(ServiceUnavailable):
            asyncio.run(guard.check(key_id="key_a", name="a", quota=quota, priced=True))
    finally:
        down.dispose()

    unrecorded = QuotaGuard(sqlite_database, recording=False)
    with pytest.raises(ServiceUnavailable, match="SAFEGATE_AUDIT__RECORD_REQUESTS=false"):
        asyncio.run(unrecorded.check(key_id="key_a", name="a", quota=quota, priced=True))
    asyncio.run(unrecorded.check(key_id="key_a", name="a", quota=Quota(), priced=True))


@pytest.mark.postgres
def test_quotas_fail_closed_within_the_deadline_when_the_server_is_frozen(
    postgres_admin: Engine, postgres_url: str
) -> None:
    """The totals' read is stopped mid-statement with its server process: the check gives
    up at the 2 s client-side deadline with the outage's 503, not when the server wakes."""
    url, name = tagged(postgres_url)
    database = Database(url, timeouts=FROZEN_TIMEOUTS)
    database.migrate()
    locker = make_engine(postgres_url)
    guard = QuotaGuard(database, now=lambda: EVENING)
    quota = Quota(daily_tokens=100)

    async def scenario(stack: ExitStack) -> float:
        with locker.begin() as connection:  # holds the read until its server is stopped
            connection.execute(text("LOCK TABLE request_log IN ACCESS EXCLUSIVE MODE"))
            started = time.monotonic()
            checking = asyncio.create_task(
                guard.check(key_id="key_a", name="a", quota=quota, priced=True)
            )
            pid = await asyncio.to_thread(backend_pid, postgres_admin, name, waiting_on="Lock")
            stack.enter_context(frozen(pid))
        with pytest.raises(ServiceUnavailable) as raised:
            await checking
        assert raised.value.code == "quota_unavailable"
        return time.monotonic() - started

    try:
        with ExitStack() as stack:
            waited = asyncio.run(scenario(stack))
    finally:
        locker.dispose()
        database.dispose()
    cutoff = FROZEN_TIMEOUTS.call_deadline_s
    assert cutoff <= waited < cutoff + FREEZE_MARGIN_S
