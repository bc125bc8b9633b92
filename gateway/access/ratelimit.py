"""Per-key rate limits: a token bucket per API key, in this process or in Redis.

Each key owns a bucket of ``Limit.capacity`` tokens that refills continuously at
``requests_per_minute / 60`` tokens a second; a request takes one token, and a request
that finds less than one is refused with the time until one will be there (the 429's
``Retry-After``). The capacity is the service's ``burst`` (``SAFEGATE_RATE_LIMIT__BURST``)
capped at the key's per-minute rate, so a key limited to 10 requests a minute can never
send more than 10 at once, and the default (no burst set) lets a key spend its whole
minute's allowance at once.

Two implementations of one :class:`RateLimiter` protocol:

``InProcessRateLimiter``
    Buckets in a dict, guarded by a lock; the default. Each replica counts on its own,
    so N replicas let a key through N times its limit.
``RedisRateLimiter``
    Buckets in Redis (``SAFEGATE_RATE_LIMIT__REDIS_URL``), shared by every replica. One
    Lua script reads, refills and takes from a bucket atomically, on the Redis server's
    clock (``TIME``), so replicas' clocks never matter; every bucket expires once it would
    be full again, so idle keys cost no memory. If Redis cannot be reached or answers with
    an error, the request is refused with 503 ``rate_limiter_unavailable`` (fail closed:
    an outage of the limiter never lifts the limits) after at most ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.access.settings import (
    DEFAULT_REDIS_KEY_PREFIX,
    DEFAULT_REDIS_TIMEOUT_S,
    MAX_REQUESTS_PER_MINUTE,
)
from gateway.errors import ServiceUnavailable

log = logging.getLogger("safegate.ratelimit")

# Redis keeps a bucket this much longer than it takes to refill, so clock jitter between
# the script's reads never drops a bucket that still owes tokens.
REDIS_TTL_MARGIN_MS = 1_000


@dataclass(frozen=True, slots=True)
class Limit:
    """A key's budget: ``requests_per_minute`` refilling a bucket of ``capacity`` tokens."""

    requests_per_minute: int
    capacity: int

    def __post_init__(self) -> None:
        if not 1 <= self.requests_per_minute <= MAX_REQUESTS_PER_MINUTE:
            raise ValueError(
                f"requests_per_minute must be 1 to {MAX_REQUESTS_PER_MINUTE}, "
                f"got {self.requests_per_minute!r}"
            )
        if self.capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {self.capacity!r}")

    @classmethod
    def of(cls, requests_per_minute: int, *, burst: int | None = None) -> Limit:
        """The limit for a rate, its capacity ``burst`` capped at the rate (``None``: the rate)."""
        capacity = requests_per_minute if burst is None else min(burst, requests_per_minute)
        return cls(requests_per_minute=requests_per_minute, capacity=capacity)

    @property
    def per_second(self) -> float:
        return self.requests_per_minute / 60.0


@dataclass(frozen=True, slots=True)
class Decision:
    """What the limiter said about one request."""

    allowed: bool
    limit: Limit
    remaining: int  # whole tokens left after this request
    retry_after_s: float  # 0 when allowed; else the time until a token is there


class RateLimiter(Protocol):
    """Takes one token from ``key``'s bucket, or says how long until it can."""

    async def acquire(self, key: str, limit: Limit) -> Decision: ...

    async def close(self) -> None: ...


def _refused(limit: Limit, tokens: float) -> Decision:
    wait = (1.0 - tokens) / limit.per_second
    return Decision(allowed=False, limit=limit, remaining=0, retry_after_s=max(wait, 0.001))


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class InProcessRateLimiter:
    """Token buckets in this process. Safe from the event loop and from worker threads.

    One bucket per key; keys are API key ids, so their number is bounded by the keys
    table. A bucket's capacity follows the limit it is asked with (a changed limit
    applies from the next request).
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}

    async def acquire(self, key: str, limit: Limit) -> Decision:
        return self.take(key, limit)

    def take(self, key: str, limit: Limit) -> Decision:
        """The synchronous core of :meth:`acquire` (no I/O, never blocks for long)."""
        with self._lock:
            now = self._clock()
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(tokens=float(limit.capacity), updated=now)
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(float(limit.capacity), bucket.tokens + elapsed * limit.per_second)
            bucket.updated = now
            if bucket.tokens < 1.0:
                return _refused(limit, bucket.tokens)
            bucket.tokens -= 1.0
            return Decision(
                allowed=True, limit=limit, remaining=int(bucket.tokens), retry_after_s=0.0
            )

    async def close(self) -> None:
        with self._lock:
            self._buckets.clear()


# KEYS[1]: the bucket. ARGV: capacity, tokens per millisecond, TTL in ms.
# Returns {allowed (0/1), tokens left (string: Lua numbers would be truncated to integers)}.
BUCKET_SCRIPT = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = tonumber(state[1])
local updated = tonumber(state[2])
if tokens == nil or updated == nil then
  tokens = capacity
  updated = now
end
if now > updated then
  tokens = math.min(capacity, tokens + (now - updated) * rate)
  updated = now
end
if tokens > capacity then
  tokens = capacity
end
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'updated', updated)
redis.call('PEXPIRE', KEYS[1], ttl)
return {allowed, string.format('%.6f', tokens)}
"""


class RedisRateLimiter:
    """Token buckets in Redis, shared by every replica; fails closed when Redis is down."""

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = DEFAULT_REDIS_KEY_PREFIX,
        timeout_s: float = DEFAULT_REDIS_TIMEOUT_S,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        import redis.asyncio as redis  # imported here: the in-process limiter needs no Redis

        self.key_prefix = key_prefix
        self.timeout_s = timeout_s
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
        )
        self._script = self._client.register_script(BUCKET_SCRIPT)
        self._where = _without_password(url)

    async def acquire(self, key: str, limit: Limit) -> Decision:
        from redis.exceptions import RedisError

        ttl_ms = math.ceil(limit.capacity / limit.per_second * 1000) + REDIS_TTL_MARGIN_MS
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                allowed, left = await self._script(
                    keys=[self.key_prefix + key],
                    args=[limit.capacity, repr(limit.per_second / 1000.0), ttl_ms],
                )
        except (RedisError, OSError, TimeoutError) as error:
            log.error(
                "rate limiter unavailable",
                extra={"redis": self._where, "error": type(error).__name__},
            )
            raise ServiceUnavailable(
                f"the rate limiter (Redis at {self._where}) cannot be reached, so requests "
                "are refused (fail closed); retry shortly",
                code="rate_limiter_unavailable",
            ) from None
        tokens = float(left)
        if not int(allowed):
            return _refused(limit, tokens)
        return Decision(allowed=True, limit=limit, remaining=int(tokens), retry_after_s=0.0)

    async def close(self) -> None:
        await self._client.aclose()


def _without_password(url: str) -> str:
    """``redis://user:secret@host:6379/0`` as ``redis://host:6379/0``: fit for messages."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}" if rest else url


def build_limiter(
    *,
    redis_url: str | None,
    key_prefix: str = DEFAULT_REDIS_KEY_PREFIX,
    timeout_s: float = DEFAULT_REDIS_TIMEOUT_S,
) -> RateLimiter:
    """Redis-backed when ``redis_url`` is set, else in this process."""
    if redis_url:
        return RedisRateLimiter(redis_url, key_prefix=key_prefix, timeout_s=timeout_s)
    return InProcessRateLimiter()
