"""Recall on harmful sentences inside mid-length benign text, and false blocks on
mid-length benign text, for the shipped engine (default members and policy).

Built from the project's own held-out examples (data/safety/own_examples.jsonl), no
shared data needed: each harmful held-out text is placed after benign held-out texts so
that the whole is 150-300 characters (a chat completion's paragraph, a stream window);
benign texts are joined the same way. Reports the share blocked, for the engine as
configured and, with ``--chunk-chars N``, with another sentence-chunk size.

Usage: .venv/bin/python bench/mixed_length.py [--chunk-chars 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gateway.config import Settings  # noqa: E402
from gateway.engine_factory import build_engine  # noqa: E402
from gateway.safety.engine import SafetyEngine  # noqa: E402
from gateway.safety.members import encoder_heads  # noqa: E402
from gateway.safety.settings import DEFAULT_MAX_BATCH  # noqa: E402
from gateway.safety.taxonomy import Direction  # noqa: E402
from gateway.safety.verdict import Verdict  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MIN_CHARS, MAX_CHARS = 150, 300
BATCH = DEFAULT_MAX_BATCH


def build_sets(seed: int) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in (ROOT / "data/safety/own_examples.jsonl").open()]
    heldout = [row for row in rows if row["split"] == "heldout"]
    harmful = [row["text"] for row in heldout if row["group"] == "harmful"]
    benign = [row["text"] for row in heldout if row["group"].startswith("benign")]
    rng = random.Random(seed)

    def padded(tail: str | None) -> str:
        parts: list[str] = []
        budget = rng.randint(MIN_CHARS, MAX_CHARS) - (len(tail) + 1 if tail else 0)
        while sum(len(p) + 1 for p in parts) < budget:
            parts.append(rng.choice(benign))
        text = " ".join([*parts, tail] if tail else parts)
        return text

    mixed_harmful = [padded(text) for text in harmful]
    mixed_benign = [padded(None) for _ in range(len(benign))]
    return mixed_harmful, mixed_benign


def _check(engine: SafetyEngine, texts: list[str]) -> list[Verdict]:
    """In batches the size the service uses, so no batch overruns its time budget."""
    return [
        verdict
        for start in range(0, len(texts), BATCH)
        for verdict in engine.check(texts[start : start + BATCH], direction=Direction.COMPLETION)
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunk-chars", type=int, default=encoder_heads.CHUNK_CHARS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    encoder_heads.CHUNK_CHARS = args.chunk_chars
    harmful, benign = build_sets(args.seed)
    with tempfile.TemporaryDirectory() as home:
        engine = build_engine(Settings(home=Path(home)), blocklists=None)
        started = time.perf_counter()
        blocked_harmful = sum(v.blocked for v in _check(engine, harmful))
        blocked_benign = sum(v.blocked for v in _check(engine, benign))
        errors = sum(1 for v in _check(engine, harmful[:BATCH]) for r in v.members if r.error)
        seconds = time.perf_counter() - started
    lengths = [len(t) for t in harmful + benign]
    print(
        json.dumps(
            {
                "chunk_chars": args.chunk_chars,
                "texts": len(lengths),
                "mean_chars": round(sum(lengths) / len(lengths), 1),
                "harmful_blocked": round(blocked_harmful / len(harmful), 4),
                "benign_blocked": round(blocked_benign / len(benign), 4),
                "n_harmful": len(harmful),
                "n_benign": len(benign),
                "seconds": round(seconds, 1),
                "member_errors_in_first_batch": errors,
            }
        )
    )


if __name__ == "__main__":
    main()
