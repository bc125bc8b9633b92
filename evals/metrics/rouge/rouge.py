"""ROUGE as a local ``evaluate`` module (Google's rouge-score): F-measure per sample and mean.

``rouge1``/``rouge2`` are unigram/bigram overlap, ``rougeL`` the longest common
subsequence over the whole text. Each sample's F-measure is kept (for paired
statistics); the aggregate is their mean. rouge-score's default tokenizer keeps ASCII
letters and digits only. Loaded by path, so it works offline.
"""

from __future__ import annotations

from typing import Any

import evaluate
from rouge_score import rouge_scorer

from evals.metrics.module import TextMetric, citation

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


class Rouge(TextMetric, evaluate.Metric):  # type: ignore[misc]
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures (rouge-score), per sample and mean."""

    CITATION = citation("lin-2004-rouge")
    URLS = ("https://github.com/google-research/google-research/tree/master/rouge",)
    OPTIONS = """
    rouge_types (list of str): default ["rouge1", "rouge2", "rougeL"].
    use_stemmer (bool): Porter-stem tokens before matching. Default False.
    """
    RETURNS = """
    <type> (float): mean F-measure for each rouge type, in [0, 1].
    per_sample (dict of list of float): F-measure of each sample, per rouge type.
    """

    def _compute(
        self,
        predictions: list[str],
        references: list[str],
        rouge_types: list[str] | None = None,
        use_stemmer: bool = False,
    ) -> dict[str, Any]:
        types = list(rouge_types or ROUGE_TYPES)
        scorer = rouge_scorer.RougeScorer(types, use_stemmer=use_stemmer)
        per_sample: dict[str, list[float]] = {kind: [] for kind in types}
        for prediction, reference in zip(predictions, references, strict=True):
            # rouge-score's argument order is (target, prediction)
            scores = scorer.score(reference, prediction)
            for kind in types:
                per_sample[kind].append(float(scores[kind].fmeasure))
        result: dict[str, Any] = {
            kind: (sum(values) / len(values) if values else float("nan"))
            for kind, values in per_sample.items()
        }
        result["per_sample"] = per_sample
        return result
