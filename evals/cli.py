"""``safegate eval run|list|show`` (and ``compare``, registered by ``evals.cli_compare``).

``run`` prints its progress and messages on stderr and each run's id alone on a stdout
line, the last line the last run's, so ``RUN=$(safegate eval run suite.yaml | tail -1)``
works. Exit codes: 0 when every run succeeded, 1 when one failed (its record says why),
2 on a usage error (a bad suite, dataset, metric or model, an unknown run id), found before
any model is called. Nothing prints a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from evals.errors import EvalError
from evals.runs import Run, RunStatus, RunStore, dumps
from evals.settings import get_settings
from evals.suite import MAX_CONCURRENCY
from safegate.offline import offline_defaults
from safegate.output import table_console

if TYPE_CHECKING:
    from evals.cache import CallCache

USAGE_ERROR = 2
RUN_FAILED = 1
INTERRUPTED = 130

app = typer.Typer(no_args_is_help=True, help="Eval suites, runs and the release gate.")
console = Console(stderr=True, soft_wrap=True)  # messages stay whole for copy and grep

RunIdArgument = Annotated[str, typer.Argument(help="A run id ('safegate eval list').")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _fail(message: str, code: int) -> NoReturn:
    console.print(f"[red]error:[/] {escape(message)}")
    raise typer.Exit(code)


@contextmanager
def open_storage() -> Iterator[tuple[RunStore, CallCache]]:
    """The run store and call cache on the configured database (migrated)."""
    from evals.cache import CallCache  # the model clients (openai) load with it
    from evals.db import Database

    settings = get_settings()
    database = Database(settings.database, timeouts=settings.database_timeouts)
    try:
        database.migrate()
        yield RunStore(database, runs_dir=settings.runs_dir), CallCache(database)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or type(exc).__name__)
        _fail(f"cannot use the database ({type(exc).__name__}: {reason})", RUN_FAILED)
    finally:
        database.dispose()


@app.command()
def run(
    suite: Annotated[Path, typer.Argument(help="The suite's YAML file.")],
    model: Annotated[
        str | None,
        typer.Option(
            help="Run only this model of the suite; gateway:NAME or litellm:MODEL runs "
            "another one with the suite's settings."
        ),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(min=1, max=MAX_CONCURRENCY, help="Calls in flight (default: the suite's)."),
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(help="Continue this interrupted run: only the missing samples are called."),
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Call the model even for cached calls.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
    base_url: Annotated[
        list[str] | None,
        typer.Option(
            "--base-url",
            metavar="[MODEL=]URL",
            help="Where the gateway is, for every via: gateway model (over $SAFEGATE_BASE_URL "
            "and the suite); MODEL=URL moves one model, litellm ones included. Repeatable.",
        ),
    ] = None,
) -> None:
    """Run a suite; prints each run's id on its own stdout line."""
    offline_defaults()  # a suite's Hugging Face datasets need HF_HUB_OFFLINE=0
    from evals.endpoints import parse_endpoints

    try:
        endpoints = parse_endpoints(base_url or (), environ_value=get_settings().base_url)
    except EvalError as exc:
        _fail(str(exc), USAGE_ERROR)
    failed = False
    with open_storage() as (store, cache):
        from evals.runner import Runner

        runner = Runner(store, cache, console=console, progress=progress)
        try:
            plans = runner.prepare(
                suite, model=model, concurrency=concurrency, resume=resume, endpoints=endpoints
            )
        except EvalError as exc:
            _fail(str(exc), USAGE_ERROR)
        for plan in plans:
            try:
                result = runner.execute(plan, use_cache=not no_cache)
            except KeyboardInterrupt:
                raise typer.Exit(INTERRUPTED) from None
            except EvalError as exc:  # e.g. the run to resume is running elsewhere
                _fail(str(exc), USAGE_ERROR)
            _print_outcome(result)
            typer.echo(result.id)
            failed = failed or result.status is not RunStatus.SUCCEEDED
    if failed:
        raise typer.Exit(RUN_FAILED)


def _print_outcome(run: Run) -> None:
    counts = run.counts
    colour = "green" if run.status is RunStatus.SUCCEEDED else "red"
    console.print(
        f"[{colour}]{run.status.value}[/] {run.id}: {counts.get('samples', 0)} samples, "
        f"{counts.get('called', 0)} called, {counts.get('cached', 0)} cached, "
        f"{counts.get('errors', 0)} errors, {counts.get('filtered_prompt', 0)} prompts and "
        f"{counts.get('filtered_completion', 0)} completions filtered"
    )
    for name, scores in sorted(run.metrics.items()):
        console.print(f"  {escape(name)} = {_number(scores.get('value'))}", highlight=False)
    if run.error:
        console.print(f"  [red]error:[/] {escape(run.error)}")


@app.command("list")
def list_runs(as_json: JsonOption = False) -> None:
    """List runs, newest first (id, suite, model, created, status)."""
    with open_storage() as (store, _):
        runs = store.list()
    if as_json:
        typer.echo(json.dumps([item.summary() for item in runs], indent=2))
        return
    if not runs:
        console.print("no runs yet; 'safegate eval run SUITE.yaml' makes one")
        return
    table = Table("id", "suite", "model", "created", "status")
    for item in runs:
        colour = {"succeeded": "green", "failed": "red"}.get(item.status.value, "yellow")
        table.add_row(
            item.id,
            escape(item.suite),
            escape(item.model),
            item.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            f"[{colour}]{item.status.value}[/]",
        )
    table_console().print(table)


@app.command()
def show(run_id: RunIdArgument, as_json: JsonOption = False) -> None:
    """Show a run: its suite, model, counts, metrics and error."""
    with open_storage() as (store, _):
        try:
            found = store.get(run_id)
        except EvalError as exc:
            _fail(str(exc), USAGE_ERROR)
        folder = store.run_dir(found.id)
    if as_json:
        typer.echo(dumps(found.record(), indent=2))
        return
    counts = ", ".join(f"{key} {value}" for key, value in sorted(found.counts.items()))
    finished = found.finished_at.isoformat(timespec="seconds") if found.finished_at else "-"
    lines = [
        f"{found.id}  {found.status.value}",
        f"  suite     {found.suite} ({found.suite_path}, sha256 {found.suite_sha256[:12]})",
        f"  model     {found.model}",
        f"  created   {found.created_at.isoformat(timespec='seconds')}",
        f"  finished  {finished}",
        f"  samples   {counts or '-'}",
        f"  error     {found.error or '-'}",
        f"  files     {folder}",
    ]
    typer.echo("\n".join(lines))
    if found.metrics:
        table = Table("metric", "value", "direction", "kind", "applicable")
        for name, scores in sorted(found.metrics.items()):
            per_sample = scores.get("per_sample", {})
            applicable = sum(value is not None for value in per_sample.values())
            table.add_row(
                escape(name),
                _number(scores.get("value")),
                str(scores.get("direction", "-")),
                str(scores.get("kind", "-")),
                f"{applicable}/{len(per_sample)}",
            )
        table_console().print(table)


def _number(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


# Commands defined in other modules register on ``app`` when imported here.
from evals.cli_compare import register as _register_compare  # noqa: E402 - needs ``app``

_register_compare(app)
