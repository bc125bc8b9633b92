"""``safegate``: every package's commands under one root, each imported only when used.

The root names each top-level command, where it lives and its one-line help
(``COMMANDS``), so ``safegate --help`` lists them without importing a single package,
and ``safegate keys ...`` imports only the key commands, never torch or transformers.
``tests/test_cli.py`` checks that each line here matches the command's own help.
Nothing imports this module.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import typer
import typer.rich_utils
from typer._click.core import Command as ClickCommand  # typer's own copy of click
from typer._click.core import Context
from typer._click.exceptions import ClickException
from typer._click.formatting import HelpFormatter
from typer.core import TyperCommand, TyperGroup
from typer.exceptions import Abort

from safegate.offline import offline_defaults


@dataclass(frozen=True)
class Command:
    """A top-level command: ``module:attribute`` is a ``typer.Typer``; ``command`` names
    one of its commands (a flat command such as ``serve``), or is ``None`` when the whole
    app is the command group (``safegate finetune ...``)."""

    target: str
    help: str
    command: str | None = None

    def load(self, name: str) -> ClickCommand:
        """The command as ``add_typer`` mounted it: an app of one command stays a group."""
        module, attribute = self.target.split(":")
        mounted = typer.Typer()
        mounted.add_typer(
            getattr(importlib.import_module(module), attribute),
            name=None if self.command else name,
        )
        root = typer.main.get_command(mounted)
        found = (
            root.get_command(Context(root), self.command or name)
            if isinstance(root, TyperGroup)
            else None
        )
        if found is None:
            raise LookupError(f"{self.target} has no command {self.command or name!r}")
        return found


COMMANDS: dict[str, Command] = {
    "serve": Command(
        "gateway.cli:app", "Start the gateway (default http://127.0.0.1:8000).", "serve"
    ),
    "moderate": Command(
        "gateway.cli:app",
        "Check TEXT, or every line of --input, with the safety engine.",
        "moderate",
    ),
    "safety": Command("gateway.cli:safety", "Train and inspect the safety engine."),
    "keys": Command(
        "gateway.access.cli:keys", "Create, list and revoke API keys; quotas and usage."
    ),
    "finetune": Command("finetune.cli:app", "Fine-tune Phi-3 into LoRA adapters."),
    "models": Command("finetune.cli:models", "The model registry: list, deploy, delete."),
    "eval": Command("evals.cli:app", "Eval suites, runs and the release gate."),
    "dashboard": Command(
        "dashboard.cli:app",
        "Start the dashboard (default http://127.0.0.1:8501): compare, review, training, traffic.",
        "dashboard",
    ),
}


class LazyGroup(TyperGroup):
    """Loads a command's package when the command runs, not when help lists it."""

    listing = False

    def list_commands(self, ctx: Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: Context, cmd_name: str) -> ClickCommand | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        if self.listing:
            return TyperCommand(cmd_name, help=entry.help)
        return entry.load(cmd_name)

    def format_help(self, ctx: Context, formatter: HelpFormatter) -> None:
        self.listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self.listing = False


app = typer.Typer(cls=LazyGroup, no_args_is_help=True)


@app.callback()
def root() -> None:
    """safegate: safety-first content filter, fine-tuning and evaluation gateway."""


# Help fills the width of its output; piped (no terminal), rich would use 80 columns and
# cut option names. ``safegate.output.table_console`` does the same for tables.
PIPED_HELP_COLUMNS = 120


def fit_help_to_pipes(environ: Mapping[str, str], *, terminal: bool) -> None:
    """Unless output is a terminal or the user set a width, print help 120 wide."""
    if not terminal and "COLUMNS" not in environ and not environ.get("TERMINAL_WIDTH"):
        typer.rich_utils.MAX_WIDTH = PIPED_HELP_COLUMNS


def main() -> None:
    """Run the CLI; a usage error prints click's plain lines (usage, a hint, ``Error: ...``
    on a line of its own, greppable and unboxed) and exits 2."""
    fit_help_to_pipes(os.environ, terminal=sys.stdout.isatty())
    # Every command, not only those that remember to: ``keys create`` with a budget reads
    # litellm's prices, and litellm fetches them from the network at import without this.
    offline_defaults()
    try:
        code = app(standalone_mode=False)
    except ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except Abort:
        typer.echo("Aborted.", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
