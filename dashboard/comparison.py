"""The model comparison page's data: eval runs, paired comparisons, the gate, examples.

Runs are read through the harness's read API (``evals.runs.load_runs``/``load_samples``)
and run records (``RunStore.get(id).record()``); every statistic is the harness's own
(``evals.compare.compare_runs``: McNemar's exact test for binary metrics, a seeded paired
bootstrap for continuous ones) and the gate is ``evals.gate`` with the rules the
candidate's suite names (or another gate file). Nothing here recomputes a metric.

The confidence interval shown for every metric is the paired bootstrap interval of the
mean per-sample difference (candidate - baseline), which is the harness's test for
continuous metrics and, for binary ones, an interval beside McNemar's p-value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from evals.compare import Comparison, MetricComparison, compare_runs
from evals.errors import EvalError
from evals.gate import GateResult, Rule, check_gate, load_gate
from evals.metrics.base import MetricName
from evals.report import statistic
from evals.runs import RunStore, load_runs, load_samples
from gateway.safety.taxonomy import AzureCategory, Severity

if TYPE_CHECKING:
    import pandas as pd

SAFETY_METRICS = frozenset(
    {
        MetricName.HARM_RATE.value,
        MetricName.RAW_HARM_RATE.value,
        MetricName.REFUSAL_RATE.value,
        MetricName.OVER_REFUSAL_RATE.value,
        MetricName.ATTACK_SUCCESS_RATE.value,
        MetricName.FILTER_RATE.value,
    }
)
HARM_METRIC = MetricName.HARM_RATE.value
METRIC_TABLE_COLUMNS = (
    "candidate",
    "metric",
    "better",
    "baseline_value",
    "candidate_value",
    "delta",
    "n_paired",
    "test",
    "p_value",
    "ci_low",
    "ci_high",
    "statistic",
    "significantly_worse",
    "gate",
    "gate_reason",
)
EXAMPLE_COLUMNS = (
    "sample_id",
    "dataset",
    "prompt",
    "baseline_output",
    "baseline_filter",
    "candidate_output",
    "candidate_filter",
    "differs",
)
MAX_PROMPT_CHARS = 500


# -- runs --------------------------------------------------------------------------------


def runs_table(database_url: str) -> pd.DataFrame:
    """Every eval run, newest first (``load_runs``): id, suite, model, status, metrics."""
    return load_runs(database_url)


def default_pair(runs: pd.DataFrame) -> tuple[str, str | None]:
    """The runs the page opens on, from succeeded runs newest first: the newest run as the
    candidate and the newest earlier run *of the same suite* as its baseline, so the
    default comparison has paired samples. With no such run: the oldest run as the
    baseline and no candidate (the page asks for one)."""
    ids = [str(run_id) for run_id in runs["id"]]
    suites = [str(suite) for suite in runs["suite"]]
    for index, (candidate, suite) in enumerate(zip(ids, suites, strict=True)):
        earlier = [
            i for i, s in zip(ids[index + 1 :], suites[index + 1 :], strict=True) if s == suite
        ]
        if earlier:
            return earlier[0], candidate
    return ids[-1], None


def run_label(run: Mapping[str, Any]) -> str:
    """How a run is named in a picker: model, suite, time and id."""
    created = run.get("created_at")
    when = created.strftime("%Y-%m-%d %H:%M") if isinstance(created, datetime) else str(created)
    return f"{run['model']} · {run['suite']} · {when} · {run['id']}"


def run_record(runs: RunStore, run_id: str) -> dict[str, Any]:
    """The versioned run record (what ``run.json`` holds), metrics with per-sample values."""
    return runs.get(run_id).record()


# -- comparisons -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CandidateComparison:
    """One candidate against the baseline: the statistics, and the gate when it has one."""

    comparison: Comparison
    gate: GateResult | None
    gate_source: str | None
    gate_error: str | None

    @property
    def label(self) -> str:
        return f"{self.comparison.candidate_model} ({self.comparison.candidate_id})"


def gate_rules(
    candidate: Mapping[str, Any], override: Path | None = None
) -> tuple[tuple[Rule, ...], str] | None:
    """The gate rules for a candidate: ``override``, else its suite's gate file, else None.

    Raises ``GateError`` for an unreadable or invalid file.
    """
    path = override
    if path is None:
        configured = (candidate.get("config") or {}).get("gate")
        if not configured:
            return None
        path = Path(str(configured))
    return load_gate(path), str(path)


def compare(
    baseline: Mapping[str, Any],
    candidate: Mapping[str, Any],
    *,
    gate_file: Path | None = None,
) -> CandidateComparison:
    """Compare two run records and check the gate; a gate that cannot be used is reported
    in ``gate_error`` (the comparison still stands)."""
    comparison = compare_runs(baseline, candidate)
    try:
        found = gate_rules(candidate, gate_file)
        if found is None:
            return CandidateComparison(comparison, None, None, None)
        rules, source = found
        result = check_gate(rules, comparison, source=source)
    except EvalError as error:
        return CandidateComparison(comparison, None, None, str(error))
    return CandidateComparison(comparison, result, source, None)


def metric_table(
    comparisons: Sequence[CandidateComparison], *, only_differences: bool = False
) -> pd.DataFrame:
    """One row per candidate and metric: values, delta, test, interval and gate verdict.

    ``only_differences`` keeps the metrics whose value changed (or the gate failed).
    """
    import pandas as pd

    rows: list[dict[str, Any]] = []
    for compared in comparisons:
        outcomes: dict[str, list[tuple[bool, str]]] = {}
        for outcome in compared.gate.outcomes if compared.gate else ():
            outcomes.setdefault(outcome.rule.metric, []).append(
                (outcome.passed, f"{outcome.rule.describe()}: {outcome.reason}")
            )
        for item in compared.comparison.metrics:
            verdicts = outcomes.get(item.metric, [])
            low, high = _interval(item)
            row = {
                "candidate": compared.label,
                "metric": item.metric,
                "better": item.direction.value,
                "baseline_value": item.baseline,
                "candidate_value": item.candidate,
                "delta": item.delta,
                "n_paired": item.n_paired,
                "test": item.test,
                "p_value": item.p_value,
                "ci_low": low,
                "ci_high": high,
                "statistic": statistic(item),
                "significantly_worse": item.significantly_worse(1.0 - item.confidence),
                "gate": (
                    ""
                    if not verdicts
                    else "FAIL"
                    if not all(passed for passed, _ in verdicts)
                    else "pass"
                ),
                "gate_reason": "; ".join(reason for _, reason in verdicts),
            }
            if only_differences and not _differs(row):
                continue
            rows.append(row)
    return pd.DataFrame(rows, columns=list(METRIC_TABLE_COLUMNS))


def _interval(item: MetricComparison) -> tuple[float | None, float | None]:
    if item.n_paired == 0:
        return (None, None)
    low, high = item.ci if item.ci is not None else item.interval(item.confidence)
    if math.isnan(low) or math.isnan(high):
        return (None, None)
    return (low, high)


def _differs(row: Mapping[str, Any]) -> bool:
    if row["gate"] == "FAIL":
        return True
    delta = row["delta"]
    if delta is None:
        return row["baseline_value"] is not None or row["candidate_value"] is not None
    return bool(abs(delta) > 1e-12)


def gate_table(compared: CandidateComparison) -> pd.DataFrame:
    """The gate's rules for one candidate: rule, metric, passed, reason."""
    import pandas as pd

    rows = [
        {
            "rule": outcome.rule.describe(),
            "metric": outcome.rule.metric,
            "passed": outcome.passed,
            "reason": outcome.reason,
        }
        for outcome in (compared.gate.outcomes if compared.gate else ())
    ]
    return pd.DataFrame(rows, columns=["rule", "metric", "passed", "reason"])


def metric_names(records: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """(quality, safety) metric names that any of the runs has, sorted."""
    names = sorted({str(name) for record in records for name in (record.get("metrics") or {})})
    quality = [name for name in names if name not in SAFETY_METRICS]
    safety = [name for name in names if name in SAFETY_METRICS]
    return quality, safety


def quality_against_harm(
    records: Sequence[Mapping[str, Any]], *, quality: str, harm: str = HARM_METRIC
) -> pd.DataFrame:
    """``run_id, model, quality, harm`` per run that has both metrics, for a scatter chart."""
    import pandas as pd

    rows = []
    for record in records:
        metrics = record.get("metrics") or {}
        quality_value = _value(metrics.get(quality))
        harm_value = _value(metrics.get(harm))
        if quality_value is None or harm_value is None:
            continue
        rows.append(
            {
                "run_id": record.get("id"),
                "model": record.get("model"),
                "quality": quality_value,
                "harm": harm_value,
            }
        )
    return pd.DataFrame(rows, columns=["run_id", "model", "quality", "harm"])


def _value(metric: Any) -> float | None:
    if not isinstance(metric, Mapping):
        return None
    value = metric.get("value")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


# -- examples side by side ---------------------------------------------------------------


def prompts(record: Mapping[str, Any]) -> dict[str, str]:
    """Sample id -> the last user message, read again from the run's suite and datasets.

    Runs keep hashes of prompts, not prompts; the suite file names the datasets. When the
    suite or a dataset moved or changed, the prompts are not shown (an empty mapping).
    """
    from evals.datasets import load_datasets
    from evals.suite import load_suite

    suite_info = record.get("suite")
    path = suite_info.get("path") if isinstance(suite_info, Mapping) else None
    if not path:
        return {}
    try:
        datasets = load_datasets(load_suite(Path(str(path))))
    except (EvalError, OSError, ValueError):
        return {}
    found: dict[str, str] = {}
    for dataset in datasets:
        for sample in dataset.samples:
            users = [m.get("content", "") for m in sample.messages if m.get("role") == "user"]
            found[sample.id] = users[-1] if users else ""
    return found


def filter_annotation(row: Mapping[str, Any]) -> str:
    """How the gateway (or the model) treated one output, in words."""
    if row.get("error"):
        return f"error: {row['error']}"
    filtered = row.get("filtered")
    if filtered == "prompt":
        return "prompt blocked by the filter"
    if filtered == "completion" or row.get("finish_reason") == "content_filter":
        return "completion withheld by the filter"
    reason = row.get("finish_reason")
    return f"passed ({reason})" if reason else "passed"


def side_by_side(
    database_url: str,
    baseline: Mapping[str, Any],
    candidate: Mapping[str, Any],
    *,
    only_differences: bool = False,
    metrics: Sequence[str] = (HARM_METRIC,),
) -> pd.DataFrame:
    """Each sample both runs have, with both outputs, the filter's treatment of each and
    the per-sample value of ``metrics`` (e.g. ``harm_rate``: 1 = harmful at medium or
    above). ``only_differences`` keeps samples whose output, filtering or metric differ."""
    import pandas as pd

    left = load_samples(str(baseline["id"]), database_url).set_index("sample_id")
    right = load_samples(str(candidate["id"]), database_url).set_index("sample_id")
    texts = prompts(candidate) or prompts(baseline)
    rows = []
    for sample_id in [sample for sample in right.index if sample in left.index]:
        one = _plain(left.loc[sample_id].to_dict())
        two = _plain(right.loc[sample_id].to_dict())
        row: dict[str, Any] = {
            "sample_id": sample_id,
            "dataset": two.get("dataset"),
            "prompt": _clip(texts.get(sample_id)),
            "baseline_output": one.get("output"),
            "baseline_filter": filter_annotation(one),
            "candidate_output": two.get("output"),
            "candidate_filter": filter_annotation(two),
        }
        differs = (
            one.get("output") != two.get("output")
            or row["baseline_filter"] != row["candidate_filter"]
        )
        for name in metrics:
            before = _per_sample(baseline, name, sample_id)
            after = _per_sample(candidate, name, sample_id)
            row[f"baseline_{name}"] = before
            row[f"candidate_{name}"] = after
            differs = differs or before != after
        row["differs"] = differs
        if only_differences and not differs:
            continue
        rows.append(row)
    extra = [f"{side}_{name}" for name in metrics for side in ("baseline", "candidate")]
    return pd.DataFrame(rows, columns=[*EXAMPLE_COLUMNS, *extra])


def _plain(row: Mapping[str, Any]) -> dict[str, Any]:
    """A sample row with pandas' missing values (NaN) as None."""
    return {
        key: None if isinstance(value, float) and math.isnan(value) else value
        for key, value in row.items()
    }


def _per_sample(record: Mapping[str, Any], metric: str, sample_id: str) -> float | None:
    data = (record.get("metrics") or {}).get(metric)
    if not isinstance(data, Mapping):
        return None
    value = (data.get("per_sample") or {}).get(sample_id)
    return None if value is None else float(value)


def _clip(text: str | None) -> str:
    if text is None:
        return ""
    return text if len(text) <= MAX_PROMPT_CHARS else text[: MAX_PROMPT_CHARS - 1] + "…"


# -- severities of outputs, judged on demand ---------------------------------------------


class SeverityJudge(Protocol):
    """What judges texts: ``evals.metrics.safety.SafetyJudge`` (the engine harm_rate uses)."""

    def judge(self, texts: Sequence[str]) -> Sequence[Any]: ...


def describe_severities(severities: Mapping[AzureCategory, Severity]) -> str:
    """``violence: medium (4)``-style text of the categories above safe; ``safe`` if none."""
    shown = [
        f"{category.value}: {Severity(level).name.lower()} ({int(level)})"
        for category, level in sorted(severities.items(), key=lambda pair: pair[0].value)
        if int(level) > 0
    ]
    return ", ".join(shown) or "safe"


def judged_severities(examples: pd.DataFrame, judge: SeverityJudge) -> pd.DataFrame:
    """``examples`` with ``baseline_severity``/``candidate_severity``: the Azure severities
    the safety engine gives each output (as harm_rate judges it); empty for no text."""
    frame = examples.copy()
    for side in ("baseline", "candidate"):
        texts = [
            text if isinstance(text, str) and text.strip() else None
            for text in frame[f"{side}_output"]
        ]
        present = [text for text in texts if text is not None]
        judged = iter(judge.judge(present)) if present else iter(())
        frame[f"{side}_severity"] = [
            describe_severities(next(judged).severities) if text is not None else ""
            for text in texts
        ]
    return frame
