"""Exact match as a local ``evaluate`` module: per-sample equality, aggregated by scikit-learn.

The canonical ``exact_match`` lives on the Hugging Face Hub and cannot load offline;
this module is loaded by path (``evaluate.load("evals/metrics/exact_match")``).
"""

from __future__ import annotations

import re
import string
from typing import Any

import evaluate
from sklearn.metrics import accuracy_score

from evals.metrics.module import TextMetric

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_SPACES = re.compile(r"\s+")


def normalise(
    text: str, *, ignore_case: bool, ignore_punctuation: bool, ignore_whitespace: bool
) -> str:
    if ignore_case:
        text = text.casefold()
    if ignore_punctuation:
        text = _PUNCTUATION.sub("", text)
    if ignore_whitespace:
        text = _SPACES.sub(" ", text).strip()
    return text


class ExactMatch(TextMetric, evaluate.Metric):  # type: ignore[misc]
    """Share of predictions equal to their reference after optional normalisation
    (case, punctuation, surrounding and repeated whitespace)."""

    URLS = ("https://scikit-learn.org/stable/modules/model_evaluation.html",)
    COLUMNS = {
        "predictions": "model answers.",
        "references": "expected answers, one per prediction.",
    }
    OPTIONS = """
    ignore_case (bool): compare case-insensitively. Default True.
    ignore_punctuation (bool): drop ASCII punctuation before comparing. Default True.
    ignore_whitespace (bool): strip and collapse whitespace. Default True.
    """
    RETURNS = """
    exact_match (float): share of exact matches, in [0, 1] (sklearn.metrics.accuracy_score).
    per_sample (list of int): 1 where the prediction matches, else 0.
    """

    def _compute(
        self,
        predictions: list[str],
        references: list[str],
        ignore_case: bool = True,
        ignore_punctuation: bool = True,
        ignore_whitespace: bool = True,
    ) -> dict[str, Any]:
        options = {
            "ignore_case": ignore_case,
            "ignore_punctuation": ignore_punctuation,
            "ignore_whitespace": ignore_whitespace,
        }
        hypotheses = [normalise(text, **options) for text in predictions]
        targets = [normalise(text, **options) for text in references]
        per_sample = [int(h == t) for h, t in zip(hypotheses, targets, strict=True)]
        score = float(accuracy_score(targets, hypotheses)) if targets else float("nan")
        return {"exact_match": score, "per_sample": per_sample}
