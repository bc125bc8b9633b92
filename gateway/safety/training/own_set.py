"""The project's own labelled examples for engine v2: consolidate, deduplicate, split.

Writers add rows to ``data/safety/v2/*.jsonl`` (see data/safety/README.md for the row
format and the labelling guide). ``consolidate`` turns them into
``data/safety/intent_examples.jsonl`` with stable ids and a ``split``:

- near-copies count once: rows whose words differ in at most one place (a swapped noun)
  keep only the first;
- the held-out fifth is split by phrasing and topic, not by random rows: every row of a
  held-out *subtopic* (about a sixth of each topic's subtopics, chosen by a stable hash)
  and every row written in the held-out *style* (``HELDOUT_STYLES``) is ``heldout``, so
  the held-out measure is on themes and phrasings the model never saw;
- ``multilingual_eval.jsonl`` and ``transfer_eval.jsonl`` are never consolidated: they
  measure, they do not train.

``data/safety/multilingual/*.jsonl`` (French, Spanish, German and Portuguese rows written
for the multilingual heads only) is consolidated the same way, on its own, into
``data/safety/multilingual_examples.jsonl``: a file of its own, so adding to it changes
neither the English heads' training rows nor which English rows are held out. Later
batches (``MULTILINGUAL_BATCHES``) get files of their own for the same reason.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

from gateway.safety.training.corpus import ALL_KNOWN

HELDOUT_STYLES = frozenset({"hypothetical"})
HELDOUT_SUBTOPIC_SHARE = 0.17  # of each topic's subtopics, on top of the held-out style
MEASUREMENT_ONLY = frozenset({"multilingual_eval.jsonl", "transfer_eval.jsonl"})
GROUPS = frozenset(
    {
        "harmful",
        "benign-contrast",
        "benign-plain",
        "refusal",
        "safe-answer",
        "harmful-compliance",
    }
)
MIN_WORDS_FOR_SWAP = 4
_WORD = re.compile(r"\w+")


class OwnSetError(ValueError):
    """A row of a writer's file is malformed; the message names file and line."""


def read_rows(path: Path) -> Iterator[dict[str, object]]:
    """Rows of one JSONL file, each checked; errors name the file and line number."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise OwnSetError(f"{path.name}: line {number}: not valid JSON ({error})") from None
            problem = _problem(row)
            if problem:
                raise OwnSetError(f"{path.name}: line {number}: {problem}")
            yield row


def _problem(row: object) -> str | None:
    if not isinstance(row, dict):
        return "not a JSON object"
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        return "text must be a non-empty string"
    labels = row.get("labels")
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        return "labels must be a list of label names"
    unknown = set(labels) - ALL_KNOWN
    if unknown:
        return f"unknown labels {sorted(unknown)}"
    if row.get("group") not in GROUPS:
        return f"group must be one of {sorted(GROUPS)}"
    for name in ("topic", "subtopic", "style"):
        if not isinstance(row.get(name), str) or not row[name]:
            return f"{name} must be a non-empty string"
    return None


def _words(text: str) -> tuple[str, ...]:
    return tuple(_WORD.findall(text.casefold()))


def _copy_keys(text: str) -> list[tuple[str, ...]]:
    """Keys two texts share when their words are equal, or equal but for one position."""
    words = _words(text)
    swaps = range(len(words)) if len(words) >= MIN_WORDS_FOR_SWAP else range(0)
    return [words] + [(*words[:i], "\0", *words[i + 1 :]) for i in swaps]


def deduplicate(
    rows: Iterable[dict[str, object]], *, unlike: Iterable[dict[str, object]] = ()
) -> list[dict[str, object]]:
    """Keep the first of rows whose words are equal, or equal but for one position, and
    drop every row that is such a copy of a row of ``unlike`` (a measurement set).

    The one-position rule is for sentences (a swapped noun); texts shorter than
    ``MIN_WORDS_FOR_SWAP`` words ("Thanks!", "kill switch") count once only when equal.
    """
    seen: set[tuple[str, ...]] = {key for row in unlike for key in _copy_keys(str(row["text"]))}
    kept: list[dict[str, object]] = []
    for row in rows:
        keys = _copy_keys(str(row["text"]))
        if any(key in seen for key in keys):
            continue
        seen.update(keys)
        kept.append(row)
    return kept


def heldout_subtopics(rows: Iterable[dict[str, object]]) -> set[tuple[str, str]]:
    """About ``HELDOUT_SUBTOPIC_SHARE`` of each topic's subtopics, by a stable hash."""
    by_topic: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        by_topic[str(row["topic"])].add(str(row["subtopic"]))
    chosen: set[tuple[str, str]] = set()
    for topic, subtopics in by_topic.items():
        ranked = sorted(subtopics, key=lambda s: hashlib.sha256(f"{topic}/{s}".encode()).digest())
        count = max(1, round(len(ranked) * HELDOUT_SUBTOPIC_SHARE)) if len(ranked) > 2 else 0
        chosen.update((topic, s) for s in ranked[:count])
    return chosen


def consolidate(
    source_dir: Path,
    output: Path,
    *,
    prefix: str = "intent",
    measured: Iterable[Path] = (),
) -> dict[str, int]:
    """Write the consolidated set, ids ``{prefix}-00001`` on; return counts by split and
    group. A row that is a near-copy of a row in a ``measured`` file is left out, so no
    training row has a twin in an evaluation set."""
    rows: list[dict[str, object]] = []
    for path in sorted(source_dir.glob("*.jsonl")):
        if path.name in MEASUREMENT_ONLY:
            continue
        for row in read_rows(path):
            rows.append({**row, "file": path.name})
    evaluation = [row for path in measured for row in read_rows(path)]
    rows = deduplicate(rows, unlike=evaluation)
    held = heldout_subtopics(rows)
    counts: dict[str, int] = defaultdict(int)
    with output.open("w", encoding="utf-8") as handle:
        for number, row in enumerate(rows, 1):
            heldout = (str(row["topic"]), str(row["subtopic"])) in held or (
                row["style"] in HELDOUT_STYLES
            )
            split = "heldout" if heldout else "train"
            record = {
                "id": f"{prefix}-{number:05d}",
                "text": row["text"],
                "labels": sorted(set(row["labels"])),  # type: ignore[call-overload]
                "direction": row.get("direction", "prompt"),
                "group": row["group"],
                "topic": row["topic"],
                "subtopic": row["subtopic"],
                "style": row["style"],
                "lang": row.get("lang", "en"),
                "split": split,
            }
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            counts[split] += 1
            counts[f"{split}:{row['group']}"] += 1
    return dict(sorted(counts.items()))


# Batches of rows written for the multilingual heads: (folder, consolidated file, id prefix).
# Each batch is consolidated on its own, with its own held-out fifth, so adding a batch moves
# no row of an earlier one between train and held out.
MULTILINGUAL_BATCHES = (
    ("multilingual", "multilingual_examples.jsonl", "multilingual"),
    ("multilingual_b2", "multilingual_examples_b2.jsonl", "multilingual-b2"),
)


def consolidate_multilingual(
    root: Path, output: Path | None = None, *, batch: int = 0
) -> dict[str, int]:
    """Consolidate batch ``batch`` of ``MULTILINGUAL_BATCHES`` (``root``: data/safety),
    leaving out near-copies of the evaluation files' rows and of earlier batches' rows."""
    folder, name, prefix = MULTILINGUAL_BATCHES[batch]
    earlier = [
        path
        for earlier_folder, _, _ in MULTILINGUAL_BATCHES[:batch]
        for path in sorted((root / earlier_folder).glob("*.jsonl"))
    ]
    return consolidate(
        root / folder,
        output or root / name,
        prefix=prefix,
        measured=[*(root / "v2" / measured for measured in sorted(MEASUREMENT_ONLY)), *earlier],
    )
