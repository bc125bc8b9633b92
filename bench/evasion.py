"""Obfuscated prompts: how often the shipped engine still catches harmful ones and leaves
benign ones alone, under each way of hiding text an attacker has at hand.

The texts are the project's own held-out English prompts (``data/safety/intent_examples.jsonl``,
split ``heldout``, under 300 characters): 150 harmful ones and 150 benign contrasts, each
set sampled with seed 0, and every variant in ``EVASIONS`` applied to each. The engine
has never been fitted or tuned on these rows. Beside them, the plain benign sets whose
blocked rate the new decoders must not raise: the own held-out benign prompts,
refusal-direction's harmless test prompts and toxicchat's non-toxic prompts (read from
``--data-dir``; skipped when absent).

Decoding is code, not weights: to compare two versions of it, run this script from each
checkout (``PYTHONPATH=<checkout>``) on the same weights, one after the other.

Usage: .venv/bin/python bench/evasion.py [--data-dir ../shared/data] [--limit 2000]
"""

from __future__ import annotations

import argparse
import html
import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from gateway.safety.obfuscate import OBFUSCATIONS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BATCH = 32

EVASIONS: dict[str, Callable[[str], str]] = {
    "plain": lambda text: text,
    **OBFUSCATIONS,
    "HTML-escaped": html.escape,  # a control: no disguise at all
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared/data")
    parser.add_argument("--limit", type=int, default=2000, help="rows per plain benign set")
    args = parser.parse_args()

    from engine_compare import engine_for, rate, read_jsonl

    from gateway.safety.taxonomy import Direction

    # Every member's time budget lifted, as in engine_compare: a timeout fails closed,
    # which would count as caught, and encoded variants are several times as long.
    engine = engine_for(ROOT / "gateway/safety/weights")
    errors = 0

    def blocked(texts: Sequence[str]) -> list[bool]:
        nonlocal errors
        out: list[bool] = []
        for start in range(0, len(texts), BATCH):
            chunk = [text[: engine.max_text_chars] for text in texts[start : start + BATCH]]
            verdicts = engine.check(chunk, direction=Direction.PROMPT)
            errors += sum(any(r.error for r in v.members) for v in verdicts)
            out += [v.blocked for v in verdicts]
        return out

    held = [
        r
        for r in read_jsonl(ROOT / "data/safety/intent_examples.jsonl")
        if r["split"] == "heldout" and r["direction"] == "prompt"
    ]
    english = [r for r in held if r["lang"] == "en" and len(str(r["text"])) < 300]
    generator = random.Random(0)  # noqa: S311 - sampling, not secrets
    harmful_pool = [str(r["text"]) for r in english if r["labels"]]
    benign_pool = [str(r["text"]) for r in english if r["group"] == "benign-contrast"]
    harmful = generator.sample(harmful_pool, min(150, len(harmful_pool)))
    benign = generator.sample(benign_pool, min(150, len(benign_pool)))
    started = time.perf_counter()
    record: dict[str, object] = {
        "date": datetime.now(UTC).isoformat(timespec="minutes"),
        "code": os.environ.get("PYTHONPATH") or str(ROOT),
        "harmful": len(harmful),
        "benign": len(benign),
    }
    record["evasion"] = {
        name: {
            "harmful_caught": rate(blocked([transform(text) for text in harmful])),
            "benign_blocked": rate(blocked([transform(text) for text in benign])),
        }
        for name, transform in EVASIONS.items()
    }
    plain: dict[str, object] = {
        "own held-out benign prompts": rate(
            blocked([str(r["text"]) for r in held if not r["labels"]][: args.limit])
        )
    }
    harmless = args.data_dir / "refusal-direction/harmless_test.json"
    if harmless.exists():
        rows = json.loads(harmless.read_text(encoding="utf-8"))[: args.limit]
        plain["refusal-direction harmless test"] = rate(blocked([r["instruction"] for r in rows]))
    toxicchat = args.data_dir / "toxicchat-train/toxic_chat_train.json"
    if toxicchat.exists():
        rows = json.loads(toxicchat.read_text(encoding="utf-8"))["instances"]
        texts = [
            r["instance"] for r in rows if r["annotations"]["toxicity"]["majority_human"] == "0"
        ]
        plain["toxicchat non-toxic"] = rate(blocked(texts[: args.limit]))
    record["plain_benign_blocked"] = plain
    record["verdicts_with_member_errors"] = errors
    record["seconds"] = round(time.perf_counter() - started, 1)
    engine.close()
    json.dump(record, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
