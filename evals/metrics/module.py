"""The shared part of the project's local Hugging Face ``evaluate`` modules.

Each folder under ``evals/metrics/`` is an ``evaluate`` module loaded by path (offline).
They all compare two columns of strings, so a module is only its description, its
arguments' description and ``_compute``; ``TextMetric`` builds ``evaluate``'s
``MetricInfo`` from those class attributes: ``class Bleu(TextMetric, evaluate.Metric)``.
"""

from __future__ import annotations

from typing import ClassVar

import datasets
import evaluate


class TextMetric:
    """The ``_info`` of an ``evaluate`` metric over two string columns (``COLUMNS``).

    A mixin, listed before ``evaluate.Metric``: ``evaluate`` takes a module's first
    ``evaluate.Metric`` subclass as the metric, so the shared base must not be one.
    """

    DESCRIPTION: ClassVar[str]
    ARGUMENTS: ClassVar[str]
    CITATION: ClassVar[str] = ""
    URLS: ClassVar[tuple[str, ...]] = ()
    COLUMNS: ClassVar[tuple[str, str]] = ("predictions", "references")

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=self.DESCRIPTION,
            citation=self.CITATION,
            inputs_description=self.ARGUMENTS,
            features=datasets.Features(
                {column: datasets.Value("string") for column in self.COLUMNS}
            ),
            reference_urls=list(self.URLS),
        )
