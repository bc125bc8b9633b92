"""Settings: ``SAFEGATE_*`` environment variables over embedded defaults.

Nested sections use ``__``: ``SAFEGATE_DETOXIFY__ENABLED=true``. Every limit and
timeout has a named default here; none means "unlimited". ``get_settings()`` is cached;
``create_app(settings)`` takes the settings the app and its routes use (tests pass their
own), and commands read ``get_settings()``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import SettingsConfigDict

from gateway.access import DEFAULT_CACHE_TTL_S, DEFAULT_OUTAGE_GRACE_S
from gateway.access.quotas import DEFAULT_QUOTA_CACHE_TTL_S
from gateway.access.ratelimit import (
    DEFAULT_REDIS_KEY_PREFIX,
    DEFAULT_REDIS_TIMEOUT_S,
    DEFAULT_REQUESTS_PER_MINUTE,
    MAX_REQUESTS_PER_MINUTE,
)
from gateway.audit import DEFAULT_DRAIN_INTERVAL_S, DEFAULT_WRITE_TIMEOUT_S
from gateway.blocklists import DEFAULT_REFRESH_S
from gateway.chat import (
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
from gateway.chat.upstreams import SHIPPED_UPSTREAMS
from gateway.safety.artifacts import SHIPPED_HEADS, SHIPPED_MULTILINGUAL_HEADS, Backend
from gateway.safety.batcher import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BATCH_CHARS,
    DEFAULT_MAX_WAIT_S,
    DEFAULT_QUEUE_CAPACITY_CHARS,
)
from gateway.safety.engine import (
    DEFAULT_MAX_TEXT_CHARS,
    DEFAULT_MEMBER_TIMEOUT_S,
    DEFAULT_TIMEOUT_PER_KCHAR_S,
)
from gateway.safety.members.llm_judge import DEFAULT_JUDGE_TIMEOUT_S
from gateway.safety.policy import SHIPPED_POLICY
from safegate.settings import SharedSettings

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BODY_BYTES = 2_000_000
DEFAULT_MAX_MODERATION_INPUTS = 64
# OpenTelemetry's own default: an export of spans (retries included) gives up after this.
DEFAULT_TRACE_EXPORT_TIMEOUT_S = 10.0


class EncoderSettings(BaseModel):
    """The project's heads; the encoder they need is named inside the heads file."""

    enabled: bool = True
    heads: Path = SHIPPED_HEADS
    backend: Backend = Field(default=Backend.ONNX, description="onnx (faster on CPU) or torch")
    timeout_s: float = Field(default=DEFAULT_MEMBER_TIMEOUT_S, gt=0)
    threads: int | None = Field(default=None, ge=1, description="torch intra-op threads")


class MultilingualSettings(BaseModel):
    """Heads on multilingual-e5-small for the languages its model card lists."""

    enabled: bool = True
    heads: Path = SHIPPED_MULTILINGUAL_HEADS
    timeout_s: float = Field(default=DEFAULT_MEMBER_TIMEOUT_S, gt=0)


class LanguageSettings(BaseModel):
    """Language identification: texts the engine's model does not cover are marked."""

    enabled: bool = True
    timeout_s: float = Field(default=DEFAULT_MEMBER_TIMEOUT_S, gt=0)


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
        description="extra time budget per member per 1,000 characters in a batch "
        "(a batch holds at most max_batch_chars, or one longer text)",
    )
    max_batch: int = Field(default=DEFAULT_MAX_BATCH, ge=1)
    max_batch_chars: int = Field(
        default=DEFAULT_MAX_BATCH_CHARS,
        ge=1,
        description="characters in one detection batch (a longer text runs alone); "
        "requests take turns, so a short one waits about one such batch per request ahead",
    )
    queue_capacity_chars: int = Field(
        default=DEFAULT_QUEUE_CAPACITY_CHARS,
        ge=1,
        description="characters waiting for detection; a request past it gets a 429 "
        "engine_overloaded with Retry-After (an idle engine admits any valid request)",
    )
    max_wait_s: float = Field(
        default=DEFAULT_MAX_WAIT_S,
        ge=0,
        description="how long an idle engine waits for more texts before a forward pass; "
        "0 starts at once and lets batches form from what arrives during one",
    )


class AuditSettings(BaseModel):
    """The audit store (``gateway.audit``): flagged texts for review, request metadata."""

    drain_interval_s: float = Field(
        default=DEFAULT_DRAIN_INTERVAL_S,
        gt=0,
        description="how often records spooled while the database was down are moved into it",
    )
    write_timeout_s: float = Field(
        default=DEFAULT_WRITE_TIMEOUT_S,
        gt=0,
        description="a database write that takes longer is spooled to disk as well",
    )
    spool_dir: Path | None = Field(
        default=None, description="where records wait while the database is down (0700)"
    )
    record_requests: bool = Field(
        default=True, description="keep metadata (never text) of every filtered request"
    )


class AuthSettings(BaseModel):
    """API keys (``gateway.access``). Disabling makes every request an anonymous admin."""

    enabled: bool = Field(
        default=True,
        description="false: no keys needed and no per-key limits; only behind another auth layer",
    )
    cache_ttl_s: float = Field(
        default=DEFAULT_CACHE_TTL_S,
        gt=0,
        description="how long a valid key is cached; a revoke reaches other replicas within it",
    )
    outage_grace_s: float = Field(
        default=DEFAULT_OUTAGE_GRACE_S,
        ge=0,
        allow_inf_nan=False,
        description="while the database cannot be reached, a key checked this recently still "
        "works; 0: none does",
    )


class RateLimitSettings(BaseModel):
    """Per-key token buckets (``gateway.access.ratelimit``); a key's own rate_limit_rpm wins."""

    requests_per_minute: int = Field(
        default=DEFAULT_REQUESTS_PER_MINUTE, ge=1, le=MAX_REQUESTS_PER_MINUTE
    )
    burst: int | None = Field(
        default=None,
        ge=1,
        description="most requests at once (capped at a key's rate); unset: a minute's worth",
    )
    redis_url: str | None = Field(
        default=None, description="share buckets across replicas; unreachable Redis means 503"
    )
    key_prefix: str = DEFAULT_REDIS_KEY_PREFIX
    timeout_s: float = Field(default=DEFAULT_REDIS_TIMEOUT_S, gt=0)


class QuotaSettings(BaseModel):
    """Per-key token quotas and budgets (``gateway.access.quotas``), set on each key."""

    cache_ttl_s: float = Field(
        default=DEFAULT_QUOTA_CACHE_TTL_S,
        gt=0,
        description="how long a key's usage totals are cached; other replicas' requests "
        "count within it",
    )


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


class TracingSettings(BaseModel):
    """OpenTelemetry traces of each request and its stages (``gateway.tracing``): sizes,
    scores and actions, never content. Off by default; on, spans go out by OTLP/HTTP."""

    enabled: bool = False
    service_name: str | None = Field(
        default=None, description="the spans' service.name; unset: OTEL_SERVICE_NAME, else safegate"
    )
    endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP traces URL (http://collector:4318/v1/traces); unset: "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT, else localhost:4318",
    )
    sample_ratio: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="share of new traces recorded; a caller's traceparent decides for its own",
    )
    export_timeout_s: float = Field(
        default=DEFAULT_TRACE_EXPORT_TIMEOUT_S,
        gt=0,
        description="an export to the collector, retries included, gives up after this (and "
        "so does the last flush when the gateway stops)",
    )


class Settings(SharedSettings):
    model_config = SettingsConfigDict(
        env_prefix="SAFEGATE_", env_nested_delimiter="__", extra="ignore"
    )

    policy_file: Path = SHIPPED_POLICY
    host: str = DEFAULT_HOST
    port: int = Field(default=DEFAULT_PORT, ge=1, le=65535)
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1024)
    max_moderation_inputs: int = Field(default=DEFAULT_MAX_MODERATION_INPUTS, ge=1)
    log_level: str = "info"
    api_docs: bool = Field(
        default=False,
        description="serve /docs, /redoc and /openapi.json, to callers with a key (any role)",
    )

    engine: EngineSettings = EngineSettings()
    encoder: EncoderSettings = EncoderSettings()
    language: LanguageSettings = LanguageSettings()
    multilingual: MultilingualSettings = MultilingualSettings()
    profanity: ProfanitySettings = ProfanitySettings()
    pii: PiiSettings = PiiSettings()
    blocklist: BlocklistSettings = BlocklistSettings()
    detoxify: DetoxifySettings = DetoxifySettings()
    llm_judge: LlmJudgeSettings = LlmJudgeSettings()
    chat: ChatSettings = ChatSettings()
    upstreams: UpstreamSettings = UpstreamSettings()
    audit: AuditSettings = AuditSettings()
    auth: AuthSettings = AuthSettings()
    rate_limit: RateLimitSettings = RateLimitSettings()
    quota: QuotaSettings = QuotaSettings()
    tracing: TracingSettings = TracingSettings()

    def degraded(self) -> tuple[str, ...]:
        """What these settings switch off that weakens every verdict: ``/readyz`` lists it
        and every response carries it in a ``safegate-degraded`` header."""
        notices: list[str] = []
        if not self.encoder.enabled:
            notices.append(
                "encoder disabled by configuration: harm categories and attack shields are "
                "scored without safegate's model"
            )
        if not self.language.enabled:
            notices.append("language identification disabled: no text is marked low-confidence")
        if not self.multilingual.enabled:
            notices.append(
                "multilingual heads disabled: French, Spanish, German and Portuguese texts are "
                "scored by the English model only and marked low-confidence"
            )
        return tuple(notices)


@lru_cache
def get_settings() -> Settings:
    return Settings()
