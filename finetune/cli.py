"""``safegate finetune ...`` and ``safegate models ...``.

Each commands module registers its commands on these two apps; ``safegate.cli`` mounts
them. Commands print a report for bad input and exit non-zero; never a traceback.
"""

from __future__ import annotations

import os

import typer

app = typer.Typer(no_args_is_help=True, help="Fine-tune Phi-3 into LoRA adapters.")
models = typer.Typer(no_args_is_help=True, help="The model registry: list, deploy, delete.")


def offline_defaults() -> None:
    """Never reach for the network unless the user asked for a hub id."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Registering commands: importing these modules adds their commands to the apps above.
import finetune.commands.data  # noqa: E402,F401
import finetune.commands.models  # noqa: E402,F401
import finetune.commands.training  # noqa: E402,F401
