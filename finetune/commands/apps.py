"""The two command groups the ``commands`` modules register on: ``safegate finetune ...``
and ``safegate models ...`` (``finetune.cli`` imports the modules, so each registers)."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, help="Fine-tune Phi-3 into LoRA adapters.")
models = typer.Typer(no_args_is_help=True, help="The model registry: list, deploy, delete.")
