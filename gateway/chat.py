"""The filtered chat completion: the request, its prompt check, its completion check.

The route (``gateway.routes.chat``) runs, for every request::

    limits -> prompt check (every message) -> upstream (litellm) -> completion check
           -> Azure content_filter annotations, audit records, metrics

Prompt check: every message's text is checked before any upstream call. System, user and
assistant turns are checked for harm and jailbreaks; tool results and content parts marked
``"document": true`` are checked for indirect attacks too (a user's own turn is never an
"indirect" attack; ``SafetyEngine.decide(ignore=...)``).

Completion check: a whole completion is checked before a byte leaves (non-streaming); a
stream goes through a ``StreamGuard``. In the default ``sync`` mode text is held back until
at least ``increment_chars`` have arrived (cut at the last space, so words stay whole) or a
sentence ends, checked together with the text released just before it (up to
``overlap_chars``, from a sentence start where one is in reach: a phrase cut by a release
edge is still seen whole), and released only if it passes. A part that fails ends the
stream with ``finish_reason: "content_filter"``; nothing after it reaches the client. When
the stream ends, the whole completion is checked once more, so a stream is blocked
whenever the same completion would be blocked unstreamed (its last part is withheld).

The ``async`` mode (a policy option, Azure's "asynchronous filter") sends text as it
arrives and checks it in the same increments right after; a violation ends the stream.
It is not leak-proof: the failing increment has already been sent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from gateway.safety.taxonomy import Label, Shield
from gateway.safety.verdict import Verdict

DEFAULT_MAX_MESSAGES = 256
DEFAULT_MAX_MESSAGE_CHARS = 32_000
DEFAULT_MAX_TOKENS = 4096  # the most a request may ask for (max_tokens / max_completion_tokens)
DEFAULT_MAX_CHOICES = 4
DEFAULT_MAX_TOOLS = 128  # OpenAI's own limit on tools per request
DEFAULT_MAX_PROMPT_CHARS = 256_000  # every text the model reads, together
DEFAULT_STREAM_WINDOW_CHARS = 160  # held back at most without a space
DEFAULT_STREAM_INCREMENT_CHARS = (
    24  # released once this much has arrived (bench/stream_increments.py)
)
DEFAULT_STREAM_OVERLAP_CHARS = 160  # of released text checked again with the next part

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
DOCUMENT_ROLES = frozenset({"tool", "function"})
# Labels a text cannot carry by its role: only documents and tool output can hold an
# indirect attack.
NOT_IN_TURNS: frozenset[Label] = frozenset({Shield.INDIRECT_ATTACK})


def _valid_unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains invalid Unicode (a lone surrogate)") from None
    return value


def _valid_json_unicode(value: Any) -> Any:
    """Every string (keys too) inside a JSON value must be valid Unicode."""
    if isinstance(value, str):
        _valid_unicode(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _valid_unicode(str(key))
            _valid_json_unicode(item)
    elif isinstance(value, list):
        for item in value:
            _valid_json_unicode(item)
    return value


# Strings and JSON objects from clients: valid Unicode (a lone surrogate is a 400 naming
# the field, not an upstream failure) and no infinities or NaN anywhere.
Text = Annotated[str, AfterValidator(_valid_unicode)]
JsonObject = Annotated[dict[str, Any], AfterValidator(_valid_json_unicode)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ContentPart(_Strict):
    """A text part. ``document: true`` (a safegate extension) marks retrieved content."""

    type: Literal["text"]
    text: Text
    document: bool = False


class ToolFunction(_Strict):
    name: Text = Field(min_length=1, max_length=64)
    arguments: Text = ""


class ToolCall(_Strict):
    id: Text = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: ToolFunction


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = Field(default=None, max_length=64)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Text | None = Field(default=None, max_length=256)
    refusal: Text | None = None

    @model_validator(mode="after")
    def _required_fields(self) -> Message:
        """What OpenAI requires of each role, so a bad message is a 400, not a 502."""
        if self.role == "assistant":
            if self.content is None and not self.tool_calls and self.refusal is None:
                raise ValueError("an assistant message needs content, tool_calls or refusal")
        elif self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages may carry tool_calls")
        return self

    def to_upstream(self) -> dict[str, Any]:
        """The message as the upstream gets it: safegate's ``document`` marks removed."""
        data = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            data["content"] = [{"type": "text", "text": part.text} for part in self.content]
        return data


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    """OpenAI's chat completion request. Unknown fields are refused with a 400 naming
    them; only the parameters in ``gateway.upstreams.FORWARDED_PARAMS`` reach litellm."""

    model: str = Field(min_length=1, max_length=128)
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1)
    stop: Text | list[Text] | None = Field(default=None)
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[Text, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: Text | None = Field(default=None, max_length=256)
    tools: list[JsonObject] | None = None
    tool_choice: Text | JsonObject | None = None
    parallel_tool_calls: bool | None = None
    response_format: JsonObject | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> ChatCompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def upstream_params(self, *, forwarded: frozenset[str]) -> dict[str, Any]:
        params = self.model_dump(exclude_none=True, include=set(forwarded))
        params.pop("stream", None)
        return params


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


Check = Callable[[str], Awaitable[Verdict]]


@dataclass(slots=True)
class Release:
    """Text a ``StreamGuard`` let through, and the verdict on the window it was in."""

    text: str
    verdict: Verdict | None


StreamMode = Literal["sync", "async"]


@dataclass(slots=True)
class StreamGuard:
    """Checks streamed text in small increments; see the module docstring.

    ``sync``: held-back text is released at the last space once ``increment_chars`` have
    arrived, or at a sentence end, or, when ``window_chars`` arrive without a space, at
    that length. Each release is checked together with up to ``overlap_chars`` of the text
    released before it. ``async``: text is released as it arrives and checked afterwards
    in the same increments.
    """

    check: Check
    window_chars: int = DEFAULT_STREAM_WINDOW_CHARS
    overlap_chars: int = DEFAULT_STREAM_OVERLAP_CHARS
    increment_chars: int = DEFAULT_STREAM_INCREMENT_CHARS
    mode: StreamMode = "sync"
    final_check: bool = True
    pending: str = ""
    released: str = ""
    blocked: Verdict | None = None
    verdicts: list[Verdict] = field(default_factory=list)
    checked_windows: list[str] = field(default_factory=list)
    _unchecked: str = ""

    async def feed(self, piece: str) -> Release | None:
        """Take a piece of the stream; return what may be sent now, if anything."""
        if self.blocked is not None:
            return None
        if self.mode == "async":
            return await self._feed_async(piece)
        self.pending += piece
        cut = self._cut()
        if cut is None:
            return None
        return await self._release(cut)

    async def flush(self) -> Release | None:
        """The stream ended: check and release what is still held back, then check the
        whole completion once (unless it was checked whole already)."""
        if self.blocked is not None:
            return None
        if self.mode == "async":
            if self._unchecked.strip():
                verdict = await self._checked(self._context(self._unchecked) + self._unchecked)
                self._unchecked = ""
                if verdict.blocked:
                    return None
            await self._check_whole(self.released)
            return None
        release: Release | None = None
        if not self.pending.strip():
            remainder, self.pending = self.pending, ""
            if remainder:
                release = Release(remainder, None)
        else:
            part = self.pending
            window = self._context(part) + part
            verdict = await self._checked(window)
            self.pending = ""
            if verdict.blocked:
                return None
            release = Release(part, verdict)
        whole = self.released + (release.text if release is not None else "")
        if await self._check_whole(whole):
            return None  # the whole completion fails: its last part is withheld
        self.released = whole
        return release

    async def _check_whole(self, whole: str) -> bool:
        """Check the entire completion unless the last check already read all of it."""
        if not self.final_check or not whole.strip():
            return False
        if self.checked_windows and self.checked_windows[-1] == whole:
            return False
        verdict = await self._checked(whole)
        return verdict.blocked

    async def _checked(self, window: str) -> Verdict:
        verdict = await self.check(window)
        self.verdicts.append(verdict)
        self.checked_windows.append(window)
        if verdict.blocked:
            self.blocked = verdict
        return verdict

    async def _feed_async(self, piece: str) -> Release:
        self.released += piece
        self._unchecked += piece
        verdict: Verdict | None = None
        if len(self._unchecked) >= self.increment_chars or _SENTENCE_END.search(piece):
            part, self._unchecked = self._unchecked, ""
            verdict = await self._checked(self._context(part) + part)
        return Release(piece, verdict)

    def _cut(self) -> int | None:
        """Where the held-back text may be cut for release, if anywhere yet."""
        ends = [match.end() for match in _SENTENCE_END.finditer(self.pending)]
        if len(self.pending) >= self.increment_chars:
            space = max(self.pending.rfind(" "), self.pending.rfind("\n"))
            if space > 0:
                return max(space + 1, ends[-1] if ends else 0)
        if ends:
            return ends[-1]
        if len(self.pending) < self.window_chars:
            return None
        space = self.pending.rfind(" ", 0, self.window_chars)
        return space + 1 if space > 0 else self.window_chars

    def _context(self, part: str) -> str:
        """The end of the released text (before ``part``), up to ``overlap_chars``,
        starting at a sentence start where one is in reach, else at a word."""
        released = (
            self.released[: len(self.released) - len(part)]
            if self.mode == "async"
            else (self.released)
        )
        if not self.overlap_chars or not released:
            return ""
        tail = released[-self.overlap_chars :]
        if len(tail) < len(released):
            first = _SENTENCE_END.search(tail)
            if first is not None and tail[first.end() :].strip():
                tail = tail[first.end() :]
            else:
                space = tail.find(" ")
                tail = tail[space + 1 :] if space >= 0 else tail
        return tail

    async def _release(self, cut: int) -> Release | None:
        part, rest = self.pending[:cut], self.pending[cut:]
        verdict = await self._checked(self._context(part) + part)
        if verdict.blocked:
            self.pending = ""
            return None
        self.pending = rest
        self.released += part
        return Release(part, verdict)


# A sentence ends at . ! ? ; or : followed by white space (which must have arrived, so
# "3.5" and "e.g" mid-stream do not cut), or at a line break.
_SENTENCE_END = re.compile(r"[.!?;:]+[\"')\]]*\s+|\n+")


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
