"""How much harmful text a stream lets out before the cut, per increment size.

Each completion of ``data/evals/stream_completions.jsonl`` (written for the project: harm
at the start, in the middle, in run-on text without punctuation, and benign answers)
streams through the gateway's ``StreamGuard`` with the real engine, a ~4-character token
every ``--token-ms`` ms (50 tokens/s by default), as the chat route feeds it. For each
increment size this reports:

- leaked: characters of the harmful span released before the stream was cut (mean, max);
- same verdict: completions blocked streamed exactly when the unstreamed check blocks them;
- ttft: time from the first token's arrival to the first release (benign answers), p50;
- benign cut: benign answers the stream cut;
- benign held: benign answers the stream held back for a while (a part failed on its own,
  and a later check, or the whole answer's, let it through).

Usage: .venv/bin/python bench/stream_increments.py [--increments 10000,96,48,24,12,1]
       [--token-ms 20] [--mode sync]
Run on an idle machine: the check latency is part of what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

from gateway.chat import DEFAULT_STREAM_OVERLAP_CHARS, DEFAULT_STREAM_WINDOW_CHARS, StreamGuard
from gateway.config import Settings
from gateway.engine_factory import build_members
from gateway.safety.batcher import MicroBatcher
from gateway.safety.engine import SafetyEngine
from gateway.safety.policy import Policy
from gateway.safety.taxonomy import Direction
from gateway.safety.verdict import Verdict

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data/evals/stream_completions.jsonl"


async def stream_one(
    text: str, *, batcher: MicroBatcher, increment: int, token_s: float, mode: str
) -> tuple[str, bool, float | None, bool]:
    """Released text, whether the stream was cut, seconds from first token to release,
    and whether some text was held back and released later."""

    async def check(window: str) -> Verdict:
        (verdict,) = await batcher.check([window], direction=Direction.COMPLETION)
        return verdict

    guard = StreamGuard(
        check=check,
        window_chars=DEFAULT_STREAM_WINDOW_CHARS,
        overlap_chars=DEFAULT_STREAM_OVERLAP_CHARS,
        increment_chars=increment,
        mode=mode,  # type: ignore[arg-type]
    )
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    async def produce() -> None:
        for start in range(0, len(text), 4):
            await asyncio.sleep(token_s)
            queue.put_nowait(text[start : start + 4])
        queue.put_nowait(None)

    producer = asyncio.create_task(produce())
    released = ""
    first_token: float | None = None
    first_release: float | None = None
    while (piece := await queue.get()) is not None:
        first_token = first_token or time.perf_counter()
        out = await guard.feed(piece)
        if out is not None and out.text:
            first_release = first_release or time.perf_counter()
            released += out.text
        if guard.blocked is not None:
            break
    producer.cancel()
    if guard.blocked is None:
        out = await guard.flush()
        if out is not None and out.text:
            first_release = first_release or time.perf_counter()
            released += out.text
    ttft = None if first_release is None or first_token is None else first_release - first_token
    return released, guard.blocked is not None, ttft, guard.overruled > 0


def leaked(released: str, text: str, harm: str) -> int:
    if not harm:
        return 0
    start = text.index(harm)
    return max(0, min(len(released), start + len(harm)) - start)


async def run(args: argparse.Namespace) -> dict[str, object]:
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]
    settings = Settings()
    engine = SafetyEngine(
        build_members(settings, blocklists=None), policy=Policy.load(settings.policy_file)
    )
    batcher = MicroBatcher(engine)
    unstreamed = {
        row["id"]: verdict.blocked
        for row, verdict in zip(
            rows,
            engine.check([row["text"] for row in rows], direction=Direction.COMPLETION),
            strict=True,
        )
    }
    results: dict[str, object] = {
        "date": datetime.now(UTC).isoformat(timespec="minutes"),
        "token_ms": args.token_ms,
        "mode": args.mode,
        "completions": {
            "harmful": sum(1 for r in rows if r["harm"]),
            "benign": sum(1 for r in rows if not r["harm"]),
            "harmful blocked unstreamed": sum(unstreamed[r["id"]] for r in rows if r["harm"]),
            "benign blocked unstreamed": sum(unstreamed[r["id"]] for r in rows if not r["harm"]),
        },
    }
    for increment in (int(i) for i in args.increments.split(",")):
        leaks: dict[str, list[int]] = {}
        same = 0
        ttfts: list[float] = []
        benign_cut = 0
        benign_held = 0
        for row in rows:
            released, cut, ttft, held = await stream_one(
                row["text"],
                batcher=batcher,
                increment=increment,
                token_s=args.token_ms / 1000,
                mode=args.mode,
            )
            same += cut == unstreamed[row["id"]]
            if row["harm"]:
                leaks.setdefault(row["position"], []).append(
                    leaked(released, row["text"], row["harm"])
                )
            else:
                benign_cut += cut
                benign_held += held
                if ttft is not None:
                    ttfts.append(ttft * 1000)
        every = [value for values in leaks.values() for value in values]
        results[f"increment_{increment}"] = {
            "leaked_chars_mean": round(statistics.mean(every), 1),
            "leaked_chars_max": max(every),
            "leaked_chars_mean_by_position": {
                position: round(statistics.mean(values), 1) for position, values in leaks.items()
            },
            "same_verdict_as_unstreamed": f"{same}/{len(rows)}",
            "ttft_after_first_token_p50_ms": round(statistics.median(ttfts), 1) if ttfts else None,
            "benign_cut": benign_cut,
            "benign_held": benign_held,
        }
        print(json.dumps({f"increment_{increment}": results[f"increment_{increment}"]}))
    await batcher.close()
    engine.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--increments", default="10000,96,48,24,12,1")
    parser.add_argument("--token-ms", type=float, default=20.0)
    parser.add_argument("--mode", default="sync", choices=["sync", "async"])
    print(json.dumps(asyncio.run(run(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
