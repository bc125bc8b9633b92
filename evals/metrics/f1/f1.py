"""F1 of predicted labels as a local ``evaluate`` module (scikit-learn).

F1 is a corpus-level score (macro over labels by default): it is not the mean of a
per-sample value. ``per_sample`` is each prediction's correctness, the paired outcome
McNemar's test compares between two runs. Loaded by path, so it works offline.
"""

from __future__ import annotations

from typing import Any

import evaluate
from sklearn.metrics import f1_score

from evals.metrics.module import LABELS, TextMetric

AVERAGES = ("macro", "micro", "weighted", "binary")


class F1(TextMetric, evaluate.Metric):  # type: ignore[misc]
    """F1 of predicted labels against reference labels (sklearn.metrics.f1_score)."""

    URLS = ("https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html",)
    COLUMNS = LABELS
    OPTIONS = """
    average (str): "macro" (default), "micro" or "weighted", as scikit-learn defines them.
    pos_label (str or None): with average="binary", the positive label.
    """
    RETURNS = """
    f1 (float): the corpus-level F1, in [0, 1].
    per_label (dict): F1 of each reference label.
    per_sample (list of int): 1 where the label is right, else 0.
    """

    def _compute(
        self,
        predictions: list[str],
        references: list[str],
        average: str = "macro",
        pos_label: str | None = None,
    ) -> dict[str, Any]:
        if average not in AVERAGES:
            raise ValueError(f"average must be one of {', '.join(AVERAGES)}, got {average!r}")
        if average == "binary" and pos_label is None:
            raise ValueError('average="binary" needs pos_label')
        per_sample = [int(p == r) for p, r in zip(predictions, references, strict=True)]
        if not references:
            return {"f1": float("nan"), "per_label": {}, "per_sample": per_sample}
        labels = sorted(set(references))
        extra: dict[str, Any] = {"pos_label": pos_label} if average == "binary" else {}
        score = f1_score(
            references,
            predictions,
            labels=None if average == "binary" else labels,
            average=average,
            zero_division=0.0,
            **extra,
        )
        per_label = f1_score(
            references, predictions, labels=labels, average=None, zero_division=0.0
        )
        return {
            "f1": float(score),
            "per_label": {label: float(v) for label, v in zip(labels, per_label, strict=True)},
            "per_sample": per_sample,
        }
