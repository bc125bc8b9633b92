"""The filtered chat completion: its request, its checks, its stream.

- ``schemas``: the request as OpenAI defines it (checked as OpenAI checks it) and the
  response models.
- ``prompt``: which texts of a request (and of an upstream answer) the engine reads.
- ``stream_guard``: streamed text checked in increments before it is released.
- ``service``: one request from limits to audit records (``ChatService``).
- ``streaming``: the server-sent events of a filtered stream.
- ``metering``: the tokens (and cost) a request used.
- ``content_filter``: Azure's ``content_filter_results`` annotations from verdicts.
- ``upstreams``: the models behind litellm's Router (``upstreams.yaml`` ships).
- ``local_models``: the local model server ``safegate serve`` starts for deployed adapters.
- ``settings``: the chat and upstream settings and their defaults.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from gateway.chat.prompt import PromptText, json_text, prompt_texts
    from gateway.chat.schemas import ChatCompletionRequest
    from gateway.chat.settings import (
        DEFAULT_MAX_CHOICES,
        DEFAULT_MAX_MESSAGE_CHARS,
        DEFAULT_MAX_MESSAGES,
        DEFAULT_MAX_PROMPT_CHARS,
        DEFAULT_MAX_TOKENS,
        DEFAULT_MAX_TOOLS,
        DEFAULT_STREAM_INCREMENT_CHARS,
        DEFAULT_STREAM_OVERLAP_CHARS,
        DEFAULT_STREAM_WINDOW_CHARS,
    )
    from gateway.chat.stream_guard import StreamGuard

__all__ = [
    "DEFAULT_MAX_CHOICES",
    "DEFAULT_MAX_MESSAGES",
    "DEFAULT_MAX_MESSAGE_CHARS",
    "DEFAULT_MAX_PROMPT_CHARS",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_MAX_TOOLS",
    "DEFAULT_STREAM_INCREMENT_CHARS",
    "DEFAULT_STREAM_OVERLAP_CHARS",
    "DEFAULT_STREAM_WINDOW_CHARS",
    "ChatCompletionRequest",
    "PromptText",
    "StreamGuard",
    "json_text",
    "prompt_texts",
]

if not TYPE_CHECKING:
    __getattr__ = lazy_exports(
        __name__,
        {
            "prompt": ("PromptText", "json_text", "prompt_texts"),
            "schemas": ("ChatCompletionRequest",),
            "settings": (
                "DEFAULT_MAX_CHOICES",
                "DEFAULT_MAX_MESSAGE_CHARS",
                "DEFAULT_MAX_MESSAGES",
                "DEFAULT_MAX_PROMPT_CHARS",
                "DEFAULT_MAX_TOKENS",
                "DEFAULT_MAX_TOOLS",
                "DEFAULT_STREAM_INCREMENT_CHARS",
                "DEFAULT_STREAM_OVERLAP_CHARS",
                "DEFAULT_STREAM_WINDOW_CHARS",
            ),
            "stream_guard": ("StreamGuard",),
        },
        exported=__all__,
    )
