"""Latency of a one-line moderation while heavy requests run beside it (the fair queue).

Loads the shipped engine (default members, as ``bench/engine_latency.py`` does) behind a
``MicroBatcher``, measures one-line checks on the idle engine, then starts heavy requests
(by default one of 32 messages of 7,000 characters, the issue's case) and sends one-line
checks one after another until the heavy work is done. Reports p50, p99 and max of the
one-liners' latency, how long the heavy requests took, and how many texts came back with
a member error (which the chat route turns into a fail-closed 503).

``--max-batch-chars 0`` restores the old behaviour for comparison: batches bounded only
by ``max_batch`` texts, so a heavy request's messages form one long batch that everyone
behind it waits for, under a budget computed over the whole batch.

Usage: .venv/bin/python bench/engine_fairness.py [--max-batch-chars 4000]
           [--heavy-requests 1] [--heavy-messages 32] [--heavy-chars 7000]
Prints a JSON record; docs/BENCHMARKS.md quotes it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

ROOT = Path(__file__).resolve().parent.parent
ONE_LINER = (
    "Hey, can you help me write a short, friendly reminder email to my team about "
    "tomorrow's 10am planning meeting?"
)
IDLE_PROBES = 20
PROBE_GAP_S = 0.05  # between one-liners, so they sample the heavy run rather than flood it


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def heavy_messages(count: int, chars: int) -> list[str]:
    """Benign text from the project's own examples, ``chars`` characters a message."""
    rows = (ROOT / "data/safety/own_examples.jsonl").read_text(encoding="utf-8").splitlines()
    benign = [row["text"] for row in map(json.loads, rows) if row["group"].startswith("benign")]
    messages = []
    for index in range(count):
        parts: list[str] = []
        position = index
        while sum(len(part) + 1 for part in parts) <= chars:
            parts.append(benign[position % len(benign)])
            position += 7
        messages.append(" ".join(parts)[:chars])
    return messages


def summary(timings_ms: list[float]) -> dict[str, float]:
    return {
        "count": len(timings_ms),
        "p50_ms": round(percentile(timings_ms, 0.5), 1),
        "p99_ms": round(percentile(timings_ms, 0.99), 1),
        "max_ms": round(max(timings_ms), 1),
    }


async def measure(args: argparse.Namespace) -> dict[str, object]:
    from gateway.config import Settings
    from gateway.engine_factory import build_engine
    from gateway.safety.batcher import MicroBatcher
    from gateway.safety.engine import EngineOverloaded
    from gateway.safety.taxonomy import Direction

    settings = Settings(home=Path(tempfile.mkdtemp()))
    engine = build_engine(settings, blocklists=None)
    unbounded = args.max_batch_chars == 0
    batcher = MicroBatcher(
        engine,
        max_batch=settings.engine.max_batch,
        max_batch_chars=(
            settings.engine.max_batch * engine.max_text_chars if unbounded else args.max_batch_chars
        ),
        queue_capacity_chars=args.queue_capacity_chars or settings.engine.queue_capacity_chars,
        max_wait_s=settings.engine.max_wait_s,
    )
    heavy = heavy_messages(args.heavy_messages, args.heavy_chars)

    async def probe() -> tuple[float, bool]:
        started = time.perf_counter()
        verdict = (await batcher.check([ONE_LINER], direction=Direction.PROMPT))[0]
        failed = any(report.error is not None for report in verdict.members)
        return (time.perf_counter() - started) * 1000, failed

    for _ in range(5):
        await probe()
    idle = [(await probe())[0] for _ in range(IDLE_PROBES)]

    async def heavy_request() -> tuple[float, int, bool]:
        started = time.perf_counter()
        try:
            reports = await batcher.detect(heavy)
        except EngineOverloaded:
            return (time.perf_counter() - started), 0, True
        errors = sum(any(r.error is not None for r in text) for text in reports)
        return (time.perf_counter() - started), errors, False

    started = time.perf_counter()
    heavies = [asyncio.create_task(heavy_request()) for _ in range(args.heavy_requests)]
    await asyncio.sleep(0.2)  # the first heavy batch is running
    loaded: list[float] = []
    probe_failures = 0
    while not all(task.done() for task in heavies):
        latency, failed = await probe()
        loaded.append(latency)
        probe_failures += failed
        await asyncio.sleep(PROBE_GAP_S)
    outcomes = [await task for task in heavies]
    wall = time.perf_counter() - started
    await batcher.close()
    engine.close()
    return {
        "max_batch_chars": "unbounded (old behaviour)" if unbounded else args.max_batch_chars,
        "queue_capacity_chars": batcher.queue_capacity_chars,
        "heavy": {
            "requests": args.heavy_requests,
            "messages": args.heavy_messages,
            "chars_per_message": args.heavy_chars,
            "seconds": [round(seconds, 1) for seconds, _, _ in outcomes],
            "texts_with_member_errors": [errors for _, errors, _ in outcomes],
            "refused_overloaded": sum(refused for _, _, refused in outcomes),
            "wall_s": round(wall, 1),
        },
        "one_liner_idle": summary(idle),
        "one_liner_beside_heavy": {
            **(summary(loaded) if loaded else {"count": 0}),
            "with_member_errors": probe_failures,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--max-batch-chars",
        type=int,
        default=None,
        help="characters per batch; 0 = unbounded, the old behaviour (default: settings)",
    )
    parser.add_argument(
        "--queue-capacity-chars", type=int, default=0, help="0 = the settings' capacity"
    )
    parser.add_argument("--heavy-requests", type=int, default=1)
    parser.add_argument("--heavy-messages", type=int, default=32)
    parser.add_argument("--heavy-chars", type=int, default=7_000)
    args = parser.parse_args()
    if args.max_batch_chars is None:
        from gateway.config import EngineSettings

        args.max_batch_chars = EngineSettings().max_batch_chars
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = asyncio.run(measure(args))
    record = {
        "date": datetime.now(UTC).isoformat(timespec="minutes"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average_1m_at_start": load,
        "command": " ".join(["bench/engine_fairness.py", *sys.argv[1:]]),
        **result,
    }
    json.dump(record, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
