"""The engine without the multilingual member, with it on its trained languages only, and
with it scoring other languages by transfer (the default), side by side in one run.

Every engine is the default ensemble under the shipped policy with the shipped English
heads; the second and third add the ``multilingual`` member (heads on multilingual-e5-small
trained on French, Spanish, German and Portuguese), the third with ``transfer`` on.
Measured on sets none was fitted or tuned on:

- ``data/safety/v2/multilingual_eval.jsonl`` (never trained on): per language, harmful
  prompts blocked, benign prompts blocked, verdicts marked low-confidence;
- ``data/safety/v2/transfer_eval.jsonl`` (never trained on): the same, for Italian,
  Dutch, Polish, Russian, Turkish, Chinese, Japanese and Arabic;
- toxicchat-train's prompts in a language other than English (measurement only), as the
  language member guesses it: toxic caught, non-toxic blocked;
- the own held-out English prompts (``intent_examples.jsonl`` split ``heldout``, language
  ``en``): harmful blocked, benign blocked (the member must leave English alone);
- refusal-direction's harmless test prompts (measurement only): benign blocked;
- engine time per text on the multilingual set, p50 (busy machines move this).

Time budgets are lifted: this measures the classifiers, not a loaded machine.

With ``--heads FOLDER`` (repeatable), the engines are instead the shipped configuration
(member on, transfer on) with each folder's multilingual heads, so heads trained
differently are compared in one run.

Usage: .venv/bin/python bench/multilingual_member.py [--data-dir ../shared/data]
       [--heads gateway/safety/weights/multilingual --heads OTHER]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from gateway.config import Settings  # noqa: E402
from gateway.engine_factory import build_engine  # noqa: E402
from gateway.safety.engine import SafetyEngine  # noqa: E402
from gateway.safety.members.language import LanguageClassifier  # noqa: E402
from gateway.safety.normalize import normalize  # noqa: E402
from gateway.safety.taxonomy import Direction  # noqa: E402
from gateway.safety.verdict import Verdict  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NO_BUDGET_S = 3600.0
BATCH = 16


def engine(
    *, multilingual: bool, transfer: bool = False, heads: Path | None = None
) -> SafetyEngine:
    unbounded = {"timeout_s": NO_BUDGET_S}
    chosen = {} if heads is None else {"heads": heads / "heads.safetensors"}
    settings = Settings(
        home=Path(tempfile.mkdtemp()),
        encoder=unbounded,
        language=unbounded,
        profanity=unbounded,
        pii=unbounded,
        multilingual={"enabled": multilingual, "transfer": transfer, **chosen, **unbounded},
        engine={"timeout_per_kchar_s": NO_BUDGET_S},
    )
    return build_engine(settings, blocklists=None)


def check(engine: SafetyEngine, texts: Sequence[str]) -> tuple[list[Verdict], list[float]]:
    verdicts: list[Verdict] = []
    per_text_ms: list[float] = []
    for start in range(0, len(texts), BATCH):
        part = texts[start : start + BATCH]
        began = time.perf_counter()
        verdicts += engine.check(part, direction=Direction.PROMPT)
        per_text_ms.append((time.perf_counter() - began) * 1000 / len(part))
    return verdicts, per_text_ms


def share(flags: Sequence[bool]) -> float | None:
    return round(100 * sum(flags) / len(flags), 1) if flags else None


def read_jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def per_language(engine: SafetyEngine, path: Path) -> tuple[dict[str, object], list[float]]:
    rows = read_jsonl(path)
    verdicts, times = check(engine, [str(r["text"]) for r in rows])
    by_language: dict[str, object] = {}
    for language in sorted({str(r["lang"]) for r in rows}):
        chosen = [(r, v) for r, v in zip(rows, verdicts, strict=True) if r["lang"] == language]
        by_language[language] = {
            "harmful_blocked_%": share([v.blocked for r, v in chosen if r["labels"]]),
            "benign_blocked_%": share([v.blocked for r, v in chosen if not r["labels"]]),
            "low_confidence_%": share([v.low_confidence for _, v in chosen]),
        }
    return by_language, times


def measure(engine: SafetyEngine, data_dir: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    out["multilingual"], times = per_language(
        engine, ROOT / "data/safety/v2/multilingual_eval.jsonl"
    )
    out["engine_ms_per_text_p50_multilingual"] = round(statistics.median(times), 2)
    out["transfer"], _ = per_language(engine, ROOT / "data/safety/v2/transfer_eval.jsonl")
    chat = json.loads((data_dir / "toxicchat-train/toxic_chat_train.json").read_text())
    guess = LanguageClassifier().guess
    foreign = [
        r for r in chat["instances"] if guess(normalize(r["instance"]).light) not in ("en", None)
    ]
    verdicts, _ = check(engine, [str(r["instance"])[:20_000] for r in foreign])
    toxic = [r["annotations"]["toxicity"]["majority_human"] == "1" for r in foreign]
    out["toxicchat_not_english"] = {
        "prompts": len(foreign),
        "toxic": sum(toxic),
        "toxic_blocked_%": share([v.blocked for v, t in zip(verdicts, toxic, strict=True) if t]),
        "non_toxic_blocked_%": share(
            [v.blocked for v, t in zip(verdicts, toxic, strict=True) if not t]
        ),
    }
    own = [
        r
        for r in read_jsonl(ROOT / "data/safety/intent_examples.jsonl")
        if r["split"] == "heldout" and r.get("lang", "en") == "en" and r["direction"] == "prompt"
    ]
    verdicts, _ = check(engine, [str(r["text"]) for r in own])
    pairs = list(zip(own, verdicts, strict=True))
    out["own_heldout_en"] = {
        "harmful_blocked_%": share([v.blocked for r, v in pairs if r["labels"]]),
        "benign_blocked_%": share([v.blocked for r, v in pairs if not r["labels"]]),
        "prompts": len(own),
    }
    harmless = json.loads((data_dir / "refusal-direction/harmless_test.json").read_text())
    texts = [str(row["instruction"]) for row in harmless]
    verdicts, _ = check(engine, texts)
    out["refusal_direction_harmless_test"] = {
        "benign_blocked_%": share([v.blocked for v in verdicts]),
        "prompts": len(texts),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared/data")
    parser.add_argument("--heads", type=Path, action="append", default=[])
    args = parser.parse_args()
    result: dict[str, object] = {"date": datetime.now(UTC).isoformat(timespec="minutes")}
    runs: list[tuple[str, bool, bool, Path | None]] = [
        ("without_multilingual_member", False, False, None),
        ("trained_languages_only", True, False, None),
        ("with_transfer", True, True, None),
    ]
    if args.heads:
        runs = [(str(folder), True, True, folder) for folder in args.heads]
    for name, multilingual, transfer, heads in runs:
        current = engine(multilingual=multilingual, transfer=transfer, heads=heads)
        result[name] = measure(current, args.data_dir)
        current.close()
        print(json.dumps({name: result[name]}), file=sys.stderr)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
