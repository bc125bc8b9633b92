"""Accuracy of predicted labels as a local ``evaluate`` module (scikit-learn).

Inputs are labels (strings); pulling a label out of a free-text answer is the caller's
job (``evals.metrics.quality`` does it). Loaded by path, so it works offline.
"""

from __future__ import annotations

from typing import Any

import evaluate
from sklearn.metrics import accuracy_score

from evals.metrics.module import TextMetric

_DESCRIPTION = "Share of predicted labels equal to the reference label (scikit-learn)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): predicted labels.
    references (list of str): reference labels.
Returns:
    accuracy (float): sklearn.metrics.accuracy_score, in [0, 1].
    per_sample (list of int): 1 where the label is right, else 0.
"""


class Accuracy(TextMetric, evaluate.Metric):  # type: ignore[misc]
    DESCRIPTION = _DESCRIPTION
    ARGUMENTS = _KWARGS_DESCRIPTION
    URLS = (
        "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html",
    )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, Any]:
        per_sample = [int(p == r) for p, r in zip(predictions, references, strict=True)]
        score = float(accuracy_score(references, predictions)) if references else float("nan")
        return {"accuracy": score, "per_sample": per_sample}
