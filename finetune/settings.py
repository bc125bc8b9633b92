"""Fine-tuning settings: the same ``SAFEGATE_*`` variables the gateway reads.

``finetune`` imports none of the other packages; the shared variables
(``SAFEGATE_HOME``, ``SAFEGATE_DATABASE_URL``) come from ``safegate.database.StorageSettings``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from safegate.settings import SharedSettings

DEFAULT_BASE_MODEL = "microsoft/Phi-3-mini-4k-instruct"
DEMO_BASE = "demo-base"


class FinetuneSettings(SharedSettings):
    @property
    def models_dir(self) -> Path:
        """Bases built locally (the demo base) and trained adapters live here."""
        return self.home_dir / "models"

    @property
    def jobs_dir(self) -> Path:
        """One folder per training job: checkpoints, results.csv, logs."""
        return self.home_dir / "jobs"


@lru_cache
def get_settings() -> FinetuneSettings:
    return FinetuneSettings()
