"""Paired statistics between a baseline run and a candidate run.

Samples are paired by id: only samples where both runs have a value for a metric count
(``n_paired``). For each metric in either run:

- ``BINARY`` metrics (0/1 per sample): McNemar's exact test. Of the discordant pairs,
  ``b`` went 1 -> 0 and ``c`` went 0 -> 1; under "no change" each discordant pair is
  equally likely to go either way, so the two-sided p-value is that of a binomial test
  of ``c`` successes in ``b + c`` trials at p = 0.5 (``scipy.stats.binomtest``).
- ``CONTINUOUS`` metrics: a paired bootstrap of the mean per-sample difference
  (candidate - baseline): ``DEFAULT_RESAMPLES`` resamples of the paired differences with
  a seeded generator, and the percentile interval at ``confidence``.

``delta`` is the difference of the two runs' reported values (what the table shows side
by side); for metrics whose value is a corpus statistic (BLEU, chrF, F1) it is not the
mean per-sample difference, and the report says which aggregate each metric uses.
"Worse" follows the metric's direction: a significant change the wrong way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from evals.errors import EvalError
from evals.metrics.base import Better, Kind

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
DEFAULT_CONFIDENCE = 0.95
DEFAULT_ALPHA = 0.05
_BOOTSTRAP_CHUNK = 250  # resamples drawn at once, so memory stays at chunk x n


class CompareError(EvalError):
    """The runs cannot be compared (no metrics in common, a malformed metric record)."""


@dataclass(frozen=True, slots=True)
class MetricRecord:
    """One metric as a run record stores it."""

    name: str
    value: float | None
    direction: Better
    kind: Kind
    per_sample: Mapping[str, float | None]
    details: Mapping[str, Any]

    @classmethod
    def from_mapping(cls, name: str, data: Mapping[str, Any], *, run: str) -> MetricRecord:
        try:
            value = data.get("value")
            per_sample = data.get("per_sample") or {}
            return cls(
                name=name,
                value=None if value is None or _nan(value) else float(value),
                direction=Better(data["direction"]),
                kind=Kind(data["kind"]),
                per_sample={
                    str(key): None if item is None or _nan(item) else float(item)
                    for key, item in dict(per_sample).items()
                },
                details=dict(data.get("details") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CompareError(f"run {run}: metric {name!r} is malformed ({exc})") from exc


def _nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def run_metrics(record: Mapping[str, Any]) -> dict[str, MetricRecord]:
    """The metric records of a run record (``Run.record()`` or a ``run.json``)."""
    run = str(record.get("id", "?"))
    metrics = record.get("metrics") or {}
    if not isinstance(metrics, Mapping):
        raise CompareError(f"run {run}: metrics must be a mapping")
    return {
        str(name): MetricRecord.from_mapping(str(name), data, run=run)
        for name, data in metrics.items()
    }


@dataclass(frozen=True, slots=True)
class Paired:
    """A metric's per-sample values in both runs, on the samples both have."""

    sample_ids: tuple[str, ...]
    baseline: npt.NDArray[np.float64]
    candidate: npt.NDArray[np.float64]

    @property
    def differences(self) -> npt.NDArray[np.float64]:
        return self.candidate - self.baseline


def pair(baseline: Mapping[str, float | None], candidate: Mapping[str, float | None]) -> Paired:
    ids = tuple(
        sample_id
        for sample_id, value in baseline.items()
        if value is not None and candidate.get(sample_id) is not None
    )
    return Paired(
        sample_ids=ids,
        baseline=np.asarray([baseline[i] for i in ids], dtype=np.float64),
        candidate=np.asarray([candidate[i] for i in ids], dtype=np.float64),
    )


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` (1 -> 0) and ``c`` (0 -> 1) discordant pairs."""
    if b < 0 or c < 0:
        raise ValueError("discordant counts cannot be negative")
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(c, b + c, 0.5, alternative="two-sided").pvalue)


def paired_bootstrap(
    differences: npt.NDArray[np.float64],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> tuple[float, float]:
    """Percentile interval of the mean of ``differences`` over seeded bootstrap resamples."""
    if resamples < 1:
        raise ValueError("resamples must be at least 1")
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be between 0 and 1")
    n = len(differences)
    if n == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, _BOOTSTRAP_CHUNK):
        size = min(_BOOTSTRAP_CHUNK, resamples - start)
        index = rng.integers(0, n, size=(size, n))
        means[start : start + size] = differences[index].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return (float(low), float(high))


@dataclass(frozen=True, slots=True)
class MetricComparison:
    """One metric, baseline against candidate."""

    metric: str
    kind: Kind
    direction: Better
    baseline: float | None
    candidate: float | None
    n_paired: int
    mean_difference: float | None  # mean per-sample (candidate - baseline) over pairs
    test: str  # "mcnemar-exact", "paired-bootstrap", or "none" (nothing paired)
    p_value: float | None = None  # McNemar
    discordant: tuple[int, int] | None = None  # (b: 1 -> 0, c: 0 -> 1)
    ci: tuple[float, float] | None = None  # bootstrap interval of the mean difference
    confidence: float = DEFAULT_CONFIDENCE
    aggregate: str | None = None
    paired: Paired | None = field(default=None, repr=False, compare=False)
    resamples: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_SEED

    @property
    def delta(self) -> float | None:
        if self.baseline is None or self.candidate is None:
            return None
        return self.candidate - self.baseline

    def worse_by(self, change: float) -> bool:
        """Whether a change of ``change`` (candidate - baseline) is a change for the worse."""
        return change < 0 if self.direction is Better.HIGHER else change > 0

    def significantly_worse(self, alpha: float = DEFAULT_ALPHA) -> bool:
        """A change the wrong way, significant at ``alpha``."""
        if self.paired is None or self.n_paired == 0:
            return False
        if self.test == "mcnemar-exact" and self.discordant is not None:
            b, c = self.discordant
            return self.worse_by(float(c - b)) and mcnemar_exact(b, c) < alpha
        low, high = self.interval(1.0 - alpha)
        if math.isnan(low):
            return False
        return high < 0 if self.direction is Better.HIGHER else low > 0

    def interval(self, confidence: float) -> tuple[float, float]:
        """The bootstrap interval of the mean difference at ``confidence``."""
        if self.ci is not None and math.isclose(confidence, self.confidence):
            return self.ci
        if self.paired is None:
            return (math.nan, math.nan)
        return paired_bootstrap(
            self.paired.differences,
            resamples=self.resamples,
            seed=self.seed,
            confidence=confidence,
        )

    def summary(self) -> dict[str, Any]:
        """JSON-ready, for reports."""
        return {
            "metric": self.metric,
            "kind": self.kind.value,
            "direction": self.direction.value,
            "baseline": self.baseline,
            "candidate": self.candidate,
            "delta": self.delta,
            "n_paired": self.n_paired,
            "mean_difference": self.mean_difference,
            "test": self.test,
            "p_value": self.p_value,
            "discordant": (
                None
                if self.discordant is None
                else {"one_to_zero": self.discordant[0], "zero_to_one": self.discordant[1]}
            ),
            "ci": None if self.ci is None else list(self.ci),
            "confidence": self.confidence,
            "aggregate": self.aggregate,
            "significantly_worse": self.significantly_worse(1.0 - self.confidence),
        }


@dataclass(frozen=True, slots=True)
class Comparison:
    """Every metric of two runs compared; metrics only one run has are listed apart."""

    baseline_id: str
    candidate_id: str
    baseline_model: str
    candidate_model: str
    metrics: tuple[MetricComparison, ...]
    only_baseline: tuple[str, ...] = ()
    only_candidate: tuple[str, ...] = ()
    resamples: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_SEED

    def get(self, metric: str) -> MetricComparison | None:
        return next((item for item in self.metrics if item.metric == metric), None)


def compare_metric(
    baseline: MetricRecord,
    candidate: MetricRecord,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> MetricComparison:
    if baseline.kind is not candidate.kind or baseline.direction is not candidate.direction:
        raise CompareError(
            f"metric {baseline.name!r} is {baseline.kind}/{baseline.direction} in the baseline "
            f"but {candidate.kind}/{candidate.direction} in the candidate"
        )
    paired = pair(baseline.per_sample, candidate.per_sample)
    n = len(paired.sample_ids)
    aggregate = candidate.details.get("aggregate") or baseline.details.get("aggregate")
    common: dict[str, Any] = {
        "metric": baseline.name,
        "kind": baseline.kind,
        "direction": baseline.direction,
        "baseline": baseline.value,
        "candidate": candidate.value,
        "n_paired": n,
        "mean_difference": float(paired.differences.mean()) if n else None,
        "confidence": confidence,
        "aggregate": None if aggregate is None else str(aggregate),
        "paired": paired,
        "resamples": resamples,
        "seed": seed,
    }
    if n == 0:
        return MetricComparison(test="none", **common)
    binary = (
        np.isin(paired.baseline, (0.0, 1.0)).all() and np.isin(paired.candidate, (0.0, 1.0)).all()
    )
    if baseline.kind is Kind.BINARY and binary:
        b = int(((paired.baseline == 1.0) & (paired.candidate == 0.0)).sum())
        c = int(((paired.baseline == 0.0) & (paired.candidate == 1.0)).sum())
        return MetricComparison(
            test="mcnemar-exact", p_value=mcnemar_exact(b, c), discordant=(b, c), **common
        )
    ci = paired_bootstrap(paired.differences, resamples=resamples, seed=seed, confidence=confidence)
    return MetricComparison(test="paired-bootstrap", ci=ci, **common)


def compare_runs(
    baseline: Mapping[str, Any],
    candidate: Mapping[str, Any],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Comparison:
    """Compare two run records (``Run.record()`` dicts or ``run.json`` contents)."""
    base = run_metrics(baseline)
    cand = run_metrics(candidate)
    shared = [name for name in sorted(base) if name in cand]
    return Comparison(
        baseline_id=str(baseline.get("id", "?")),
        candidate_id=str(candidate.get("id", "?")),
        baseline_model=str(baseline.get("model", "?")),
        candidate_model=str(candidate.get("model", "?")),
        metrics=tuple(
            compare_metric(
                base[name], cand[name], resamples=resamples, seed=seed, confidence=confidence
            )
            for name in shared
        ),
        only_baseline=tuple(sorted(set(base) - set(cand))),
        only_candidate=tuple(sorted(set(cand) - set(base))),
        resamples=resamples,
        seed=seed,
    )


def comparison_summary(comparison: Comparison) -> dict[str, Any]:
    return {
        "baseline": {"id": comparison.baseline_id, "model": comparison.baseline_model},
        "candidate": {"id": comparison.candidate_id, "model": comparison.candidate_model},
        "metrics": [item.summary() for item in comparison.metrics],
        "only_baseline": list(comparison.only_baseline),
        "only_candidate": list(comparison.only_candidate),
        "bootstrap": {"resamples": comparison.resamples, "seed": comparison.seed},
    }


def discordant_labels(direction: Better) -> tuple[str, str]:
    """Words for (b, c) in a report: which discordant pairs got better, which worse."""
    if direction is Better.HIGHER:
        return ("worse (1 -> 0)", "better (0 -> 1)")
    return ("better (1 -> 0)", "worse (0 -> 1)")
