"""chrF as a local ``evaluate`` module: sacrebleu's corpus chrF plus sentence chrF per sample.

The aggregate is corpus chrF (character n-gram statistics summed over the corpus);
``per_sample`` holds sentence chrF. ``word_order=2`` gives chrF++. Scores are on
sacrebleu's 0-100 scale. Loaded by path, so it works offline.
"""

from __future__ import annotations

from typing import Any

import evaluate
from sacrebleu.metrics.chrf import CHRF

from evals.metrics.module import TextMetric

_DESCRIPTION = "sacrebleu chrF (one reference per prediction), corpus and per sentence."
_CITATION = """@inproceedings{popovic-2015-chrf,
  title = "chr{F}: character n-gram {F}-score for automatic {MT} evaluation",
  author = "Popovi{\\'c}, Maja",
  booktitle = "Proceedings of the Tenth Workshop on Statistical Machine Translation",
  year = "2015",
  pages = "392--395",
}"""
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): model answers.
    references (list of str): one reference per prediction.
    char_order (int): character n-gram order, default 6.
    word_order (int): word n-gram order, default 0 (chrF); 2 gives chrF++.
    beta (int): recall weight, default 2.
    lowercase (bool): lowercase before scoring. Default False.
Returns:
    chrf (float): corpus chrF, 0-100.
    per_sample (list of float): sentence chrF, 0-100.
    signature (str): sacrebleu's signature of the corpus score.
"""


class Chrf(TextMetric, evaluate.Metric):  # type: ignore[misc]
    DESCRIPTION = _DESCRIPTION
    ARGUMENTS = _KWARGS_DESCRIPTION
    CITATION = _CITATION
    URLS = ("https://github.com/mjpost/sacrebleu",)

    def _compute(
        self,
        predictions: list[str],
        references: list[str],
        char_order: int = CHRF.CHAR_ORDER,
        word_order: int = CHRF.WORD_ORDER,
        beta: int = CHRF.BETA,
        lowercase: bool = False,
    ) -> dict[str, Any]:
        metric = CHRF(char_order=char_order, word_order=word_order, beta=beta, lowercase=lowercase)
        per_sample = [
            float(metric.sentence_score(p, [r]).score)
            for p, r in zip(predictions, references, strict=True)
        ]
        if not references:
            return {"chrf": float("nan"), "per_sample": per_sample, "signature": ""}
        score = metric.corpus_score(predictions, [references])
        return {
            "chrf": float(score.score),
            "per_sample": per_sample,
            "signature": str(metric.get_signature()),
        }
