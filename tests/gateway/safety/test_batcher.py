"""The batcher's scheduling: bounded slices, round robin, admission, reports per text.

Members here are stubs whose cost is set by the test: ``PerChar`` sleeps in proportion
to the characters it is given (the real encoder's cost grows the same way), ``Gate``
holds its batch until the test opens it, ``Echo`` scores each text from the text alone.
"""

from __future__ import annotations

import asyncio
import threading
import time
import zlib
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.safety.batcher import MIN_RETRY_AFTER_S, MicroBatcher
from gateway.safety.engine import EngineOverloaded, MemberSpec, SafetyEngine
from gateway.safety.normalize import NormalizedText
from gateway.safety.policy import Policy
from gateway.safety.taxonomy import Category, Direction
from gateway.safety.verdict import Detection, MemberReport

# The heavy request: 32 user messages of 7,000 characters.
HEAVY = [f"{i:02d} " + "lorem ipsum dolor sit amet " * 259 for i in range(32)]
HEAVY_CHARS = sum(len(text) for text in HEAVY)
ONE_LINER = "Is this sentence fine?"
# 224,000 characters of heavy work take about 3 s: 94 ms per message.
SECONDS_PER_CHAR = 3.0 / HEAVY_CHARS
WAIT_S = 5.0  # how long a test waits for a stub to be reached before it fails


class PerChar:
    """Costs ``SECONDS_PER_CHAR`` per character; records each batch's characters."""

    id = "per-char"
    labels = frozenset({Category.HATE})

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.started = threading.Event()

    def classify(self, texts: Sequence[NormalizedText]) -> list[Detection]:
        characters = sum(len(text.original) for text in texts)
        self.batches.append(characters)
        self.started.set()
        time.sleep(SECONDS_PER_CHAR * characters)
        return [Detection(scores={Category.HATE: 0.0}) for _ in texts]


class Gate:
    """Holds every batch until ``open`` is set."""

    id = "gate"
    labels = frozenset({Category.HATE})

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()

    def classify(self, texts: Sequence[NormalizedText]) -> list[Detection]:
        self.entered.set()
        self.open.wait(WAIT_S)
        return [Detection(scores={Category.HATE: 0.0}) for _ in texts]


class Echo:
    """A score that depends on the text alone; records the texts of each batch."""

    id = "echo"
    labels = frozenset({Category.HATE, Category.VIOLENCE})

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def classify(self, texts: Sequence[NormalizedText]) -> list[Detection]:
        self.batches.append([text.original for text in texts])
        return [
            Detection(
                scores={
                    Category.HATE: zlib.crc32(text.original.encode()) % 1000 / 999,
                    Category.VIOLENCE: min(1.0, len(text.original) / 100),
                }
            )
            for text in texts
        ]


def engine(member: object, *, timeout_s: float = 2.0, per_kchar_s: float = 0.1) -> SafetyEngine:
    spec = MemberSpec(member, timeout_s, per_kchar_s)  # type: ignore[arg-type]
    return SafetyEngine([spec], policy=Policy())


def results(reports: list[tuple[MemberReport, ...]]) -> list[list[object]]:
    """What a text's reports say, without the latency (which depends on its batch)."""
    return [[(r.member, r.detection, r.error) for r in text] for text in reports]


async def wait_until(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, WAIT_S), "the stub was never reached"


def test_a_one_liner_is_served_while_a_heavy_request_is_queued() -> None:
    # The budget has no per-character allowance: the heavy request as one batch (3 s)
    # would overrun it and fail every text in the batch; bounded slices (94 ms) do not.
    member = PerChar()
    batcher = MicroBatcher(engine(member, timeout_s=1.0, per_kchar_s=0.0))

    async def scenario() -> tuple[float, bool, list[MemberReport], list[MemberReport]]:
        heavy = asyncio.create_task(batcher.detect(HEAVY))
        await wait_until(member.started)  # the heavy request's first slice is running
        started = time.perf_counter()
        light = await batcher.detect([ONE_LINER])
        waited = time.perf_counter() - started
        heavy_done_first = heavy.done()
        heavy_reports = await heavy
        await batcher.close()
        return (
            waited,
            heavy_done_first,
            [r for t in light for r in t],
            [r for t in heavy_reports for r in t],
        )

    started = time.perf_counter()
    waited, heavy_done_first, light, heavy = asyncio.run(scenario())
    total = time.perf_counter() - started
    assert total > 2.5  # the heavy request really was about 3 s of work
    assert waited < 1.0  # the one-liner waited for about one slice, not for 3 s
    assert not heavy_done_first
    assert [r.error for r in light] == [None]
    assert all(r.error is None for r in heavy)
    assert max(member.batches) <= len(HEAVY[0])  # one message per slice, never the lot


def test_a_request_past_the_capacity_is_refused_at_once_with_a_retry_time() -> None:
    gate = Gate()
    batcher = MicroBatcher(engine(gate), queue_capacity_chars=HEAVY_CHARS + 1_000)

    async def scenario() -> tuple[EngineOverloaded, float, int, list[int]]:
        heavy = asyncio.create_task(batcher.detect(HEAVY))
        await wait_until(gate.entered)
        queued = batcher.pending_chars
        started = time.perf_counter()
        with pytest.raises(EngineOverloaded) as refused:
            await batcher.detect(HEAVY)
        refused_after = time.perf_counter() - started
        light = asyncio.create_task(batcher.detect([ONE_LINER]))  # still fits
        await asyncio.sleep(0.01)
        gate.open.set()
        done = [len(await heavy), len(await light)]
        assert batcher.pending_chars == 0
        done.append(len(await batcher.detect(HEAVY)))  # admitted again once drained
        await batcher.close()
        return refused.value, refused_after, queued, done

    error, refused_after, queued, done = asyncio.run(scenario())
    assert queued == HEAVY_CHARS
    assert refused_after < 0.1
    assert error.retry_after_s >= MIN_RETRY_AFTER_S > 0
    assert error.pending == HEAVY_CHARS
    assert error.capacity == HEAVY_CHARS + 1_000
    assert "SAFEGATE_ENGINE__QUEUE_CAPACITY_CHARS" in str(error)
    assert done == [32, 1, 32]


def test_the_retry_time_follows_the_measured_drain_rate() -> None:
    gate = Gate()
    batcher = MicroBatcher(engine(gate), queue_capacity_chars=10_000, drain_chars_per_s=1_000.0)

    async def scenario() -> float:
        first = asyncio.create_task(batcher.detect(["x" * 9_000]))
        await wait_until(gate.entered)
        with pytest.raises(EngineOverloaded) as refused:
            await batcher.detect(["y" * 4_000])
        gate.open.set()
        await first
        await batcher.close()
        return refused.value.retry_after_s

    # 3,000 characters must drain before 4,000 more fit; at the assumed 1,000 a second.
    assert asyncio.run(scenario()) == pytest.approx(3.0)


def test_a_completion_check_is_never_shed() -> None:
    gate = Gate()
    batcher = MicroBatcher(engine(gate), queue_capacity_chars=100)

    async def scenario() -> int:
        first = asyncio.create_task(batcher.detect(["x" * 90]))
        await wait_until(gate.entered)
        with pytest.raises(EngineOverloaded):
            await batcher.detect(["y" * 50])
        completion = asyncio.create_task(batcher.detect(["y" * 50], sheddable=False))
        await asyncio.sleep(0.01)
        gate.open.set()
        await first
        reports = await completion
        await batcher.close()
        return len(reports)

    assert asyncio.run(scenario()) == 1


def test_a_caller_that_gives_up_leaves_the_queue() -> None:
    gate = Gate()
    batcher = MicroBatcher(engine(gate), max_batch_chars=100)

    async def scenario() -> tuple[int, int]:
        first = asyncio.create_task(batcher.detect(["x" * 100]))
        await wait_until(gate.entered)
        waiting = asyncio.create_task(batcher.detect(["y" * 100] * 5))
        await asyncio.sleep(0.01)
        queued = batcher.pending_chars
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        left = batcher.pending_chars
        gate.open.set()
        await first
        await batcher.close()
        return queued, left

    assert asyncio.run(scenario()) == (600, 100)


texts = st.text(alphabet="abc xyz.", min_size=0, max_size=120)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(texts, min_size=1, max_size=6), min_size=1, max_size=6))
def test_reports_per_text_are_those_of_detecting_alone(requests: list[list[str]]) -> None:
    member = Echo()
    run = engine(member)
    batcher = MicroBatcher(run, max_batch=4, max_batch_chars=150, max_wait_s=0.01)

    async def concurrently() -> list[list[tuple[MemberReport, ...]]]:
        answers = await asyncio.gather(*(batcher.detect(texts) for texts in requests))
        await batcher.close()
        return answers

    answers = asyncio.run(concurrently())
    for texts, reports in zip(requests, answers, strict=True):
        assert results(reports) == results([run.detect([text])[0] for text in texts])
    for batch in member.batches[: -sum(len(texts) for texts in requests)]:  # the batcher's
        assert len(batch) <= 4
        assert len(batch) == 1 or sum(len(text) for text in batch) <= 150
    run.close()


def test_a_text_longer_than_a_slice_runs_alone() -> None:
    member = Echo()
    batcher = MicroBatcher(engine(member), max_batch_chars=50, max_wait_s=0.05)
    long, short = "l" * 80, "s" * 10

    async def together() -> None:
        await asyncio.gather(batcher.detect([long, short]), batcher.detect([short, short]))
        await batcher.close()

    asyncio.run(together())
    assert [long] in member.batches
    assert all(len(batch) == 1 or long not in batch for batch in member.batches)
    assert sorted(len(text) for batch in member.batches for text in batch) == [10, 10, 10, 80]


def test_concurrent_requests_share_one_batch() -> None:
    member = Echo()
    batcher = MicroBatcher(engine(member), max_batch=16, max_wait_s=0.05)

    async def many() -> list[list[tuple[MemberReport, ...]]]:
        answers = await asyncio.gather(*(batcher.detect([f"text {i}"]) for i in range(5)))
        await batcher.close()
        return answers

    assert [len(r) for r in asyncio.run(many())] == [1] * 5
    assert [len(batch) for batch in member.batches] == [5]


def test_check_decides_each_text() -> None:
    batcher = MicroBatcher(engine(Echo()))

    async def check() -> int:
        verdicts = await batcher.check(["a", "b"], direction=Direction.COMPLETION)
        await batcher.close()
        return sum(v.direction is Direction.COMPLETION for v in verdicts)

    assert asyncio.run(check()) == 2


@pytest.mark.parametrize(
    ("limit", "value"), [("max_batch", 0), ("max_batch_chars", 0), ("queue_capacity_chars", 0)]
)
def test_limits_must_be_positive(limit: str, value: int) -> None:
    with pytest.raises(ValueError, match=f"{limit} must be at least 1"):
        MicroBatcher(engine(Echo()), **{limit: value})
