"""The gateway's tables: their declarative base, shared column types and Alembic history.

SQLite under ``SAFEGATE_HOME`` by default, PostgreSQL (or any SQLAlchemy URL) through
``SAFEGATE_DATABASE_URL``. The schema is owned by Alembic (``gateway/migrations``):
``Database.migrate()`` upgrades to head at start-up, and tables are never created any
other way. Engine and session handling are shared (``safegate.database``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import DateTime, Dialect
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator

from safegate import database, settings

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


class Base(DeclarativeBase):
    """Declarative base of every table the gateway owns."""


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores no offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("timestamps must be timezone-aware")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Database(database.Database):
    def __init__(
        self, url: str, *, timeouts: settings.DatabaseTimeouts = settings.DEFAULT_TIMEOUTS
    ) -> None:
        super().__init__(url, migrations=MIGRATIONS, timeouts=timeouts)
