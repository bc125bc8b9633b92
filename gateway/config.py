"""Settings: ``SAFEGATE_*`` environment variables over embedded defaults.

Nested sections use ``__``: ``SAFEGATE_DETOXIFY__ENABLED=true``. Every limit and
timeout has a named default; none means "unlimited". Each domain owns its sections and
their defaults in its ``settings.py`` (``gateway.access``, ``gateway.audit``,
``gateway.blocklists``, ``gateway.chat``, ``gateway.safety``), a leaf its own modules take
their defaults from; this module composes them into ``Settings``, with the service's own
fields and its tracing section, and imports nothing else of the gateway.
``get_settings()`` is cached; ``create_app(settings)`` takes the settings the app and its
routes use (tests pass their own), and commands read ``get_settings()``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from gateway.access.settings import AuthSettings, QuotaSettings, RateLimitSettings
from gateway.audit.settings import AuditSettings
from gateway.blocklists.settings import BlocklistSettings
from gateway.chat.settings import ChatSettings, UpstreamSettings
from gateway.safety.settings import (
    SHIPPED_POLICY,
    DetoxifySettings,
    EncoderSettings,
    EngineSettings,
    LanguageSettings,
    LlmJudgeSettings,
    MultilingualSettings,
    PiiSettings,
    ProfanitySettings,
)
from safegate.settings import SharedSettings

__all__ = [
    "AuditSettings",
    "AuthSettings",
    "BlocklistSettings",
    "ChatSettings",
    "DetoxifySettings",
    "EncoderSettings",
    "EngineSettings",
    "LanguageSettings",
    "LlmJudgeSettings",
    "MultilingualSettings",
    "PiiSettings",
    "ProfanitySettings",
    "QuotaSettings",
    "RateLimitSettings",
    "Settings",
    "TracingSettings",
    "UpstreamSettings",
    "get_settings",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BODY_BYTES = 2_000_000
DEFAULT_MAX_MODERATION_INPUTS = 64
# OpenTelemetry's own default: an export of spans (retries included) gives up after this.
DEFAULT_TRACE_EXPORT_TIMEOUT_S = 10.0


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
