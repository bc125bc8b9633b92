"""Local serving on a tiny Phi-3: one base loaded once, adapters switched per request.

The base and its adapters are built in a temporary folder (``tiny_phi3``); the official
``openai`` client talks to the app through ``TestClient``, exactly as it would over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from openai.types.chat import ChatCompletionMessageParam
from transformers import Phi3ForCausalLM
from typer.testing import CliRunner

from finetune.db import Database
from finetune.errors import ModelNotFound, ServerBusy
from finetune.registry import ModelKind, ModelRegistry
from finetune.serving import app as serving_app
from finetune.serving.app import GenerationWorker, create_app
from finetune.serving.generation import (
    SamplingDefaults,
    SamplingParams,
    StopFilter,
    Turn,
    first_stop,
)
from finetune.serving.schemas import ChatCompletionRequest
from finetune.serving.server import LocalModelServer, RefreshReport
from finetune.settings import get_settings
from safegate.cli import app as cli
from tests.finetune.tiny_phi3 import (
    build_adapter,
    build_base,
    make_registry,
    register,
    train_adapter,
)

pytestmark = pytest.mark.filterwarnings(
    # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` when it wraps a
    # model (PeftModel.__init__); neither is ours to fix.
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
)

PROMPT = "hello tell me a story"
TURNS = [Turn("user", PROMPT)]
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]
GREEDY = SamplingParams(temperature=0, max_tokens=12)
STOPPER_PROMPTS = ("hello tell me a story", "what is the sky", "tell me about a cat")


@dataclass(frozen=True)
class Folders:
    base: Path
    a: Path
    b: Path
    stopper: Path
    root: Path


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """A tiny model runs fastest on one thread, and the machine has other work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Folders:
    root = tmp_path_factory.mktemp("tiny-phi3")
    base = build_base(root / "base")
    return Folders(
        base=base,
        a=build_adapter(base, root / "a", seed=1),
        b=build_adapter(base, root / "b", seed=2),
        stopper=train_adapter(base, root / "stopper", prompts=STOPPER_PROMPTS, answer="yes"),
        root=root,
    )


@pytest.fixture(scope="module")
def registry(folders: Folders) -> Iterator[ModelRegistry]:
    registry = make_registry(folders.root / "registry")
    adapters = {"ad-a": folders.a, "ad-b": folders.b, "stopper": folders.stopper}
    register(registry, base_name="tiny", base_path=folders.base, adapters=adapters)
    yield registry
    registry.database.dispose()


@pytest.fixture(scope="module")
def server(registry: ModelRegistry) -> LocalModelServer:
    return LocalModelServer.open("tiny", registry=registry)


@pytest.fixture(scope="module")
def expected(server: LocalModelServer) -> dict[str, str]:
    """Greedy answers to PROMPT, taken once, before any other request."""
    return {name: server.complete(name, TURNS, GREEDY).text for name in ("ad-a", "ad-b", "tiny")}


@pytest.fixture(scope="module")
def app(server: LocalModelServer) -> FastAPI:
    return create_app(server, refresh_s=0)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as client:
        yield client


@pytest.fixture
def oai(app: FastAPI) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=TestClient(app))


# -- one base, many adapters ------------------------------------------------------------------


def test_adapters_answer_differently_on_one_loaded_base(
    server: LocalModelServer, expected: dict[str, str]
) -> None:
    base = server.base_model
    assert len({expected["ad-a"], expected["ad-b"], expected["tiny"]}) == 3
    assert all(len(text.split()) >= 5 for text in expected.values())
    for name in ("ad-b", "ad-a", "tiny"):
        assert server.complete(name, TURNS, GREEDY).text == expected[name]
    assert server.base_loads == 1
    assert server.base_model is base


def test_switching_back_and_forth_leaks_nothing(
    server: LocalModelServer, expected: dict[str, str]
) -> None:
    order = ["ad-a", "ad-b", "ad-a", "tiny", "ad-b", "tiny", "ad-a", "ad-a", "ad-b"]
    assert [server.complete(name, TURNS, GREEDY).text for name in order] == [
        expected[name] for name in order
    ]


def test_an_adapter_answers_as_it_does_alone(
    folders: Folders, expected: dict[str, str], tmp_path: Path
) -> None:
    """A server that never loaded adapter B gives A's answer unchanged: B leaks nothing."""
    alone = make_registry(tmp_path / "alone")
    register(alone, base_name="tiny", base_path=folders.base, adapters={"ad-a": folders.a})
    single = LocalModelServer.open("tiny", registry=alone)
    assert [m.id for m in single.served()] == ["tiny", "ad-a"]
    assert single.complete("ad-a", TURNS, GREEDY).text == expected["ad-a"]
    assert single.complete("tiny", TURNS, GREEDY).text == expected["tiny"]
    alone.database.dispose()


def test_a_trained_adapter_stops_at_end_of_turn(server: LocalModelServer) -> None:
    completion = server.complete("stopper", [Turn("user", STOPPER_PROMPTS[1])], GREEDY)
    assert completion.text == "yes"
    assert completion.finish_reason == "stop"
    assert completion.completion_tokens == 2  # "yes" and <|end|>


def test_a_base_without_a_chat_template_uses_phi3s(
    folders: Folders, server: LocalModelServer, expected: dict[str, str]
) -> None:
    bare = build_base(folders.root / "bare", chat_template=False)  # same seed, same weights
    plain = LocalModelServer.open(str(bare))
    assert plain.tokenizer.chat_template is None
    assert [m.id for m in plain.served()] == [str(bare)]
    ours = plain.prepare(str(bare), TURNS, GREEDY).input_ids
    assert ours == server.prepare("tiny", TURNS, GREEDY).input_ids
    assert plain.complete(str(bare), TURNS, GREEDY).text == expected["tiny"]


@pytest.mark.parametrize(
    ("params", "cancelled"),
    [(GREEDY, True), (SamplingParams(temperature=0, max_tokens=12, timeout_s=1e-9), False)],
    ids=["client-gone", "past-deadline"],
)
def test_a_cancelled_or_late_generation_stops_at_the_next_token(
    server: LocalModelServer, params: SamplingParams, cancelled: bool
) -> None:
    cancel = threading.Event()
    if cancelled:
        cancel.set()
    completion = server.generate(server.prepare("ad-a", TURNS, params), params, cancel=cancel)
    # A client gone before its turn costs nothing; a deadline stops after the first token.
    tokens = 0 if cancelled else 1
    assert (completion.completion_tokens, completion.finish_reason) == (tokens, "length")


# -- refresh ------------------------------------------------------------------------------


def test_refresh_attaches_and_drops_adapters_without_reloading_the_base(
    folders: Folders,
    expected: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loads: list[object] = []
    original = Phi3ForCausalLM.from_pretrained

    def counting(*args: Any, **kwargs: Any) -> Any:
        loads.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(Phi3ForCausalLM, "from_pretrained", counting)
    registry = make_registry(tmp_path / "refresh")
    register(
        registry,
        base_name="tiny",
        base_path=folders.base,
        adapters={"ad-a": folders.a, "ad-b": folders.b},
        deploy=False,
    )
    registry.deploy("ad-a")
    live = LocalModelServer.open("tiny", registry=registry)
    base = live.base_model
    assert [m.id for m in live.served()] == ["tiny", "ad-a"]

    registry.deploy("ad-b")
    assert live.refresh().added == ("ad-b",)
    assert live.complete("ad-b", TURNS, GREEDY).text == expected["ad-b"]

    registry.undeploy("ad-a")
    assert live.refresh().removed == ("ad-a",)
    assert [m.id for m in live.served()] == ["tiny", "ad-b"]
    with pytest.raises(ModelNotFound, match="'ad-a' does not exist"):
        live.complete("ad-a", TURNS, GREEDY)
    assert live.complete("ad-b", TURNS, GREEDY).text == expected["ad-b"]

    registry.undeploy("ad-b")  # the last one: LoRA layers come out of the base
    assert live.refresh().removed == ("ad-b",)
    assert live.complete("tiny", TURNS, GREEDY).text == expected["tiny"]

    registry.deploy("ad-a")
    assert live.refresh().added == ("ad-a",)
    assert live.complete("ad-a", TURNS, GREEDY).text == expected["ad-a"]
    assert live.refresh() == RefreshReport()
    assert len(loads) == 1
    assert live.base_loads == 1
    assert live.base_model is base
    registry.database.dispose()


def test_a_request_for_a_just_deployed_adapter_is_answered_without_a_restart(
    folders: Folders, expected: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serving_app, "MIN_REFRESH_GAP_S", 0.0)
    registry = make_registry(tmp_path / "late")
    register(registry, base_name="tiny", base_path=folders.base, adapters={"ad-b": folders.b})
    registry.undeploy("ad-b")
    live = LocalModelServer.open("tiny", registry=registry)
    with TestClient(create_app(live, refresh_s=0)) as client:
        body = {"model": "ad-b", "messages": MESSAGES, "temperature": 0, "max_tokens": 12}
        assert client.post("/v1/chat/completions", json=body).status_code == 404
        registry.deploy("ad-b")
        answer = client.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == expected["ad-b"]
    registry.database.dispose()


def test_a_running_server_reads_the_registry_again_on_its_own(
    folders: Folders, tmp_path: Path
) -> None:
    registry = make_registry(tmp_path / "periodic")
    register(registry, base_name="tiny", base_path=folders.base, adapters={"ad-a": folders.a})
    live = LocalModelServer.open("tiny", registry=registry)
    with TestClient(create_app(live, refresh_s=0.05)) as client:
        registry.undeploy("ad-a")
        deadline = time.monotonic() + 10
        while [m["id"] for m in client.get("/v1/models").json()["data"]] != ["tiny"]:
            assert time.monotonic() < deadline, "the undeployed adapter is still served"
            time.sleep(0.05)
    registry.database.dispose()


def test_an_adapter_that_fails_to_load_is_reported_and_refused(
    folders: Folders, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((folders.a / "adapter_config.json").read_text())
    registry = make_registry(tmp_path / "broken-registry")
    register(
        registry,
        base_name="tiny",
        base_path=folders.base,
        adapters={"ad-a": folders.a, "broken": broken},
    )
    live = LocalModelServer.open("tiny", registry=registry)
    assert [m.id for m in live.served()] == ["tiny", "ad-a"]
    assert "no adapter_model.safetensors" in live.failed["broken"]
    with TestClient(create_app(live, refresh_s=0)) as client:
        health = client.get("/healthz").json()
        assert health["adapters"] == ["ad-a"]
        assert "broken" in health["failed"]
        refused = client.post(
            "/v1/chat/completions", json={"model": "broken", "messages": MESSAGES}
        )
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "model_unavailable"
    registry.database.dispose()


def test_an_adapter_for_another_base_leaves_the_loaded_one_intact(
    folders: Folders, expected: dict[str, str], tmp_path: Path
) -> None:
    """peft injects LoRA layers before it finds the shapes wrong; the server takes them out."""
    bigger = build_base(tmp_path / "bigger", hidden_size=32)
    registry = make_registry(tmp_path / "mismatch")
    register(
        registry,
        base_name="tiny",
        base_path=folders.base,
        adapters={
            "wrong-first": build_adapter(bigger, tmp_path / "w1", seed=3),
            "ad-a": folders.a,
            "wrong-later": build_adapter(bigger, tmp_path / "w2", seed=4),
        },
    )
    live = LocalModelServer.open("tiny", registry=registry)
    assert [m.id for m in live.served()] == ["tiny", "ad-a"]
    assert set(live.failed) == {"wrong-first", "wrong-later"}
    assert live.failed["wrong-first"].startswith("RuntimeError: Error(s) in loading state_dict")
    assert "size mismatch" in live.failed["wrong-first"]
    assert live.complete("tiny", TURNS, GREEDY).text == expected["tiny"]
    assert live.complete("ad-a", TURNS, GREEDY).text == expected["ad-a"]
    registry.undeploy("ad-a")
    live.refresh()
    assert live.complete("tiny", TURNS, GREEDY).text == expected["tiny"]
    registry.database.dispose()


# -- the OpenAI API -----------------------------------------------------------------------


def test_the_openai_client_gets_each_adapters_answer(
    oai: openai.OpenAI, expected: dict[str, str]
) -> None:
    for name in ("ad-a", "tiny", "ad-b"):
        answer = oai.chat.completions.create(
            model=name, messages=MESSAGES, temperature=0, max_tokens=12
        )
        assert answer.model == name
        assert answer.object == "chat.completion"
        assert answer.choices[0].message.role == "assistant"
        assert answer.choices[0].message.content == expected[name]
        assert answer.choices[0].finish_reason == "length"
        assert answer.usage is not None
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (8, 12)
        assert answer.usage.total_tokens == 20


def test_streamed_chunks_assemble_to_the_same_answer(
    oai: openai.OpenAI, expected: dict[str, str]
) -> None:
    for name in ("ad-b", "ad-a"):
        chunks = list(
            oai.chat.completions.create(
                model=name,
                messages=MESSAGES,
                temperature=0,
                max_tokens=12,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
        assert len({chunk.id for chunk in chunks}) == 1
        with_choices = [chunk for chunk in chunks if chunk.choices]
        assert with_choices[0].choices[0].delta.role == "assistant"
        text = "".join(chunk.choices[0].delta.content or "" for chunk in with_choices)
        assert text == expected[name]
        assert len(with_choices) > 3  # it streamed, not one blob
        assert [c.choices[0].finish_reason for c in with_choices][-1] == "length"
        assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
        usage = chunks[-1].usage
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (8, 12)


def test_a_stream_ends_with_done(client: TestClient) -> None:
    body = {"model": "stopper", "messages": MESSAGES, "stream": True, "temperature": 0}
    response = client.post("/v1/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "yes"
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_is_respected(
    oai: openai.OpenAI, expected: dict[str, str], stream: bool
) -> None:
    if stream:
        chunks = list(
            oai.chat.completions.create(
                model="ad-a", messages=MESSAGES, temperature=0, max_tokens=3, stream=True
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = chunks[-1].choices[0].finish_reason
    else:
        answer = oai.chat.completions.create(
            model="ad-a", messages=MESSAGES, temperature=0, max_tokens=3
        )
        assert answer.usage is not None
        assert answer.usage.completion_tokens == 3
        text, finish = answer.choices[0].message.content or "", answer.choices[0].finish_reason
    assert text.split() == expected["ad-a"].split()[:3]
    assert finish == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_ends_the_answer_before_it(
    oai: openai.OpenAI, expected: dict[str, str], stream: bool
) -> None:
    word = expected["ad-b"].split()[3]
    before = expected["ad-b"][: expected["ad-b"].index(word)]
    if stream:
        chunks = list(
            oai.chat.completions.create(
                model="ad-b",
                messages=MESSAGES,
                temperature=0,
                max_tokens=12,
                stop=[word],
                stream=True,
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = chunks[-1].choices[0].finish_reason
    else:
        answer = oai.chat.completions.create(
            model="ad-b", messages=MESSAGES, temperature=0, max_tokens=12, stop=word
        )
        text, finish = answer.choices[0].message.content or "", answer.choices[0].finish_reason
    assert (text, finish) == (before, "stop")


@pytest.mark.parametrize(
    ("generation_config", "defaults"),
    [
        ({}, SamplingDefaults(1.0, 1.0)),  # Phi-3's own files set no sampling values
        ({"do_sample": False, "temperature": 0.7}, SamplingDefaults(0.0, 1.0)),
        ({"do_sample": True, "temperature": 0.7, "top_p": 0.9}, SamplingDefaults(0.7, 0.9)),
        ({"temperature": 0.5}, SamplingDefaults(0.5, 1.0)),
        ({"temperature": 5.0}, SamplingDefaults(1.0, 1.0)),  # out of OpenAI's range: ignored
        ({"top_p": 0}, SamplingDefaults(1.0, 1.0)),
        ({"temperature": True}, SamplingDefaults(1.0, 1.0)),
    ],
)
def test_sampling_defaults_come_from_the_bases_generation_config(
    generation_config: dict[str, Any], defaults: SamplingDefaults
) -> None:
    assert SamplingDefaults.of(generation_config) == defaults


def test_a_request_without_temperature_gets_the_bases_default(
    folders: Folders, server: LocalModelServer, tmp_path: Path
) -> None:
    assert server.sampling_defaults == SamplingDefaults()  # the tiny base sets none
    request = ChatCompletionRequest.model_validate({"model": "tiny", "messages": MESSAGES})
    assert request.params(server.sampling_defaults).temperature == 1.0
    greedy = tmp_path / "greedy-base"
    shutil.copytree(folders.base, greedy)
    settings = greedy / "generation_config.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "do_sample": False}))
    local = LocalModelServer.open(str(greedy))
    assert local.sampling_defaults == SamplingDefaults(temperature=0.0)
    expected = local.complete(str(greedy), TURNS, GREEDY).text
    with TestClient(create_app(local, refresh_s=0)) as client:
        body = {"model": str(greedy), "messages": MESSAGES, "max_tokens": 12}
        for seed in (1, 2):  # no temperature: greedy, whatever the seed
            reply = client.post("/v1/chat/completions", json={**body, "seed": seed})
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["message"]["content"] == expected


def test_sampling_with_a_seed_repeats(oai: openai.OpenAI) -> None:
    def sample() -> str | None:
        answer = oai.chat.completions.create(
            model="ad-a", messages=MESSAGES, temperature=1.2, top_p=0.9, max_tokens=8, seed=7
        )
        return answer.choices[0].message.content

    assert sample() == sample()


def test_models_lists_the_base_and_each_deployed_adapter(oai: openai.OpenAI) -> None:
    models = oai.models.list().data
    assert [m.id for m in models] == ["tiny", "ad-a", "ad-b", "stopper"]
    assert {m.owned_by for m in models} == {"safegate"}
    assert {m.object for m in models} == {"model"}
    extras = [(m.model_extra or {}) for m in models]
    assert [(e["kind"], e["base"]) for e in extras] == [
        ("base", None),
        ("adapter", "tiny"),
        ("adapter", "tiny"),
        ("adapter", "tiny"),
    ]
    assert oai.models.retrieve("ad-b").id == "ad-b"


def test_an_unknown_model_is_a_404_in_openais_shape(client: TestClient, oai: openai.OpenAI) -> None:
    response = client.post("/v1/chat/completions", json={"model": "gpt-9", "messages": MESSAGES})
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "message": "the model 'gpt-9' does not exist; GET /v1/models lists the models "
            "served here",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    with pytest.raises(openai.NotFoundError) as raised:
        oai.chat.completions.create(model="gpt-9", messages=MESSAGES, stream=True)
    assert raised.value.code == "model_not_found"
    assert client.get("/v1/models/gpt-9").status_code == 404


BAD_BODIES: list[tuple[str, Any, str | None]] = [
    ("broken json", b'{"model": "tiny", "messages": [', None),
    ("not an object", [1, 2], None),
    ("no messages", {"model": "tiny"}, "messages"),
    ("empty messages", {"model": "tiny", "messages": []}, "messages"),
    ("max_tokens 0", {"model": "tiny", "messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    ("max_tokens cap", {"model": "tiny", "messages": MESSAGES, "max_tokens": 5000}, "max_tokens"),
    (
        "past the context",
        {"model": "tiny", "messages": MESSAGES, "max_tokens": 2000},
        "max_tokens",
    ),
    (
        "prompt too long",
        {"model": "tiny", "messages": [{"role": "user", "content": "cat " * 400}]},
        "messages",
    ),
    ("temperature", {"model": "tiny", "messages": MESSAGES, "temperature": "hot"}, "temperature"),
    ("n", {"model": "tiny", "messages": MESSAGES, "n": 3}, "n"),
    ("stop list", {"model": "tiny", "messages": MESSAGES, "stop": ["a"] * 5}, "stop"),
    (
        "tool role",
        {"model": "tiny", "messages": [{"role": "tool", "content": "x"}]},
        "messages.0.role",
    ),
    (
        "image part",
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
        },
        "messages.0.content",
    ),
    ("tools", {"model": "tiny", "messages": MESSAGES, "tools": [{"type": "function"}]}, "tools"),
]


@pytest.mark.parametrize(
    ("body", "param"), [(b, p) for _, b, p in BAD_BODIES], ids=[i for i, _, _ in BAD_BODIES]
)
def test_a_bad_request_is_a_400_never_a_422_or_500(
    client: TestClient, body: Any, param: str | None
) -> None:
    if isinstance(body, bytes):
        response = client.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
    else:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


def test_openais_optional_fields_are_accepted(client: TestClient) -> None:
    body = {
        "model": "stopper",
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": PROMPT}], "name": "u1"},
        ],
        "temperature": 0,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.1,
        "user": "someone",
        "response_format": {"type": "text"},
        "max_completion_tokens": 5,
        "store": False,
        "n": 1,
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "yes"


def test_concurrent_requests_each_get_their_own_adapter(
    app: FastAPI, expected: dict[str, str]
) -> None:
    order = ["ad-a", "ad-b", "tiny", "ad-b", "ad-a", "tiny"]

    async def ask(client: httpx.AsyncClient, name: str) -> str:
        body = {"model": name, "messages": MESSAGES, "temperature": 0, "max_tokens": 12}
        response = await client.post("/v1/chat/completions", json=body)
        return str(response.json()["choices"][0]["message"]["content"])

    async def everyone() -> list[str]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return list(await asyncio.gather(*(ask(client, name) for name in order)))

    assert asyncio.run(everyone()) == [expected[name] for name in order]


def test_the_queue_in_front_of_the_model_is_bounded() -> None:
    async def scenario() -> None:
        worker = GenerationWorker(max_queued=1)
        gate = threading.Event()
        first = worker.submit(gate.wait)
        with pytest.raises(ServerBusy):
            worker.submit(lambda: True)
        gate.set()
        assert await first is True
        assert await worker.run(lambda: 5) == 5
        worker.close()

    asyncio.run(scenario())


# -- stop strings while streaming ---------------------------------------------------------


@given(
    text=st.text(alphabet="ab c", max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=8),
    stops=st.lists(st.text(alphabet="ab c", min_size=1, max_size=3), max_size=3),
)
def test_a_streamed_answer_is_cut_where_the_whole_answer_is(
    text: str, cuts: list[int], stops: list[str]
) -> None:
    # Generation stops as soon as a stop string has appeared; the text ends there.
    ends = [text.find(s) + len(s) for s in stops if s in text]
    text = text[: min(ends)] if ends else text
    bounds = [0, *sorted(c for c in cuts if c <= len(text)), len(text)]
    pieces = [text[start:end] for start, end in zip(bounds, bounds[1:], strict=False)]
    cut = StopFilter(stops)
    streamed = "".join(cut.feed(piece) for piece in pieces) + cut.flush()
    found = first_stop(text, stops)
    assert streamed == (text if found is None else text[:found])


# -- safegate finetune serve --------------------------------------------------------------


@pytest.fixture
def home_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModelRegistry]:
    monkeypatch.setenv("SAFEGATE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SAFEGATE_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    database = Database(get_settings().database)
    database.migrate()
    yield ModelRegistry(database)
    database.dispose()
    get_settings.cache_clear()


@pytest.fixture
def uvicorn_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """``uvicorn.run`` replaced: the command builds the app, nothing listens."""
    import uvicorn

    calls: list[dict[str, Any]] = []
    fake: Callable[..., None] = lambda app, **kwargs: calls.append({"app": app, **kwargs})  # noqa: E731
    monkeypatch.setattr(uvicorn, "run", fake)
    return calls


def test_serve_loads_the_base_of_the_deployed_adapters(
    home_registry: ModelRegistry, folders: Folders, uvicorn_calls: list[dict[str, Any]]
) -> None:
    register(
        home_registry,
        base_name="tiny",
        base_path=folders.base,
        adapters={"ad-a": folders.a, "ad-b": folders.b},
    )
    result = CliRunner().invoke(cli, ["finetune", "serve", "--port", "8123"])
    assert result.exit_code == 0, result.output
    assert "base tiny; adapters: ad-a, ad-b" in result.output
    [call] = uvicorn_calls
    assert (call["host"], call["port"]) == ("127.0.0.1", 8123)
    with TestClient(call["app"]) as client:
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["tiny", "ad-a", "ad-b"]


def test_serve_listens_on_the_local_models_port_by_default(
    home_registry: ModelRegistry,
    folders: Folders,
    uvicorn_calls: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    register(home_registry, base_name="tiny", base_path=folders.base, adapters={"ad-a": folders.a})
    monkeypatch.setenv("SAFEGATE_LOCAL_MODELS_PORT", "8555")
    get_settings.cache_clear()
    result = CliRunner().invoke(cli, ["finetune", "serve"])
    assert result.exit_code == 0, result.output
    [call] = uvicorn_calls
    assert (call["host"], call["port"]) == ("127.0.0.1", 8555)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("none", "no adapter is deployed; run 'safegate models deploy NAME' or pass --base"),
        ("two bases", "deployed adapters span several bases: tiny (ad-a); other (ad-b)"),
        ("adapter as base", "'ad-a' is an adapter, not a base; serve its base 'tiny' instead"),
        ("missing base", "cannot load base 'nowhere'"),
    ],
)
def test_serve_refuses_with_a_reason(
    home_registry: ModelRegistry,
    folders: Folders,
    uvicorn_calls: list[dict[str, Any]],
    setup: str,
    message: str,
) -> None:
    register(home_registry, base_name="tiny", base_path=folders.base, adapters={"ad-a": folders.a})
    args = ["finetune", "serve"]
    if setup == "none":
        home_registry.undeploy("ad-a")
    elif setup == "two bases":
        home_registry.register("other", kind=ModelKind.BASE, path=folders.root / "bare")
        home_registry.register("ad-b", kind=ModelKind.ADAPTER, path=folders.b, base="other")
        home_registry.deploy("ad-b")
    elif setup == "adapter as base":
        args += ["--base", "ad-a"]
    else:
        args += ["--base", "nowhere"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output
    assert uvicorn_calls == []
