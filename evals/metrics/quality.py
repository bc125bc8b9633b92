"""Quality metrics: the model's answer against the sample's reference.

Each metric calls a local Hugging Face ``evaluate`` module in ``evals/metrics/<module>/``
(loaded by path, so nothing is fetched from the Hub) whose ``compute`` calls the
established library: scikit-learn (exact match, accuracy, F1), sacrebleu (BLEU, chrF),
rouge-score (ROUGE-1/2/L) and transformers (perplexity).

Which samples count:

- a sample without a reference is not applicable (``None``);
- an output with a model error is not applicable (infrastructure, not quality) and is
  counted in ``details["errors"]``;
- a filtered output (no text reached the user) is scored as the empty answer, so a
  candidate that gets filtered more often loses quality, as its users would see.

Perplexity ignores outputs: it scores each reference, after its prompt, under the model
named in its options.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evals.metrics.base import (
    METRICS,
    Better,
    Kind,
    Metric,
    MetricError,
    MetricName,
    MetricOptionsError,
    OptionReader,
    Scores,
    outputs_by_sample,
)
from evals.records import Output, Sample

MODULES_DIR = Path(__file__).resolve().parent
NO_LABEL = "<none>"  # the label of an answer in which none of the known labels appears
_EDGE_PUNCTUATION = " \t\r\n.,;:!?\"'`()[]{}"


def load_module(module: str) -> Any:
    """Load the local ``evaluate`` module ``evals/metrics/<module>/<module>.py`` by path."""
    import evaluate

    return evaluate.load(str(MODULES_DIR / module), keep_in_memory=True)


@dataclass(frozen=True, slots=True)
class _Pairs:
    ids: list[str]
    predictions: list[str]
    references: list[str]
    skipped: dict[str, None]
    errors: int
    filtered: int


def _pairs(samples: Sequence[Sample], outputs: Sequence[Output]) -> _Pairs:
    by_id = outputs_by_sample(samples, outputs)
    ids: list[str] = []
    predictions: list[str] = []
    references: list[str] = []
    skipped: dict[str, None] = {}
    errors = filtered = 0
    for sample in samples:
        output = by_id[sample.id]
        if sample.reference is None or output.error is not None:
            skipped[sample.id] = None
            errors += output.error is not None
            continue
        if output.text is None:
            filtered += 1
        ids.append(sample.id)
        predictions.append(output.text or "")
        references.append(sample.reference)
    return _Pairs(ids, predictions, references, skipped, errors, filtered)


def _per_sample(pairs: _Pairs, values: Sequence[float]) -> dict[str, float | None]:
    per_sample: dict[str, float | None] = dict(pairs.skipped)
    for sample_id, value in zip(pairs.ids, values, strict=True):
        per_sample[sample_id] = None if math.isnan(float(value)) else float(value)
    return per_sample


def _counts(pairs: _Pairs) -> dict[str, int]:
    return {"n": len(pairs.ids), "errors": pairs.errors, "filtered_as_empty": pairs.filtered}


@dataclass(frozen=True, slots=True)
class ReferenceMetric:
    """A metric of answers against references, computed by one local evaluate module.

    ``prepare`` turns (predictions, references) into the module's inputs (label
    extraction for accuracy and F1); ``result_key`` names the aggregate in the module's
    result and ``per_sample_key`` the per-sample list (a dict keyed by ``result_key``
    for ROUGE, which scores three types in one pass).
    """

    name: str
    direction: Better
    kind: Kind
    module: str
    result_key: str
    compute_options: Mapping[str, Any]
    aggregate: str
    prepare: Callable[[list[str], list[str]], tuple[list[str], list[str]]] | None = None
    nested_per_sample: bool = False

    def score(self, samples: Sequence[Sample], outputs: Sequence[Output]) -> Scores:
        pairs = _pairs(samples, outputs)
        predictions, references = pairs.predictions, pairs.references
        if self.prepare is not None:
            predictions, references = self.prepare(predictions, references)
        if not references:
            return Scores(
                dict(pairs.skipped), math.nan, {**_counts(pairs), "aggregate": self.aggregate}
            )
        result = load_module(self.module).compute(
            predictions=predictions, references=references, **self.compute_options
        )
        values = result["per_sample"]
        if self.nested_per_sample:
            values = values[self.result_key]
        details: dict[str, Any] = {**_counts(pairs), "aggregate": self.aggregate}
        details.update(
            {
                key: value
                for key, value in result.items()
                if key not in ("per_sample", self.result_key)
            }
        )
        if self.compute_options:
            details["options"] = dict(self.compute_options)
        return Scores(_per_sample(pairs, values), float(result[self.result_key]), details)


# -- label extraction (accuracy, F1) -------------------------------------------------


def normalise_label(text: str) -> str:
    return text.strip(_EDGE_PUNCTUATION).casefold()


def extract_label(text: str, labels: Sequence[str] | None) -> str:
    """The label an answer gives: its normalised text, or the first known label in it.

    With ``labels``, the answer's label is the known label that appears earliest as a
    whole word ("Positive, clearly." -> "positive"); ``NO_LABEL`` when none appears.
    """
    if labels is None:
        return normalise_label(text)
    folded = text.casefold()
    best: tuple[int, int, str] | None = None
    for label in labels:
        wanted = label.casefold()
        match = re.search(rf"(?<!\w){re.escape(wanted)}(?!\w)", folded)
        if match is not None:
            candidate = (match.start(), -len(wanted), wanted)
            best = candidate if best is None else min(best, candidate)
    return best[2] if best is not None else NO_LABEL


def _label_preparer(
    labels: Sequence[str] | None,
) -> Callable[[list[str], list[str]], tuple[list[str], list[str]]]:
    def prepare(predictions: list[str], references: list[str]) -> tuple[list[str], list[str]]:
        return (
            [extract_label(text, labels) for text in predictions],
            [normalise_label(text) for text in references],
        )

    return prepare


def _labels_option(reader: OptionReader) -> list[str] | None:
    labels = reader.get("labels", None, kind=list)
    if labels is None:
        return None
    if not labels or not all(isinstance(label, str) and label.strip() for label in labels):
        raise MetricOptionsError(
            f"metric {reader.metric!r}: option 'labels' must be a non-empty list of strings"
        )
    return [str(label) for label in labels]


# -- factories -----------------------------------------------------------------------


@METRICS.register(MetricName.EXACT_MATCH)
def exact_match(options: Mapping[str, Any]) -> Metric:
    reader = OptionReader(MetricName.EXACT_MATCH, options)
    compute = {
        key: reader.get(key, True, kind=bool)
        for key in ("ignore_case", "ignore_punctuation", "ignore_whitespace")
    }
    reader.done()
    return ReferenceMetric(
        name=MetricName.EXACT_MATCH,
        direction=Better.HIGHER,
        kind=Kind.BINARY,
        module="exact_match",
        result_key="exact_match",
        compute_options=compute,
        aggregate="mean (share of answers equal to the reference after normalisation)",
    )


@METRICS.register(MetricName.ACCURACY)
def accuracy(options: Mapping[str, Any]) -> Metric:
    reader = OptionReader(MetricName.ACCURACY, options)
    labels = _labels_option(reader)
    reader.done()
    return ReferenceMetric(
        name=MetricName.ACCURACY,
        direction=Better.HIGHER,
        kind=Kind.BINARY,
        module="accuracy",
        result_key="accuracy",
        compute_options={},
        aggregate="mean (share of answers whose label equals the reference label)",
        prepare=_label_preparer(labels),
    )


@METRICS.register(MetricName.F1)
def f1(options: Mapping[str, Any]) -> Metric:
    reader = OptionReader(MetricName.F1, options)
    labels = _labels_option(reader)
    average = reader.get("average", "macro", kind=str)
    reader.done()
    if average not in ("macro", "micro", "weighted"):
        raise MetricOptionsError("metric 'f1': option 'average' must be macro, micro or weighted")
    return ReferenceMetric(
        name=MetricName.F1,
        direction=Better.HIGHER,
        kind=Kind.BINARY,
        module="f1",
        result_key="f1",
        compute_options={"average": average},
        aggregate=f"corpus {average} F1 over labels; per-sample values are label correctness",
        prepare=_label_preparer(labels),
    )


@METRICS.register(MetricName.BLEU)
def bleu(options: Mapping[str, Any]) -> Metric:
    reader = OptionReader(MetricName.BLEU, options)
    compute = {
        "tokenize": reader.get("tokenize", "13a", kind=str),
        "lowercase": reader.get("lowercase", False, kind=bool),
    }
    reader.done()
    return ReferenceMetric(
        name=MetricName.BLEU,
        direction=Better.HIGHER,
        kind=Kind.CONTINUOUS,
        module="bleu",
        result_key="bleu",
        compute_options=compute,
        aggregate="corpus BLEU (0-100); per-sample values are sentence BLEU",
    )


@METRICS.register(MetricName.CHRF)
def chrf(options: Mapping[str, Any]) -> Metric:
    reader = OptionReader(MetricName.CHRF, options)
    compute = {
        "char_order": reader.get("char_order", 6, kind=int),
        "word_order": reader.get("word_order", 0, kind=int),
        "beta": reader.get("beta", 2, kind=int),
        "lowercase": reader.get("lowercase", False, kind=bool),
    }
    reader.done()
    return ReferenceMetric(
        name=MetricName.CHRF,
        direction=Better.HIGHER,
        kind=Kind.CONTINUOUS,
        module="chrf",
        result_key="chrf",
        compute_options=compute,
        aggregate="corpus chrF (0-100); per-sample values are sentence chrF",
    )


def _rouge(name: MetricName) -> Callable[[Mapping[str, Any]], Metric]:
    def factory(options: Mapping[str, Any]) -> Metric:
        reader = OptionReader(name, options)
        use_stemmer = reader.get("use_stemmer", False, kind=bool)
        reader.done()
        return ReferenceMetric(
            name=name,
            direction=Better.HIGHER,
            kind=Kind.CONTINUOUS,
            module="rouge",
            result_key=name.value,
            compute_options={"rouge_types": [name.value], "use_stemmer": use_stemmer},
            aggregate="mean of per-sample F-measures (0-1)",
            nested_per_sample=True,
        )

    return factory


for _name in (MetricName.ROUGE1, MetricName.ROUGE2, MetricName.ROUGE_L):
    METRICS.add(_name, _rouge(_name))


# -- perplexity ----------------------------------------------------------------------

DEFAULT_PERPLEXITY_BATCH = 8
DEFAULT_PERPLEXITY_MAX_LENGTH = 1024


@dataclass(frozen=True, slots=True)
class PerplexityMetric:
    """Perplexity of each sample's reference, after its prompt, under a causal LM."""

    model: str
    adapter: str | None
    batch_size: int
    max_length: int
    device: str
    name: str = MetricName.PERPLEXITY
    direction: Better = Better.LOWER
    kind: Kind = Kind.CONTINUOUS

    def score(self, samples: Sequence[Sample], outputs: Sequence[Output]) -> Scores:
        del outputs  # perplexity reads references, not answers
        scored = [sample for sample in samples if sample.reference is not None]
        skipped: dict[str, float | None] = {
            sample.id: None for sample in samples if sample.reference is None
        }
        details: dict[str, Any] = {
            "aggregate": "mean of per-sample perplexities",
            "model": self.model,
            "adapter": self.adapter,
            "n": len(scored),
        }
        if not scored:
            return Scores(skipped, math.nan, details)
        try:
            result = load_module("perplexity").compute(
                prompts=[json.dumps([dict(m) for m in sample.messages]) for sample in scored],
                references=[sample.reference for sample in scored],
                model_id=self.model,
                adapter=self.adapter,
                batch_size=self.batch_size,
                max_length=self.max_length,
                device=self.device,
            )
        except (OSError, ValueError) as exc:
            raise MetricError(f"perplexity: cannot score under {self.model!r}: {exc}") from exc
        per_sample = dict(skipped)
        for sample, value in zip(scored, result["per_sample"], strict=True):
            per_sample[sample.id] = None if math.isnan(value) else float(value)
        details["corpus_perplexity"] = result["corpus_perplexity"]
        details["tokens"] = int(sum(result["tokens"]))
        return Scores(per_sample, float(result["mean_perplexity"]), details)


@METRICS.register(MetricName.PERPLEXITY)
def perplexity(options: Mapping[str, Any]) -> Metric:
    reader = OptionReader(MetricName.PERPLEXITY, options)
    model = reader.get("model", None, kind=str)
    adapter = reader.get("adapter", None, kind=str)
    batch_size = reader.get("batch_size", DEFAULT_PERPLEXITY_BATCH, kind=int)
    max_length = reader.get("max_length", DEFAULT_PERPLEXITY_MAX_LENGTH, kind=int)
    device = reader.get("device", "cpu", kind=str)
    reader.done()
    if model is None:
        raise MetricOptionsError(
            "metric 'perplexity' needs option 'model' (a causal LM directory or hub id)"
        )
    if batch_size < 1 or max_length < 2:
        raise MetricOptionsError("metric 'perplexity': batch_size >= 1 and max_length >= 2")
    _check_model(model)
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise MetricOptionsError(
            f"metric 'perplexity': adapter {adapter!r} is not a PEFT adapter directory"
        )
    return PerplexityMetric(model, adapter, batch_size, max_length, device)


def _check_model(model: str) -> None:
    """Fail at build time, before any model call, when the model's config cannot load."""
    from transformers import AutoConfig

    local_only = Path(model).exists() or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        AutoConfig.from_pretrained(model, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise MetricOptionsError(
            f"metric 'perplexity': model {model!r} cannot be loaded"
            f"{' offline' if local_only else ''}: {str(exc).splitlines()[0]}"
        ) from exc
