"""The harness's settings: the same ``SAFEGATE_*`` variables every package reads.

Runs are stored in the project's database and, as files, under ``SAFEGATE_HOME/evals``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from safegate.database import StorageSettings


class EvalSettings(StorageSettings):
    @property
    def runs_dir(self) -> Path:
        """One folder per run: run.json, samples.jsonl, report.md, report.json."""
        return self.home_dir / "evals"


@lru_cache
def get_settings() -> EvalSettings:
    return EvalSettings()
