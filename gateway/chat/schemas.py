"""The chat completion request as OpenAI defines it, checked the way OpenAI checks it.

Unknown fields are refused with a 400 naming them; only the parameters in
``gateway.chat.upstreams.FORWARDED_PARAMS`` reach litellm. Strings must be valid Unicode (a lone
surrogate is a 400 naming the field, not an upstream failure), numbers finite, and each
message carry what OpenAI requires of its role. The response models say what the gateway
sends back, annotations included (``gateway.chat.content_filter``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from gateway.safety.taxonomy import Label, Shield

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
    them; only the parameters in ``gateway.chat.upstreams.FORWARDED_PARAMS`` reach litellm."""

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


# -- responses ---------------------------------------------------------------------------
# What the gateway sends back. Fields that OpenAI omits when empty (tool_calls,
# content_filter_reasons) are left unset, and renderers dump with ``exclude_unset``.


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class PromptFilterResult(BaseModel):
    prompt_index: int
    content_filter_results: dict[str, Any]


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: None
    content_filter_results: dict[str, Any]
    content_filter_reasons: list[str] | None = None


class ChatCompletion(BaseModel):
    """A filtered chat completion, Azure's annotations included."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None
    prompt_filter_results: list[PromptFilterResult]
    system_fingerprint: str | None

    def render(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)
