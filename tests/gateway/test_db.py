"""Database timeouts (``safegate.database``) on the gateway's database: no wait is unbounded.

PostgreSQL tests run on the local server in a fresh schema (``postgres_url``), whose URL
carries ``options=-csearch_path=...``: the statement timeout must join it, not replace it.
"A server that never answers" is a real listening socket that never accepts: the kernel
completes the TCP handshake and nothing ever replies. "A frozen server" is the real
PostgreSQL backend of a connection stopped with SIGSTOP (``frozen`` in the conftest): it
keeps its socket and runs no timer, so only the client-side deadline ends the wait.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from pydantic import ValidationError
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from gateway.db import Database
from safegate import deadline
from safegate.database import make_engine
from safegate.settings import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_DEADLINE_MARGIN_S,
    DEFAULT_STATEMENT_TIMEOUT_S,
    DatabaseTimeouts,
    StorageSettings,
)
from tests.gateway.conftest import (
    FREEZE_MARGIN_S,
    FROZEN_TIMEOUTS,
    backend_pid,
    frozen,
    tagged,
)

SHORT = DatabaseTimeouts(connect_s=1.0, statement_s=0.5)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections into its backlog and never answers."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def libpq_parameters(database: Database) -> dict[str, str]:
    with database.engine.connect() as connection:
        raw = connection.connection.dbapi_connection
        assert isinstance(raw, psycopg.Connection)
        return raw.info.get_parameters()


# -- settings --------------------------------------------------------------------------


def test_timeouts_have_named_defaults_and_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert StorageSettings().database_timeouts == DatabaseTimeouts(
        connect_s=DEFAULT_CONNECT_TIMEOUT_S, statement_s=DEFAULT_STATEMENT_TIMEOUT_S
    )
    monkeypatch.setenv("SAFEGATE_DATABASE_CONNECT_TIMEOUT_S", "2")
    monkeypatch.setenv("SAFEGATE_DATABASE_STATEMENT_TIMEOUT_S", "2.5")
    assert StorageSettings().database_timeouts == DatabaseTimeouts(connect_s=2.0, statement_s=2.5)
    monkeypatch.setenv("SAFEGATE_DATABASE_DEADLINE_S", "4")
    assert StorageSettings().database_timeouts == DatabaseTimeouts(
        connect_s=2.0, statement_s=2.5, deadline_s=4.0
    )


def test_the_deadline_leaves_a_slow_statement_to_the_server_unless_set() -> None:
    assert DatabaseTimeouts().call_deadline_s == (
        DEFAULT_STATEMENT_TIMEOUT_S + DEFAULT_DEADLINE_MARGIN_S
    )
    assert DatabaseTimeouts(statement_s=30.0).call_deadline_s == 30.0 + DEFAULT_DEADLINE_MARGIN_S
    assert DatabaseTimeouts(statement_s=30.0, deadline_s=3.0).call_deadline_s == 3.0


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan")])
def test_a_timeout_must_be_a_positive_number_of_seconds(value: float) -> None:
    with pytest.raises(ValueError, match="connect_s"):
        DatabaseTimeouts(connect_s=value)
    with pytest.raises(ValueError, match="statement_s"):
        DatabaseTimeouts(statement_s=value)
    with pytest.raises(ValueError, match="deadline_s"):
        DatabaseTimeouts(deadline_s=value)
    with pytest.raises(ValidationError):
        StorageSettings(database_statement_timeout_s=value)
    with pytest.raises(ValidationError):
        StorageSettings(database_deadline_s=value)


def test_waiting_for_a_pooled_connection_is_bounded(tmp_path: Path) -> None:
    for url in (
        f"sqlite:///{tmp_path}/safegate.db",
        "postgresql+psycopg://postgres@127.0.0.1:9/x",  # never connected here
    ):
        engine = make_engine(url, timeouts=SHORT)
        try:
            assert engine.pool.timeout() == SHORT.connect_s  # type: ignore[attr-defined]
        finally:
            engine.dispose()


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_postgresql_engines_bound_every_call_with_the_deadline(driver: str) -> None:
    pytest.importorskip(driver)  # psycopg2 is not among the dependencies
    engine = make_engine(f"postgresql+{driver}://postgres@127.0.0.1:9/x", timeouts=SHORT)
    try:
        assert isinstance(
            engine.dialect, (deadline.PsycopgWithDeadline, deadline.Psycopg2WithDeadline)
        )
        assert engine.dialect.driver == driver
        assert engine.dialect.safegate_deadline_s == SHORT.call_deadline_s
    finally:
        engine.dispose()


# -- SQLite --------------------------------------------------------------------------------


def test_a_locked_sqlite_database_fails_within_the_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "safegate.db"
    database = Database(f"sqlite:///{path}", timeouts=SHORT)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        with database.engine.begin() as connection:
            connection.execute(text("CREATE TABLE t (x INTEGER)"))
        holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        started = time.monotonic()
        with pytest.raises(OperationalError, match="database is locked"), database.session() as s:
            s.execute(text("INSERT INTO t VALUES (1)"))
        waited = time.monotonic() - started
    finally:
        holder.close()
        database.dispose()
    assert SHORT.connect_s * 0.9 <= waited < 5.0  # waited for the lock, then gave up


# -- PostgreSQL ----------------------------------------------------------------------------


def test_connecting_to_a_server_that_never_answers_fails_within_the_connect_timeout(
    silent_port: int,
) -> None:
    database = Database(f"postgresql+psycopg://postgres@127.0.0.1:{silent_port}/x", timeouts=SHORT)
    started = time.monotonic()
    try:
        with pytest.raises(OperationalError, match="timeout"), database.engine.connect():
            pass
    finally:
        database.dispose()
    assert time.monotonic() - started < 5.0  # libpq waits at least 2 s; without a bound, 130 s


@pytest.mark.postgres
def test_a_hung_statement_is_cancelled_within_the_statement_timeout(postgres_url: str) -> None:
    database = Database(postgres_url, timeouts=SHORT)
    try:
        database.migrate()  # the migration's longer limit stays in its own transaction
        schema = postgres_url.rsplit("search_path%3D", 1)[-1]
        with database.engine.connect() as connection:
            assert connection.execute(text("SHOW statement_timeout")).scalar() == "500ms"
            assert connection.execute(text("SHOW search_path")).scalar() == schema
            assert connection.execute(text("SELECT count(*) FROM api_keys")).scalar() == 0
            started = time.monotonic()
            with pytest.raises(OperationalError) as cancelled:
                connection.execute(text("SELECT pg_sleep(30)"))
            waited = time.monotonic() - started
        assert isinstance(cancelled.value.orig, psycopg.errors.QueryCanceled)
        assert 0.4 <= waited < 5.0
        parameters = libpq_parameters(database)
        assert parameters["connect_timeout"] == "1"
        assert parameters["tcp_user_timeout"] == "500"
    finally:
        database.dispose()


@pytest.mark.postgres
def test_a_statement_waiting_on_a_lock_fails_within_the_statement_timeout(
    postgres_url: str,
) -> None:
    database = Database(postgres_url, timeouts=SHORT)
    locker = make_engine(postgres_url)
    try:
        database.migrate()
        with locker.begin() as holding:
            holding.execute(text("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE"))
            started = time.monotonic()
            with pytest.raises(OperationalError), database.session() as session:
                session.execute(text("SELECT count(*) FROM api_keys"))
            waited = time.monotonic() - started
    finally:
        locker.dispose()
        database.dispose()
    assert 0.4 <= waited < 5.0


@pytest.mark.postgres
def test_a_urls_own_timeouts_win(postgres_url: str) -> None:
    url = postgres_url.replace(
        "options=", "connect_timeout=3&options=-c%20statement_timeout%3D700%20"
    )
    database = Database(url, timeouts=SHORT)
    try:
        with database.engine.connect() as connection:
            assert connection.execute(text("SHOW statement_timeout")).scalar() == "700ms"
        assert libpq_parameters(database)["connect_timeout"] == "3"
    finally:
        database.dispose()


def test_sqlite_commits_without_an_fsync_and_survive_a_killed_process(tmp_path: Path) -> None:
    """WAL with synchronous=NORMAL: a row committed by a process that is then SIGKILLed is
    there when the database is opened again."""
    path = tmp_path / "state.db"
    engine = make_engine(f"sqlite:///{path}")
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA synchronous")).scalar() == 1  # NORMAL
        connection.execute(text("CREATE TABLE item (id INTEGER PRIMARY KEY, body TEXT)"))
        connection.commit()
    engine.dispose()
    writer = (
        "import sys, time\n"
        "from sqlalchemy import text\n"
        "from safegate.database import make_engine\n"
        "engine = make_engine(sys.argv[1])\n"
        "with engine.connect() as connection:\n"
        "    connection.execute(text(\"INSERT INTO item (body) VALUES ('kept')\"))\n"
        "    connection.commit()\n"
        "    print('committed', flush=True)\n"
        "    time.sleep(60)\n"
    )
    process = subprocess.Popen(  # noqa: S603 - this interpreter and our own script
        [sys.executable, "-c", writer, f"sqlite:///{path}"], stdout=subprocess.PIPE, text=True
    )
    with process:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "committed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    with sqlite3.connect(path) as reopened:
        assert reopened.execute("SELECT body FROM item").fetchall() == [("kept",)]


def test_replicas_migrating_at_the_same_moment_take_turns(postgres_url: str) -> None:
    """Four start-ups upgrade one empty schema at the same moment: all succeed, one head."""
    script = (
        "import sys, time\n"
        "from gateway.db import Database\n"
        "database = Database(sys.argv[1])\n"
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
        "database.migrate()\n"
    )
    at = time.time() + 8  # after every interpreter has imported what it needs
    processes = [
        subprocess.Popen(  # noqa: S603 - this interpreter and our own script
            [sys.executable, "-c", script, postgres_url, str(at)], stderr=subprocess.PIPE
        )
        for _ in range(4)
    ]
    failures = []
    for process in processes:
        with process:
            _, stderr = process.communicate(timeout=120)
            if process.returncode != 0:
                failures.append(stderr.decode(errors="replace").strip().splitlines()[-1:])
    assert failures == []
    engine = make_engine(postgres_url)
    try:
        with engine.connect() as connection:
            heads = connection.execute(text("SELECT version_num FROM alembic_version")).all()
    finally:
        engine.dispose()
    assert len(heads) == 1


# -- PostgreSQL: a frozen server ------------------------------------------------------------


def own_pid(database: Database) -> int:
    with database.engine.connect() as connection:
        return int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())


@pytest.mark.postgres
def test_a_statement_on_a_frozen_server_is_cut_at_the_deadline(
    postgres_admin: Engine, postgres_url: str
) -> None:
    """Frozen while it runs a statement, the server cancels nothing (its 1 s statement
    timeout never fires); the client gives up at its 2 s deadline, drops the connection,
    and the next call gets a fresh one while the old server process is still stopped."""
    url, name = tagged(postgres_url)
    database = Database(url, timeouts=FROZEN_TIMEOUTS)

    def sleep_long() -> None:
        with database.session() as session:
            session.execute(text("SELECT pg_sleep(30)"))

    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            started = time.monotonic()
            sleeping = pool.submit(sleep_long)
            pid = backend_pid(postgres_admin, name, waiting_on="Timeout")
            with frozen(pid):
                with pytest.raises(OperationalError) as cut:
                    sleeping.result(timeout=FROZEN_TIMEOUTS.call_deadline_s + 30)
                waited = time.monotonic() - started
                assert own_pid(database) != pid
                pool_size = database.engine.pool.checkedin()  # type: ignore[attr-defined]
    finally:
        database.dispose()
    assert "did not answer within 2 s (client-side deadline)" in str(cut.value)
    assert cut.value.connection_invalidated
    assert not isinstance(cut.value.orig, psycopg.errors.QueryCanceled)
    cutoff = FROZEN_TIMEOUTS.call_deadline_s
    assert cutoff <= waited < cutoff + FREEZE_MARGIN_S
    assert pool_size == 1  # the fresh connection; the cut one never went back


@pytest.mark.postgres
def test_an_idle_connection_to_a_frozen_server_fails_its_pre_ping_and_is_replaced(
    postgres_url: str,
) -> None:
    """The pool's pre-ping on a connection whose server froze while it sat in the pool is
    cut at the deadline; the pool connects afresh and the caller's statement succeeds."""
    url, _ = tagged(postgres_url)
    database = Database(url, timeouts=FROZEN_TIMEOUTS)
    try:
        pid = own_pid(database)  # the connection now waits in the pool
        with frozen(pid):
            started = time.monotonic()
            replaced = own_pid(database)
            waited = time.monotonic() - started
    finally:
        database.dispose()
    assert replaced != pid
    cutoff = FROZEN_TIMEOUTS.call_deadline_s
    assert cutoff <= waited < cutoff + FREEZE_MARGIN_S


@pytest.mark.postgres
def test_a_migration_lifts_the_deadline_with_its_statement_timeout(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    armed: list[float] = []

    class Recording(deadline.Watchdog):
        def arm(self, fileno: int, *, seconds: float, what: str) -> deadline.Call:
            armed.append(seconds)
            return super().arm(fileno, seconds=seconds, what=what)

    monkeypatch.setattr(deadline, "WATCHDOG", Recording(name="test-deadline-recording"))
    database = Database(postgres_url, timeouts=SHORT)
    try:
        database.migrate(statement_timeout_s=42.0)
        assert armed
        assert set(armed) == {42.0 + DEFAULT_DEADLINE_MARGIN_S}
        armed.clear()
        with database.session() as session:
            assert session.execute(text("SELECT count(*) FROM api_keys")).scalar() == 0
        assert armed
        assert set(armed) == {SHORT.call_deadline_s}
    finally:
        database.dispose()
