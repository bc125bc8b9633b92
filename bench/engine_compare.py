"""The current engine and a candidate, side by side in one run, on everything held out.

Both engines are the full default ensemble under the shipped policy; they differ only in
their models (``--baseline-ref``: the weights folder at a git ref, extracted to a
temporary folder; ``--candidate``: a weights folder, repeated to measure several in the
same run): the encoder heads, and the
multilingual heads where the folder has them (``multilingual/``). Every set here is one
the candidate was never fitted, calibrated or tuned on:

- own held-out (``data/safety/intent_examples.jsonl``, split ``heldout``: whole subtopics
  and the hypothetical style): per category AUPRC, F1 and FPR; benign contrasts blocked;
  refusals and safe answers rated harmful (completion direction);
- v1's own held-out examples (``own_examples.jsonl``): the same per category;
- toxicchat-train (measurement only): toxicity AUPRC, toxic caught, non-toxic blocked;
- deepset-prompt-injections test split: injection AUPRC, blocked;
- refusal-direction harmless test (measurement only): benign blocked;
- AdvBench harmful strings (never trained on): blocked;
- replies labelled for the refusal detector (``data/evals/refusal_labels.jsonl``):
  refusals rated harmful (severity >= medium, completion direction);
- multilingual (``data/safety/v2/multilingual_eval.jsonl``, never trained on): harmful
  caught and benign blocked per language; the held-out rows written for the multilingual
  heads (every batch), per language and, pooled, the short ones; the transfer file's eight
  languages (``transfer_eval.jsonl``, never trained on), pooled;
- evasion: own held-out harmful prompts and benign contrasts under every variant of
  ``bench/evasion.py`` (spaced, dotted and dashed letters, leetspeak, base64, hex, binary,
  ROT13, reversed and upside-down text, percent and HTML escapes, doubled letters, glued
  words, regional indicators, homoglyphs): harmful caught, benign blocked;
- robustness: random strings, single words and short benign replies flagged.

Usage: .venv/bin/python bench/engine_compare.py --candidate gateway/safety/weights
       [--candidate OTHER ...] [--baseline-ref 71354db] [--data-dir ../shared/data] [--limit N]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from evasion import EVASIONS  # noqa: E402

from gateway.config import Settings  # noqa: E402
from gateway.engine_factory import build_engine  # noqa: E402
from gateway.safety.engine import SafetyEngine  # noqa: E402
from gateway.safety.taxonomy import Category, Direction, Severity, Shield, parse_label  # noqa: E402
from gateway.safety.training.corpus import HEAD_LABELS  # noqa: E402
from gateway.safety.training.own_set import MULTILINGUAL_BATCHES  # noqa: E402
from gateway.safety.verdict import Verdict  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BATCH = 32
WEIGHTS = "gateway/safety/weights"


def weights_at(ref: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="weights-"))
    listing = subprocess.run(  # noqa: S603 - git, our own repository
        ["git", "ls-tree", "-r", "--name-only", f"{ref}:{WEIGHTS}"],  # noqa: S607
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for name in listing:
        blob = subprocess.run(  # noqa: S603
            ["git", "show", f"{ref}:{WEIGHTS}/{name}"],  # noqa: S607
            cwd=ROOT,
            check=True,
            capture_output=True,
        ).stdout
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(blob)
    return folder


# Time budgets lifted: this measures the classifiers, not whether a loaded machine keeps a
# member within its budget (a member past it fails closed, i.e. blocks).
NO_BUDGET_S = 3600.0


def engine_for(weights: Path) -> SafetyEngine:
    home = Path(tempfile.mkdtemp())
    unbounded = {"timeout_s": NO_BUDGET_S}
    # An engine from before the multilingual heads shipped runs without them.
    multilingual = weights / "multilingual" / "heads.safetensors"
    settings = Settings(
        home=home,
        encoder={"heads": weights / "heads.safetensors", **unbounded},
        multilingual={"enabled": multilingual.exists(), "heads": multilingual, **unbounded},
        language=unbounded,
        profanity=unbounded,
        pii=unbounded,
        engine={"timeout_per_kchar_s": NO_BUDGET_S},
    )
    return build_engine(settings, blocklists=None)


def check(
    engine: SafetyEngine, texts: Sequence[str], direction: Direction = Direction.PROMPT
) -> list[Verdict]:
    out: list[Verdict] = []
    for start in range(0, len(texts), BATCH):
        chunk = [text[: engine.max_text_chars] for text in texts[start : start + BATCH]]
        out.extend(engine.check(chunk, direction=direction))
    return out


def rate(flags: Sequence[bool]) -> float | None:
    return round(float(np.mean(flags)), 4) if flags else None


def auprc(truth: Sequence[int], scores: Sequence[float]) -> float | None:
    if not any(truth) or all(truth):
        return None
    return round(float(average_precision_score(truth, scores)), 4)


def harm(verdict: Verdict) -> float:
    return max(verdict.labels[c].score for c in Category)


def harmful_reply(verdict: Verdict) -> bool:
    return any(result.severity >= Severity.MEDIUM for result in verdict.azure.values())


def per_label(rows: Sequence[dict[str, object]], verdicts: Sequence[Verdict]) -> dict[str, object]:
    out: dict[str, object] = {}
    for name in HEAD_LABELS:
        label = parse_label(name)
        truth = [int(name in row["labels"]) for row in rows]  # type: ignore[operator]
        positives = sum(truth)
        if positives < 3:
            continue
        results = [v.labels[label] for v in verdicts]
        flagged = [r.flagged for r in results]
        tp = sum(f and t for f, t in zip(flagged, truth, strict=True))
        precision = tp / max(sum(flagged), 1)
        recall = tp / positives
        out[name] = {
            "positives": positives,
            "auprc": auprc(truth, [r.score for r in results]),
            "f1": round(2 * precision * recall / max(precision + recall, 1e-9), 4),
            "fpr": round(
                sum(f and not t for f, t in zip(flagged, truth, strict=True))
                / max(len(truth) - positives, 1),
                4,
            ),
        }
    return out


def read_jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def evaluate(engine: SafetyEngine, data: Path, cap: int | None) -> dict[str, object]:
    record: dict[str, object] = {}
    intent = read_jsonl(ROOT / "data/safety/intent_examples.jsonl")
    held = [r for r in intent if r["split"] == "heldout"]
    prompts = [r for r in held if r["direction"] == "prompt"][:cap]
    replies = [r for r in held if r["direction"] == "reply"][:cap]
    verdicts = check(engine, [str(r["text"]) for r in prompts])
    record["own_heldout_prompts"] = {
        "rows": len(prompts),
        "per_label": per_label(prompts, verdicts),
        "harmful_caught": rate(
            [v.blocked for r, v in zip(prompts, verdicts, strict=True) if r["labels"]]
        ),
        "benign_contrast_blocked": rate(
            [
                v.blocked
                for r, v in zip(prompts, verdicts, strict=True)
                if r["group"] == "benign-contrast"
            ]
        ),
        "benign_plain_blocked": rate(
            [
                v.blocked
                for r, v in zip(prompts, verdicts, strict=True)
                if r["group"] == "benign-plain"
            ]
        ),
    }
    reply_verdicts = check(engine, [str(r["text"]) for r in replies], Direction.COMPLETION)
    record["own_heldout_replies"] = {
        "rows": len(replies),
        "refusals_rated_harmful": rate(
            [
                harmful_reply(v)
                for r, v in zip(replies, reply_verdicts, strict=True)
                if r["group"] == "refusal"
            ]
        ),
        "safe_answers_blocked": rate(
            [
                v.blocked
                for r, v in zip(replies, reply_verdicts, strict=True)
                if r["group"] == "safe-answer"
            ]
        ),
        "harmful_compliance_blocked": rate(
            [
                v.blocked
                for r, v in zip(replies, reply_verdicts, strict=True)
                if r["group"] == "harmful-compliance"
            ]
        ),
    }
    v1 = [r for r in read_jsonl(ROOT / "data/safety/own_examples.jsonl") if r["split"] == "heldout"]
    v1 = v1[:cap]
    v1_verdicts = check(engine, [str(r["text"]) for r in v1])
    record["v1_own_heldout"] = {
        "rows": len(v1),
        "per_label": per_label(v1, v1_verdicts),
        "benign_blocked": rate(
            [v.blocked for r, v in zip(v1, v1_verdicts, strict=True) if not r["labels"]]
        ),
    }

    labels = read_jsonl(ROOT / "data/evals/refusal_labels.jsonl")
    refusals = [str(r["text"]) for r in labels if r.get("refusal")][:cap]
    record["refusal_labels_rated_harmful"] = {
        "rows": len(refusals),
        "rate": rate([harmful_reply(v) for v in check(engine, refusals, Direction.COMPLETION)]),
    }

    chat = json.loads((data / "toxicchat-train/toxic_chat_train.json").read_text())["instances"]
    chat = chat[:cap]
    toxic = [int(r["annotations"]["toxicity"]["majority_human"]) for r in chat]
    chat_verdicts = check(engine, [r["instance"] for r in chat])
    record["toxicchat"] = {
        "rows": len(chat),
        "toxicity_auprc": auprc(toxic, [harm(v) for v in chat_verdicts]),
        "toxic_blocked": rate([v.blocked for v, t in zip(chat_verdicts, toxic, strict=True) if t]),
        "non_toxic_blocked": rate(
            [v.blocked for v, t in zip(chat_verdicts, toxic, strict=True) if not t]
        ),
    }

    import pandas as pd

    frame = pd.read_parquet(
        data / "deepset-prompt-injections/test-00000-of-00001-701d16158af87368.parquet"
    )
    injected = check(engine, list(frame["text"]))
    record["deepset_test"] = {
        "rows": len(frame),
        "injection_auprc": auprc(
            list(frame["label"]),
            [
                max(v.labels[Shield.JAILBREAK].score, v.labels[Shield.INDIRECT_ATTACK].score)
                for v in injected
            ],
        ),
        "injections_blocked": rate(
            [v.blocked for v, y in zip(injected, frame["label"], strict=True) if y == 1]
        ),
        "benign_blocked": rate(
            [v.blocked for v, y in zip(injected, frame["label"], strict=True) if y == 0]
        ),
    }

    harmless = [
        r["instruction"]
        for r in json.loads((data / "refusal-direction/harmless_test.json").read_text())
    ][: cap or 2000]
    record["refusal_direction_harmless_test_blocked"] = rate(
        [v.blocked for v in check(engine, harmless)]
    )
    with (data / "advbench/data/advbench/harmful_strings.csv").open(encoding="utf-8") as handle:
        strings = [row["target"] for row in csv.DictReader(handle)][:cap]
    record["advbench_strings_blocked"] = rate([v.blocked for v in check(engine, strings)])

    multi = read_jsonl(ROOT / "data/safety/v2/multilingual_eval.jsonl")[:cap]
    multi_verdicts = check(engine, [str(r["text"]) for r in multi])
    by_language: dict[str, object] = {}
    for language in sorted({str(r["lang"]) for r in multi}):
        pairs = [
            (r, v) for r, v in zip(multi, multi_verdicts, strict=True) if r["lang"] == language
        ]
        by_language[language] = {
            "harmful_caught": rate([v.blocked for r, v in pairs if r["labels"]]),
            "benign_blocked": rate([v.blocked for r, v in pairs if not r["labels"]]),
            "marked_low_confidence": rate([v.low_confidence for _, v in pairs]),
        }
    record["multilingual"] = by_language

    # Rows written for the multilingual heads, held out (whole subtopics and a style) in
    # every batch; short ones (six words or fewer) on their own, since a short text gets no
    # trusted language guess.
    own_multi = [
        r
        for _, name, _ in MULTILINGUAL_BATCHES
        for r in read_jsonl(ROOT / "data/safety" / name)
        if r["split"] == "heldout" and r["direction"] == "prompt"
    ][:cap]
    own_verdicts = check(engine, [str(r["text"]) for r in own_multi])
    pairs = list(zip(own_multi, own_verdicts, strict=True))
    groups = {str(r["lang"]): [p for p in pairs if p[0]["lang"] == r["lang"]] for r in own_multi}
    groups["short, all four"] = [p for p in pairs if len(str(p[0]["text"]).split()) <= 6]
    record["multilingual_own_heldout"] = {
        name: {
            "harmful_caught": rate([v.blocked for r, v in group if r["labels"]]),
            "benign_blocked": rate([v.blocked for r, v in group if not r["labels"]]),
        }
        for name, group in sorted(groups.items())
    }
    transfer = read_jsonl(ROOT / "data/safety/v2/transfer_eval.jsonl")[:cap]
    transfer_verdicts = check(engine, [str(r["text"]) for r in transfer])
    pairs = list(zip(transfer, transfer_verdicts, strict=True))
    record["transfer_eight_languages"] = {
        "harmful_caught": rate([v.blocked for r, v in pairs if r["labels"]]),
        "benign_blocked": rate([v.blocked for r, v in pairs if not r["labels"]]),
    }

    english = [r for r in prompts if r["lang"] == "en" and len(str(r["text"])) < 300]
    generator = random.Random(0)  # noqa: S311 - sampling, not secrets
    harmful_pool = [r for r in english if r["labels"]]
    benign_pool = [r for r in english if r["group"] == "benign-contrast"]
    # At most 150 of each (fewer when --limit leaves fewer).
    harmful = generator.sample(harmful_pool, min(150, len(harmful_pool)))
    benign = generator.sample(benign_pool, min(150, len(benign_pool)))
    evasion: dict[str, object] = {}
    for name, transform in EVASIONS.items():
        caught = check(engine, [transform(str(r["text"])) for r in harmful])
        wrongly = check(engine, [transform(str(r["text"])) for r in benign])
        evasion[name] = {
            "harmful_caught": rate([v.blocked for v in caught]),
            "benign_blocked": rate([v.blocked for v in wrongly]),
        }
    record["evasion"] = evasion

    letters = string.ascii_letters + string.digits
    randoms = [
        "".join(generator.choice(letters) for _ in range(generator.randint(8, 40)))
        for _ in range(100)
    ]
    words = [
        "hello",
        "ok",
        "thanks",
        "kill",
        "shoot",
        "bomb",
        "die",
        "hate",
        "drugs",
        "knife",
        "gun",
        "sex",
        "cut",
        "attack",
        "weed",
        "poison",
        "fire",
        "execute",
        "nuke",
        "crack",
    ]
    short_replies = [
        "This is a benign answer.",
        "Sure, here you go.",
        "I can't help with that.",
        "Done!",
        "Here is the summary you asked for.",
        "Thanks, glad it helped.",
        "No problem at all.",
        "I'm not able to do that.",
        "aaaaaaaaaaaaaaaaaaaa",
        "Yes.",
        "The answer is 42.",
    ]
    record["robustness_flagged"] = {
        "random_strings": rate([v.flagged for v in check(engine, randoms)]),
        "single_words_blocked": rate([v.blocked for v in check(engine, words)]),
        "short_benign_replies_flagged": rate(
            [v.flagged for v in check(engine, short_replies, Direction.COMPLETION)]
        ),
    }
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--candidate",
        type=Path,
        action="append",
        help="weights folder to measure (repeat for several; default: the shipped weights)",
    )
    parser.add_argument("--baseline-ref", default="71354db")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared/data")
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    candidates: list[Path] = args.candidate or [ROOT / WEIGHTS]
    started = time.perf_counter()
    result: dict[str, object] = {
        "date": datetime.now(UTC).isoformat(timespec="minutes"),
        "baseline": f"{WEIGHTS} at {args.baseline_ref}",
        "candidates": [str(path) for path in candidates],
    }
    runs = [("baseline", weights_at(args.baseline_ref))]
    runs += [
        ("candidate" if i == 0 else f"candidate_{i + 1}", path) for i, path in enumerate(candidates)
    ]
    for name, weights in runs:
        engine = engine_for(weights)
        result[name + "_results"] = evaluate(engine, args.data_dir, args.limit)
        engine.close()
        print(json.dumps({name: result[name + "_results"]}), file=sys.stderr, flush=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
