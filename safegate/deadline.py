"""A client-side deadline on every call to a PostgreSQL server.

Why the client
    The server's ``statement_timeout`` is a timer in the backend process. A backend frozen
    mid-statement (stopped, a paused container, a hung host whose kernel still answers)
    never runs it, and because the kernel still acknowledges every packet neither TCP
    keepalives nor ``tcp_user_timeout`` see anything wrong; libpq itself waits for an
    answer without limit. Only the client can end that wait.

How
    ``make_engine`` builds PostgreSQL engines (psycopg or psycopg2) on the dialects below,
    registered with SQLAlchemy's dialect registry (``postgresql+psycopg_deadline``). Each
    call that waits for the server (the pool's pre-ping, execute, executemany, commit,
    rollback, the rollback that resets a returned connection included, and the first
    connection's set-up questions) runs under the process's ``Watchdog``: one thread that
    keeps the calls in flight and, when one is still waiting at its deadline, shuts down
    its socket (``shutdown(2)`` on a duplicate of libpq's descriptor). The blocked libpq
    call then returns at once with an error, so the thread that made it is released too:
    no thread waits on a frozen server past the deadline, and none piles up behind it
    (the request threads, the audit writers). The dialect closes the connection and
    raises the driver's ``OperationalError``; SQLAlchemy sees a closed connection,
    invalidates it (it never goes back to the pool; a pre-ping that fails this way also
    makes the pool replace its older connections) and the next checkout connects afresh.
    Callers get ``sqlalchemy.exc.OperationalError``, the error a lost connection raises,
    so every outage path (cached keys, 503 with ``Retry-After``, the audit spool) applies
    unchanged.

    Not chosen: a worker thread per call with a timeout, which leaves the thread blocked
    until the server wakes (they pile up); psycopg's ``cancel()``, which asks the frozen
    server itself to cancel; closing libpq's descriptor from another thread, which pulls it
    from under a call still using it (and the number may be reused at once).

    A call cut at its deadline may still complete if the server wakes, as after any lost
    connection: writes that must not be lost are idempotent (the audit spool's inserts).

``lifted(seconds)`` raises the deadline for the calls of the current context, for work
that may rightly take longer than a request's statements (``Database.migrate``).
"""

from __future__ import annotations

import contextvars
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from sqlalchemy import Connection
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.dialects.postgresql.psycopg2 import PGDialect_psycopg2
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.engine.interfaces import DBAPIConnection, DBAPICursor, ExecutionContext
from sqlalchemy.pool import PoolProxiedConnection

log = logging.getLogger("safegate.storage")

# The drivers whose engines get a deadline, and the dialect name each is registered as.
DEADLINE_DRIVERS = {"psycopg": "psycopg_deadline", "psycopg2": "psycopg2_deadline"}

T = TypeVar("T")

_LIFTED: contextvars.ContextVar[float] = contextvars.ContextVar(
    "safegate_database_deadline_lifted", default=0.0
)


@contextmanager
def lifted(seconds: float) -> Iterator[None]:
    """Within this block, calls of this context wait up to ``seconds`` if that is longer."""
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"seconds must be a positive number, got {seconds!r}")
    token = _LIFTED.set(seconds)
    try:
        yield
    finally:
        _LIFTED.reset(token)


# -- the watchdog ------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class Call:
    """One call in flight: a duplicate of its socket's descriptor, and when it is due."""

    fd: int
    due: float  # monotonic
    seconds: float
    what: str
    cut: bool = False


class Watchdog:
    """One thread that shuts down the socket of every call still in flight at its deadline.

    ``arm`` before a blocking call, ``disarm`` after it, whatever happened; ``disarm`` says
    whether the call was cut. A call is cut at most once and only while it is armed, so a
    socket is never touched after its call ended. The thread starts with the first call.
    """

    def __init__(self, *, name: str = "safegate-db-deadline") -> None:
        self._name = name
        self._start_afresh()
        os.register_at_fork(after_in_child=self._start_afresh)

    def _start_afresh(self) -> None:
        """No calls and no thread yet (also in a forked child: the parent's are not its own)."""
        self._wake = threading.Condition()
        self._calls: set[Call] = set()
        self._next_wake = math.inf  # when the thread means to look next; inf: when told
        self._thread: threading.Thread | None = None

    def arm(self, fileno: int, *, seconds: float, what: str) -> Call:
        """Watch the socket ``fileno`` (duplicated here) for ``seconds`` from now."""
        call = Call(os.dup(fileno), time.monotonic() + seconds, seconds, what)
        with self._wake:
            self._calls.add(call)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            elif call.due < self._next_wake:
                self._wake.notify()
        return call

    def disarm(self, call: Call) -> bool:
        """Stop watching ``call``; True if its deadline passed and its socket was shut down."""
        with self._wake:
            self._calls.discard(call)
            cut = call.cut
        if not cut:  # a cut call's descriptor belongs to the watchdog thread
            os.close(call.fd)
        return cut

    def in_flight(self) -> int:
        with self._wake:
            return len(self._calls)

    def _run(self) -> None:
        with self._wake:
            while True:
                now = time.monotonic()
                due = [call for call in self._calls if call.due <= now]
                if due:
                    for call in due:
                        self._calls.discard(call)
                        call.cut = True
                    self._wake.release()
                    try:
                        for call in due:
                            try:
                                _shut_down(call)
                            except Exception:  # noqa: BLE001 - the thread outlives any one call
                                log.exception("database deadline watchdog could not cut a call")
                    finally:
                        self._wake.acquire()
                    continue
                self._next_wake = min((call.due for call in self._calls), default=math.inf)
                self._wake.wait(None if self._next_wake == math.inf else self._next_wake - now)
                self._next_wake = -math.inf  # looking now: an arm need not wake the thread


def _shut_down(call: Call) -> None:
    """Shut the socket down (the blocked call sees the connection end) and drop the dup."""
    try:
        sock = socket.socket(fileno=call.fd)
    except OSError:
        os.close(call.fd)
        raise
    with sock:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError as error:  # already disconnected: the call has its error anyway
            log.debug("database socket shutdown failed", extra={"error": error.strerror})
    log.warning(
        "the database did not answer within the deadline; connection cut",
        extra={"call": call.what, "deadline_s": call.seconds},
    )


WATCHDOG = Watchdog()


# -- the dialects ------------------------------------------------------------------------


class _Deadlined(DefaultDialect):
    """The blocking calls of a libpq dialect, each bounded by ``safegate_deadline_s``.

    ``create_engine(url, safegate_deadline_s=...)`` passes it (a dialect argument must be
    positional for SQLAlchemy to find it); there is no default: ``make_engine`` names one.
    """

    def __init__(self, safegate_deadline_s: float, **kwargs: Any) -> None:
        if not (math.isfinite(safegate_deadline_s) and safegate_deadline_s > 0):
            raise ValueError(
                f"safegate_deadline_s must be a positive number, got {safegate_deadline_s!r}"
            )
        super().__init__(**kwargs)
        self.safegate_deadline_s = safegate_deadline_s

    def _bounded(self, connection: Any, what: str, call: Callable[[], T]) -> T:
        raw: Any = (
            connection.dbapi_connection
            if isinstance(connection, PoolProxiedConnection)
            else connection
        )
        errors = self.loaded_dbapi.Error
        try:
            fileno = raw.fileno()
        except errors:  # already closed: the call fails at once by itself
            return call()
        seconds = max(self.safegate_deadline_s, _LIFTED.get())
        watched = WATCHDOG.arm(fileno, seconds=seconds, what=what)
        try:
            result = call()
        except errors as error:
            if WATCHDOG.disarm(watched):
                self._cut(raw, seconds, error)
            raise
        except BaseException:
            if WATCHDOG.disarm(watched):
                raw.close()
            raise
        if WATCHDOG.disarm(watched):  # it answered just as the deadline passed
            self._cut(raw, seconds, None)
        return result

    def _cut(self, raw: Any, seconds: float, error: BaseException | None) -> None:
        """The watchdog shut the socket down: close the connection for good, say why."""
        raw.close()
        raise self.loaded_dbapi.OperationalError(
            f"the database server did not answer within {seconds:g} s (client-side "
            "deadline); the connection was closed"
        ) from error

    def initialize(self, connection: Connection) -> None:
        """The first connection's questions (server version, isolation level, types)."""
        self._bounded(connection.connection, "initialize", partial(super().initialize, connection))

    def do_ping(self, dbapi_connection: DBAPIConnection) -> bool:
        return self._bounded(dbapi_connection, "ping", partial(super().do_ping, dbapi_connection))

    def do_execute(
        self,
        cursor: DBAPICursor,
        statement: str,
        parameters: Any,
        context: ExecutionContext | None = None,
    ) -> None:
        run = partial(super().do_execute, cursor, statement, parameters, context)
        self._bounded(cursor.connection, "execute", run)

    def do_execute_no_params(
        self, cursor: DBAPICursor, statement: str, context: ExecutionContext | None = None
    ) -> None:
        run = partial(super().do_execute_no_params, cursor, statement, context)
        self._bounded(cursor.connection, "execute", run)

    def do_executemany(
        self,
        cursor: DBAPICursor,
        statement: str,
        parameters: Any,
        context: ExecutionContext | None = None,
    ) -> None:
        run = partial(super().do_executemany, cursor, statement, parameters, context)
        self._bounded(cursor.connection, "executemany", run)

    def do_commit(self, dbapi_connection: PoolProxiedConnection) -> None:
        self._bounded(dbapi_connection, "commit", partial(super().do_commit, dbapi_connection))

    def do_rollback(self, dbapi_connection: PoolProxiedConnection) -> None:
        run = partial(super().do_rollback, dbapi_connection)
        self._bounded(dbapi_connection, "rollback", run)


class PsycopgWithDeadline(_Deadlined, PGDialect_psycopg):
    supports_statement_cache = True


class Psycopg2WithDeadline(_Deadlined, PGDialect_psycopg2):
    supports_statement_cache = True


registry.register("postgresql.psycopg_deadline", __name__, "PsycopgWithDeadline")
registry.register("postgresql.psycopg2_deadline", __name__, "Psycopg2WithDeadline")
