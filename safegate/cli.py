"""``safegate``: mounts each package's commands. Nothing imports this module."""

from __future__ import annotations

import typer

from dashboard.cli import app as dashboard_app
from evals.cli import app as eval_app
from finetune.cli import app as finetune_app
from finetune.cli import models as models_app
from gateway.cli import app as gateway_app

app = typer.Typer(
    no_args_is_help=True,
    help="safegate: safety-first content filter, fine-tuning and evaluation gateway.",
)
app.add_typer(gateway_app)
app.add_typer(finetune_app, name="finetune")
app.add_typer(models_app, name="models")
app.add_typer(eval_app, name="eval")
app.add_typer(dashboard_app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
