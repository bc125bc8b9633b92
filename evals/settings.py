"""The harness's settings: the same ``SAFEGATE_*`` variables every package reads.

Runs are stored in the project's database and, as files, under ``SAFEGATE_HOME/evals``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field

from safegate.settings import StorageSettings


class EvalSettings(StorageSettings):
    # SAFEGATE_BASE_URL: the gateway's address for every ``via: gateway`` model of a run,
    # over the suite's own; ``--base-url`` wins over it (``evals.endpoints``). Checked there,
    # so a malformed value is one line naming the variable, not a settings traceback.
    base_url: str | None = Field(
        default=None, description="the gateway's base URL for eval runs (over the suite's)"
    )

    @property
    def runs_dir(self) -> Path:
        """One folder per run: run.json, samples.jsonl, report.md, report.json."""
        return self.home_dir / "evals"


@lru_cache
def get_settings() -> EvalSettings:
    return EvalSettings()
