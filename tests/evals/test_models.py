"""Model callers at their seams: a real gateway app (its engine, litellm's Router with
``mock_response`` upstreams) reached by the official ``openai`` client, and litellm."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import select

from evals.errors import ModelNotFound
from evals.models import Completion, GatewayCaller, LitellmCaller
from evals.suite import GatewayModel, LitellmModel
from gateway.access import Role
from gateway.audit import AuditStore, FlaggedItemRow, ItemFilter, RequestLogRow
from gateway.config import Settings
from tests.gateway.conftest import EngineFactory, issue_key, ready_client

HATE = "All Muslims are terrorists and should be thrown out of this country."
ANSWER = (
    "To reset your console, hold the power button for ten seconds until the light blinks "
    "twice, then release it and wait for the start screen."
)
QUESTION = [{"role": "user", "content": "How do I reset my console?"}]
PARAMS = {"temperature": 0.0, "max_tokens": 64, "seed": 0}


class ThreadedTransport(httpx.AsyncBaseTransport):
    """Sends an async client's requests through a started ``TestClient`` (a thread)."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
        response = await asyncio.to_thread(
            self.client.request, request.method, str(request.url), content=body, headers=headers
        )
        keep = {
            k: v
            for k, v in response.headers.items()
            if k.lower() not in ("content-length", "content-encoding", "transfer-encoding")
        }
        return httpx.Response(response.status_code, headers=keep, content=response.content)


@pytest.fixture
def gateway(tmp_path: Path, engine_factory: EngineFactory) -> Iterator[TestClient]:
    upstreams = {
        "models": [
            {
                "name": name,
                "litellm": {"model": f"openai/{name}", "api_key": "k", "mock_response": text},
            }
            for name, text in (("support", ANSWER), ("hateful", HATE))
        ],
        "num_retries": 0,
        "timeout_s": 5,
        "local_adapters": False,
    }
    path = tmp_path / "upstreams.yaml"
    path.write_text(yaml.safe_dump(upstreams), encoding="utf-8")
    settings = Settings(home=tmp_path / "home", upstreams={"file": path})
    client = ready_client(settings, engine_factory)
    yield client
    client.__exit__(None, None, None)


def _caller(gateway: TestClient, model: str) -> GatewayCaller:
    spec = GatewayModel(name=model, via="gateway", base_url="http://testserver/v1", max_retries=0)
    transport = ThreadedTransport(gateway)
    return GatewayCaller(
        spec,
        api_key=issue_key(gateway, Role.DEVELOPER),
        http_client=httpx.AsyncClient(transport=transport, base_url="http://testserver"),
    )


async def _ask(caller: GatewayCaller, content: str) -> Completion:
    try:
        await caller.check()
        return await caller.complete([{"role": "user", "content": content}], PARAMS)
    finally:
        await caller.aclose()


def test_the_gateway_caller_sees_what_users_see(gateway: TestClient) -> None:
    allowed = asyncio.run(_ask(_caller(gateway, "support"), "How do I reset my console?"))
    assert allowed == Completion(ANSWER, "stop", None, None, allowed.latency_ms)

    # the gateway's 400 content_filter for a hateful prompt
    blocked = asyncio.run(_ask(_caller(gateway, "support"), HATE))
    assert (blocked.filtered, blocked.text, blocked.error) == ("prompt", None, None)

    # a completion the gateway withholds
    withheld = asyncio.run(_ask(_caller(gateway, "hateful"), "Tell me about my neighbours."))
    assert (withheld.filtered, withheld.finish_reason, withheld.text) == (
        "completion", "content_filter", None,
    )  # fmt: skip


def test_the_gateway_marks_what_the_eval_sends_as_eval_traffic(gateway: TestClient) -> None:
    asyncio.run(_ask(_caller(gateway, "support"), HATE))  # a blocked prompt
    asyncio.run(_ask(_caller(gateway, "hateful"), "Tell me about my neighbours."))  # withheld
    user = gateway.post(
        "/v1/chat/completions",
        json={"model": "support", "messages": [{"role": "user", "content": HATE}]},
    )
    assert user.status_code == 400  # the same prompt from a user, without the header

    audit: AuditStore = gateway.app.state.runtime.audit  # type: ignore[attr-defined]
    with audit.database.session() as session:
        requests = Counter(session.execute(select(RequestLogRow.origin, RequestLogRow.blocked)))
        items = Counter(session.execute(select(FlaggedItemRow.origin, FlaggedItemRow.direction)))
    expected = Counter([("eval", "prompt"), ("eval", "completion"), (None, "prompt")])
    assert requests == expected
    assert items == expected
    # the review queue leaves the eval's items out unless asked
    assert [
        stored.item.origin for stored in audit.list_items(ItemFilter(hide_eval=True)).items
    ] == [None]


def test_the_gateway_caller_checks_the_model_is_served(gateway: TestClient) -> None:
    caller = _caller(gateway, "gpt-5")
    with pytest.raises(ModelNotFound, match=r"does not serve 'gpt-5'; it serves .*support"):
        asyncio.run(_ask(caller, "hi"))


def test_a_gateway_error_is_recorded_not_raised(gateway: TestClient) -> None:
    caller = _caller(gateway, "support")
    result = asyncio.run(
        caller.complete(QUESTION, {**PARAMS, "max_tokens": 10**9})  # over the gateway's limit
    )
    assert result.text is None
    assert result.filtered is None
    assert result.error is not None
    assert result.error.startswith("BadRequestError (400): ")


def test_an_unreachable_gateway_is_recorded_per_call() -> None:
    spec = GatewayModel(
        name="m", via="gateway", base_url="http://127.0.0.1:9/v1", max_retries=0, timeout_s=5
    )
    result = asyncio.run(GatewayCaller(spec, api_key="k").complete(QUESTION, PARAMS))
    assert result.error is not None
    assert result.error.startswith("APIConnectionError")


def test_litellm_caller_with_a_mock_response() -> None:
    spec = LitellmModel(
        name="m", via="litellm", model="openai/m", params={"mock_response": ANSWER, "api_key": "k"}
    )
    caller = LitellmCaller(spec, params=spec.params)
    asyncio.run(caller.check())
    result = asyncio.run(caller.complete(QUESTION, PARAMS))
    assert (result.text, result.finish_reason, result.error) == (ANSWER, "stop", None)
