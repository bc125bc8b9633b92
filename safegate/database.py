"""Database plumbing every package shares: engine set-up, sessions, Alembic upgrades.

Each package owns its tables and its own Alembic history (``gateway/migrations`` with the
default version table, ``finetune/migrations`` with ``alembic_version_finetune``), and
subclasses ``Database`` to name them. SQLite runs in WAL mode with foreign keys on, so
readers (the dashboard) never block the gateway's writes; any other SQLAlchemy URL
(PostgreSQL) gets a pre-pinging pool.

The state is private to the user who runs safegate: the database holds raw flagged text.
``StorageSettings.ensure_home()`` (``safegate.settings``) creates ``SAFEGATE_HOME`` mode
0700, and tightens an existing one that group or others may enter (logging that it did; if
it cannot, it raises). A SQLite database file is created mode 0600 before SQLite opens it,
and every new connection tightens it and its ``-wal``, ``-shm`` and ``-journal`` files to
0600 if they are looser (SQLite gives the files it creates the database file's mode, so a
0600 database gets 0600 side files). The process umask is never changed.

Timeouts
    Waits on the database are bounded (``DatabaseTimeouts``; settings
    ``SAFEGATE_DATABASE_CONNECT_TIMEOUT_S``, 5 s, and
    ``SAFEGATE_DATABASE_STATEMENT_TIMEOUT_S``, 10 s). On PostgreSQL (psycopg or psycopg2,
    both libpq) the connect timeout is libpq's ``connect_timeout`` (whole seconds, at least
    2: libpq's floor) and also bounds the wait for a pooled connection (``pool_timeout``);
    the statement timeout is the server's ``statement_timeout``, sent as a start-up
    ``options`` ``-c`` setting ahead of any ``options`` the URL carries (a URL's own
    ``connect_timeout`` or ``statement_timeout`` wins), and also libpq's
    ``tcp_user_timeout``, so a connection to a host that stopped answering fails instead of
    waiting out TCP's retransmissions. A statement that runs past the limit is cancelled by
    the server and raises ``sqlalchemy.exc.OperationalError``. Behind PgBouncer, list
    ``options`` in its ``ignore_startup_parameters`` and set ``statement_timeout`` on the
    role. SQLite has no server and no statement timeout: the connect timeout is its busy
    timeout (how long a statement waits for another connection's lock) and bounds the wait
    for a pooled connection. ``Database.migrate`` lifts the statement timeout to
    ``DEFAULT_MIGRATION_STATEMENT_TIMEOUT_S`` for the upgrade's own transaction: a schema
    change on a large table may rightly take longer than any request should.

    A server process frozen mid-statement (stopped, a paused container) on a host whose
    kernel still acknowledges packets runs no timeout and TCP sees nothing wrong, so on
    PostgreSQL every call that waits for the server also has a client-side deadline
    (``SAFEGATE_DATABASE_DEADLINE_S``; unset, the statement timeout plus
    ``DEFAULT_DEADLINE_MARGIN_S``, 2 s, so a statement the server would cancel is left to
    the server). Past it the connection is cut and closed, never returned to the pool, and
    the call raises ``sqlalchemy.exc.OperationalError`` as a lost connection does;
    ``safegate.deadline`` says how. ``Database.migrate`` lifts the deadline with the
    statement timeout. SQLite runs in-process: no server can freeze, and its lock waits
    end at the busy timeout.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, MetaData, create_engine, event, make_url, text
from sqlalchemy.orm import Session, sessionmaker

from safegate import deadline
from safegate.settings import (
    DEFAULT_DEADLINE_MARGIN_S,
    DEFAULT_TIMEOUTS,
    DatabaseTimeouts,
)

log = logging.getLogger("safegate.storage")

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
# What SQLite writes beside a database file in WAL (and rollback-journal) mode.
SQLITE_SIDE_SUFFIXES = ("-wal", "-shm", "-journal")
# WAL with synchronous=NORMAL, SQLite's advice for WAL: a committed transaction survives a
# crash of the process (kill -9; tests/gateway/test_crash_durability.py) without an fsync
# per commit (3.6 ms each on this machine, docs/BENCHMARKS.md); only a power loss or an
# OS crash can take the last commits back. Deployments that need those on disk too run
# on PostgreSQL, whose commits are synchronous.
SQLITE_SYNCHRONOUS = "NORMAL"
_GROUP_AND_OTHERS = 0o077

DEFAULT_MIGRATION_STATEMENT_TIMEOUT_S = 600.0
LIBPQ_DRIVERS = frozenset({"psycopg", "psycopg2"})


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


def make_engine(url: str, *, timeouts: DatabaseTimeouts = DEFAULT_TIMEOUTS) -> Engine:
    """An engine for ``url`` whose connections and statements are bounded by ``timeouts``;
    a SQLite file is created private (0600) and kept so."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() in LIBPQ_DRIVERS:
            # The same driver through a dialect whose calls have a client-side deadline.
            driver = deadline.DEADLINE_DRIVERS[parsed.get_driver_name()]
            return create_engine(
                parsed.set(drivername=f"postgresql+{driver}"),
                pool_pre_ping=True,
                pool_timeout=timeouts.connect_s,
                connect_args=libpq_timeouts(parsed.query, timeouts),
                safegate_deadline_s=timeouts.call_deadline_s,
            )
        return create_engine(url, pool_pre_ping=True, pool_timeout=timeouts.connect_s)
    connect_args = {"check_same_thread": False, "timeout": timeouts.connect_s}
    path = sqlite_file(url)
    if path is None:  # in memory: a connection per thread, no pool to wait on
        engine = create_engine(url, connect_args=connect_args)
    else:
        if not path.parent.exists():
            path.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        _create_private(path)
        engine = create_engine(url, connect_args=connect_args, pool_timeout=timeouts.connect_s)

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(connection: Any, _record: Any) -> None:
        if path is not None:
            _tighten(path)  # before WAL mode creates -wal and -shm with the file's mode
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={SQLITE_SYNCHRONOUS}")
        cursor.execute("PRAGMA foreign_keys=ON")
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


def libpq_timeouts(
    query: Mapping[str, str | tuple[str, ...]], timeouts: DatabaseTimeouts
) -> dict[str, Any]:
    """libpq connection parameters that apply ``timeouts``, merged with a URL's ``query``.

    ``connect_args`` replace a URL's parameters of the same name, so the URL's ``options``
    are kept after ours (PostgreSQL applies ``-c`` settings in order: the URL's win), and a
    URL's ``connect_timeout`` or ``tcp_user_timeout`` is left to apply.
    """
    statement_ms = max(1, math.ceil(timeouts.statement_s * 1000))
    args: dict[str, Any] = {}
    if "connect_timeout" not in query:
        args["connect_timeout"] = max(1, math.ceil(timeouts.connect_s))
    if "tcp_user_timeout" not in query:
        args["tcp_user_timeout"] = statement_ms
    given = query.get("options", ())
    options = [given] if isinstance(given, str) else list(given)
    args["options"] = " ".join([f"-c statement_timeout={statement_ms}", *options])
    return args


class Database:
    """One engine and a session factory for a URL, and the owner's migrations."""

    def __init__(
        self, url: str, *, migrations: Path, timeouts: DatabaseTimeouts = DEFAULT_TIMEOUTS
    ) -> None:
        self.url = url
        self.timeouts = timeouts
        self.engine = make_engine(url, timeouts=timeouts)
        self.migrations = migrations
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(
        self, *, statement_timeout_s: float = DEFAULT_MIGRATION_STATEMENT_TIMEOUT_S
    ) -> None:
        """Upgrade the owner's tables to their newest Alembic revision.

        On PostgreSQL each statement of the upgrade may run for ``statement_timeout_s``
        (its own transaction only, with the client-side deadline lifted to match; requests
        keep the engine's timeouts), and replicas starting together take turns: a
        transaction-scoped advisory lock per package (gateway, finetune), so the second
        finds the tables at head and changes nothing.
        """
        if not (math.isfinite(statement_timeout_s) and statement_timeout_s > 0):
            raise ValueError(
                f"statement_timeout_s must be a positive number of seconds, "
                f"got {statement_timeout_s!r}"
            )
        config = Config()
        config.set_main_option("script_location", str(self.migrations))
        lifted = deadline.lifted(statement_timeout_s + DEFAULT_DEADLINE_MARGIN_S)
        with lifted, self.engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                milliseconds = max(1, math.ceil(statement_timeout_s * 1000))
                connection.exec_driver_sql(f"SET LOCAL statement_timeout = {milliseconds}")
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(hashtext(:owner))"),
                    {"owner": f"safegate-migrations:{self.migrations.parent.name}"},
                )
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
