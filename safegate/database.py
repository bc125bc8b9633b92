"""Database plumbing every package shares: engine set-up, sessions, Alembic upgrades.

Each package owns its tables and its own Alembic history (``gateway/migrations`` with the
default version table, ``finetune/migrations`` with ``alembic_version_finetune``), and
subclasses ``Database`` to name them. SQLite runs in WAL mode with foreign keys on, so
readers (the dashboard) never block the gateway's writes; any other SQLAlchemy URL
(PostgreSQL) gets a pre-pinging pool.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import Connection, Engine, MetaData, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 5_000
DATABASE_FILE = "safegate.db"


class StorageSettings(BaseSettings):
    """Where state lives, read by every package: ``SAFEGATE_HOME`` and ``SAFEGATE_DATABASE_URL``."""

    model_config = SettingsConfigDict(env_prefix="SAFEGATE_", extra="ignore")

    home: Path = Field(default=Path("~/.safegate"))
    database_url: str | None = None

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser()

    @property
    def database(self) -> str:
        """The configured SQLAlchemy URL, or the SQLite file every package shares."""
        return self.database_url or f"sqlite:///{self.home_dir / DATABASE_FILE}"


def make_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    database = url.split("///", 1)[-1]
    if database and database != ":memory:":
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    return engine


class Database:
    """One engine and a session factory for a URL, and the owner's migrations."""

    def __init__(self, url: str, *, migrations: Path) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.migrations = migrations
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self) -> None:
        """Upgrade the owner's tables to their newest Alembic revision."""
        config = Config()
        config.set_main_option("script_location", str(self.migrations))
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def dispose(self) -> None:
        self.engine.dispose()


def run_migrations(metadata: MetaData, *, version_table: str = "alembic_version") -> None:
    """The body of every package's Alembic ``env.py``.

    Runs on the connection ``Database.migrate`` hands over, or on ``sqlalchemy.url`` when
    Alembic's own command line calls it. Batch mode, because SQLite alters tables only by
    copying them. Each package keeps its own history under its own ``version_table``.
    """
    from alembic import context

    def migrate(connection: Connection) -> None:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            version_table=version_table,
            render_as_batch=True,
        )
        with context.begin_transaction():
            context.run_migrations()

    connection = context.config.attributes.get("connection")
    if connection is not None:
        migrate(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("alembic needs a connection or sqlalchemy.url")
    with create_engine(url).begin() as own:
        migrate(own)
