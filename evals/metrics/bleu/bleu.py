"""BLEU as a local ``evaluate`` module: sacrebleu's corpus BLEU plus sentence BLEU per sample.

The aggregate is corpus BLEU (n-gram statistics summed over the corpus, as BLEU is
defined); ``per_sample`` holds sentence BLEU (exponential smoothing, effective order),
the per-example numbers a paired bootstrap resamples. Scores are on sacrebleu's 0-100
scale. Loaded by path, so it works offline.
"""

from __future__ import annotations

import evaluate
from sacrebleu.metrics.bleu import BLEU

from evals.metrics.module import SacrebleuMetric, citation


class Bleu(SacrebleuMetric, evaluate.Metric):  # type: ignore[misc]
    """sacrebleu BLEU (one reference per prediction), corpus and per sentence."""

    SCORE = "BLEU"
    CITATION = citation("post-2018-call")
    OPTIONS = 'tokenize (str): sacrebleu tokenizer, default "13a".'

    def scorers(self, tokenize: str = "13a", lowercase: bool = False) -> tuple[BLEU, BLEU]:
        corpus = BLEU(tokenize=tokenize, lowercase=lowercase)
        return corpus, BLEU(tokenize=tokenize, lowercase=lowercase, effective_order=True)
