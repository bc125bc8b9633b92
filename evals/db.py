"""The harness's tables (runs, samples, the call cache) in the project's database.

They live in the same database as the gateway's (``SAFEGATE_DATABASE_URL``, SQLite under
``SAFEGATE_HOME`` by default) under their own Alembic history (``evals/migrations``,
version table ``alembic_version_evals``), as fine-tuning's do. Engine and session
handling are shared (``safegate.database``).
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import DeclarativeBase

from safegate import database, settings

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "alembic_version_evals"


class Base(DeclarativeBase):
    """Declarative base of the harness's tables."""


class Database(database.Database):
    def __init__(
        self, url: str, *, timeouts: settings.DatabaseTimeouts = settings.DEFAULT_TIMEOUTS
    ) -> None:
        super().__init__(url, migrations=MIGRATIONS, timeouts=timeouts)
