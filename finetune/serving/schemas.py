"""OpenAI's chat completion and model list bodies as the local model server reads and
writes them, and its error body ``{"error": {"message", "type", "param", "code"}}``.

``ChatCompletionRequest`` accepts what does not change a local model's answer and
refuses (``InvalidRequest``, a 400) what this server cannot honour: tools, logprobs,
several choices, non-text content or response formats.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from finetune.errors import InvalidRequest
from finetune.registry import ModelKind
from finetune.serving.generation import (
    ROLES,
    Completion,
    FinishReason,
    SamplingDefaults,
    SamplingParams,
    Turn,
)

OWNER = "safegate"
MAX_MESSAGES = 256


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class ChatMessage(_Lenient):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    """OpenAI's chat completion request; fields this server cannot honour are refused,
    fields that do not change a local model's answer are accepted and ignored."""

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    user: str | None = None

    def turns(self) -> list[Turn]:
        turns: list[Turn] = []
        for index, message in enumerate(self.messages):
            where = f"messages.{index}"
            role = "system" if message.role == "developer" else message.role
            if role not in ROLES:
                raise InvalidRequest(
                    f"{where}.role: {message.role!r} is not supported here; "
                    "use system, developer, user or assistant",
                    param=f"{where}.role",
                )
            turns.append(Turn(ROLES[role], _text_of(message, where)))
        return turns

    def params(self, defaults: SamplingDefaults | None = None) -> SamplingParams:
        """The sampling parameters; ``defaults`` fill in a left-out temperature and top_p."""
        defaults = defaults or SamplingDefaults()
        if self.n not in (None, 1):
            raise InvalidRequest("n: only one choice per request is supported", param="n")
        if self.logprobs:
            raise InvalidRequest("logprobs are not supported", param="logprobs")
        if self.tools:
            raise InvalidRequest("tools are not supported by this server", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise InvalidRequest(
                "response_format: only type 'text' is supported", param="response_format"
            )
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=defaults.temperature if self.temperature is None else self.temperature,
            top_p=defaults.top_p if self.top_p is None else self.top_p,
            stop=stop,
            seed=self.seed,
        )


def _text_of(message: ChatMessage, where: str) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts: list[str] = []
    for index, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise InvalidRequest(
                f"{where}.content.{index}: only text parts are supported, got {part.type!r}",
                param=f"{where}.content",
            )
        texts.append(part.text)
    return "".join(texts)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = OWNER
    kind: ModelKind
    base: str | None = Field(description="The base an adapter runs on; null for the base.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, completion: Completion) -> Usage:
        total = completion.prompt_tokens + completion.completion_tokens
        return cls(
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            total_tokens=total,
        )


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    base: str
    adapters: list[str]
    failed: dict[str, str]
    queued: int


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Malformed or unsupported request"},
    404: {"model": ErrorBody, "description": "Unknown model"},
    503: {"model": ErrorBody, "description": "Busy, or the adapter failed to load"},
}


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return ErrorBody(
        error=ErrorDetail(message=message, type=type, param=param, code=code)
    ).model_dump()
