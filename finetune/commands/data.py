"""``safegate finetune validate FILE``: check a chat-completion JSONL file before training.

Problems print as ``line N: ...``, then a summary table; exit 1 on errors, 0 otherwise,
2 when ``--base`` names a tokenizer that cannot be loaded. With ``--base`` lengths are
tokens of that base's tokenizer; without it, characters.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from finetune.commands.apps import app
from finetune.errors import BaseModelError, NotABase
from finetune.validation import (
    DEFAULT_MAX_SEQ_LENGTH,
    ChatTokenizer,
    ValidationReport,
    validate_file,
)
from safegate.offline import offline_defaults
from safegate.output import table_console

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_NO_TOKENIZER = 2
_TRUE = {"1", "true", "yes", "on"}


@app.command()
def validate(
    file: Annotated[
        Path,
        typer.Argument(
            metavar="FILE",
            help="Chat-completion JSONL file.",
            show_default=False,
            exists=True,
            dir_okay=False,
        ),
    ],
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="Count tokens with this base's tokenizer: a registered model name, a local "
            "folder, or a hub id (offline: only if cached).",
        ),
    ] = None,
    max_seq_length: Annotated[
        int, typer.Option(min=1, help="Examples longer than this many tokens are reported.")
    ] = DEFAULT_MAX_SEQ_LENGTH,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check FILE's format, count examples and tokens, and name every bad line."""
    offline_defaults()
    tokenizer: ChatTokenizer | None = None
    if base is not None:
        try:
            tokenizer = load_tokenizer(base)
        except BaseModelError as error:
            Console(stderr=True).print(str(error), markup=False, highlight=False, style="red")
            raise typer.Exit(EXIT_NO_TOKENIZER) from None
    report = validate_file(file, tokenizer=tokenizer, max_seq_length=max_seq_length)
    if as_json:
        typer.echo(report.to_json())
    else:
        _print_report(report, base=base)
    raise typer.Exit(EXIT_OK if report.ok else EXIT_INVALID)


def load_tokenizer(base: str) -> ChatTokenizer:
    """The tokenizer of a base: registry name, local folder or hub id; BaseModelError if not."""
    source = tokenizer_location(base)
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE
    try:
        from transformers import AutoTokenizer

        tokenizer: ChatTokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
    except Exception as error:  # transformers raises OSError, ValueError, ...: all mean "cannot"
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        where = f"{base!r}" if source == base else f"{base!r} (at {source})"
        if source == base and not Path(base).expanduser().exists():
            where += ", which is not a local folder or a registered model"
        hint = (
            "Pass a local folder that holds the base's tokenizer files, or a name from "
            "'safegate models list'"
        )
        if offline:
            hint += "; HF_HUB_OFFLINE=1, so hub ids load only from the local cache"
        raise BaseModelError(
            f"cannot load the tokenizer of base {where}: {reason}\n{hint}."
        ) from None
    return tokenizer


def tokenizer_location(base: str) -> str:
    """Where the tokenizer of ``base`` loads from (``finetune.registry.resolve_base``).

    A local folder or hub id needs no registry; a plain name is looked up in it, unless
    it was never created. An adapter's name counts with its base's tokenizer.
    """
    from finetune.registry import NAME, resolve_base

    if Path(base).expanduser().exists() or not NAME.match(base):
        return resolve_base(base, registry=None).location
    from sqlalchemy.exc import SQLAlchemyError

    from finetune.db import Database
    from finetune.registry import ModelRegistry
    from finetune.settings import get_settings

    settings = get_settings()
    database = Database(settings.database, timeouts=settings.database_timeouts)
    registry = ModelRegistry(database)
    try:
        try:
            return resolve_base(base, registry=registry).location
        except NotABase as adapter:
            return resolve_base(adapter.base, registry=registry).location
    except SQLAlchemyError:  # no registry yet (never migrated): the name is not registered
        return resolve_base(base, registry=None).location
    finally:
        database.dispose()


def _print_report(report: ValidationReport, *, base: str | None) -> None:
    console = table_console()
    if report.issues:
        console.print(Text(f"{len(report.issues)} error(s):", style="bold red"))
        for issue in report.issues:
            console.print(Text(str(issue), style="red"), soft_wrap=True)
    if report.warnings:
        console.print(Text(f"{len(report.warnings)} warning(s):", style="bold yellow"))
        for warning in report.warnings:
            console.print(Text(str(warning), style="yellow"), soft_wrap=True)
    table = Table(title=Text("validation summary"), show_header=False)
    table.add_column("", style="bold", no_wrap=True)
    table.add_column("", overflow="fold")
    for name, value in report.summary_rows():
        if name == "tokens" and base is None:
            value = "not counted: pass --base BASE to count them"
        table.add_row(Text(name), Text(value, overflow="fold"))
    if base is not None:
        table.add_row(Text("tokenizer"), Text(base))
    console.print(table)
    if report.ok:
        console.print(Text(f"OK: {report.path} is ready for fine-tuning", style="green"))
    else:
        console.print(
            Text(f"FAILED: {len(report.issues)} error(s) in {report.path}", style="bold red")
        )
