"""The shared part of the project's local Hugging Face ``evaluate`` modules.

Each folder under ``evals/metrics/`` is an ``evaluate`` module loaded by path (offline).
They all score columns of strings, so a module is only what is its own: its description
(the class docstring), its citation (a key of ``references.bib``), its options and what
it returns, and the computation. ``TextMetric`` builds ``evaluate``'s ``MetricInfo`` from
those: ``class Rouge(TextMetric, evaluate.Metric)``. ``SacrebleuMetric`` is the whole
computation of a sacrebleu score (corpus score, sentence scores, signature); its metrics
only build their scorers (``class Bleu(SacrebleuMetric, evaluate.Metric)``).
"""

from __future__ import annotations

import functools
import inspect
import math
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Protocol

import datasets
import evaluate

BIBLIOGRAPHY = Path(__file__).resolve().parent / "references.bib"
# What the two columns of most modules hold.
ANSWERS = MappingProxyType(
    {"predictions": "model answers.", "references": "one reference per prediction."}
)
LABELS = MappingProxyType({"predictions": "predicted labels.", "references": "reference labels."})
LOWERCASE = "lowercase (bool): lowercase before scoring. Default False."


@functools.cache
def citation(key: str) -> str:
    """The BibTeX entry ``key`` of ``references.bib``, as ``evaluate`` shows a citation."""
    for entry in BIBLIOGRAPHY.read_text(encoding="utf-8").split("\n@"):
        entry = entry.strip()
        if entry.lstrip("@").split("{", 1)[-1].split(",", 1)[0] == key:
            return entry if entry.startswith("@") else "@" + entry
    raise ValueError(f"{BIBLIOGRAPHY.name} has no entry {key!r}")


class TextMetric:
    """The ``_info`` of an ``evaluate`` metric over string columns (``COLUMNS``).

    A mixin, listed before ``evaluate.Metric``: ``evaluate`` takes a module's first
    ``evaluate.Metric`` subclass as the metric, so the shared base must not be one. The
    class docstring is the description; ``COLUMNS`` names each input column and what it
    holds; ``OPTIONS`` and ``RETURNS`` are the lines (``name (type): what``) of the
    arguments past the columns and of the result.
    """

    CITATION: ClassVar[str] = ""
    URLS: ClassVar[tuple[str, ...]] = ()
    COLUMNS: ClassVar[Mapping[str, str]] = ANSWERS
    OPTIONS: ClassVar[str] = ""
    RETURNS: ClassVar[str]

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=inspect.cleandoc(type(self).__doc__ or ""),
            citation=self.CITATION,
            inputs_description=self.arguments(),
            features=datasets.Features(
                {column: datasets.Value("string") for column in self.COLUMNS}
            ),
            reference_urls=list(self.URLS),
        )

    @classmethod
    def arguments(cls) -> str:
        """The ``Args:``/``Returns:`` text ``evaluate`` shows as the inputs' description."""
        return _arguments(cls.COLUMNS, _lines(cls.OPTIONS), _lines(cls.RETURNS))


class Scorer(Protocol):
    """What sacrebleu's ``BLEU`` and ``CHRF`` have in common."""

    def corpus_score(self, hypotheses: list[str], references: list[list[str]]) -> Any: ...

    def sentence_score(self, hypothesis: str, references: list[str]) -> Any: ...

    def get_signature(self) -> Any: ...


class SacrebleuMetric(TextMetric):
    """A sacrebleu score: the corpus score as the aggregate (statistics summed over the
    corpus, as the score is defined) and the sentence score of each sample, 0-100.

    A metric names its score (``SCORE``, also its result's key in lower case), documents
    its own options and builds its corpus and sentence scorers from them (``scorers``).
    """

    URLS = ("https://github.com/mjpost/sacrebleu",)
    SCORE: ClassVar[str]
    scorers: Callable[..., tuple[Scorer, Scorer]]  # (corpus, sentence) from the options

    @classmethod
    def arguments(cls) -> str:
        key = cls.SCORE.lower()
        returns = [
            f"{key} (float): corpus {cls.SCORE}, 0-100.",
            f"per_sample (list of float): sentence {cls.SCORE}, 0-100.",
            "signature (str): sacrebleu's signature of the corpus score.",
        ]
        return _arguments(cls.COLUMNS, [*_lines(cls.OPTIONS), LOWERCASE], returns)

    def _compute(
        self, predictions: list[str], references: list[str], **options: Any
    ) -> dict[str, Any]:
        corpus, sentence = self.scorers(**options)
        per_sample = [
            float(sentence.sentence_score(p, [r]).score)
            for p, r in zip(predictions, references, strict=True)
        ]
        key = self.SCORE.lower()
        if not references:
            return {key: math.nan, "per_sample": per_sample, "signature": ""}
        score = corpus.corpus_score(predictions, [references])
        return {
            key: float(score.score),
            "per_sample": per_sample,
            "signature": str(corpus.get_signature()),
        }


def _arguments(columns: Mapping[str, str], options: list[str], returns: list[str]) -> str:
    lines = [f"{name} (list of str): {what}" for name, what in columns.items()] + options
    return "\n" + "\n".join(["Args:", *_indented(lines), "Returns:", *_indented(returns)]) + "\n"


def _lines(text: str) -> list[str]:
    return textwrap.dedent(text).strip("\n").splitlines()


def _indented(lines: list[str]) -> list[str]:
    return ["    " + line for line in lines]
