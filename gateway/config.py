"""Settings: ``SAFEGATE_*`` environment variables over embedded defaults.

Nested sections use ``__``: ``SAFEGATE_DETOXIFY__ENABLED=true``. Every limit and
timeout has a named default here; none means "unlimited". ``get_settings()`` is cached
and injected into routes as a dependency, so tests override it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import SettingsConfigDict

from gateway.blocklists import DEFAULT_REFRESH_S
from gateway.safety.encoder import Backend
from gateway.safety.engine import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_TEXT_CHARS,
    DEFAULT_MAX_WAIT_S,
    DEFAULT_MEMBER_TIMEOUT_S,
    DEFAULT_TIMEOUT_PER_KCHAR_S,
)
from gateway.safety.members.encoder_heads import SHIPPED_HEADS
from gateway.safety.members.llm_judge import DEFAULT_JUDGE_TIMEOUT_S
from gateway.safety.policy import SHIPPED_POLICY
from safegate.database import StorageSettings

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BODY_BYTES = 2_000_000
DEFAULT_MAX_MODERATION_INPUTS = 64


class EncoderSettings(BaseModel):
    """The project's heads; the encoder they need is named inside the heads file."""

    enabled: bool = True
    heads: Path = SHIPPED_HEADS
    backend: Backend = Field(default=Backend.ONNX, description="onnx (faster on CPU) or torch")
    timeout_s: float = Field(default=DEFAULT_MEMBER_TIMEOUT_S, gt=0)
    threads: int | None = Field(default=None, ge=1, description="torch intra-op threads")


class ProfanitySettings(BaseModel):
    enabled: bool = True
    timeout_s: float = Field(default=DEFAULT_MEMBER_TIMEOUT_S, gt=0)


class PiiSettings(BaseModel):
    enabled: bool = True
    default_region: str = "US"
    timeout_s: float = Field(default=DEFAULT_MEMBER_TIMEOUT_S, gt=0)


class BlocklistSettings(BaseModel):
    enabled: bool = True
    refresh_s: float = Field(default=DEFAULT_REFRESH_S, gt=0)
    timeout_s: float = Field(default=DEFAULT_MEMBER_TIMEOUT_S, gt=0)


class DetoxifySettings(BaseModel):
    """Detoxify. Off by default: its official checkpoints download from GitHub."""

    enabled: bool = False
    model_type: str = "original"
    checkpoint: Path | None = None
    huggingface_config_path: Path | None = None
    allowed_sha256: list[str] = Field(default_factory=list)
    timeout_s: float = Field(default=DEFAULT_MEMBER_TIMEOUT_S, gt=0)

    @model_validator(mode="after")
    def _pinned(self) -> DetoxifySettings:
        if self.enabled and not self.allowed_sha256:
            raise ValueError(
                "detoxify is enabled but allowed_sha256 is empty: its checkpoints are "
                "pickles, so list the sha256 of the checkpoint you trust"
            )
        return self


class LlmJudgeSettings(BaseModel):
    """An LLM judge reached through litellm. Off by default."""

    enabled: bool = False
    model: str = "ollama/llama-guard3:1b"
    api_base: str | None = None
    api_key: str | None = None
    timeout_s: float = Field(default=DEFAULT_JUDGE_TIMEOUT_S, gt=0)
    mock_response: str | None = None


class EngineSettings(BaseModel):
    max_text_chars: int = Field(default=DEFAULT_MAX_TEXT_CHARS, ge=1)
    timeout_per_kchar_s: float = Field(
        default=DEFAULT_TIMEOUT_PER_KCHAR_S,
        ge=0,
        description="extra time budget per member per 1,000 characters in a batch",
    )
    max_batch: int = Field(default=DEFAULT_MAX_BATCH, ge=1)
    max_wait_s: float = Field(default=DEFAULT_MAX_WAIT_S, ge=0)


class Settings(StorageSettings):
    model_config = SettingsConfigDict(
        env_prefix="SAFEGATE_", env_nested_delimiter="__", extra="ignore"
    )

    policy_file: Path = SHIPPED_POLICY
    host: str = DEFAULT_HOST
    port: int = Field(default=DEFAULT_PORT, ge=1, le=65535)
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1024)
    max_moderation_inputs: int = Field(default=DEFAULT_MAX_MODERATION_INPUTS, ge=1)
    log_level: str = "info"

    engine: EngineSettings = EngineSettings()
    encoder: EncoderSettings = EncoderSettings()
    profanity: ProfanitySettings = ProfanitySettings()
    pii: PiiSettings = PiiSettings()
    blocklist: BlocklistSettings = BlocklistSettings()
    detoxify: DetoxifySettings = DetoxifySettings()
    llm_judge: LlmJudgeSettings = LlmJudgeSettings()


@lru_cache
def get_settings() -> Settings:
    return Settings()
