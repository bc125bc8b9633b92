"""The shared mechanism of job-like records (``safegate.lifecycle``) on a real SQLite table:
a move the table allows is stored, one it refuses raises the package's error and stores
nothing; ``record_lifecycle`` builds the table jobs and runs share."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

import pytest
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from safegate.database import Database
from safegate.lifecycle import (
    FINISH,
    START,
    Lifecycle,
    Move,
    RecordStatus,
    StatusColumns,
    record_lifecycle,
)


class Status(StrEnum):
    NEW = "new"
    BUSY = "busy"
    DONE = "done"
    ABANDONED = "abandoned"


class Base(DeclarativeBase):
    pass


class TaskRow(StatusColumns, Base):
    __tablename__ = "tasks"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)


@dataclass(frozen=True)
class Task:
    id: str
    status: Status
    error: str | None
    pid: int | None

    @classmethod
    def from_row(cls, row: TaskRow) -> Task:
        return cls(id=row.id, status=Status(row.status), error=row.error, pid=row.pid)


class TaskError(Exception):
    pass


TASKS: Lifecycle[Status, TaskRow, Task] = Lifecycle(
    noun="task",
    statuses=Status,
    row=TaskRow,
    record=Task.from_row,
    running=Status.BUSY,
    final=(Status.DONE, Status.ABANDONED),
    moves={
        START: Move(frozenset({Status.NEW})),
        "abandon": Move(frozenset({Status.NEW}), "{noun} {id} is {status}; too late to abandon"),
        FINISH: Move(frozenset({Status.BUSY})),
    },
    error=TaskError,
    missing="no task {id!r}",
)


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'tasks.db'}", migrations=tmp_path)
    Base.metadata.create_all(database.engine)
    TASKS.add(database, TaskRow(id="t1", status=Status.NEW.value, created_at=datetime.now(UTC)))
    yield database
    database.dispose()


def test_a_legal_move_is_stored(database: Database) -> None:
    started = TASKS.start(database, "t1", pid=4242)
    assert started == Task(id="t1", status=Status.BUSY, error=None, pid=4242)
    assert TASKS.get(database, "t1") == started
    done = TASKS.finish(database, "t1", Status.DONE, error="ended early")
    assert TASKS.get(database, "t1") == done == Task("t1", Status.DONE, "ended early", None)


def test_an_illegal_move_raises_the_packages_error_and_changes_nothing(
    database: Database,
) -> None:
    with pytest.raises(TaskError, match=r"^task t1 is new; it cannot finish$"):
        TASKS.finish(database, "t1", Status.DONE)
    TASKS.start(database, "t1")
    with pytest.raises(TaskError, match=r"^task t1 is busy; too late to abandon$"):
        TASKS.update(database, "t1", move="abandon", change=lambda row: None)
    with pytest.raises(TaskError, match=r"^task t1 is busy; it cannot start$"):
        TASKS.start(database, "t1", pid=1)
    assert TASKS.get(database, "t1") == Task("t1", Status.BUSY, None, os.getpid())


def test_a_packages_own_rule_may_refuse_a_start(database: Database) -> None:
    def refuse(row: TaskRow) -> None:
        raise TaskError(f"task {row.id} is reserved")

    with pytest.raises(TaskError, match="reserved"):
        TASKS.start(database, "t1", rule=refuse)
    assert TASKS.get(database, "t1").status is Status.NEW


def test_mistakes_in_the_calls_and_the_table_are_clear(database: Database) -> None:
    with pytest.raises(ValueError, match="busy is not a final state"):
        TASKS.finish(database, "t1", Status.BUSY)
    with pytest.raises(ValueError, match="a task has no move 'pause'"):
        TASKS.update(database, "t1", move="pause", change=lambda row: None)
    with pytest.raises(TaskError, match="no task 'nope'"):
        TASKS.get(database, "nope")
    with pytest.raises(ValueError, match="needs a 'finish' move"):
        Lifecycle(
            noun="task",
            statuses=Status,
            row=TaskRow,
            record=Task.from_row,
            running=Status.BUSY,
            final=(Status.DONE,),
            moves={START: Move(frozenset({Status.NEW}))},
            error=TaskError,
            missing="no task {id!r}",
        )


class Step(RecordStatus):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"
    DROPPED = "dropped"

    @property
    def finished(self) -> bool:
        return self in (Step.DONE, Step.DROPPED)


def _steps(**moves: Move[Step]) -> Lifecycle[Step, TaskRow, Task]:
    return record_lifecycle(
        "step",
        Step,
        row=TaskRow,
        record=Task.from_row,
        start=Move(frozenset({Step.WAITING}), "{noun} {id} is {status}; it ran"),
        error=TaskError,
        missing="no step {id!r}",
        moves=moves,
    )


def test_a_record_lifecycle_derives_running_final_and_finish() -> None:
    steps = _steps(drop=Move(frozenset({Step.WAITING})))
    assert steps.running is Step.RUNNING
    assert steps.final == {Step.DONE, Step.DROPPED}
    assert list(steps.moves) == [START, "drop", FINISH]
    assert steps.moves[START].refusal == "{noun} {id} is {status}; it ran"
    assert steps.moves[FINISH].sources == frozenset(Step)
    with pytest.raises(ValueError, match="a step's 'finish' move is record_lifecycle's own"):
        _steps(finish=Move(frozenset({Step.RUNNING})))
