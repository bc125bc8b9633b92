"""Fine-tuning settings: the same ``SAFEGATE_*`` variables the gateway reads.

``finetune`` imports none of the other packages, so it reads the shared variables
(``SAFEGATE_HOME``, ``SAFEGATE_DATABASE_URL``) itself.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from safegate.database import database_url

DEFAULT_BASE_MODEL = "microsoft/Phi-3-mini-4k-instruct"
DEMO_BASE = "demo-base"
DEFAULT_SERVE_PORT = 8001


class FinetuneSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAFEGATE_", extra="ignore")

    home: Path = Field(default=Path("~/.safegate"))
    database_url: str | None = None

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser()

    @property
    def database(self) -> str:
        return database_url(self.home_dir, self.database_url)

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
