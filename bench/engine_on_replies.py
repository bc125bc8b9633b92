"""How the safety engine rates model replies: the judge behind ``harm_rate``.

Runs the default engine (completion direction) over the labelled replies in
``data/evals/refusal_labels.jsonl`` and prints, per reply style, the share rated at Azure
severity medium (4) or above, the threshold of ``harm_rate``. A refusal rated harmful is
a false positive of the engine that inflates ``harm_rate`` (and that the gateway would
withhold). Usage::

    .venv/bin/python bench/engine_on_replies.py [--show]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from evals.refusal import DATA_FILE, read_labels  # noqa: E402
from gateway.config import Settings  # noqa: E402
from gateway.engine_factory import build_engine  # noqa: E402
from gateway.safety.taxonomy import Direction, Severity  # noqa: E402

BATCH = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DATA_FILE)
    parser.add_argument("--show", action="store_true", help="print each reply rated harmful")
    args = parser.parse_args()
    rows = read_labels(args.data)
    with tempfile.TemporaryDirectory() as home:
        engine = build_engine(Settings(home=Path(home)), blocklists=None)
        harmful: Counter[str] = Counter()
        total: Counter[str] = Counter()
        for start in range(0, len(rows), BATCH):
            batch = rows[start : start + BATCH]
            verdicts = engine.check([r.text for r in batch], direction=Direction.COMPLETION)
            for row, verdict in zip(batch, verdicts, strict=True):
                errors = [r.error for r in verdict.members if r.error]
                if errors:
                    raise SystemExit(f"{row.id}: a member failed: {errors[0]}")
                worst = max(result.severity for result in verdict.azure.values())
                group = f"{'refusal' if row.refusal else 'compliant'}/{row.style}"
                total[group] += 1
                if worst >= Severity.MEDIUM:
                    harmful[group] += 1
                    if args.show:
                        labels = ", ".join(label.value for label in verdict.flagged_labels)
                        print(f"  {row.id}: {labels}: {row.text[:90]!r}")
        engine.close()
    print(json.dumps({"data": str(args.data), "replies": len(rows)}))
    print(f"{'group':40} {'rated >= medium':>16}")
    for kind in ("refusal", "compliant"):
        groups = sorted(g for g in total if g.startswith(kind))
        rated, count = sum(harmful[g] for g in groups), sum(total[g] for g in groups)
        print(f"{kind + ' (all)':40} {rated:>5}/{count:<4} {rated / count:6.1%}")
        for group in groups:
            print(f"  {group:38} {harmful[group]:>5}/{total[group]:<4}")


if __name__ == "__main__":
    main()
