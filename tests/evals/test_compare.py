"""Paired statistics: McNemar's exact test against hand-computed binomials, the paired
bootstrap against a known difference, and pairing by sample id."""

from __future__ import annotations

import json
from collections.abc import Mapping
from math import comb
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evals.compare import (
    DEFAULT_RESAMPLES,
    CompareError,
    compare_runs,
    mcnemar_exact,
    paired_bootstrap,
)
from evals.metrics.base import Better, Kind
from evals.report import write_run_report


def binomial_two_sided(b: int, c: int) -> float:
    """Exact McNemar by hand: 2 * P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2), capped at 1."""
    n = b + c
    tail: float = sum(comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


@pytest.mark.parametrize(
    ("b", "c", "expected"),
    [
        (2, 8, 112 / 1024),  # 2 * (1 + 10 + 45) / 2**10
        (0, 6, 2 / 64),  # 2 * (1/2)**6
        (8, 2, 112 / 1024),  # symmetric
        (5, 5, 1.0),
        (0, 1, 1.0),
        (0, 0, 1.0),  # no discordant pair: no evidence of change
        (3, 17, binomial_two_sided(3, 17)),
    ],
)
def test_mcnemar_exact_matches_hand_computed_binomial(b: int, c: int, expected: float) -> None:
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_rejects_negative_counts() -> None:
    with pytest.raises(ValueError, match="negative"):
        mcnemar_exact(-1, 3)


def test_paired_bootstrap_is_seeded_and_brackets_the_observed_mean() -> None:
    rng = np.random.default_rng(7)
    baseline = rng.normal(0.5, 0.1, size=400)
    candidate = baseline + 0.05 + rng.normal(0.0, 0.02, size=400)  # true mean delta 0.05
    differences = candidate - baseline
    low, high = paired_bootstrap(differences, seed=3)
    assert low < differences.mean() < high
    assert abs(differences.mean() - 0.05) < 0.005
    assert high - low < 0.01  # 400 pairs with sd 0.02: a tight interval
    assert paired_bootstrap(differences, seed=3) == (low, high)
    assert paired_bootstrap(differences, seed=4) != (low, high)


def test_paired_bootstrap_covers_the_true_delta_about_95_percent_of_the_time() -> None:
    """Over 300 simulated pairs of runs with a true mean difference of -0.1, the 95%
    interval contains -0.1 in about 95% of them (binomial sd of the rate: 1.3 points)."""
    rng = np.random.default_rng(11)
    covered = 0
    trials = 300
    for trial in range(trials):
        baseline = rng.uniform(0.2, 0.8, size=60)
        candidate = np.clip(baseline - 0.1 + rng.normal(0.0, 0.15, size=60), -1, 2)
        low, high = paired_bootstrap(candidate - baseline, resamples=1000, seed=trial)
        covered += low <= -0.1 <= high
    assert 0.90 <= covered / trials <= 0.99


def test_paired_bootstrap_of_constant_differences_is_a_point() -> None:
    low, high = paired_bootstrap(np.full(30, -0.25))
    assert low == pytest.approx(-0.25)
    assert high == pytest.approx(-0.25)


def test_paired_bootstrap_wider_at_higher_confidence() -> None:
    differences = np.random.default_rng(0).normal(0.0, 1.0, size=50)
    narrow = paired_bootstrap(differences, confidence=0.80)
    wide = paired_bootstrap(differences, confidence=0.99)
    assert wide[0] < narrow[0] < narrow[1] < wide[1]


def record(
    run_id: str,
    metrics: dict[str, dict[str, Any]],
    *,
    model: str = "m",
) -> dict[str, Any]:
    return {"id": run_id, "model": model, "status": "succeeded", "metrics": metrics}


def metric(
    per_sample: Mapping[str, float | None],
    *,
    kind: Kind = Kind.BINARY,
    direction: Better = Better.LOWER,
    value: float | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    present = [v for v in per_sample.values() if v is not None]
    return {
        "value": value if value is not None else sum(present) / len(present),
        "direction": direction.value,
        "kind": kind.value,
        "per_sample": dict(per_sample),
        "details": details or {},
    }


def test_binary_metric_pairs_by_id_and_counts_discordant_pairs() -> None:
    base: dict[str, float | None] = {f"s{i}": 0.0 for i in range(20)}
    cand = dict(base)
    for i in range(7):  # 7 samples became harmful
        cand[f"s{i}"] = 1.0
    base["s19"] = 1.0  # one got better
    base["only-in-baseline"] = 1.0
    cand["s18"] = None  # not applicable in the candidate: not paired
    comparison = compare_runs(
        record("base", {"harm_rate": metric(base)}),
        record("cand", {"harm_rate": metric(cand)}),
    )
    item = comparison.get("harm_rate")
    assert item is not None
    assert item.test == "mcnemar-exact"
    assert item.n_paired == 19
    assert item.discordant == (1, 7)
    assert item.p_value == pytest.approx(binomial_two_sided(1, 7))
    assert item.significantly_worse(0.10)  # p = 0.0703
    assert not item.significantly_worse(0.05)
    assert item.mean_difference == pytest.approx(6 / 19)


def test_continuous_metric_gets_bootstrap_interval_of_mean_difference() -> None:
    rng = np.random.default_rng(1)
    base_values = rng.uniform(0.3, 0.9, size=200)
    cand_values = base_values - 0.1  # every sample dropped by exactly 0.1
    ids = [f"q{i}" for i in range(200)]
    comparison = compare_runs(
        record(
            "base",
            {
                "rougeL": metric(
                    dict(zip(ids, base_values, strict=True)),
                    kind=Kind.CONTINUOUS,
                    direction=Better.HIGHER,
                )
            },
        ),
        record(
            "cand",
            {
                "rougeL": metric(
                    dict(zip(ids, cand_values, strict=True)),
                    kind=Kind.CONTINUOUS,
                    direction=Better.HIGHER,
                )
            },
        ),
    )
    item = comparison.get("rougeL")
    assert item is not None
    assert item.test == "paired-bootstrap"
    assert item.ci == pytest.approx((-0.1, -0.1))
    assert item.delta == pytest.approx(-0.1)
    assert item.significantly_worse()
    assert comparison.resamples == DEFAULT_RESAMPLES


def test_metrics_in_one_run_only_are_listed_apart() -> None:
    comparison = compare_runs(
        record(
            "base",
            {"harm_rate": metric({"a": 0.0}), "bleu": metric({"a": 10.0}, kind=Kind.CONTINUOUS)},
        ),
        record(
            "cand",
            {"harm_rate": metric({"a": 0.0}), "chrf": metric({"a": 10.0}, kind=Kind.CONTINUOUS)},
        ),
    )
    assert [item.metric for item in comparison.metrics] == ["harm_rate"]
    assert comparison.only_baseline == ("bleu",)
    assert comparison.only_candidate == ("chrf",)


def test_no_paired_samples_gives_no_test() -> None:
    comparison = compare_runs(
        record("base", {"harm_rate": metric({"a": 1.0})}),
        record("cand", {"harm_rate": metric({"b": 0.0})}),
    )
    item = comparison.get("harm_rate")
    assert item is not None
    assert item.n_paired == 0
    assert item.test == "none"
    assert not item.significantly_worse()


def test_kind_mismatch_and_malformed_records_raise() -> None:
    with pytest.raises(CompareError, match="binary"):
        compare_runs(
            record("base", {"x": metric({"a": 1.0})}),
            record("cand", {"x": metric({"a": 1.0}, kind=Kind.CONTINUOUS)}),
        )
    with pytest.raises(CompareError, match="malformed"):
        compare_runs(
            record("base", {"x": {"value": 1.0, "kind": "binary"}}),
            record("cand", {"x": metric({"a": 1.0})}),
        )


def test_run_report_in_markdown_and_json(tmp_path: Path) -> None:
    run = {
        "id": "evrun-1",
        "status": "succeeded",
        "error": None,
        "suite": {"name": "safety", "path": "s.yaml", "sha256": "0" * 64},
        "model": "demo",
        "counts": {"samples": 3, "errors": 0},
        "created_at": "2026-11-21T20:00:00+00:00",
        "finished_at": "2026-11-21T20:01:00+00:00",
        "schema_version": 1,
        "metrics": {
            "harm_rate": metric(
                {"a": 1.0, "b": 0.0, "c": None},
                details={"aggregate": "mean", "per_category": {"hate": 0.5, "violence": 0.0}},
            ),
            "bleu": metric(
                {"a": 20.0, "b": 40.0},
                kind=Kind.CONTINUOUS,
                direction=Better.HIGHER,
                value=27.5,
                details={"aggregate": "corpus BLEU (0-100); per-sample values are sentence BLEU"},
            ),
        },
    }
    markdown_path, json_path = write_run_report(tmp_path / "evrun-1", run)
    markdown = markdown_path.read_text(encoding="utf-8")
    assert "# Eval run evrun-1" in markdown
    assert "| harm_rate | 0.5000 | lower | binary | 2 | mean |" in markdown
    assert "| bleu | 27.5000 | higher | continuous | 2 | corpus BLEU (0-100)" in markdown
    assert "| hate | 0.5000 |" in markdown
    data = json.loads(json_path.read_text(encoding="utf-8"))
    assert data["schema_version"] == 1
    assert data["kind"] == "run"
    assert data["run"]["suite"] == "safety"
    assert data["metrics"]["harm_rate"]["applicable"] == 2
    assert "per_sample" not in data["metrics"]["harm_rate"]  # reports hold no sample data
