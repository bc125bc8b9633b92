"""Reports of a run and of a comparison, in Markdown (for people) and JSON (for tools).

JSON reports carry ``schema_version`` (``REPORT_SCHEMA_VERSION``) and ``kind`` ("run" or
"comparison"); they hold values and statistics, never sample text. Markdown reports are
the same content as tables. ``write_run_report`` writes a run's ``report.md`` and
``report.json`` beside its ``run.json``; ``write_comparison_report`` writes
``compare-<baseline>-<candidate>.md`` and ``.json`` into a folder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from evals.compare import Comparison, MetricComparison, comparison_summary, discordant_labels
from evals.gate import GateResult, RuleOutcome

REPORT_SCHEMA_VERSION = 1
RUN_REPORT_MARKDOWN = "report.md"
RUN_REPORT_JSON = "report.json"


def _number(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _signed(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:+.{digits}f}"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _dumps(value: Any) -> str:
    return json.dumps(_jsonable(value), indent=2, sort_keys=True, allow_nan=False) + "\n"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# -- a run -----------------------------------------------------------------------------


def run_json(record: Mapping[str, Any]) -> dict[str, Any]:
    """A run's report: identity, status, counts and each metric's value and details."""
    metrics = record.get("metrics") or {}
    suite = record.get("suite")
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "kind": "run",
        "generated_at": _now(),
        "run": {
            "id": record.get("id"),
            "status": record.get("status"),
            "error": record.get("error"),
            "suite": suite.get("name") if isinstance(suite, Mapping) else suite,
            "model": record.get("model"),
            "created_at": record.get("created_at"),
            "finished_at": record.get("finished_at"),
            "run_schema_version": record.get("schema_version"),
        },
        "counts": dict(record.get("counts") or {}),
        "metrics": {
            name: {
                "value": data.get("value"),
                "direction": data.get("direction"),
                "kind": data.get("kind"),
                "applicable": sum(v is not None for v in (data.get("per_sample") or {}).values()),
                "details": dict(data.get("details") or {}),
            }
            for name, data in sorted(metrics.items())
        },
    }


def run_markdown(record: Mapping[str, Any]) -> str:
    report = run_json(record)
    run = report["run"]
    lines = [
        f"# Eval run {run['id']}",
        "",
        f"- suite: {run['suite']}",
        f"- model: {run['model']}",
        f"- status: {run['status']}" + (f" ({run['error']})" if run["error"] else ""),
        f"- created: {run['created_at']}; finished: {run['finished_at'] or '-'}",
    ]
    counts = report["counts"]
    if counts:
        lines.append("- samples: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    lines += [
        "",
        "| metric | value | better | kind | applicable | aggregate |",
        "|---|---|---|---|---|---|",
    ]
    for name, data in report["metrics"].items():
        details = data["details"]
        lines.append(
            f"| {_cell(name)} | {_number(data['value'])} | {data['direction']} | {data['kind']} | "
            f"{data['applicable']} | {_cell(str(details.get('aggregate', 'mean')))} |"
        )
    per_category = [
        (name, data["details"]["per_category"])
        for name, data in report["metrics"].items()
        if isinstance(data["details"].get("per_category"), Mapping)
    ]
    for name, categories in per_category:
        lines += ["", f"{name} per Azure category:", ""]
        lines += ["| category | rate |", "|---|---|"]
        lines += [f"| {k} | {_number(v)} |" for k, v in sorted(categories.items())]
    return "\n".join(lines) + "\n"


def write_run_report(folder: Path, record: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.json`` for a run into its folder."""
    folder.mkdir(parents=True, exist_ok=True)
    markdown = folder / RUN_REPORT_MARKDOWN
    data = folder / RUN_REPORT_JSON
    _write(markdown, run_markdown(record))
    _write(data, _dumps(run_json(record)))
    return markdown, data


# -- a comparison ----------------------------------------------------------------------


def statistic(item: MetricComparison) -> str:
    """The test result in words: the McNemar p-value or the bootstrap interval."""
    if item.test == "mcnemar-exact" and item.discordant is not None:
        return f"p={item.p_value:.3g} (b={item.discordant[0]}, c={item.discordant[1]})"
    if item.test == "paired-bootstrap" and item.ci is not None:
        return f"{100 * item.confidence:g}% CI [{item.ci[0]:+.4f}, {item.ci[1]:+.4f}]"
    return "no paired samples"


def comparison_rows(comparison: Comparison, gate: GateResult | None = None) -> list[dict[str, str]]:
    """One row of formatted cells per metric: the table both the CLI and Markdown show."""
    verdicts: dict[str, list[RuleOutcome]] = {}
    for outcome in gate.outcomes if gate else ():
        verdicts.setdefault(outcome.rule.metric, []).append(outcome)
    rows = []
    for item in comparison.metrics:
        outcomes = verdicts.get(item.metric, [])
        rows.append(
            {
                "metric": item.metric,
                "better": item.direction.value,
                "baseline": _number(item.baseline),
                "candidate": _number(item.candidate),
                "delta": _signed(item.delta),
                "n": str(item.n_paired),
                "test": {"mcnemar-exact": "McNemar", "paired-bootstrap": "bootstrap"}.get(
                    item.test, "-"
                ),
                "statistic": statistic(item),
                "gate": (
                    "-"
                    if not outcomes
                    else "FAIL"
                    if any(not outcome.passed for outcome in outcomes)
                    else "pass"
                ),
            }
        )
    return rows


def comparison_json(comparison: Comparison, gate: GateResult | None = None) -> dict[str, Any]:
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "kind": "comparison",
        "generated_at": _now(),
        **comparison_summary(comparison),
        "gate": None if gate is None else gate.summary(),
        "passed": None if gate is None else gate.passed,
    }


def comparison_markdown(comparison: Comparison, gate: GateResult | None = None) -> str:
    lines = [
        f"# Compare {comparison.candidate_id} against {comparison.baseline_id}",
        "",
        f"- baseline: {comparison.baseline_id} ({comparison.baseline_model})",
        f"- candidate: {comparison.candidate_id} ({comparison.candidate_model})",
        "- delta: candidate - baseline of the values each run reports; binary metrics: "
        "McNemar's exact test on pairs that disagree (b: 1 -> 0, c: 0 -> 1); continuous: "
        f"paired bootstrap ({comparison.resamples} resamples, seed {comparison.seed}) "
        "of the mean per-sample difference",
    ]
    if gate is not None:
        lines.append(f"- gate: {gate.source}: **{'PASSED' if gate.passed else 'FAILED'}**")
    lines += [
        "",
        "| metric | better | baseline | candidate | delta | n paired | test | statistic | gate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in comparison_rows(comparison, gate):
        lines.append("| " + " | ".join(_cell(row[key]) for key in _COLUMNS) + " |")
    aggregates = [
        (item.metric, item.aggregate)
        for item in comparison.metrics
        if item.aggregate and not item.aggregate.startswith("mean")
    ]
    if aggregates:
        lines += ["", "Aggregates that are not per-sample means:", ""]
        lines += [f"- {name}: {_cell(text)}" for name, text in aggregates]
    binary = [item for item in comparison.metrics if item.discordant is not None]
    if binary:
        lines += ["", "Discordant pairs:", ""]
        for item in binary:
            first, second = discordant_labels(item.direction)
            b, c = item.discordant or (0, 0)
            lines.append(f"- {item.metric}: {b} {first}, {c} {second}")
    if gate is not None:
        lines += ["", "| rule | result | why |", "|---|---|---|"]
        for outcome in gate.outcomes:
            lines.append(
                f"| {_cell(outcome.rule.describe())} | {'pass' if outcome.passed else 'FAIL'} | "
                f"{_cell(outcome.reason)} |"
            )
    if comparison.only_baseline or comparison.only_candidate:
        lines += [""]
        if comparison.only_baseline:
            lines.append(f"- only in the baseline: {', '.join(comparison.only_baseline)}")
        if comparison.only_candidate:
            lines.append(f"- only in the candidate: {', '.join(comparison.only_candidate)}")
    return "\n".join(lines) + "\n"


_COLUMNS = ("metric", "better", "baseline", "candidate", "delta", "n", "test", "statistic", "gate")


def write_comparison_report(
    directory: Path, comparison: Comparison, gate: GateResult | None = None
) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"compare-{comparison.baseline_id}-{comparison.candidate_id}"
    markdown = directory / f"{stem}.md"
    data = directory / f"{stem}.json"
    _write(markdown, comparison_markdown(comparison, gate))
    _write(data, _dumps(comparison_json(comparison, gate)))
    return markdown, data


def _write(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
