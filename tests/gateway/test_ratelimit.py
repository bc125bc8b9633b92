"""Token buckets: the in-process limiter on a hand-moved clock, and the Redis limiter on the
local Redis server (a unique key prefix per test, deleted after it).

The Redis tests skip only when nothing answers at ``SAFEGATE_TEST_REDIS_URL``
(``redis://127.0.0.1:6379/0`` by default), and say so.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.access.ratelimit import (
    REDIS_TTL_MARGIN_MS,
    InProcessRateLimiter,
    Limit,
    RateLimiter,
    RedisRateLimiter,
    build_limiter,
)
from gateway.access.settings import MAX_REQUESTS_PER_MINUTE
from gateway.errors import ServiceUnavailable

REDIS_URL = os.environ.get("SAFEGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- limits ------------------------------------------------------------------------------


def test_limit_capacity_is_the_burst_capped_at_the_rate() -> None:
    assert Limit.of(600) == Limit(requests_per_minute=600, capacity=600)
    assert Limit.of(600, burst=50) == Limit(requests_per_minute=600, capacity=50)
    assert Limit.of(10, burst=50) == Limit(requests_per_minute=10, capacity=10)
    assert Limit.of(120).per_second == 2.0


@pytest.mark.parametrize(
    ("rpm", "capacity"), [(0, 1), (-5, 1), (MAX_REQUESTS_PER_MINUTE + 1, 1), (10, 0)]
)
def test_bad_limits_are_refused(rpm: int, capacity: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        Limit(requests_per_minute=rpm, capacity=capacity)


def test_build_limiter_picks_redis_only_when_configured() -> None:
    assert isinstance(build_limiter(redis_url=None), InProcessRateLimiter)
    limiter = build_limiter(redis_url=REDIS_URL, key_prefix="x:")
    try:
        assert isinstance(limiter, RedisRateLimiter)
        assert limiter.key_prefix == "x:"
    finally:
        asyncio.run(limiter.close())


# -- in process --------------------------------------------------------------------------


def test_in_process_bucket_empties_then_refills_with_time() -> None:
    clock = Clock()
    limiter = InProcessRateLimiter(clock=clock)
    limit = Limit.of(60, burst=3)  # one token a second, three at most

    decisions = [limiter.take("key_a", limit) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert decisions[3].retry_after_s == pytest.approx(1.0)

    clock.now += 0.5
    refused = limiter.take("key_a", limit)
    assert not refused.allowed
    assert refused.retry_after_s == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.take("key_a", limit).allowed
    assert not limiter.take("key_a", limit).allowed

    clock.now += 3600  # never more than the capacity, however long the key idled
    assert [limiter.take("key_a", limit).allowed for _ in range(4)] == [True, True, True, False]


def test_in_process_keys_have_their_own_buckets() -> None:
    limiter = InProcessRateLimiter(clock=Clock())
    limit = Limit.of(1)
    assert limiter.take("key_a", limit).allowed
    assert not limiter.take("key_a", limit).allowed
    assert limiter.take("key_b", limit).allowed
    assert not limiter.take("key_a", limit).allowed


def test_a_clock_going_back_never_adds_tokens() -> None:
    clock = Clock()
    limiter = InProcessRateLimiter(clock=clock)
    limit = Limit.of(60, burst=1)
    assert limiter.take("key_a", limit).allowed
    clock.now -= 100
    assert not limiter.take("key_a", limit).allowed


def test_in_process_is_exact_under_concurrent_tasks_and_threads() -> None:
    limiter = InProcessRateLimiter()
    limit = Limit.of(10)  # refills one token in 6 s: none during the test

    async def many() -> list[bool]:
        decisions = await asyncio.gather(*(limiter.acquire("key_a", limit) for _ in range(50)))
        return [decision.allowed for decision in decisions]

    assert sum(asyncio.run(many())) == 10
    with ThreadPoolExecutor(max_workers=8) as pool:
        allowed = list(pool.map(lambda _: limiter.take("key_b", limit).allowed, range(200)))
    assert sum(allowed) == 10


@settings(max_examples=200, deadline=None)
@given(
    rpm=st.integers(min_value=1, max_value=600),
    burst=st.integers(min_value=1, max_value=50),
    steps=st.lists(st.floats(min_value=0, max_value=5, allow_nan=False), max_size=60),
)
def test_no_sequence_of_requests_beats_the_bucket(rpm: int, burst: int, steps: list[float]) -> None:
    """Allowed requests never exceed the capacity plus what the elapsed time refilled."""
    clock = Clock()
    limiter = InProcessRateLimiter(clock=clock)
    limit = Limit.of(rpm, burst=burst)
    allowed = 0
    for step in steps:
        clock.now += step
        decision = limiter.take("key", limit)
        allowed += decision.allowed
        assert decision.allowed == (decision.retry_after_s == 0)
        assert 0 <= decision.remaining < limit.capacity
        elapsed = clock.now - 1000.0
        assert allowed <= limit.capacity + elapsed * limit.per_second + 1e-9


# -- Redis -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as error:
        client.close()
        pytest.skip(
            f"Redis at {REDIS_URL} is unreachable ({error}); start it or set "
            "SAFEGATE_TEST_REDIS_URL"
        )
    yield client
    client.close()


@pytest.fixture
def prefix(redis_server: redis.Redis) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    unique = f"safegate-test:{uuid.uuid4().hex}:"
    yield unique
    keys = list(redis_server.scan_iter(match=unique + "*"))
    if keys:
        redis_server.delete(*keys)


def run_acquires(limiter: RateLimiter, key: str, limit: Limit, count: int) -> list[bool]:
    async def many() -> list[bool]:
        try:
            decisions = await asyncio.gather(*(limiter.acquire(key, limit) for _ in range(count)))
            return [decision.allowed for decision in decisions]
        finally:
            await limiter.close()

    return asyncio.run(many())


def test_redis_bucket_refuses_past_capacity_and_says_when_to_retry(
    prefix: str, redis_server: redis.Redis
) -> None:
    limit = Limit.of(60, burst=2)

    async def scenario() -> None:
        limiter = RedisRateLimiter(REDIS_URL, key_prefix=prefix)
        try:
            first = await limiter.acquire("key_a", limit)
            second = await limiter.acquire("key_a", limit)
            third = await limiter.acquire("key_a", limit)
            other = await limiter.acquire("key_b", limit)
        finally:
            await limiter.close()
        assert (first.allowed, first.remaining) == (True, 1)
        assert (second.allowed, second.remaining) == (True, 0)
        assert not third.allowed
        assert 0.9 < third.retry_after_s <= 1.0  # one token a second, a few ms have passed
        assert other.allowed

    asyncio.run(scenario())
    # The bucket expires once it would be full again: 2 tokens at 1/s, plus the margin.
    ttl_ms = redis_server.pttl(prefix + "key_a")
    assert 0 < ttl_ms <= 2000 + REDIS_TTL_MARGIN_MS
    assert set(redis_server.scan_iter(match=prefix + "*")) == {
        (prefix + "key_a").encode(),
        (prefix + "key_b").encode(),
    }


def test_redis_bucket_refills_by_time(prefix: str) -> None:
    limit = Limit.of(1200, burst=1)  # a token every 50 ms

    async def scenario() -> None:
        limiter = RedisRateLimiter(REDIS_URL, key_prefix=prefix)
        try:
            assert (await limiter.acquire("key_a", limit)).allowed
            refused = await limiter.acquire("key_a", limit)
            assert not refused.allowed
            assert refused.retry_after_s <= 0.05
            await asyncio.sleep(refused.retry_after_s + 0.02)
            assert (await limiter.acquire("key_a", limit)).allowed
        finally:
            await limiter.close()

    asyncio.run(scenario())


def test_redis_is_exact_across_replicas_under_concurrency(prefix: str) -> None:
    """Two limiters (two replicas) and 60 concurrent requests share one bucket of 10."""
    limit = Limit.of(10)

    async def scenario() -> int:
        replicas = [RedisRateLimiter(REDIS_URL, key_prefix=prefix) for _ in range(2)]
        try:
            decisions = await asyncio.gather(
                *(replicas[i % 2].acquire("key_a", limit) for i in range(60))
            )
        finally:
            for replica in replicas:
                await replica.close()
        return sum(decision.allowed for decision in decisions)

    assert asyncio.run(scenario()) == 10


def test_unreachable_redis_fails_closed_quickly() -> None:
    async def scenario() -> None:
        limiter = RedisRateLimiter("redis://:hunter2@127.0.0.1:1/0", timeout_s=0.5)
        try:
            await limiter.acquire("key_a", Limit.of(600))
        finally:
            await limiter.close()

    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as refused:
        asyncio.run(scenario())
    assert time.monotonic() - started < 2.0
    assert refused.value.code == "rate_limiter_unavailable"
    assert "fail closed" in refused.value.message
    assert "127.0.0.1:1" in refused.value.message
    assert "hunter2" not in refused.value.message  # the URL's password never leaks


def test_the_redis_ttl_covers_a_full_refill(prefix: str, redis_server: redis.Redis) -> None:
    limit = Limit.of(6, burst=6)  # ten seconds a token, a minute to refill
    assert run_acquires(RedisRateLimiter(REDIS_URL, key_prefix=prefix), "key_a", limit, 1) == [True]
    ttl_ms = redis_server.pttl(prefix + "key_a")
    full_refill_ms = math.ceil(limit.capacity / limit.per_second * 1000)
    assert full_refill_ms < ttl_ms <= full_refill_ms + REDIS_TTL_MARGIN_MS
