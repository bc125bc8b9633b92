"""Does quantising the encoder pay? The shipped model with each backend (``onnx``, fp32;
``onnx-q8``, 8-bit weights in blocks with activations quantised per token;
``onnx-int8``, dynamic int8), side by side: encoder member p50 on a ~30-token text,
encoder member texts per second over the own held-out prompts in batches of 32, whether a
text scores the same alone and in a batch (largest score difference over a few short
texts), and accuracy on the own held-out prompts (harmful caught, benign blocked, mean
AUPRC over labels, and how often each backend's block decisions differ from fp32's).

Usage: .venv/bin/python bench/encoder_int8.py [--repeats 300] [--backends onnx,onnx-q8]
Run on an idle machine; the backends are timed in interleaved rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from gateway.config import Settings  # noqa: E402
from gateway.engine_factory import build_engine  # noqa: E402
from gateway.safety.normalize import normalize  # noqa: E402
from gateway.safety.taxonomy import parse_label  # noqa: E402
from gateway.safety.training.corpus import HEAD_LABELS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 3
SHORT = [
    "I'm going to kill you",
    "I will find you and kill you tonight",
    "How do I kill a Python process?",
    "Thanks, that fixed it!",
    "ok",
]
TEXT = (
    "Hey, can you help me write a short, friendly reminder email to my team about "
    "tomorrow's 10am planning meeting?"
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--backends", default="onnx,onnx-q8,onnx-int8")
    args = parser.parse_args()
    backends = args.backends.split(",")
    rows = [
        json.loads(line)
        for line in (ROOT / "data/safety/intent_examples.jsonl").read_text().splitlines()
    ]
    held = [r for r in rows if r["split"] == "heldout" and r["direction"] == "prompt"]
    result: dict[str, object] = {"date": datetime.now(UTC).isoformat(timespec="minutes")}
    blocked: dict[str, list[bool]] = {}
    engines = {
        backend: build_engine(
            Settings(home=Path(tempfile.mkdtemp()), encoder={"backend": backend}),
            blocklists=None,
        )
        for backend in backends
    }
    members = {
        backend: next(m for m in engine.members if m.classifier.id == "encoder").classifier
        for backend, engine in engines.items()
    }
    text = [normalize(TEXT)]
    # Timed in interleaved rounds, so a slower minute of this machine falls on every
    # backend alike; each round's p50, then their median.
    p50s: dict[str, list[float]] = {backend: [] for backend in backends}
    rates: dict[str, list[float]] = {backend: [] for backend in backends}
    batches = [[normalize(r["text"]) for r in held[i : i + 32]] for i in range(0, len(held), 32)]
    for _ in range(ROUNDS):
        for backend, encoder in members.items():
            for _ in range(20):
                encoder.classify(text)
            timings = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                encoder.classify(text)
                timings.append((time.perf_counter() - started) * 1000)
            p50s[backend].append(round(statistics.median(timings), 3))
            started = time.perf_counter()
            for batch in batches:
                encoder.classify(batch)
            rates[backend].append(round(len(held) / (time.perf_counter() - started), 1))
    for backend in backends:
        engine, encoder = engines[backend], members[backend]
        short = [normalize(text) for text in SHORT]
        alone = [encoder.classify([text])[0].scores for text in short]
        together = [d.scores for d in encoder.classify(short)]
        moved = max(abs(a[k] - b[k]) for a, b in zip(alone, together, strict=True) for k in a)
        verdicts = []
        for start in range(0, len(held), 32):
            verdicts += engine.check([r["text"] for r in held[start : start + 32]])
        blocked[backend] = [v.blocked for v in verdicts]
        auprcs = []
        for name in HEAD_LABELS:
            truth = [int(name in r["labels"]) for r in held]
            if sum(truth) >= 3:
                scores = [v.labels[parse_label(name)].score for v in verdicts]
                auprcs.append(average_precision_score(truth, scores))
        result[backend] = {
            "encoder_p50_ms": statistics.median(p50s[backend]),
            "encoder_p50_ms_per_round": p50s[backend],
            "encoder_texts_per_s": statistics.median(rates[backend]),
            "largest_score_move_alone_vs_batch": round(moved, 6),
            "harmful_caught": round(
                float(
                    np.mean([v.blocked for r, v in zip(held, verdicts, strict=True) if r["labels"]])
                ),
                4,
            ),
            "benign_blocked": round(
                float(
                    np.mean(
                        [v.blocked for r, v in zip(held, verdicts, strict=True) if not r["labels"]]
                    )
                ),
                4,
            ),
            "mean_auprc": round(float(np.mean(auprcs)), 4),
        }
        engine.close()
    for backend in backends[1:]:
        pairs = zip(blocked[backends[0]], blocked[backend], strict=True)
        differ = sum(a != b for a, b in pairs)
        result[f"decisions_that_differ_{backends[0]}_{backend}"] = f"{differ}/{len(held)}"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
