"""Database plumbing every package shares: engine set-up, sessions, Alembic upgrades.

Each package owns its tables and its own Alembic history (``gateway/migrations`` with the
default version table, ``finetune/migrations`` with ``alembic_version_finetune``), and
subclasses ``Database`` to name them. SQLite runs in WAL mode with foreign keys on, so
readers (the dashboard) never block the gateway's writes; any other SQLAlchemy URL
(PostgreSQL) gets a pre-pinging pool.

The state is private to the user who runs safegate: the database holds raw flagged text.
``StorageSettings.ensure_home()`` creates ``SAFEGATE_HOME`` mode 0700, and tightens an
existing one that group or others may enter (logging that it did; if it cannot, it
raises). A SQLite database file is created mode 0600 before SQLite opens it, and every new
connection tightens it and its ``-wal``, ``-shm`` and ``-journal`` files to 0600 if they
are looser (SQLite gives the files it creates the database file's mode, so a 0600 database
gets 0600 side files). The process umask is never changed.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import Connection, Engine, MetaData, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("safegate.storage")

SQLITE_BUSY_TIMEOUT_MS = 5_000
DATABASE_FILE = "safegate.db"
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
# What SQLite writes beside a database file in WAL (and rollback-journal) mode.
SQLITE_SIDE_SUFFIXES = ("-wal", "-shm", "-journal")
_GROUP_AND_OTHERS = 0o077


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

    def ensure_home(self) -> Path:
        """Create ``SAFEGATE_HOME`` private (0700), or tighten it; return it."""
        return private_directory(self.home_dir, what="SAFEGATE_HOME")


def private_directory(path: Path, *, what: str = "state directory") -> Path:
    """Create ``path`` mode 0700, or tighten it to 0700 when group or others have any access.

    Raises ``PermissionError`` naming ``what`` when a loose directory cannot be tightened
    (it belongs to someone else): state is never kept where others can read it.
    """
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & _GROUP_AND_OTHERS:
        try:
            os.chmod(path, PRIVATE_DIR_MODE)
        except PermissionError as error:
            raise PermissionError(
                f"{what} {path} is open to other users (mode {mode:04o}) and cannot be "
                f"tightened to {PRIVATE_DIR_MODE:04o}: {error.strerror}; choose a directory "
                "you own"
            ) from None
        log.warning(
            "state directory was open to other users; tightened",
            extra={"path": str(path), "mode_was": f"{mode:04o}", "mode": "0700"},
        )
    return path


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; ``None`` for another backend or an in-memory one."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def make_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    path = sqlite_file(url)
    if path is not None:
        if not path.parent.exists():
            path.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        _create_private(path)
    engine = create_engine(url, connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(connection: Any, _record: Any) -> None:
        if path is not None:
            _tighten(path)  # before WAL mode creates -wal and -shm with the file's mode
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()
        if path is not None:
            for suffix in SQLITE_SIDE_SUFFIXES:
                _tighten(path.with_name(path.name + suffix))

    return engine


def _create_private(path: Path) -> None:
    """Create an empty database file mode 0600 unless it exists (SQLite would use 0644)."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        return
    os.close(descriptor)


def _tighten(path: Path) -> None:
    """Make an existing file 0600 if group or others may read or write it."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if mode & _GROUP_AND_OTHERS:
        os.chmod(path, PRIVATE_FILE_MODE)
        log.warning(
            "database file was open to other users; tightened",
            extra={"path": str(path), "mode_was": f"{mode:04o}", "mode": "0600"},
        )


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
