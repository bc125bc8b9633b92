"""Does int8 quantisation of the encoder pay? The shipped model with the ``onnx`` and the
``onnx-int8`` backends, side by side: encoder compute p50 on a ~30-token text, and
accuracy on the own held-out prompts (harmful caught, benign blocked, mean AUPRC over
labels, and how often the two backends' block decisions differ).

Usage: .venv/bin/python bench/encoder_int8.py [--repeats 300]
Run on an idle machine.
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
from gateway.safety.taxonomy import parse_label  # noqa: E402
from gateway.safety.training.corpus import HEAD_LABELS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEXT = (
    "Hey, can you help me write a short, friendly reminder email to my team about "
    "tomorrow's 10am planning meeting?"
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    rows = [
        json.loads(line)
        for line in (ROOT / "data/safety/intent_examples.jsonl").read_text().splitlines()
    ]
    held = [r for r in rows if r["split"] == "heldout" and r["direction"] == "prompt"]
    result: dict[str, object] = {"date": datetime.now(UTC).isoformat(timespec="minutes")}
    blocked: dict[str, list[bool]] = {}
    for backend in ("onnx", "onnx-int8"):
        settings = Settings(home=Path(tempfile.mkdtemp()), encoder={"backend": backend})
        engine = build_engine(settings, blocklists=None)
        encoder = next(m for m in engine.members if m.classifier.id == "encoder").classifier
        from gateway.safety.normalize import normalize

        text = [normalize(TEXT)]
        for _ in range(20):
            encoder.classify(text)
        timings = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            encoder.classify(text)
            timings.append((time.perf_counter() - started) * 1000)
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
            "encoder_p50_ms": round(statistics.median(timings), 3),
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
    differ = sum(a != b for a, b in zip(blocked["onnx"], blocked["onnx-int8"], strict=True))
    result["decisions_that_differ"] = f"{differ}/{len(held)}"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
