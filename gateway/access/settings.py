"""Settings of API keys, rate limits and token quotas, with their defaults.

A leaf (pydantic only): ``gateway.config`` composes these sections into ``Settings``, and
the access modules take their defaults from here.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

DEFAULT_CACHE_TTL_S = 5.0
DEFAULT_OUTAGE_GRACE_S = 300.0
DEFAULT_QUOTA_CACHE_TTL_S = 2.0
DEFAULT_REQUESTS_PER_MINUTE = 600
DEFAULT_REDIS_KEY_PREFIX = "safegate:ratelimit:"
DEFAULT_REDIS_TIMEOUT_S = 0.5
MAX_REQUESTS_PER_MINUTE = 1_000_000


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
