"""Every part of a chat request the model reads is checked; bad requests are 400s.

The real engine, litellm's ``mock_response`` upstream (the upstream is never reached
when the prompt check blocks, which the tests also show by counting audit records).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from gateway.chat import ChatCompletionRequest, json_text, prompt_texts
from gateway.config import Settings
from tests.gateway.conftest import EngineFactory, ready_client

HATE = "All Muslims are terrorists and should be thrown out of this country."
ANSWER = "To reset your console, hold the power button for ten seconds."
USER = {"role": "user", "content": "How do I reset my console?"}


@pytest.fixture
def chat(tmp_path: Path, engine_factory: EngineFactory) -> Iterator[TestClient]:
    upstreams = {
        "models": [
            {
                "name": "support",
                "litellm": {"model": "openai/support", "api_key": "k", "mock_response": ANSWER},
            }
        ],
        "num_retries": 0,
        "timeout_s": 5,
        "local_adapters": False,
    }
    path = tmp_path / "upstreams.yaml"
    path.write_text(yaml.safe_dump(upstreams), encoding="utf-8")
    client = ready_client(
        Settings(home=tmp_path / "home", upstreams={"file": path}), engine_factory
    )
    yield client
    client.__exit__(None, None, None)


def _tool(description: str, parameter: str = "the city") -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": parameter}},
                "required": ["city"],
            },
        },
    }


# Each row puts the same hateful sentence in one field the upstream turns into model input.
HARMFUL_FIELDS = [
    ("tools[0]", {"messages": [USER], "tools": [_tool(HATE)]}),
    ("tools[0]", {"messages": [USER], "tools": [_tool("Weather lookup.", HATE)]}),
    (
        "response_format",
        {
            "messages": [USER],
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "answer",
                    "schema": {
                        "type": "object",
                        "properties": {"text": {"type": "string", "description": HATE}},
                    },
                },
            },
        },
    ),
    ("messages[0].name", {"messages": [{**USER, "name": HATE[:60]}]}),
    (
        "messages[1].refusal",
        {"messages": [USER, {"role": "assistant", "content": "ok", "refusal": HATE}]},
    ),
    (
        "messages[1].tool_calls[0]",
        {
            "messages": [
                USER,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "say", "arguments": f'{{"text": "{HATE}"}}'},
                        }
                    ],
                },
            ]
        },
    ),
    ("stop[0]", {"messages": [USER], "stop": [HATE]}),
    (
        "tool_choice",
        {
            "messages": [USER],
            "tools": [_tool("Weather lookup.")],
            "tool_choice": {"type": "function", "function": {"name": "get_weather", "x": HATE}},
        },
    ),
]


@pytest.mark.parametrize(("source", "body"), HARMFUL_FIELDS)
def test_a_harmful_instruction_in_any_field_blocks_the_prompt(
    chat: TestClient, source: str, body: dict[str, Any]
) -> None:
    response = chat.post("/v1/chat/completions", json={"model": "support", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "content_filter"
    assert any(reason.startswith(f"{source}: ") for reason in error["innererror"]["reasons"])
    assert "hate" in error["message"]


def test_a_benign_tool_definition_passes(chat: TestClient) -> None:
    body = {"model": "support", "messages": [USER], "tools": [_tool("Look up the weather.")]}
    response = chat.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == ANSWER


def test_json_text_reads_what_a_model_reads_and_skips_schema_words() -> None:
    text = json_text(_tool("Look up the weather.", "the city name"))
    assert text.splitlines() == [
        "get_weather",
        "Look up the weather.",
        "city",
        "the city name",
        "city",  # required: ["city"]
    ]


def test_tool_definitions_count_toward_the_limits(tmp_path: Path) -> None:
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [USER], "tools": [_tool("x" * 5000)] * 3}
    )
    sources = [text.source for text in prompt_texts(request)]
    assert sources == ["messages[0]", "tools[0]", "tools[1]", "tools[2]"]


@pytest.mark.parametrize(
    ("settings_override", "body", "code", "param"),
    [
        (
            {"max_tools": 2},
            {"messages": [USER], "tools": [_tool("a"), _tool("b"), _tool("c")]},
            "too_many_tools",
            "tools",
        ),
        (
            {"max_message_chars": 1000},
            {"messages": [USER], "tools": [_tool("word " * 400)]},
            "message_too_long",
            "tools[0]",
        ),
        (
            {"max_prompt_chars": 3000},
            {"messages": [USER], "tools": [_tool("word " * 300)] * 3},
            "prompt_too_long",
            "messages",
        ),
    ],
)
def test_limits_cover_tools(
    tmp_path: Path,
    engine_factory: EngineFactory,
    settings_override: dict[str, int],
    body: dict[str, Any],
    code: str,
    param: str,
) -> None:
    settings = Settings(home=tmp_path / "home", chat=settings_override)
    client = ready_client(settings, engine_factory)
    try:
        response = client.post("/v1/chat/completions", json={"model": "support", **body})
    finally:
        client.__exit__(None, None, None)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user"}]}, "messages.0"),
        ({"messages": [{"role": "system", "content": None}, USER]}, "messages.0"),
        ({"messages": [USER, {"role": "assistant"}]}, "messages.1"),
        ({"messages": [USER, {"role": "tool", "content": "42"}]}, "messages.1"),
        ({"messages": [USER], "logit_bias": {"50256": 101}}, "logit_bias.50256"),
        ({"messages": [USER], "logit_bias": {"50256": "Infinity"}}, "logit_bias.50256"),
        ({"messages": [USER], "temperature": "NaN"}, "temperature"),
        ({"messages": [USER], "top_p": "-Infinity"}, "top_p"),
    ],
)
def test_invalid_requests_are_400s_naming_the_field(
    chat: TestClient, body: dict[str, Any], param: str
) -> None:
    # JSON has no Infinity or NaN, but Python's parser (and so FastAPI's) takes the bare
    # words: send them as such, unquoted.
    raw = json.dumps({"model": "support", **body})
    for word in ("Infinity", "NaN"):
        raw = raw.replace(f'"-{word}"', f"-{word}").replace(f'"{word}"', word)
    response = chat.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (
            '{"model": "support", "messages": [{"role": "user", "content": "hi \\ud800"}]}',
            "messages.0.content",
        ),
        (
            '{"model": "support", "messages": [{"role": "user", "content": "hi"}], '
            '"stop": "\\udfff"}',
            "stop",
        ),
        (
            '{"model": "support", "messages": [{"role": "user", "content": "hi"}], '
            '"tools": [{"type": "function", "function": {"name": "f", "description": '
            '"\\ud83d"}}]}',
            "tools.0",
        ),
    ],
)
def test_lone_surrogates_are_400s_not_upstream_failures(
    chat: TestClient, raw: str, param: str
) -> None:
    response = chat.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert "invalid Unicode" in error["message"]
