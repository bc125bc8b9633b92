"""How many tokens should one encoder forward pass hold? The shipped encoder heads with
each ``--budgets`` value as ``SentenceEncoder.batch_tokens``, in one process, taking turns
call by call (the order flips every call) on toxicchat-train's prompts, 16 texts per
``classify`` call as ``/v1/moderations`` batches them. Prints seconds per budget and the
ratio to the first.

Usage: .venv/bin/python bench/encoder_batch_tokens.py [--texts 640]
       [--budgets 256,1024,4096,1000000000]
Run on an idle machine; docs/BENCHMARKS.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gateway.safety.members.encoder_heads import EncoderHeadsClassifier  # noqa: E402
from gateway.safety.normalize import normalize  # noqa: E402
from gateway.safety.settings import SHIPPED_HEADS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOXICCHAT = ROOT.parent / "shared/data/toxicchat-train/toxic_chat_train.json"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=640)
    parser.add_argument("--budgets", default="256,1024,4096,1000000000")
    args = parser.parse_args()
    budgets = [int(value) for value in args.budgets.split(",")]
    rows = json.loads(TOXICCHAT.read_text(encoding="utf-8"))["instances"]
    texts = [normalize(row["instance"][:32_000]) for row in rows[: args.texts]]
    cache = Path(tempfile.mkdtemp())
    classifiers = []
    for budget in budgets:
        classifier = EncoderHeadsClassifier(heads_path=SHIPPED_HEADS, cache_dir=cache)
        classifier.encoder.batch_tokens = budget
        classifier.classify(texts[:1])
        classifiers.append(classifier)
    seconds = [0.0] * len(budgets)
    order = list(range(len(budgets)))
    for start in range(0, len(texts), 16):
        order.reverse()
        for index in order:
            began = time.perf_counter()
            classifiers[index].classify(texts[start : start + 16])
            seconds[index] += time.perf_counter() - began
    print(  # noqa: T201
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(timespec="minutes"),
                "texts": len(texts),
                "seconds": {str(b): round(s, 1) for b, s in zip(budgets, seconds, strict=True)},
                "against_first": {
                    str(b): round(s / seconds[0], 2) for b, s in zip(budgets, seconds, strict=True)
                },
            }
        )
    )


if __name__ == "__main__":
    main()
