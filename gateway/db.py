"""The gateway's tables: their declarative base and Alembic history.

SQLite under ``SAFEGATE_HOME`` by default, PostgreSQL (or any SQLAlchemy URL) through
``SAFEGATE_DATABASE_URL``. The schema is owned by Alembic (``gateway/migrations``):
``Database.migrate()`` upgrades to head at start-up, and tables are never created any
other way. Engine and session handling are shared (``safegate.database``).
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import DeclarativeBase

from safegate import database

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


class Base(DeclarativeBase):
    """Declarative base of every table the gateway owns."""


class Database(database.Database):
    def __init__(
        self, url: str, *, timeouts: database.DatabaseTimeouts = database.DEFAULT_TIMEOUTS
    ) -> None:
        super().__init__(url, migrations=MIGRATIONS, timeouts=timeouts)
