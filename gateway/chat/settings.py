"""Settings of the chat route and of the upstream models, with their defaults.

A leaf (pydantic only): ``gateway.config`` composes these sections into ``Settings``, and
the chat modules take their defaults from here.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

DEFAULT_MAX_MESSAGES = 256
DEFAULT_MAX_MESSAGE_CHARS = 32_000
DEFAULT_MAX_TOKENS = 4096  # the most a request may ask for (max_tokens / max_completion_tokens)
DEFAULT_MAX_CHOICES = 4
DEFAULT_MAX_TOOLS = 128  # OpenAI's own limit on tools per request
DEFAULT_MAX_PROMPT_CHARS = 256_000  # every text the model reads, together

DEFAULT_STREAM_WINDOW_CHARS = 160  # held back at most without a space
# released once this much has arrived; chosen by bench/stream_increments.py
DEFAULT_STREAM_INCREMENT_CHARS = 24
DEFAULT_STREAM_OVERLAP_CHARS = 160  # of released text checked again with the next part

SHIPPED_UPSTREAMS = Path(__file__).resolve().parent / "upstreams.yaml"


class ChatSettings(BaseModel):
    """Limits of ``/v1/chat/completions`` and how streams are held back for checking."""

    max_messages: int = Field(default=DEFAULT_MAX_MESSAGES, ge=1)
    max_message_chars: int = Field(default=DEFAULT_MAX_MESSAGE_CHARS, ge=1)
    max_tokens: int = Field(
        default=DEFAULT_MAX_TOKENS, ge=1, description="most max_tokens a request may ask for"
    )
    max_choices: int = Field(default=DEFAULT_MAX_CHOICES, ge=1)
    max_tools: int = Field(default=DEFAULT_MAX_TOOLS, ge=0)
    max_prompt_chars: int = Field(
        default=DEFAULT_MAX_PROMPT_CHARS,
        ge=1,
        description="characters of every text the model reads, together",
    )
    stream_window_chars: int = Field(
        default=DEFAULT_STREAM_WINDOW_CHARS,
        ge=1,
        description="most streamed characters held back without a sentence end",
    )
    stream_increment_chars: int = Field(
        default=DEFAULT_STREAM_INCREMENT_CHARS,
        ge=1,
        description="streamed characters gathered (to the last space) before each check",
    )
    stream_overlap_chars: int = Field(
        default=DEFAULT_STREAM_OVERLAP_CHARS,
        ge=0,
        description="released text (whole sentences) checked again with the next part",
    )


class UpstreamSettings(BaseModel):
    """Where the models are: a litellm Router config (``gateway.chat.upstreams``)."""

    file: Path = SHIPPED_UPSTREAMS
    serve_local: bool = Field(
        default=True,
        description="`safegate serve` also starts the local model server for deployed adapters",
    )
