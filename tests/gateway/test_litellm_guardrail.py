"""``SafegateGuardrail`` in LiteLLM: through its hooks with the real engine, and inside a
real ``litellm`` proxy started here against a stub OpenAI-compatible upstream.

The hook tests hand the guardrail the session's loaded members (``engine_factory``) and
litellm's own response objects (``mock_response`` answers and streams). The proxy test
starts the ``litellm`` command on a loopback port with a ``config.yaml`` that loads the
guardrail as LiteLLM documents custom guardrails, and talks to it over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import litellm
import pytest
import uvicorn
import yaml
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from litellm.types.utils import ModelResponse, ModelResponseStream

from gateway.config import Settings
from gateway.integrations.litellm_guardrail import SafegateGuardrail
from gateway.integrations.litellm_texts import request_texts
from gateway.safety.engine import MemberSpec, SafetyEngine
from gateway.safety.normalize import NormalizedText
from gateway.safety.policy import Policy
from gateway.safety.settings import SHIPPED_POLICY
from gateway.safety.taxonomy import Category, Direction
from gateway.safety.verdict import Detection
from tests.ports import free_port

HATE = "All Muslims are terrorists and should be thrown out of this country."
BENIGN = "How do I reset my game console?"
ANSWER = "To reset your console, hold the power button for ten seconds."
REPO = Path(__file__).resolve().parents[2]
PROXY_START_TIMEOUT_S = 240.0
# The proxy builds the engine on its first request: loading takes a while on 2 cores.
PROXY_REQUEST_TIMEOUT_S = 180.0


class Broken:
    id = "broken"
    labels = frozenset({Category.HATE})

    def classify(self, texts: Sequence[NormalizedText]) -> list[Detection]:
        raise RuntimeError("weights unreadable")


def _guardrail(engine: SafetyEngine) -> SafegateGuardrail:
    return SafegateGuardrail(
        guardrail_name="safegate",
        event_hook=["pre_call", "post_call"],
        default_on=True,
        engine_factory=lambda settings: engine,
    )


@pytest.fixture
def guardrail(real_engine: SafetyEngine) -> Iterator[SafegateGuardrail]:
    guard = _guardrail(real_engine)
    yield guard
    asyncio.run(guard.aclose())


def _request(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "stub", "messages": [{"role": "user", "content": content}], **extra}


def _pre_call(guard: SafegateGuardrail, data: dict[str, Any]) -> object:
    return asyncio.run(
        guard.async_pre_call_hook(
            user_api_key_dict=None,  # type: ignore[arg-type]
            cache=None,  # type: ignore[arg-type]
            data=data,
            call_type="acompletion",
        )
    )


def _answer(text: str) -> ModelResponse:
    """A chat completion as litellm returns it."""
    response = litellm.completion(
        model="openai/stub", api_key="sk-stub", messages=[{"role": "user", "content": BENIGN}],
        mock_response=text,
    )  # fmt: skip
    assert isinstance(response, ModelResponse)
    return response


async def _chunks(text: str) -> AsyncIterator[ModelResponseStream]:
    """A stream as litellm yields it."""
    stream = await litellm.acompletion(
        model="openai/stub", api_key="sk-stub", messages=[{"role": "user", "content": BENIGN}],
        mock_response=text, stream=True,
    )  # fmt: skip
    async for chunk in stream:  # type: ignore[union-attr]
        yield chunk


@dataclass
class Streamed:
    content: str = ""
    finish: list[str | None] = field(default_factory=list)
    chunks: list[ModelResponseStream] = field(default_factory=list)
    error: HTTPException | None = None


def _stream(guard: SafegateGuardrail, text: str) -> Streamed:
    async def go() -> Streamed:
        out = Streamed()
        hook = guard.async_post_call_streaming_iterator_hook(
            user_api_key_dict=None,  # type: ignore[arg-type]
            response=_chunks(text),
            request_data=_request(BENIGN, stream=True),
        )
        try:
            async for chunk in hook:
                out.chunks.append(chunk)
                for choice in chunk.choices:
                    out.content += choice.delta.content or ""
                    out.finish.append(choice.finish_reason)
        except HTTPException as error:
            out.error = error
        return out

    return asyncio.run(go())


# -- through LiteLLM's hooks ------------------------------------------------------------


def test_a_hateful_prompt_is_blocked_with_its_category(guardrail: SafegateGuardrail) -> None:
    with pytest.raises(HTTPException) as raised:
        _pre_call(guardrail, _request(HATE))
    error = raised.value
    assert error.status_code == 400
    detail: dict[str, Any] = error.detail  # type: ignore[assignment]
    assert detail["code"] == "content_filter"
    assert detail["param"] == "prompt"
    assert "hate" in detail["categories"]
    assert "hate" in detail["error"]
    assert "messages[0]: prompt flagged for hate" in detail["error"]
    assert detail["content_filter_result"]["hate"]["filtered"] is True
    assert "Muslims" not in json.dumps(detail)  # the error never echoes the text


def test_a_benign_prompt_passes_and_its_answer_is_annotated(
    guardrail: SafegateGuardrail,
) -> None:
    data = _request(BENIGN)
    assert _pre_call(guardrail, data) is None
    response = asyncio.run(
        guardrail.async_post_call_success_hook(
            data=data,
            user_api_key_dict=None,  # type: ignore[arg-type]
            response=_answer(ANSWER),
        )
    )
    body = response.model_dump()
    assert body["choices"][0]["message"]["content"] == ANSWER
    assert body["choices"][0]["content_filter_results"]["hate"] == {
        "filtered": False,
        "severity": "safe",
    }
    prompt = body["prompt_filter_results"][0]
    assert prompt["prompt_index"] == 0
    assert prompt["content_filter_results"]["jailbreak"] == {"filtered": False, "detected": False}
    logged = data["metadata"]["standard_logging_guardrail_information"]
    assert [entry["guardrail_status"] for entry in logged] == ["success", "success"]
    assert BENIGN not in json.dumps(logged, default=str)


def test_a_hateful_tool_description_is_blocked_too(guardrail: SafegateGuardrail) -> None:
    tool = {
        "type": "function",
        "function": {"name": "lookup", "description": HATE, "parameters": {"type": "object"}},
    }
    with pytest.raises(HTTPException) as raised:
        _pre_call(guardrail, _request(BENIGN, tools=[tool]))
    assert raised.value.status_code == 400
    assert "tools[0]: prompt flagged for hate" in raised.value.detail["error"]


def test_a_hateful_completion_is_blocked_in_post_call(guardrail: SafegateGuardrail) -> None:
    data = _request(BENIGN)
    _pre_call(guardrail, data)
    with pytest.raises(HTTPException) as raised:
        asyncio.run(
            guardrail.async_post_call_success_hook(
                data=data,
                user_api_key_dict=None,  # type: ignore[arg-type]
                response=_answer(f"{ANSWER} {HATE}"),
            )
        )
    detail: dict[str, Any] = raised.value.detail  # type: ignore[assignment]
    assert raised.value.status_code == 400
    assert detail["param"] == "completion"
    assert "hate" in detail["categories"]
    assert detail["error"].startswith("safegate's content filter blocked the completion for")
    logged = data["metadata"]["standard_logging_guardrail_information"]
    assert logged[-1]["guardrail_status"] == "guardrail_intervened"


def test_a_stream_that_turns_hateful_is_cut(
    guardrail: SafegateGuardrail, real_engine: SafetyEngine
) -> None:
    streamed = _stream(guardrail, f"{ANSWER} {HATE}")
    assert streamed.error is not None
    assert streamed.error.status_code == 400
    assert "hate" in streamed.error.detail["categories"]
    assert streamed.error.detail["param"] == "completion"
    # Everything before the harm was sent a few words at a time; the part that failed
    # was not, and what the client got passes the engine on its own.
    assert streamed.content.startswith(ANSWER)
    assert "thrown out of this country" not in streamed.content
    (verdict,) = real_engine.check([streamed.content], direction=Direction.COMPLETION)
    assert not verdict.blocked
    assert "stop" not in streamed.finish


def test_a_benign_stream_arrives_whole_and_annotated(guardrail: SafegateGuardrail) -> None:
    text = f"{ANSWER} Your saved games stay on the internal storage."
    streamed = _stream(guardrail, text)
    assert streamed.error is None
    assert streamed.content == text
    assert streamed.finish[-1] == "stop"
    last = streamed.chunks[-1].choices[0]
    assert last.content_filter_results["hate"]["severity"] == "safe"  # type: ignore[attr-defined]
    # Released a few words at a time, not held to the end.
    assert len([c for c in streamed.chunks if c.choices[0].delta.content]) >= 2


def test_a_failing_classifier_fails_closed_unless_the_policy_lets_it_fail_open(
    loaded_members: list[MemberSpec],
) -> None:
    members = [*loaded_members, MemberSpec(Broken())]
    closed = _guardrail(SafetyEngine(members, policy=Policy.load(SHIPPED_POLICY)))
    with pytest.raises(HTTPException) as raised:
        _pre_call(closed, _request(BENIGN))
    assert raised.value.status_code == 503
    detail: dict[str, Any] = raised.value.detail  # type: ignore[assignment]
    assert detail["code"] == "safety_check_failed"
    assert "member broken failed (RuntimeError: weights unreadable)" in detail["error"]
    asyncio.run(closed.aclose())

    lenient = Policy.load(SHIPPED_POLICY).model_copy(update={"fail_open": frozenset({"broken"})})
    opened = _guardrail(SafetyEngine(members, policy=lenient))
    assert _pre_call(opened, _request(BENIGN)) is None
    with pytest.raises(HTTPException) as still:
        _pre_call(opened, _request(HATE))  # failing open does not open the filter
    assert still.value.status_code == 400
    asyncio.run(opened.aclose())


def test_an_engine_that_cannot_load_refuses_every_request() -> None:
    calls: list[Settings] = []

    def unloadable(settings: Settings) -> SafetyEngine:
        calls.append(settings)
        raise OSError("heads file missing")

    guard = SafegateGuardrail(guardrail_name="safegate", engine_factory=unloadable)
    for _ in range(2):
        with pytest.raises(HTTPException) as raised:
            _pre_call(guard, _request(BENIGN))
        assert raised.value.status_code == 503
        assert "OSError: heads file missing" in raised.value.detail["error"]
    assert len(calls) == 1  # built once; the failure is kept, not retried per request


def test_concurrent_first_requests_build_the_engine_once(real_engine: SafetyEngine) -> None:
    builds: list[Settings] = []

    def slow(settings: Settings) -> SafetyEngine:
        builds.append(settings)
        time.sleep(0.2)
        return real_engine

    guard = SafegateGuardrail(guardrail_name="safegate", engine_factory=slow)

    async def go() -> list[object]:
        return await asyncio.gather(*(guard.async_pre_call_hook(
            user_api_key_dict=None, cache=None, data=_request(BENIGN), call_type="acompletion",  # type: ignore[arg-type]
        ) for _ in range(4)))  # fmt: skip

    assert asyncio.run(go()) == [None] * 4
    assert len(builds) == 1
    asyncio.run(guard.aclose())


def test_the_config_parameters_reach_the_settings(tmp_path: Path) -> None:
    policy = tmp_path / "strict.yaml"
    policy.write_text("name: strict\nprompt:\n  profanity: {action: block}\n", encoding="utf-8")
    guard = SafegateGuardrail(
        guardrail_name="safegate",
        event_hook=["pre_call", "post_call"],
        policy_file=str(policy),
        safegate_home=str(tmp_path / "home"),
        # LiteLLM hands a custom guardrail every parameter of its config model as well
        unreachable_fallback="fail_closed",
        presidio_language="en",
    )
    assert guard.settings.policy_file == policy
    assert guard.settings.home == tmp_path / "home"
    with pytest.raises(ValueError, match="not in the supported event hooks"):
        SafegateGuardrail(guardrail_name="safegate", event_hook="logging_only")


def test_request_texts_reads_what_the_model_reads() -> None:
    data = {
        "model": "stub",
        "litellm_call_id": "not a prompt",
        "metadata": {"user_api_key_alias": "not a prompt either"},
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Part one."},
                                         {"type": "image_url", "image_url": {"url": "x"}}]},
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
             "function": {"name": "search", "arguments": '{"query": "consoles"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Retrieved page."},
        ],
        "tools": [{"type": "function", "function": {"name": "search", "description": "Find."}}],
        "stop": ["END"],
    }  # fmt: skip
    texts = [(t.source, t.text, t.document) for t in request_texts(data)]
    assert texts == [
        ("messages[0]", "Be brief.", False),
        ("messages[1].content[0]", "Part one.", False),
        ("messages[2].tool_calls[0]", "call_1 search\nquery\nconsoles", False),
        ("messages[3].tool_call_id", "call_1", False),
        ("messages[3]", "Retrieved page.", True),
        ("tools[0]", "search\nFind.", False),
        ("stop[0]", "END", False),
    ]


# -- a real LiteLLM proxy ----------------------------------------------------------------


def _stub_upstream(calls: list[str]) -> FastAPI:
    """An OpenAI-compatible upstream: model ``benign`` answers ANSWER, model ``rogue``
    answers ANSWER and then HATE; ``stream: true`` sends it word by word."""
    app = FastAPI()

    @app.post("/v1/chat/completions", response_model=None)
    async def complete(request: Request) -> JSONResponse | StreamingResponse:
        body = await request.json()
        calls.append(body["model"])
        text = ANSWER if body["model"] == "benign" else f"{ANSWER} {HATE}"
        head = {"id": "chatcmpl-stub", "created": int(time.time()), "model": body["model"]}
        if not body.get("stream"):
            return JSONResponse({
                **head, "object": "chat.completion",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 9, "completion_tokens": 20, "total_tokens": 29},
            })  # fmt: skip

        def events() -> Iterator[str]:
            words = text.split(" ")
            pieces = [w + " " for w in words[:-1]] + [words[-1]]
            for piece in pieces:
                choice = {
                    "index": 0,
                    "delta": {"role": "assistant", "content": piece},
                    "finish_reason": None,
                }
                chunk = {**head, "object": "chat.completion.chunk", "choices": [choice]}
                yield f"data: {json.dumps(chunk)}\n\n"
            end = {**head, "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}  # fmt: skip
            yield f"data: {json.dumps(end)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@dataclass
class Proxy:
    base: str
    key: str
    upstream_calls: list[str]

    def chat(self, model: str, content: str, **extra: Any) -> httpx.Response:
        return httpx.post(
            f"{self.base}/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": content}], **extra},
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=PROXY_REQUEST_TIMEOUT_S,
        )


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, members_home: Path) -> Iterator[Proxy]:
    """``litellm --config config.yaml`` on a loopback port, the guardrail loaded from the
    config as LiteLLM documents custom guardrails, models served by a stub upstream."""
    litellm_command = Path(sys.executable).parent / "litellm"
    if not litellm_command.exists():
        pytest.fail(f"the litellm command is missing beside {sys.executable}: pip install litellm")
    calls: list[str] = []
    upstream_port, proxy_port = free_port(), free_port()
    upstream = uvicorn.Server(
        uvicorn.Config(_stub_upstream(calls), host="127.0.0.1", port=upstream_port,
                       log_level="warning", lifespan="off")
    )  # fmt: skip
    thread = threading.Thread(target=upstream.run, daemon=True)
    thread.start()
    folder = tmp_path_factory.mktemp("litellm-proxy")
    key = "sk-" + os.urandom(32).hex()
    api_base = f"http://127.0.0.1:{upstream_port}/v1"
    config = {
        "model_list": [
            {
                "model_name": name,
                "litellm_params": {
                    "model": f"openai/{name}",
                    "api_base": api_base,
                    "api_key": "sk-stub",
                },
            }  # fmt: skip
            for name in ("benign", "rogue")
        ],
        "guardrails": [
            {
                "guardrail_name": "safegate",
                "litellm_params": {
                    "guardrail": "gateway.integrations.litellm_guardrail.SafegateGuardrail",
                    "mode": ["pre_call", "post_call"],
                    "default_on": True,
                    "policy_file": str(SHIPPED_POLICY),
                    "safegate_home": str(members_home),
                },
            }
        ],
        "litellm_settings": {"num_retries": 0},
        "general_settings": {"master_key": key},
    }
    config_file = folder / "config.yaml"
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    log_file = folder / "proxy.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    with log_file.open("wb") as log:
        server = subprocess.Popen(  # noqa: S603 - litellm's own command, fixed arguments
            [str(litellm_command), "--config", str(config_file),
             "--host", "127.0.0.1", "--port", str(proxy_port)],
            cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{proxy_port}"
    try:
        deadline = time.monotonic() + PROXY_START_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"{base}/health/liveliness", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                tail = log_file.read_text(encoding="utf-8", errors="replace")[-3000:]
                pytest.fail(
                    "the litellm proxy did not start (exit status "
                    f"{server.poll()}); the proxy needs the modules listed for it in "
                    f"pyproject.toml's dev extra. Its log ends:\n{tail}"
                )
            time.sleep(0.5)
        yield Proxy(base=base, key=key, upstream_calls=calls)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=30)
        upstream.should_exit = True
        thread.join(timeout=10)


def test_the_proxy_answers_a_benign_request_with_annotations(proxy: Proxy) -> None:
    response = proxy.chat("benign", BENIGN)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"] == ANSWER
    assert body["choices"][0]["content_filter_results"]["hate"]["severity"] == "safe"
    assert body["prompt_filter_results"][0]["content_filter_results"]["hate"]["filtered"] is False


def test_the_proxy_blocks_a_hateful_prompt_before_the_upstream(proxy: Proxy) -> None:
    before = len(proxy.upstream_calls)
    response = proxy.chat("benign", HATE)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "safegate's content filter blocked the prompt for" in error["message"]
    assert "hate" in error["message"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "prompt")
    assert "hate" in error["provider_specific_fields"]["categories"]
    assert error["provider_specific_fields"]["content_filter_result"]["hate"]["filtered"] is True
    assert "Muslims" not in response.text
    assert len(proxy.upstream_calls) == before  # the model was never called


def test_the_proxy_blocks_a_hateful_completion(proxy: Proxy) -> None:
    response = proxy.chat("rogue", BENIGN)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "blocked the completion for" in error["message"]
    assert error["param"] == "completion"
    assert "hate" in error["provider_specific_fields"]["categories"]
    assert "terrorists" not in response.text


def test_the_proxy_cuts_a_stream_that_turns_hateful(
    proxy: Proxy, real_engine: SafetyEngine
) -> None:
    content, errors = "", []
    with httpx.stream(
        "POST",
        f"{proxy.base}/v1/chat/completions",
        json={"model": "rogue", "stream": True, "messages": [{"role": "user", "content": BENIGN}]},
        headers={"Authorization": f"Bearer {proxy.key}"},
        timeout=PROXY_REQUEST_TIMEOUT_S,
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                errors.append(event["error"])
            for choice in event.get("choices") or ():
                content += choice["delta"].get("content") or ""
    assert content.startswith(ANSWER)
    assert "thrown out of this country" not in content
    (verdict,) = real_engine.check([content], direction=Direction.COMPLETION)
    assert not verdict.blocked
    assert len(errors) == 1
    assert "blocked the completion for" in errors[0]["message"]
    assert "hate" in errors[0]["message"]
