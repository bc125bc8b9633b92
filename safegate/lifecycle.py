"""Records that move through statuses: a fine-tuning job, an eval run.

``finetune.jobs`` and ``evals.runs`` keep rows with a status (``queued -> running -> ...``),
the pid of the process running them, when they were made, started and finished, and an error
(``StatusColumns``, mixed into both row classes). Each package
declares its own statuses and a ``Lifecycle``: the moves it allows (``start`` and
``finish``, which every such record has, and any of its own, such as a job's ``cancel``),
the statuses each may happen from, and what a refusal says. This module is the mechanism
they share:

- ``record_lifecycle`` builds the table both packages declare the same way: statuses that
  subclass ``RecordStatus`` (a ``running`` one, and each says whether it is ``finished``),
  a record that may be finished from any status, and the package's own ``start`` rule and
  other moves;
- ``Lifecycle.update`` reads the row under a lock (``SELECT ... FOR UPDATE`` where the
  database has it), refuses a move its current status does not allow with the package's
  own error, applies the change and returns the package's record;
- ``Lifecycle.start`` and ``Lifecycle.finish`` write the columns those two moves set;
- ``LifecycleStore`` is the base of each package's store (``get``, ``list``, ``start``,
  ``finish``);
- ``process_alive`` says whether a recorded pid still runs.

Rules beyond the table (a run refuses a second live process) are the package's: a check
passed to ``start`` as its ``rule``.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Generic, TypeVar

from sqlalchemy import DateTime, Integer, String, Text, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from safegate.database import Database

START = "start"
FINISH = "finish"


class StatusColumns:
    """The columns a lifecycle reads and writes, mixed into each package's row class
    (``class JobRow(StatusColumns, Base)``); SQLAlchemy copies them into each table."""

    status: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)


class RecordStatus(StrEnum):
    """The statuses of a ``record_lifecycle``'s records: a package's enum subclasses this,
    with a member ``running``, and says which of its members are ``finished``."""

    @property
    def finished(self) -> bool:
        raise NotImplementedError(f"{type(self).__name__} says which statuses are finished")


S = TypeVar("S", bound=StrEnum)
F = TypeVar("F", bound=RecordStatus)
R = TypeVar("R", bound=StatusColumns)
T = TypeVar("T")


@dataclass(frozen=True)
class Move(Generic[S]):
    """The statuses a move may happen from, and the message that refuses it from any other.

    ``refusal`` is formatted with ``noun``, ``id``, ``status`` (the current one) and ``move``.
    """

    sources: frozenset[S]
    refusal: str = "{noun} {id} is {status}; it cannot {move}"


class Lifecycle(Generic[S, R, T]):
    """One kind of record's transition table and the locked update that enforces it."""

    def __init__(
        self,
        *,
        noun: str,
        statuses: type[S],
        row: type[R],
        record: Callable[[R], T],
        running: S,
        final: Collection[S],
        moves: Mapping[str, Move[S]],
        error: Callable[[str], Exception],
        missing: str,
    ) -> None:
        """``missing``: the message for an unknown id, formatted with ``id``."""
        for required in (START, FINISH):
            if required not in moves:
                raise ValueError(f"a {noun}'s lifecycle needs a {required!r} move")
        if running in final:
            raise ValueError(f"{running} cannot be both the running state and a final one")
        self.noun = noun
        self.statuses = statuses
        self.row = row
        self.record = record
        self.running = running
        self.final = frozenset(final)
        self.moves = dict(moves)
        self.error = error
        self.missing = missing

    def check(self, move: str, record_id: str, status: S) -> None:
        """Raise the package's error unless ``move`` may happen from ``status``."""
        rule = self.moves.get(move)
        if rule is None:
            raise ValueError(f"a {self.noun} has no move {move!r}; it has {sorted(self.moves)}")
        if status not in rule.sources:
            message = rule.refusal.format(
                noun=self.noun, id=record_id, status=status.value, move=move
            )
            raise self.error(message)

    def add(self, database: Database, row: R) -> T:
        """Store a new record's row; return the record."""
        with database.session() as session:
            session.add(row)
        return self.record(row)

    def get(self, database: Database, record_id: str) -> T:
        with database.session() as session:
            return self.record(self.find(session, record_id))

    def newest_first(self, database: Database) -> list[T]:
        """Every record, the newest first."""
        with database.session() as session:
            rows = session.scalars(select(self.row).order_by(self.row.created_at.desc())).all()
            return [self.record(row) for row in rows]

    def find(self, session: Session, record_id: str, *, lock: bool = False) -> R:
        """The row of ``record_id`` (locked for update with ``lock``); the package's error
        when there is none."""
        row = session.get(self.row, record_id, with_for_update=lock)
        if row is None:
            raise self.error(self.missing.format(id=record_id))
        return row

    def update(
        self, database: Database, record_id: str, *, move: str | None, change: Callable[[R], None]
    ) -> T:
        """Apply ``change`` to the locked row if ``move`` may happen from its status (any
        status with ``move`` None: a change that moves nothing); return the record."""
        with database.session() as session:
            row = self.find(session, record_id, lock=True)
            if move is not None:
                self.check(move, record_id, self.statuses(row.status))
            change(row)
            session.flush()
            return self.record(row)

    def start(
        self,
        database: Database,
        record_id: str,
        *,
        pid: int | None = None,
        rule: Callable[[R], None] | None = None,
    ) -> T:
        """Mark the record running in process ``pid`` (this one by default); ``rule``
        (the package's own, past the table) may refuse first."""

        def change(row: R) -> None:
            if rule is not None:
                rule(row)
            row.status = self.running.value
            row.started_at = row.started_at or datetime.now(UTC)
            row.finished_at = None
            row.error = None
            row.pid = pid if pid is not None else os.getpid()

        return self.update(database, record_id, move=START, change=change)

    def finish(
        self,
        database: Database,
        record_id: str,
        status: S,
        *,
        error: str | None = None,
        change: Callable[[R], None] | None = None,
    ) -> T:
        """End the record in the final ``status``; ``change`` writes the package's own
        columns in the same update."""
        if status not in self.final:
            raise ValueError(f"{status} is not a final state")

        def end(row: R) -> None:
            row.status = status.value
            row.finished_at = datetime.now(UTC)
            row.error = error
            row.pid = None
            if change is not None:
                change(row)

        return self.update(database, record_id, move=FINISH, change=end)


def record_lifecycle(
    noun: str,
    statuses: type[F],
    *,
    row: type[R],
    record: Callable[[R], T],
    start: Move[F],
    error: Callable[[str], Exception],
    missing: str,
    moves: Mapping[str, Move[F]] | None = None,
) -> Lifecycle[F, R, T]:
    """The lifecycle of a job-like record: it runs in ``statuses("running")``, ends in the
    statuses that are ``finished``, and may be finished from any status (a final status is
    written over by whichever process ends the record last: a crashed run's reaper and the
    run itself may race). ``start`` says which statuses it may start from, ``moves`` adds
    the package's own (a job's ``cancel``); the rest is ``Lifecycle``'s."""
    own = dict(moves or {})
    for reserved in (START, FINISH):
        if reserved in own:
            raise ValueError(f"a {noun}'s {reserved!r} move is record_lifecycle's own")
    return Lifecycle(
        noun=noun,
        statuses=statuses,
        row=row,
        record=record,
        running=statuses("running"),
        final=[status for status in statuses if status.finished],
        moves={START: start, **own, FINISH: Move(frozenset(statuses))},
        error=error,
        missing=missing,
    )


class LifecycleStore(Generic[S, R, T]):
    """The base of a package's store of such records: ``get``, ``list`` (newest first),
    ``start`` and ``finish`` through its lifecycle; the package adds what is its own."""

    def __init__(self, database: Database, lifecycle: Lifecycle[S, R, T]) -> None:
        self.database = database
        self.lifecycle = lifecycle

    def get(self, record_id: str) -> T:
        return self.lifecycle.get(self.database, record_id)

    def list(self) -> builtins.list[T]:
        return self.lifecycle.newest_first(self.database)

    def start(self, record_id: str, *, pid: int | None = None) -> T:
        return self.lifecycle.start(self.database, record_id, pid=pid)

    def finish(self, record_id: str, status: S, *, error: str | None = None) -> T:
        return self.lifecycle.finish(self.database, record_id, status, error=error)


def process_alive(pid: int | None) -> bool:
    """Whether process ``pid`` still runs (one owned by another user counts)."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
