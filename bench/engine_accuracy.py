"""Accuracy of the whole engine (default members, shipped policy) on ../shared/data.

Reports:

- per label on the corpus test split (held-out public rows + the project's own held-out
  examples): AUPRC of the combined score, F1 and false-positive rate at the shipped
  thresholds;
- toxicchat-train (never trained on; CC-BY-NC, measurement only): AUPRC of the highest
  harm-category score against ``toxicity``, and of the jailbreak shield against
  ``jailbreaking``;
- deepset prompt-injection test split: AUPRC of the jailbreak shield;
- benign prompts blocked: refusal-direction harmless test split (measurement only) and
  the project's own held-out benign examples (tricky and plain);
- share blocked of harmful sets: AdvBench behaviours and strings, the forbidden
  question set's harmful policies, in-the-wild jailbreak prompts.

Usage: .venv/bin/python bench/engine_accuracy.py [--data-dir ../shared/data] [--limit N]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from gateway.config import Settings  # noqa: E402
from gateway.engine_factory import build_engine  # noqa: E402
from gateway.safety.engine import SafetyEngine  # noqa: E402
from gateway.safety.taxonomy import Category, Direction, Shield, parse_label  # noqa: E402
from gateway.safety.training.corpus import HEAD_LABELS, Corpus, Split  # noqa: E402
from gateway.safety.verdict import Verdict  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BATCH = 64


MEMBER_ERRORS: list[str] = []


def verdicts(engine: SafetyEngine, texts: Sequence[str]) -> list[Verdict]:
    """Check texts in batches; member failures are counted and reported, not hidden."""
    out: list[Verdict] = []
    for start in range(0, len(texts), BATCH):
        chunk = [text[: engine.max_text_chars] for text in texts[start : start + BATCH]]
        out.extend(engine.check(chunk, direction=Direction.PROMPT))
    MEMBER_ERRORS.extend(r.error for v in out for r in v.members if r.error is not None)
    return out


def harm_score(verdict: Verdict) -> float:
    return max(verdict.labels[c].score for c in Category)


def attack_score(verdict: Verdict) -> float:
    return max(verdict.labels[Shield.JAILBREAK].score, verdict.labels[Shield.INDIRECT_ATTACK].score)


def auprc(labels: Sequence[int], scores: Sequence[float]) -> float:
    return round(float(average_precision_score(labels, scores)), 4)


def rate(flags: Sequence[bool]) -> float:
    return round(float(np.mean(flags)), 4) if flags else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared/data")
    parser.add_argument("--limit", type=int, default=None, help="cap rows per set (quick runs)")
    args = parser.parse_args()
    data = args.data_dir
    cap = args.limit
    started = time.perf_counter()
    engine = build_engine(Settings(home=Path(tempfile.mkdtemp())), blocklists=None)
    record: dict[str, object] = {"date": datetime.now(UTC).date().isoformat()}

    # 1. corpus test split, per label
    corpus = Corpus(data, ROOT / "data/safety/own_examples.jsonl")
    test = [e for e in corpus.training_examples() if e.split == Split.TEST][:cap]
    results = verdicts(engine, [e.text for e in test])
    per_label: dict[str, dict[str, float | int]] = {}
    for name in HEAD_LABELS:
        label = parse_label(name)
        rows = [
            (name in e.positives, v.labels[label])
            for e, v in zip(test, results, strict=True)
            if name in e.known
        ]
        positives = sum(p for p, _ in rows)
        if not positives or positives == len(rows):
            continue
        truth = [int(p) for p, _ in rows]
        flagged = [r.flagged for _, r in rows]
        tp = sum(f and t for f, t in zip(flagged, truth, strict=True))
        precision = tp / max(sum(flagged), 1)
        recall = tp / positives
        per_label[name] = {
            "positives": positives,
            "negatives": len(rows) - positives,
            "auprc": auprc(truth, [r.score for _, r in rows]),
            "f1": round(2 * precision * recall / max(precision + recall, 1e-9), 4),
            "fpr": round(
                sum(f and not t for f, t in zip(flagged, truth, strict=True))
                / (len(rows) - positives),
                4,
            ),
        }
    record["corpus_test"] = per_label

    # 2. toxicchat (measurement only)
    instances = json.loads((data / "toxicchat-train/toxic_chat_train.json").read_text())[
        "instances"
    ]
    rows = instances[:cap]
    toxicity = [int(r["annotations"]["toxicity"]["majority_human"]) for r in rows]
    jailbreaking = [int(r["annotations"]["jailbreaking"]["majority_human"]) for r in rows]
    toxic = verdicts(engine, [row["instance"] for row in rows])
    record["toxicchat"] = {
        "rows": len(rows),
        "toxicity_auprc_max_harm": auprc(toxicity, [harm_score(v) for v in toxic]),
        "jailbreaking_auprc_attack_shield": auprc(jailbreaking, [attack_score(v) for v in toxic]),
        "toxicity_prevalence": rate([bool(t) for t in toxicity]),
        "blocked_toxic": rate([v.blocked for v, t in zip(toxic, toxicity, strict=True) if t]),
        "blocked_non_toxic": rate(
            [v.blocked for v, t in zip(toxic, toxicity, strict=True) if not t]
        ),
    }

    # 3. deepset test split
    import pandas as pd

    frame = pd.read_parquet(
        data / "deepset-prompt-injections/test-00000-of-00001-701d16158af87368.parquet"
    )
    injected = verdicts(engine, list(frame["text"]))
    record["deepset_test"] = {
        "rows": len(frame),
        "injection_auprc_attack_shield": auprc(
            list(frame["label"]), [attack_score(v) for v in injected]
        ),
        "blocked_benign": rate(
            [v.blocked for v, y in zip(injected, frame["label"], strict=True) if y == 0]
        ),
        "blocked_injections": rate(
            [v.blocked for v, y in zip(injected, frame["label"], strict=True) if y == 1]
        ),
    }

    # 4. benign prompts blocked
    harmless = [
        r["instruction"]
        for r in json.loads((data / "refusal-direction/harmless_test.json").read_text())
    ][:cap]
    own = [
        json.loads(line)
        for line in (ROOT / "data/safety/own_examples.jsonl").read_text().splitlines()
        if line.strip()
    ]
    tricky = [r["text"] for r in own if r["split"] == "heldout" and r["group"] == "benign-tricky"]
    plain = [r["text"] for r in own if r["split"] == "heldout" and r["group"] == "benign-plain"]
    record["benign_blocked"] = {
        "refusal_direction_harmless_test": {
            "rows": len(harmless),
            "blocked": rate([v.blocked for v in verdicts(engine, harmless)]),
        },
        "own_heldout_benign_tricky": {
            "rows": len(tricky),
            "blocked": rate([v.blocked for v in verdicts(engine, tricky)]),
        },
        "own_heldout_benign_plain": {
            "rows": len(plain),
            "blocked": rate([v.blocked for v in verdicts(engine, plain)]),
        },
    }

    # 5. harmful sets blocked
    def column(relative: str, name: str) -> list[str]:
        with (data / relative).open(encoding="utf-8", newline="") as handle:
            csv.field_size_limit(10_000_000)
            return [row[name] for row in csv.DictReader(handle)][:cap]

    forbidden_rows = []
    with (data / "jailbreak-llms/forbidden_question_set.csv").open(encoding="utf-8") as handle:
        forbidden_rows = list(csv.DictReader(handle))
    harmful_policies = {
        "Illegal Activity",
        "Hate Speech",
        "Malware",
        "Physical Harm",
        "Fraud",
        "Pornography",
        "Privacy Violence",
    }
    forbidden = [
        r["question"] for r in forbidden_rows if r["content_policy_name"] in harmful_policies
    ][:cap]
    jailbreaks = column("jailbreak-llms/jailbreak_prompts_2023_12_25.csv", "prompt")
    record["harmful_blocked"] = {
        "advbench_behaviors (partly trained on)": rate(
            [
                v.blocked
                for v in verdicts(
                    engine, column("advbench/data/advbench/harmful_behaviors.csv", "goal")
                )
            ]
        ),
        "advbench_strings (never trained on)": rate(
            [
                v.blocked
                for v in verdicts(
                    engine, column("advbench/data/advbench/harmful_strings.csv", "target")
                )
            ]
        ),
        "forbidden_questions_harmful_policies (partly trained on)": rate(
            [v.blocked for v in verdicts(engine, forbidden)]
        ),
        "jailbreak_prompts_2023_12_25 (partly trained on)": rate(
            [v.blocked for v in verdicts(engine, jailbreaks)]
        ),
    }
    record["member_errors"] = {"count": len(MEMBER_ERRORS), "first": MEMBER_ERRORS[:3]}
    record["seconds"] = round(time.perf_counter() - started, 1)
    engine.close()
    json.dump(record, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
