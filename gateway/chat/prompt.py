"""Which texts of a chat request and of an upstream answer the safety engine reads.

Prompt check: every text the model will read is checked before any upstream call, in
request order: message contents and content parts, names, refusals, tool calls with their
ids and arguments, tool definitions, the response format's schema, tool_choice and stop
sequences. Tool results and content parts marked ``"document": true`` are checked for
indirect attacks too (a user's own turn is never an "indirect" attack;
``SafetyEngine.decide(ignore=...)``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.chat.schemas import DOCUMENT_ROLES, ChatCompletionRequest
from gateway.safety.verdict import Verdict


@dataclass(frozen=True, slots=True)
class PromptText:
    """One checkable text of the request: a message (or a document part of one)."""

    source: str  # "messages[2]" or "messages[2].content[1]"
    text: str
    document: bool


# JSON-Schema words that carry no instruction: left out of a schema's checkable text.
_SCHEMA_WORDS = frozenset(
    {
        "type", "object", "string", "integer", "number", "boolean", "array", "null",
        "properties", "required", "items", "additionalProperties", "enum", "description",
        "title", "function", "parameters", "name", "json_schema", "json_object", "text",
        "schema", "strict", "anyOf", "oneOf", "allOf", "$defs", "definitions", "$ref",
        "default", "format", "minimum", "maximum", "minItems", "maxItems", "pattern",
        "const", "examples", "auto", "none",
    }
)  # fmt: skip


def json_text(value: Any) -> str:
    """Every string a model would read in a JSON value (keys and values), one per line,
    less the schema's own vocabulary: tool definitions and response formats are prompts
    too."""
    words: list[str] = []

    def walk(item: Any) -> None:
        if isinstance(item, str):
            if item not in _SCHEMA_WORDS:
                words.append(item)
        elif isinstance(item, dict):
            for key, inner in item.items():
                if str(key) not in _SCHEMA_WORDS:
                    words.append(str(key))
                walk(inner)
        elif isinstance(item, list):
            for inner in item:
                walk(inner)
        elif item is not None and not isinstance(item, bool):
            words.append(str(item))

    walk(value)
    return "\n".join(words)


def arguments_text(arguments: str) -> str:
    """A tool call's arguments as a model reads them: the strings of its JSON, or the raw
    text when it is not JSON."""
    try:
        return json_text(json.loads(arguments))
    except ValueError:
        return arguments


def prompt_texts(request: ChatCompletionRequest) -> list[PromptText]:
    """Every text the model will read, in request order; empty texts are skipped.

    Messages (content, content parts, names, refusals, tool calls and their ids), tool
    definitions, the response format's schema, tool_choice and stop sequences: anything
    the upstream turns into model input is checked and counts toward the limits.
    """
    texts: list[PromptText] = []
    for index, message in enumerate(request.messages):
        where = f"messages[{index}]"
        document = message.role in DOCUMENT_ROLES
        for field_name in ("name", "refusal", "tool_call_id"):
            value = getattr(message, field_name)
            if value:
                texts.append(PromptText(f"{where}.{field_name}", value, False))
        if isinstance(message.content, str):
            texts.append(PromptText(where, message.content, document))
        elif isinstance(message.content, list):
            for part_index, part in enumerate(message.content):
                texts.append(
                    PromptText(
                        f"{where}.content[{part_index}]", part.text, document or part.document
                    )
                )
        for call_index, call in enumerate(message.tool_calls or ()):
            texts.append(
                PromptText(
                    f"{where}.tool_calls[{call_index}]",
                    f"{call.id} {call.function.name}\n{arguments_text(call.function.arguments)}",
                    False,
                )
            )
    for index, tool in enumerate(request.tools or ()):
        texts.append(PromptText(f"tools[{index}]", json_text(tool), False))
    if request.response_format is not None:
        texts.append(PromptText("response_format", json_text(request.response_format), False))
    if isinstance(request.tool_choice, dict):
        texts.append(PromptText("tool_choice", json_text(request.tool_choice), False))
    stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
    for index, stop in enumerate(stops):
        texts.append(PromptText(f"stop[{index}]", stop, False))
    return [text for text in texts if text.text.strip()]


def completion_text(message: Any) -> str:
    """The checkable text of an upstream choice's message (content and tool calls)."""
    parts = [getattr(message, "content", None) or ""]
    for call in getattr(message, "tool_calls", None) or ():
        function = getattr(call, "function", None)
        if function is not None:
            parts.append(f"{function.name or ''} {function.arguments or ''}")
    return "\n".join(part for part in parts if part)


def usage_dict(usage: Any) -> dict[str, int] | None:
    if usage is None:
        return None
    prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
    completion = int(getattr(usage, "completion_tokens", 0) or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": int(getattr(usage, "total_tokens", 0) or prompt + completion),
    }


def worst_reasons(verdicts: Mapping[str, Verdict]) -> list[str]:
    """Why texts were blocked, each reason prefixed with where it came from."""
    return [
        f"{source}: {reason}"
        for source, verdict in verdicts.items()
        if verdict.blocked
        for reason in verdict.reasons
    ]
