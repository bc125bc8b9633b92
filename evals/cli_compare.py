"""``safegate eval compare BASELINE CANDIDATE [--gate GATE.yaml]``: deltas, statistics, gate.

Prints one row per metric the two runs share: both values, the change, the number of
paired samples, and McNemar's exact p-value (binary metrics) or the paired bootstrap
interval of the mean difference (continuous ones). With gate rules, from ``--gate`` or
else the gate file the candidate's suite names, each rule passes or fails.

Exit codes: 0 when every gate rule passes (or there are none), 1 when any fails, 2 on a
usage error: an unknown run id, a run that did not succeed, an unreadable or invalid
gate file, a rule on a metric the runs lack. ``--json`` prints the JSON report on
stdout instead of the table; ``--report-dir`` also writes Markdown and JSON reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from evals.compare import DEFAULT_RESAMPLES, DEFAULT_SEED, Comparison, compare_runs
from evals.errors import EvalError
from evals.gate import GateResult, Rule, check_gate, load_gate
from evals.report import (
    comparison_json,
    comparison_rows,
    write_comparison_report,
)
from safegate.output import table_console

GATE_PASSED = 0
GATE_FAILED = 1
USAGE_ERROR = 2

_stderr = Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int = USAGE_ERROR) -> NoReturn:
    _stderr.print(f"[red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def load_records(baseline: str, candidate: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both run records from the run store; ``EvalError`` for an unknown id."""
    from evals.runs import open_store

    with open_store() as store:
        return store.get(baseline).record(), store.get(candidate).record()


def compare(
    baseline: Annotated[str, typer.Argument(help="The baseline run id ('safegate eval list').")],
    candidate: Annotated[str, typer.Argument(help="The candidate run id.")],
    gate: Annotated[
        Path | None,
        typer.Option(
            help="Gate rules (YAML). Default: the gate file the candidate's suite names, if any."
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the JSON report instead of the table.")
    ] = False,
    report_dir: Annotated[
        Path | None,
        typer.Option(help="Also write compare-<baseline>-<candidate>.md and .json here."),
    ] = None,
    resamples: Annotated[
        int, typer.Option(min=100, help="Bootstrap resamples for continuous metrics.")
    ] = DEFAULT_RESAMPLES,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = DEFAULT_SEED,
) -> None:
    """Compare a candidate run with a baseline run; exit 1 when a gate rule fails."""
    try:
        base, cand = load_records(baseline, candidate)
    except EvalError as exc:
        _fail(str(exc))
    for role, record in (("baseline", base), ("candidate", cand)):
        if record.get("status") != "succeeded":
            error = f": {record['error']}" if record.get("error") else ""
            _fail(
                f"{role} run {record.get('id')} is {record.get('status')}{error}; "
                "compare runs that succeeded"
            )
    if _suite_name(base) != _suite_name(cand):
        _stderr.print(
            f"[yellow]warning:[/] the runs come from different suites "
            f"({escape(_suite_name(base))} and {escape(_suite_name(cand))}); "
            "only samples with the same id are paired"
        )
    rules, source = _rules(gate, cand)
    try:
        comparison = compare_runs(base, cand, resamples=resamples, seed=seed)
        if not comparison.metrics:
            _fail(f"runs {baseline} and {candidate} have no metric in common")
        result = check_gate(rules, comparison, source=source) if rules else None
    except EvalError as exc:
        _fail(str(exc))
    if as_json:
        from evals.runs import dumps

        typer.echo(dumps(comparison_json(comparison, result), indent=2))
    else:
        _print_table(comparison, result)
    if report_dir is not None:
        markdown, data = write_comparison_report(report_dir, comparison, result)
        _stderr.print(f"reports: {escape(str(markdown))}, {escape(str(data))}")
    if result is not None and not result.passed:
        failed = ", ".join(outcome.rule.metric for outcome in result.failed)
        _stderr.print(f"[red]gate failed:[/] {escape(failed)}")
        raise typer.Exit(GATE_FAILED)
    raise typer.Exit(GATE_PASSED)


def _suite_name(record: dict[str, Any]) -> str:
    suite = record.get("suite")
    return str(suite.get("name") if isinstance(suite, dict) else suite)


def _rules(gate: Path | None, candidate: dict[str, Any]) -> tuple[tuple[Rule, ...], str]:
    path = gate
    if path is None:
        configured = (candidate.get("config") or {}).get("gate")
        if not configured:
            return (), ""
        path = Path(configured)
    try:
        return load_gate(path), str(path)
    except EvalError as exc:
        _fail(str(exc))


def _print_table(comparison: Comparison, result: GateResult | None) -> None:
    table = Table(
        "metric",
        "better",
        "baseline",
        "candidate",
        "delta",
        "n",
        "test",
        "p-value / CI",
        "gate",
        title=f"{comparison.candidate_id} ({escape(comparison.candidate_model)}) against "
        f"{comparison.baseline_id} ({escape(comparison.baseline_model)})",
    )
    for row in comparison_rows(comparison, result):
        gate_cell = {"FAIL": "[red]FAIL[/]", "pass": "[green]pass[/]"}.get(row["gate"], "-")
        table.add_row(
            escape(row["metric"]),
            row["better"],
            row["baseline"],
            row["candidate"],
            row["delta"],
            row["n"],
            row["test"],
            escape(row["statistic"]),
            gate_cell,
        )
    console = table_console()  # CI logs and pipes: one metric per line
    console.print(table)
    if result is not None:
        for outcome in result.outcomes:
            mark = "[green]pass[/]" if outcome.passed else "[red]FAIL[/]"
            console.print(
                f"{mark} {escape(outcome.rule.describe())}: {escape(outcome.reason)}",
                highlight=False,
            )
        verdict = "[green]gate passed[/]" if result.passed else "[red]gate failed[/]"
        console.print(f"{verdict} ({escape(result.source)})")


def register(app: typer.Typer) -> None:
    """Add ``compare`` to the ``safegate eval`` app."""
    app.command("compare")(compare)
