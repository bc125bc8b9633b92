"""Clients as application developers use them, against a real ``safegate serve``-style
server on a loopback port: litellm (``openai/`` and ``azure/`` routes), the OpenAI SDK's
``AzureOpenAI``, LangChain's ``ChatOpenAI`` and ``AzureChatOpenAI``. A blocked prompt must
surface as each client's content-policy error with safegate's details; Azure's deployment
route must take the deployment as the model when the body's ``model`` is missing or null.
Upstreams are litellm mock responses: nothing leaves the machine."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import litellm
import openai
import pytest
import uvicorn
import yaml
from langchain_openai import AzureChatOpenAI, ChatOpenAI
from litellm.exceptions import ContentPolicyViolationError

from gateway.access import KeyStore, Role
from gateway.app import create_app
from gateway.blocklists import BlocklistStore
from gateway.config import Settings
from gateway.safety.engine import MemberSpec, SafetyEngine
from gateway.safety.members.blocklist import BlocklistClassifier
from gateway.safety.policy import Policy
from tests.ports import free_port

HATE = "All Muslims are terrorists and should be thrown out of this country."
QUESTION = "How do I reset my console?"
ANSWER = "Hold the power button for ten seconds, then wait for the start screen."
API_VERSION = "2024-10-21"
READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Server:
    url: str
    key: str


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, loaded_members: list[MemberSpec]
) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("clients")
    upstreams = folder / "upstreams.yaml"
    upstreams.write_text(
        yaml.safe_dump(
            {
                "models": [
                    {
                        "name": "support",
                        "litellm": {
                            "model": "openai/support",
                            "api_key": "k",
                            "mock_response": ANSWER,
                        },
                    }
                ],
                "num_retries": 0,
                "local_adapters": False,
            }
        ),
        encoding="utf-8",
    )
    settings = Settings(home=folder / "home", upstreams={"file": upstreams})

    def factory(settings: Settings, store: BlocklistStore) -> SafetyEngine:
        return SafetyEngine(
            [*loaded_members, MemberSpec(BlocklistClassifier(source=store))],
            policy=Policy.load(settings.policy_file),
        )

    app = create_app(settings, engine_factory=factory)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    served = uvicorn.Server(config)
    thread = threading.Thread(target=served.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the gateway did not become ready")
        time.sleep(0.1)
    keys: KeyStore = app.state.runtime.keys
    yield Server(url, keys.create("clients-test", Role.DEVELOPER).secret)
    served.should_exit = True
    thread.join(timeout=10)


def _ask(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def _assert_safegate_details(body: object) -> None:
    """The body every client hands back: Azure's shape, categories named, no text."""
    assert isinstance(body, dict)
    error = body.get("error", body)
    assert error["code"] == "content_filter"
    inner = error["innererror"]
    assert inner["code"] == "ResponsibleAIPolicyViolation"
    assert inner["content_filter_result"]["hate"]["filtered"] is True
    assert HATE not in str(body)


# -- litellm ------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["openai", "azure"])
def test_litellm_raises_content_policy_violation(server: Server, route: str) -> None:
    where = (
        {"api_base": f"{server.url}/v1"}
        if route == "openai"
        else {"api_base": server.url, "api_version": API_VERSION}
    )

    def ask(content: str) -> Any:
        return litellm.completion(
            model=f"{route}/support",
            api_key=server.key,
            messages=_ask(content),
            num_retries=0,
            **where,
        )

    assert ask(QUESTION).choices[0].message.content == ANSWER
    with pytest.raises(ContentPolicyViolationError) as raised:
        ask(HATE)
    assert raised.value.status_code == 400
    assert "hate" in raised.value.message


# -- the OpenAI SDK -----------------------------------------------------------------------


def test_azure_openai_client_sees_the_content_filter_details(server: Server) -> None:
    azure = openai.AzureOpenAI(
        api_key=server.key, azure_endpoint=server.url, api_version=API_VERSION, max_retries=0
    )
    answer = azure.chat.completions.create(model="support", messages=_ask(QUESTION))  # type: ignore[arg-type]
    assert answer.choices[0].message.content == ANSWER
    with pytest.raises(openai.BadRequestError) as raised:
        azure.chat.completions.create(model="support", messages=_ask(HATE))  # type: ignore[arg-type]
    assert raised.value.code == "content_filter"
    _assert_safegate_details(raised.value.body)


# -- LangChain ----------------------------------------------------------------------------


def test_langchain_chat_openai_answers_and_surfaces_the_block(server: Server) -> None:
    model = ChatOpenAI(
        model="support", base_url=f"{server.url}/v1", api_key=server.key, max_retries=0
    )
    assert model.invoke(QUESTION).content == ANSWER
    with pytest.raises(openai.BadRequestError) as raised:
        model.invoke(HATE)
    assert raised.value.code == "content_filter"
    _assert_safegate_details(raised.value.body)


def test_langchain_azure_chat_openai_uses_the_deployment(server: Server) -> None:
    # AzureChatOpenAI sends "model": null; the deployment in the path names the model.
    model = AzureChatOpenAI(
        azure_deployment="support",
        azure_endpoint=server.url,
        api_version=API_VERSION,
        api_key=server.key,
        max_retries=0,
    )
    assert model.invoke(QUESTION).content == ANSWER
    with pytest.raises(openai.BadRequestError) as raised:
        model.invoke(HATE)
    assert raised.value.code == "content_filter"
    _assert_safegate_details(raised.value.body)


@pytest.mark.parametrize("body", [{"model": None}, {}], ids=["null", "missing"])
def test_deployment_route_takes_the_deployment_when_model_is_absent(
    server: Server, body: dict[str, object]
) -> None:
    response = httpx.post(
        f"{server.url}/openai/deployments/support/chat/completions",
        params={"api-version": API_VERSION},
        headers={"api-key": server.key},
        json={**body, "messages": _ask(QUESTION)},
    )
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "support"
    assert response.json()["choices"][0]["message"]["content"] == ANSWER
