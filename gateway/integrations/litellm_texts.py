"""Which texts of a LiteLLM proxy request and answer safegate's guardrail reads.

The proxy hands a guardrail plain dicts (the client's JSON, plus the proxy's own keys)
and litellm's response objects. The prompt check reads what ``gateway.chat.prompt``
reads in safegate's own chat route, from those dicts, in request order:

- ``messages``: each message's name, refusal, tool_call_id, its content (a string, or
  every part that carries text: OpenAI's ``text``, Anthropic's ``text``,
  ``tool_result`` and ``tool_use`` blocks), its tool calls (id, name and arguments) and a
  legacy ``function_call``;
- ``system`` (Anthropic), ``instructions`` (Responses API), ``prompt`` (text completions)
  and ``input`` (Responses API items, embeddings, moderations);
- ``tools`` and legacy ``functions``, ``response_format``, ``tool_choice`` and ``stop``.

Text from a ``tool`` or ``function`` message, an Anthropic ``tool_result`` block, a
Responses API ``function_call_output`` item, or a content part marked
``"document": true`` is a document: it is checked for indirect attacks too. Images,
audio and token-id prompts carry no text the engine can read and are not checked.

The completion check reads a chat choice's content, reasoning and tool calls.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from gateway.chat.prompt import PromptText, arguments_text, json_text
from gateway.chat.schemas import DOCUMENT_ROLES

# Content blocks and Responses API items that hold a tool's output: documents.
_DOCUMENT_BLOCKS = frozenset({"tool_result", "function_call_output"})
# Top-level request fields that hold prompt text (beside messages), in the order read.
_PROMPT_FIELDS = ("system", "instructions", "prompt", "input")
# Fields whose JSON (names, descriptions, schemas) the model reads.
_JSON_FIELDS = ("tools", "functions")


def request_texts(data: Mapping[str, Any]) -> list[PromptText]:
    """Every text the model will read, in request order; empty texts are skipped."""
    texts: list[PromptText] = []
    messages = data.get("messages")
    if isinstance(messages, list):
        for index, message in enumerate(messages):
            texts.extend(_message_texts(f"messages[{index}]", message))
    for field in _PROMPT_FIELDS:
        texts.extend(_loose_texts(field, data.get(field), document=False))
    for field in _JSON_FIELDS:
        items = data.get(field)
        if isinstance(items, list):
            for index, item in enumerate(items):
                texts.append(PromptText(f"{field}[{index}]", json_text(item), False))
    response_format = data.get("response_format")
    if isinstance(response_format, dict):
        texts.append(PromptText("response_format", json_text(response_format), False))
    tool_choice = data.get("tool_choice")
    if isinstance(tool_choice, dict):
        texts.append(PromptText("tool_choice", json_text(tool_choice), False))
    stop = data.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    for index, value in enumerate(stops):
        if isinstance(value, str):
            texts.append(PromptText(f"stop[{index}]", value, False))
    return [text for text in texts if text.text.strip()]


def split_long(texts: Sequence[PromptText], *, limit: int) -> list[PromptText]:
    """Texts over ``limit`` characters as consecutive pieces of at most ``limit``: the
    engine refuses longer texts, and every character must still be read."""
    pieces: list[PromptText] = []
    for text in texts:
        if len(text.text) <= limit:
            pieces.append(text)
            continue
        for part, start in enumerate(range(0, len(text.text), limit)):
            pieces.append(
                PromptText(f"{text.source}#{part}", text.text[start : start + limit], text.document)
            )
    return pieces


def completion_text(message: Any) -> str:
    """The checkable text of a chat choice's message: content, reasoning, tool calls."""
    parts = [text.text for text in _content_texts("", getattr(message, "content", None), False)]
    reasoning = getattr(message, "reasoning_content", None)
    if isinstance(reasoning, str):
        parts.append(reasoning)
    for call in getattr(message, "tool_calls", None) or ():
        function = getattr(call, "function", None)
        if function is not None:
            parts.append(
                f"{getattr(function, 'name', None) or ''} "
                f"{getattr(function, 'arguments', None) or ''}"
            )
    function_call = getattr(message, "function_call", None)
    if function_call is not None:
        parts.append(
            f"{getattr(function_call, 'name', None) or ''} "
            f"{getattr(function_call, 'arguments', None) or ''}"
        )
    return "\n".join(part for part in parts if part.strip())


def _message_texts(where: str, message: object) -> Iterator[PromptText]:
    if not isinstance(message, dict):
        return
    document = message.get("role") in DOCUMENT_ROLES
    for field in ("name", "refusal", "tool_call_id"):
        value = message.get(field)
        if isinstance(value, str):
            yield PromptText(f"{where}.{field}", value, False)
    yield from _content_texts(where, message.get("content"), document)
    tool_calls = message.get("tool_calls")
    for index, call in enumerate(tool_calls if isinstance(tool_calls, list) else ()):
        if isinstance(call, dict):
            yield PromptText(f"{where}.tool_calls[{index}]", _call_text(call), False)
    function_call = message.get("function_call")
    if isinstance(function_call, dict):
        yield PromptText(f"{where}.function_call", _call_text(function_call), False)


def _call_text(call: Mapping[str, Any]) -> str:
    """A tool call as the model reads it: its id, its function's name, its arguments."""
    function = call.get("function")
    function = function if isinstance(function, dict) else call
    arguments = function.get("arguments", function.get("input"))
    argument_text = (
        arguments_text(arguments) if isinstance(arguments, str) else json_text(arguments)
    )
    call_id = call.get("id") or call.get("call_id") or ""
    return f"{call_id} {function.get('name') or ''}\n{argument_text}".strip()


def _content_texts(where: str, content: object, document: bool) -> Iterator[PromptText]:
    """A message's content: a string, or the text of each part that carries some."""
    if isinstance(content, str):
        yield PromptText(where, content, document)
        return
    if not isinstance(content, list):
        return
    for index, part in enumerate(content):
        source = f"{where}.content[{index}]"
        if isinstance(part, str):
            yield PromptText(source, part, document)
            continue
        if not isinstance(part, dict):
            continue
        part_document = document or part.get("document") is True
        part_document = part_document or part.get("type") in _DOCUMENT_BLOCKS
        text = part.get("text")
        if isinstance(text, str):
            yield PromptText(source, text, part_document)
        if part.get("type") == "tool_use":
            yield PromptText(source, _call_text(part), False)
        if "content" in part:
            yield from _content_texts(source, part["content"], part_document)


def _loose_texts(where: str, value: object, *, document: bool) -> Iterator[PromptText]:
    """A prompt field that is a string, a list of strings, or a list of message-like
    items (Responses API input, Anthropic system blocks)."""
    if isinstance(value, str):
        yield PromptText(where, value, document)
        return
    if not isinstance(value, list):
        return
    for index, item in enumerate(value):
        source = f"{where}[{index}]"
        if isinstance(item, str):
            yield PromptText(source, item, document)
        elif isinstance(item, dict):
            if item.get("type") in _DOCUMENT_BLOCKS:
                output = item.get("output", item.get("content"))
                yield from _content_texts(source, output, True)
            elif item.get("type") in ("function_call", "tool_use"):
                yield PromptText(source, _call_text(item), False)
            elif "role" in item or "content" in item:
                yield from _message_texts(source, item)
            elif isinstance(item.get("text"), str):
                yield PromptText(source, item["text"], document)
