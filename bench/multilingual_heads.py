"""Multilingual heads side by side, the member alone, threshold-free and at its thresholds.

For each ``--heads`` folder (``heads.safetensors`` and its model card), on sets none of
them was fitted, calibrated or tuned on:

- ``data/safety/v2/multilingual_eval.jsonl`` (measurement only): per language;
- ``data/safety/v2/transfer_eval.jsonl`` (measurement only): per language, and the mean;
- the held-out rows of ``data/safety/multilingual_examples.jsonl`` and of each later
  batch's file (whole subtopics and the hypothetical style; prompts and replies): per
  language.

Each text gets one score: the highest over labels of the head's log-odds minus its
threshold's, so 0 is where the member flags and the ranking does not depend on where the
thresholds sit. Reported: ROC AUC and average precision of harmful against benign (the
ranking), and harmful caught and benign flagged at the heads' own thresholds (the
operating point). ``bench/multilingual_member.py`` measures the same heads inside the
whole engine.

Usage: .venv/bin/python bench/multilingual_heads.py --heads gateway/safety/weights/multilingual
       [--heads OTHER ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
from sklearn.metrics import average_precision_score, roc_auc_score

from gateway.safety.heads import Heads
from gateway.safety.multilingual import E5Encoder
from gateway.safety.normalize import normalize
from gateway.safety.training.own_set import MULTILINGUAL_BATCHES

ROOT = Path(__file__).resolve().parent.parent
SETS = {
    "multilingual_eval": ROOT / "data/safety/v2/multilingual_eval.jsonl",
    "transfer_eval": ROOT / "data/safety/v2/transfer_eval.jsonl",
    **{
        "own_heldout" if index == 0 else f"own_heldout_b{index + 1}": ROOT / "data/safety" / name
        for index, (_, name, _) in enumerate(MULTILINGUAL_BATCHES)
    },
}


def rows_of(name: str) -> list[dict[str, object]]:
    lines = SETS[name].read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line]
    return [r for r in rows if not name.startswith("own_heldout") or r["split"] == "heldout"]


def margins(heads: Heads, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """Each text's highest log-odds over labels minus that label's threshold's."""
    p = np.clip(heads.probabilities(x).astype(np.float64), 1e-7, 1 - 1e-7)
    t = np.clip(np.asarray(heads.threshold, np.float64), 1e-7, 1 - 1e-7)
    return np.asarray((np.log(p / (1 - p)) - np.log(t / (1 - t))).max(axis=1))


def measure(score: npt.NDArray[np.float64], harmful: npt.NDArray[np.bool_]) -> dict[str, float]:
    return {
        "roc_auc": round(float(roc_auc_score(harmful, score)), 3),
        "average_precision": round(float(average_precision_score(harmful, score)), 3),
        "harmful_caught_%": round(100 * float((score[harmful] >= 0).mean()), 1),
        "benign_flagged_%": round(100 * float((score[~harmful] >= 0).mean()), 1),
        "harmful": int(harmful.sum()),
        "benign": int((~harmful).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--heads", type=Path, action="append", required=True)
    args = parser.parse_args()
    encoder = E5Encoder()
    embedded = {}
    for name in [name for name, path in SETS.items() if path.exists()]:
        rows = rows_of(name)
        x = encoder.embed([normalize(str(r["text"])).plain for r in rows])
        embedded[name] = (rows, x)
    result: dict[str, object] = {"date": datetime.now(UTC).isoformat(timespec="minutes")}
    for folder in args.heads:
        heads = Heads.load(folder / "heads.safetensors")
        out: dict[str, object] = {}
        for name, (rows, x) in embedded.items():
            score = margins(heads, x)
            harmful = np.array([bool(r["labels"]) for r in rows])
            languages = np.array([str(r["lang"]) for r in rows])
            per_language = {
                language: measure(score[languages == language], harmful[languages == language])
                for language in sorted(set(languages))
            }
            per_language["all"] = measure(score, harmful)
            out[name] = per_language
        result[str(folder)] = out
        print(json.dumps({str(folder): out["multilingual_eval"]}), file=sys.stderr)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
