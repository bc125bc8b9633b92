"""Fine-tuning's tables (jobs, models) in the project's database, with their own migrations.

The tables live in the same database as the gateway's (``SAFEGATE_DATABASE_URL``, SQLite
under ``SAFEGATE_HOME`` by default) but under their own Alembic history
(``finetune/migrations``, version table ``alembic_version_finetune``), because
``finetune`` imports nothing from the gateway. Engine and session handling are shared
(``safegate.database``).
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import DeclarativeBase

from safegate import database, settings

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "alembic_version_finetune"


class Base(DeclarativeBase):
    """Declarative base of fine-tuning's tables."""


class Database(database.Database):
    def __init__(
        self, url: str, *, timeouts: settings.DatabaseTimeouts = settings.DEFAULT_TIMEOUTS
    ) -> None:
        super().__init__(url, migrations=MIGRATIONS, timeouts=timeouts)
