"""``safegate finetune ...`` and ``safegate models ...``.

Each commands module registers its commands on these two apps; ``safegate.cli`` mounts
them. Commands print a report for bad input and exit non-zero; never a traceback.
"""

from __future__ import annotations

import typer

from safegate.offline import offline_defaults as offline_defaults  # the commands import it

app = typer.Typer(no_args_is_help=True, help="Fine-tune Phi-3 into LoRA adapters.")
models = typer.Typer(no_args_is_help=True, help="The model registry: list, deploy, delete.")


# Registering commands: importing these modules adds their commands to the apps above.
import finetune.commands.data  # noqa: E402,F401
import finetune.commands.models  # noqa: E402,F401
import finetune.commands.training  # noqa: E402,F401
