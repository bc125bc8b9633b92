"""The metric seam: what a metric is, what it returns, and how one is built by name.

A metric reads the samples of a run and the outputs the model gave, and returns
``Scores``: a value per sample (``None`` where the metric does not apply, e.g. refusal
rate on a benign sample) and one aggregate. Per-sample values are what ``compare`` pairs
by sample id: a ``BINARY`` metric's values are 0/1 outcomes (McNemar's test), a
``CONTINUOUS`` metric's are real numbers (paired bootstrap). ``direction`` says which
way is better, so a gate knows what "worse" means.

Metrics are built by name through ``METRICS``, one ``Registry`` of factories with names
from ``MetricName``; a factory takes the suite's options for the metric and checks them
(unknown option, bad value: ``MetricOptionsError``) before any model is called.

A metric's scores are a function of its inputs: ``metric_inputs_sha256`` hashes them (name,
options, the code and weight files the metric's module reads, and per sample its id,
labels, reference and output), and the runner reuses an earlier run's record for the same
hash instead of scoring again, so an unchanged rerun loads neither the engine nor evaluate.

Exceptions (``EvalError`` is the harness's base, see ``evals.errors``)::

    EvalError
     +-- MetricError            a metric cannot be built or cannot score
          +-- UnknownMetric     no metric has that name (the message lists the known ones)
          +-- MetricOptionsError  the options given to a metric are wrong
"""

from __future__ import annotations

import hashlib
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

from evals.errors import EvalError
from evals.records import Output, Sample, sha256_json
from gateway.registry import Registry


class MetricError(EvalError):
    """A metric cannot be built or cannot score."""


class UnknownMetric(MetricError):
    """No metric has this name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown metric {name!r}; known metrics: {', '.join(metric_names())}")
        self.name = name


class MetricOptionsError(MetricError):
    """A metric's options are unknown or have bad values."""


class Better(StrEnum):
    """Which way a metric is better: a higher or a lower value."""

    HIGHER = "higher"
    LOWER = "lower"


class Kind(StrEnum):
    """What a per-sample value is, and so which paired test ``compare`` runs."""

    BINARY = "binary"  # 0/1 outcome per sample: McNemar's exact test
    CONTINUOUS = "continuous"  # a number per sample: paired bootstrap of the mean difference


class MetricName(StrEnum):
    """Every metric the project provides."""

    EXACT_MATCH = "exact_match"
    ACCURACY = "accuracy"
    F1 = "f1"
    BLEU = "bleu"
    CHRF = "chrf"
    ROUGE1 = "rouge1"
    ROUGE2 = "rouge2"
    ROUGE_L = "rougeL"
    PERPLEXITY = "perplexity"
    HARM_RATE = "harm_rate"
    RAW_HARM_RATE = "raw_harm_rate"
    REFUSAL_RATE = "refusal_rate"
    OVER_REFUSAL_RATE = "over_refusal_rate"
    ATTACK_SUCCESS_RATE = "attack_success_rate"
    FILTER_RATE = "filter_rate"


@dataclass(frozen=True, slots=True)
class Scores:
    """What one metric says about one run.

    ``value`` is the aggregate the metric reports (usually the mean over applicable
    samples; ``details["aggregate"]`` names it when it is not, e.g. corpus BLEU).
    """

    per_sample: Mapping[str, float | None]
    value: float
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checked: dict[str, float | None] = {}
        for sample_id, number in self.per_sample.items():
            if number is not None and not math.isfinite(float(number)):
                raise ValueError(f"per-sample value for {sample_id!r} is not finite: {number!r}")
            checked[sample_id] = None if number is None else float(number)
        object.__setattr__(self, "per_sample", MappingProxyType(checked))
        object.__setattr__(self, "value", float(self.value))
        object.__setattr__(self, "details", MappingProxyType(dict(self.details)))

    @property
    def applicable(self) -> int:
        """How many samples the metric applied to."""
        return sum(1 for number in self.per_sample.values() if number is not None)


@runtime_checkable
class Metric(Protocol):
    """A named, directed scoring function over a run's samples and outputs."""

    @property
    def name(self) -> str: ...
    @property
    def direction(self) -> Better: ...
    @property
    def kind(self) -> Kind: ...

    def score(self, samples: Sequence[Sample], outputs: Sequence[Output]) -> Scores: ...


MetricFactory = Callable[[Mapping[str, Any]], Metric]

METRICS: Registry[MetricFactory] = Registry("metric")

# Importing a module registers its factories; modules load only when a metric is built,
# so naming the metrics (and a usage error) never imports evaluate or torch.
_METRIC_MODULES: Mapping[MetricName, str] = MappingProxyType(
    {
        **dict.fromkeys(
            (
                MetricName.EXACT_MATCH,
                MetricName.ACCURACY,
                MetricName.F1,
                MetricName.BLEU,
                MetricName.CHRF,
                MetricName.ROUGE1,
                MetricName.ROUGE2,
                MetricName.ROUGE_L,
                MetricName.PERPLEXITY,
            ),
            "evals.metrics.quality",
        ),
        **dict.fromkeys(
            (
                MetricName.HARM_RATE,
                MetricName.RAW_HARM_RATE,
                MetricName.REFUSAL_RATE,
                MetricName.OVER_REFUSAL_RATE,
                MetricName.ATTACK_SUCCESS_RATE,
                MetricName.FILTER_RATE,
            ),
            "evals.metrics.safety",
        ),
    }
)


# The files besides its inputs that a module's scores depend on (globs under the project
# root): its code, the local evaluate modules, the engine's and refusal detector's weights.
# A change to any of them changes ``metric_inputs_sha256``, so earlier scores are not reused.
_PROJECT_ROOT = Path(__file__).resolve().parents[2]
_MODULE_FILES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "evals.metrics.quality": (
            "evals/metrics/base.py",
            "evals/metrics/quality.py",
            "evals/metrics/*/*.py",
        ),
        "evals.metrics.safety": (
            "evals/metrics/base.py",
            "evals/metrics/safety.py",
            "evals/refusal.py",
            "evals/weights/*",
            "gateway/safety/weights/*",
        ),
    }
)


def metric_names() -> list[str]:
    """The names ``build_metric`` accepts, sorted."""
    return sorted(name.value for name in MetricName)


def is_metric(name: str) -> bool:
    return name in {member.value for member in MetricName}


def build_metric(name: str, options: Mapping[str, Any] | None = None) -> Metric:
    """Build the metric called ``name`` with the suite's ``options`` for it.

    Raises ``UnknownMetric`` (naming the known metrics) for a name that is not one of
    ``MetricName``, and ``MetricOptionsError`` for options the metric does not take.
    """
    if not is_metric(name):
        raise UnknownMetric(name)
    metric_name = MetricName(name)
    importlib.import_module(_METRIC_MODULES[metric_name])
    factory = METRICS.get(metric_name.value)
    return factory(MappingProxyType(dict(options or {})))


def metric_record(metric: Metric, scores: Scores) -> dict[str, Any]:
    """The JSON-ready form of a metric's scores that run records store under its name."""
    return {
        "value": scores.value,
        "direction": metric.direction.value,
        "kind": metric.kind.value,
        "per_sample": dict(scores.per_sample),
        "details": dict(scores.details),
    }


@lru_cache(maxsize=8)
def _module_files_sha256(module: str) -> str:
    digest = hashlib.sha256()
    paths = sorted({p for g in _MODULE_FILES[module] for p in _PROJECT_ROOT.glob(g) if p.is_file()})
    for path in paths:
        digest.update(path.relative_to(_PROJECT_ROOT).as_posix().encode("utf-8") + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def metric_inputs_sha256(
    name: str,
    options: Mapping[str, Any] | None,
    samples: Sequence[Sample],
    outputs: Sequence[Output],
) -> str:
    """sha256 of everything metric ``name``'s scores depend on, for reusing them.

    That is its name and options, the files its module reads (``_MODULE_FILES``, hashed
    once per process), and per sample, in order: id, labels, reference, and the output's
    text, finish reason, filter and error (not its latency, nor whether it was cached).
    Not covered: a model named in the options (perplexity) changing on disk, or the safety
    judge's settings (``SAFEGATE_*``); ``--no-cache`` scores afresh.
    """
    if not is_metric(name):
        raise UnknownMetric(name)
    by_id = {output.sample_id: output for output in outputs}
    rows: list[list[Any]] = []
    for sample in samples:
        output = by_id.get(sample.id)
        rows.append(
            [
                sample.id,
                dict(sample.labels),
                sample.reference,
                None
                if output is None
                else [output.text, output.finish_reason, output.filtered, output.error],
            ]
        )
    return sha256_json(
        {
            "metric": name,
            "options": dict(options or {}),
            "files": _module_files_sha256(_METRIC_MODULES[MetricName(name)]),
            "samples": rows,
        }
    )


class OptionReader:
    """Reads a metric's options, refusing unknown keys and values of the wrong type."""

    def __init__(self, metric: str, options: Mapping[str, Any]) -> None:
        self.metric = metric
        self.options = options
        self._seen: set[str] = set()

    def get(self, key: str, default: Any, *, kind: type | tuple[type, ...]) -> Any:
        self._seen.add(key)
        if key not in self.options:
            return default
        value = self.options[key]
        if isinstance(value, bool) and kind not in (bool, (bool,)):
            raise MetricOptionsError(self._bad(key, value, kind))
        if not isinstance(value, kind):
            raise MetricOptionsError(self._bad(key, value, kind))
        return value

    def done(self) -> None:
        """Raise for any option no ``get`` asked about."""
        unknown = sorted(set(self.options) - self._seen)
        if unknown:
            known = ", ".join(sorted(self._seen)) or "none"
            raise MetricOptionsError(
                f"metric {self.metric!r} has no option {', '.join(map(repr, unknown))}; "
                f"its options: {known}"
            )

    def _bad(self, key: str, value: object, kind: type | tuple[type, ...]) -> str:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        wanted = " or ".join(k.__name__ for k in kinds)
        return f"metric {self.metric!r}: option {key!r} must be {wanted}, got {value!r}"


def outputs_by_sample(samples: Sequence[Sample], outputs: Sequence[Output]) -> dict[str, Output]:
    """Index outputs by sample id; every sample must have exactly one output."""
    found: dict[str, Output] = {}
    for output in outputs:
        if output.sample_id in found:
            raise MetricError(f"two outputs for sample {output.sample_id!r}")
        found[output.sample_id] = output
    missing = [sample.id for sample in samples if sample.id not in found]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise MetricError(f"{len(missing)} samples have no output: {shown}")
    return found


def mean_of(values: Mapping[str, float | None]) -> float:
    """Mean over applicable values; NaN when none applies (the run shows it as n/a)."""
    present = [value for value in values.values() if value is not None]
    return math.fsum(present) / len(present) if present else math.nan
