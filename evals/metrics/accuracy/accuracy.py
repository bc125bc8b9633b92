"""Accuracy of predicted labels as a local ``evaluate`` module (scikit-learn).

Inputs are labels (strings); pulling a label out of a free-text answer is the caller's
job (``evals.metrics.quality`` does it). Loaded by path, so it works offline.
"""

from __future__ import annotations

from typing import Any

import evaluate
from sklearn.metrics import accuracy_score

from evals.metrics.module import LABELS, TextMetric


class Accuracy(TextMetric, evaluate.Metric):  # type: ignore[misc]
    """Share of predicted labels equal to the reference label (scikit-learn)."""

    URLS = (
        "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html",
    )
    COLUMNS = LABELS
    RETURNS = """
    accuracy (float): sklearn.metrics.accuracy_score, in [0, 1].
    per_sample (list of int): 1 where the label is right, else 0.
    """

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, Any]:
        per_sample = [int(p == r) for p, r in zip(predictions, references, strict=True)]
        score = float(accuracy_score(references, predictions)) if references else float("nan")
        return {"accuracy": score, "per_sample": per_sample}
