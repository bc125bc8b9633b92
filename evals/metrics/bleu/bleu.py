"""BLEU as a local ``evaluate`` module: sacrebleu's corpus BLEU plus sentence BLEU per sample.

The aggregate is corpus BLEU (n-gram statistics summed over the corpus, as BLEU is
defined); ``per_sample`` holds sentence BLEU (exponential smoothing, effective order),
the per-example numbers a paired bootstrap resamples. Scores are on sacrebleu's 0-100
scale. Loaded by path, so it works offline.
"""

from __future__ import annotations

from typing import Any

import evaluate
from sacrebleu.metrics.bleu import BLEU

from evals.metrics.module import TextMetric

_DESCRIPTION = "sacrebleu BLEU (one reference per prediction), corpus and per sentence."
_CITATION = """@inproceedings{post-2018-call,
  title = "A Call for Clarity in Reporting {BLEU} Scores",
  author = "Post, Matt",
  booktitle = "Proceedings of the Third Conference on Machine Translation",
  year = "2018",
  pages = "186--191",
}"""
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): model answers.
    references (list of str): one reference per prediction.
    tokenize (str): sacrebleu tokenizer, default "13a".
    lowercase (bool): lowercase before scoring. Default False.
Returns:
    bleu (float): corpus BLEU, 0-100.
    per_sample (list of float): sentence BLEU, 0-100.
    signature (str): sacrebleu's signature of the corpus score.
"""


class Bleu(TextMetric, evaluate.Metric):  # type: ignore[misc]
    DESCRIPTION = _DESCRIPTION
    ARGUMENTS = _KWARGS_DESCRIPTION
    CITATION = _CITATION
    URLS = ("https://github.com/mjpost/sacrebleu",)

    def _compute(
        self,
        predictions: list[str],
        references: list[str],
        tokenize: str = "13a",
        lowercase: bool = False,
    ) -> dict[str, Any]:
        corpus = BLEU(tokenize=tokenize, lowercase=lowercase)
        sentence = BLEU(tokenize=tokenize, lowercase=lowercase, effective_order=True)
        per_sample = [
            float(sentence.sentence_score(p, [r]).score)
            for p, r in zip(predictions, references, strict=True)
        ]
        if not references:
            return {"bleu": float("nan"), "per_sample": per_sample, "signature": ""}
        score = corpus.corpus_score(predictions, [references])
        return {
            "bleu": float(score.score),
            "per_sample": per_sample,
            "signature": str(corpus.get_signature()),
        }
