"""``safegate finetune ...`` and ``safegate models ...``.

The command groups live in ``finetune.commands.apps``; each commands module registers its
commands on them, and importing the modules here registers every command, so
``safegate.cli`` mounts ``app`` and ``models`` from this module. Commands print a report
for bad input and exit non-zero; never a traceback.
"""

from __future__ import annotations

import finetune.commands.data  # noqa: F401 - importing registers its commands
import finetune.commands.models  # noqa: F401 - importing registers its commands
import finetune.commands.training  # noqa: F401 - importing registers its commands
from finetune.commands.apps import app, models

__all__ = ["app", "models"]
