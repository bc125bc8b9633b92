"""Fair, bounded scheduling of concurrent detection requests onto the safety engine.

CPU inference never runs on the event loop: ``MicroBatcher`` runs ``engine.detect`` in
one worker thread, over batches gathered from concurrent requests. Its queue is measured
in characters, not requests, because a detection pass costs about its characters:

- **Slices.** A batch holds at most ``max_batch`` texts and ``max_batch_chars``
  characters; a single longer text runs alone. Texts are never cut, so a text's reports
  are the ones it would get if detected alone.
- **Round robin.** Each waiting request is a job. A batch takes one text per job in turn
  (then another round while there is room), starting with the job after the one that
  started the previous batch, and a job's texts keep their order. A one-line request
  that arrives behind a heavy one waits for the batch in flight and then for at most one
  slice of each request ahead of it, never for the heavy request's whole work.
- **Budgets.** A member's time budget is computed from the characters of the batch it
  runs (``MemberSpec.budget``), and a batch is one slice, so other requests add at most
  one slice to the work a text's budget must cover; a queue of other requests never
  makes a text overrun its budget.
- **Admission.** ``pending_chars`` counts the characters admitted and not yet detected.
  A request that would take it past ``queue_capacity_chars`` fails at once with
  ``EngineOverloaded``, whose ``retry_after_s`` is the time the queue needs to drain
  enough, at the rate measured over recent batches. An idle batcher admits any request
  the engine accepts, so one larger than the whole capacity still runs (alone). Checks
  that finish work already admitted (a chat completion) pass ``sheddable=False``: they
  count toward the queue and wait their turn, but are never refused.
- **Gathering.** By default an idle worker starts on the first text at once, and texts
  that arrive during a forward pass make up the next batch, so batches grow with load
  and a lone request pays no delay (a dynamic batcher with no queue delay). A positive
  ``max_wait_s`` holds an idle worker that long for company: bigger first batches, at
  that cost in latency for every request that finds the engine idle.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from gateway.safety.engine import EngineNotReady, EngineOverloaded, SafetyEngine
from gateway.safety.policy import Policy
from gateway.safety.settings import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BATCH_CHARS,
    DEFAULT_MAX_WAIT_S,
    DEFAULT_QUEUE_CAPACITY_CHARS,
)
from gateway.safety.taxonomy import Direction, Label
from gateway.safety.verdict import MemberReport, Verdict

# The drain rate assumed until batches have been measured (shipped engine, 2 cores).
DEFAULT_DRAIN_CHARS_PER_S = 8_000.0
MIN_RETRY_AFTER_S = 1.0
# Each batch's weight in the measured drain rate decays by this factor per later batch.
DRAIN_RATE_DECAY = 0.9

Reports = list[tuple[MemberReport, ...]]


@dataclass(eq=False)
class _Job:
    """One request's texts: which are scheduled, which are answered."""

    texts: list[str]
    future: asyncio.Future[Reports]
    unscheduled_chars: int
    next: int = 0
    reports: list[tuple[MemberReport, ...] | None] = field(init=False)
    missing: int = field(init=False)

    def __post_init__(self) -> None:
        self.reports = [None] * len(self.texts)
        self.missing = len(self.texts)

    @property
    def scheduled(self) -> bool:
        return self.next == len(self.texts)

    def deliver(self, index: int, reports: tuple[MemberReport, ...]) -> None:
        self.reports[index] = reports
        self.missing -= 1
        if self.missing == 0 and not self.future.done():
            self.future.set_result([r for r in self.reports if r is not None])


@dataclass
class _Batch:
    texts: list[str] = field(default_factory=list)
    owners: list[tuple[_Job, int]] = field(default_factory=list)
    chars: int = 0

    def add(self, job: _Job) -> None:
        text = job.texts[job.next]
        self.texts.append(text)
        self.owners.append((job, job.next))
        self.chars += len(text)
        job.next += 1
        job.unscheduled_chars -= len(text)

    @property
    def jobs(self) -> list[_Job]:
        return list(dict.fromkeys(job for job, _ in self.owners))


class _DrainRate:
    """Characters per second the engine gets through, over recent batches.

    Decayed sums of characters and of seconds, not an average of per-batch rates, so a
    run of one-liners (mostly fixed cost) does not hide the rate of long batches.
    """

    def __init__(self, prior_chars_per_s: float) -> None:
        self._chars = prior_chars_per_s
        self._seconds = 1.0

    def observe(self, chars: int, seconds: float) -> None:
        self._chars = self._chars * DRAIN_RATE_DECAY + chars
        self._seconds = self._seconds * DRAIN_RATE_DECAY + seconds

    @property
    def chars_per_s(self) -> float:
        return self._chars / self._seconds


class MicroBatcher:
    """Serves detection requests fairly, in bounded batches, from one worker thread."""

    def __init__(
        self,
        engine: SafetyEngine,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_batch_chars: int = DEFAULT_MAX_BATCH_CHARS,
        queue_capacity_chars: int = DEFAULT_QUEUE_CAPACITY_CHARS,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
        drain_chars_per_s: float = DEFAULT_DRAIN_CHARS_PER_S,
    ) -> None:
        for name, value in (
            ("max_batch", max_batch),
            ("max_batch_chars", max_batch_chars),
            ("queue_capacity_chars", queue_capacity_chars),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must not be negative, got {max_wait_s}")
        if drain_chars_per_s <= 0:
            raise ValueError(f"drain_chars_per_s must be positive, got {drain_chars_per_s}")
        self.engine = engine
        self.max_batch = max_batch
        self.max_batch_chars = max_batch_chars
        self.queue_capacity_chars = queue_capacity_chars
        self.max_wait_s = max_wait_s
        self._rate = _DrainRate(drain_chars_per_s)
        self._jobs: deque[_Job] = deque()  # jobs with unscheduled texts, in serving order
        self._open: set[_Job] = set()  # admitted and not yet answered
        self._pending_chars = 0
        self._started_last: _Job | None = None
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safety-batch")

    @property
    def pending_chars(self) -> int:
        """Characters admitted and not yet detected (queued or in the running batch)."""
        return self._pending_chars

    async def detect(
        self, texts: Sequence[str], *, sheddable: bool = True
    ) -> list[tuple[MemberReport, ...]]:
        """Each text's member reports, in order.

        Raises ``InputTooLong`` for a text over the engine's limit and, unless
        ``sheddable`` is false, ``EngineOverloaded`` when the queue cannot take the texts.
        """
        self.engine.validate(texts)
        if not texts:
            return []
        characters = sum(len(text) for text in texts)
        arrived = self._ensure_worker()
        if sheddable:
            self._admit(characters)
        job = _Job(
            texts=list(texts),
            future=asyncio.get_running_loop().create_future(),
            unscheduled_chars=characters,
        )
        self._jobs.append(job)
        self._open.add(job)
        self._pending_chars += characters
        arrived.set()
        try:
            return await job.future
        except asyncio.CancelledError:
            self._forget(job)  # the caller gave up: its unscheduled texts leave the queue
            raise

    async def check(
        self,
        texts: Sequence[str],
        *,
        direction: Direction,
        policy: Policy | None = None,
        ignore: Collection[Label] = (),
    ) -> list[Verdict]:
        reports = await self.detect(texts)
        return [
            self.engine.decide(r, direction=direction, policy=policy, ignore=ignore)
            for r in reports
        ]

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)

    # -- admission ---------------------------------------------------------------------

    def _admit(self, characters: int) -> None:
        pending = self._pending_chars
        if pending == 0 or pending + characters <= self.queue_capacity_chars:
            return
        must_drain = min(pending, pending + characters - self.queue_capacity_chars)
        retry_after_s = max(MIN_RETRY_AFTER_S, must_drain / self._rate.chars_per_s)
        raise EngineOverloaded(
            characters=characters,
            pending=pending,
            capacity=self.queue_capacity_chars,
            retry_after_s=retry_after_s,
        )

    # -- the worker --------------------------------------------------------------------

    def _ensure_worker(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        worker = self._worker
        if (
            worker is None
            or self._arrived is None
            or worker.done()
            or worker.get_loop() is not loop
        ):
            # First use, a new event loop, or a worker that stopped (its jobs were failed).
            self._jobs.clear()
            self._open.clear()
            self._pending_chars = 0
            self._started_last = None
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._run(self._arrived), name="safety-microbatcher")
        return self._arrived

    async def _run(self, arrived: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._jobs:
                    arrived.clear()
                    await arrived.wait()
                    await self._gather(arrived, loop)
                batch = self._take()
                if batch.texts:
                    await self._serve(batch, loop)
        finally:
            stopped = EngineNotReady("the safety engine's batcher stopped")
            for job in list(self._open):
                self._fail(job, stopped)

    async def _gather(self, arrived: asyncio.Event, loop: asyncio.AbstractEventLoop) -> None:
        """Wait up to ``max_wait_s`` for more requests, unless a batch is already full."""
        deadline = loop.time() + self.max_wait_s
        while not self._full():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), remaining)
            except TimeoutError:
                return

    def _full(self) -> bool:
        texts = sum(len(job.texts) - job.next for job in self._jobs)
        chars = sum(job.unscheduled_chars for job in self._jobs)
        return texts >= self.max_batch or chars >= self.max_batch_chars

    def _take(self) -> _Batch:
        """The next batch: one text per job in turn, within the slice's limits."""
        for job in [job for job in self._jobs if job.future.done()]:
            self._forget(job)
        batch = _Batch()
        if not self._jobs:
            return batch
        if self._jobs[0] is self._started_last:
            self._jobs.rotate(-1)  # it started the last batch: everyone else goes first
        self._started_last = self._jobs[0]
        candidates = list(self._jobs)
        while candidates and len(batch.texts) < self.max_batch:
            still_open: list[_Job] = []
            for job in candidates:
                if len(batch.texts) >= self.max_batch:
                    break
                size = len(job.texts[job.next])
                if batch.texts and batch.chars + size > self.max_batch_chars:
                    continue  # this job's next text waits for a later batch
                batch.add(job)
                if not job.scheduled:
                    still_open.append(job)
            candidates = still_open
        for job in batch.jobs:
            if job.scheduled:
                self._jobs.remove(job)
        return batch

    async def _serve(self, batch: _Batch, loop: asyncio.AbstractEventLoop) -> None:
        started = loop.time()
        try:
            reports = await loop.run_in_executor(self._thread, self.engine.detect, batch.texts)
            if len(reports) != len(batch.texts):
                raise RuntimeError(
                    f"the engine returned {len(reports)} results for {len(batch.texts)} texts"
                )
        except Exception as exc:  # noqa: BLE001 - handed to every request in the batch
            self._pending_chars -= batch.chars
            for job in batch.jobs:
                self._fail(job, exc)
            return
        self._pending_chars -= batch.chars
        self._rate.observe(batch.chars, loop.time() - started)
        for (job, index), report in zip(batch.owners, reports, strict=True):
            job.deliver(index, report)
            if job.missing == 0:
                self._open.discard(job)

    def _fail(self, job: _Job, error: BaseException) -> None:
        if not job.future.done():
            job.future.set_exception(error)
        self._forget(job)

    def _forget(self, job: _Job) -> None:
        """Drop a job that failed or whose caller gave up; its in-flight texts still
        leave ``pending_chars`` when their batch ends."""
        if job in self._jobs:
            self._jobs.remove(job)
        self._pending_chars -= job.unscheduled_chars
        job.unscheduled_chars = 0
        job.next = len(job.texts)
        self._open.discard(job)
