"""chrF as a local ``evaluate`` module: sacrebleu's corpus chrF plus sentence chrF per sample.

The aggregate is corpus chrF (character n-gram statistics summed over the corpus);
``per_sample`` holds sentence chrF. ``word_order=2`` gives chrF++. Scores are on
sacrebleu's 0-100 scale. Loaded by path, so it works offline.
"""

from __future__ import annotations

import evaluate
from sacrebleu.metrics.chrf import CHRF

from evals.metrics.module import SacrebleuMetric, citation


class Chrf(SacrebleuMetric, evaluate.Metric):  # type: ignore[misc]
    """sacrebleu chrF (one reference per prediction), corpus and per sentence."""

    SCORE = "chrF"
    CITATION = citation("popovic-2015-chrf")
    OPTIONS = """
    char_order (int): character n-gram order, default 6.
    word_order (int): word n-gram order, default 0 (chrF); 2 gives chrF++.
    beta (int): recall weight, default 2.
    """

    def scorers(
        self,
        char_order: int = CHRF.CHAR_ORDER,
        word_order: int = CHRF.WORD_ORDER,
        beta: int = CHRF.BETA,
        lowercase: bool = False,
    ) -> tuple[CHRF, CHRF]:
        metric = CHRF(char_order=char_order, word_order=word_order, beta=beta, lowercase=lowercase)
        return metric, metric
