"""``safegate``: mounts each package's commands. Nothing imports this module."""

from __future__ import annotations

import typer

from gateway.cli import app as gateway_app

app = typer.Typer(
    no_args_is_help=True,
    help="safegate: safety-first content filter, fine-tuning and evaluation gateway.",
)
app.add_typer(gateway_app)


def main() -> None:
    app()
