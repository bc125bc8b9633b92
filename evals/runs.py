"""Eval runs: versioned records in the project's database and as files under SAFEGATE_HOME.

A run is one suite against one model: ``queued -> running -> succeeded | failed``.
``eval_runs`` holds one row per run (suite name and sha256, model, status, error, times,
``schema_version``, the resolved configuration, counts and metrics as JSON);
``eval_samples`` one row per sample, written as each call completes (prompt and reference
sha256, the output, finish reason, filter, error, latency, whether it came from the
cache), which is what lets an interrupted run resume. When a run ends its files are
written to ``SAFEGATE_HOME/evals/<run_id>/``:

- ``run.json``: the record (sorted keys; ``schema_version`` says how to read it),
- ``samples.jsonl``: one line per sample in dataset order,
- ``report.md`` / ``report.json``: the report (``evals.report``).

``load_runs()`` and ``load_samples(run_id)`` return pandas DataFrames for the dashboard.
"""

from __future__ import annotations

import builtins
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    delete,
    select,
)
from sqlalchemy.orm import Mapped, mapped_column

from evals.db import Base, Database
from evals.errors import RunError
from evals.records import SCHEMA_VERSION, Output, Sample
from evals.settings import get_settings
from safegate.lifecycle import (
    Lifecycle,
    LifecycleStore,
    Move,
    RecordStatus,
    StatusColumns,
    process_alive,
    record_lifecycle,
)

if TYPE_CHECKING:
    import pandas as pd

RUN_FILE = "run.json"
SAMPLES_FILE = "samples.jsonl"
REPORT_MARKDOWN = "report.md"
REPORT_JSON = "report.json"
RUN_COLUMNS = (
    "id",
    "suite",
    "model",
    "status",
    "created_at",
    "finished_at",
    "error",
    "suite_sha256",
    "schema_version",
)
SAMPLE_COLUMNS = (
    "sample_id",
    "dataset",
    "prompt_sha256",
    "reference_sha256",
    "output",
    "finish_reason",
    "filtered",
    "error",
    "latency_ms",
    "cached",
)


class RunStatus(RecordStatus):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (RunStatus.SUCCEEDED, RunStatus.FAILED)


class RunRow(StatusColumns, Base):
    # status, created_at, started_at, finished_at, error and pid: StatusColumns
    __tablename__ = "eval_runs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    suite: Mapped[str] = mapped_column(String(128), index=True)
    suite_path: Mapped[str] = mapped_column(String(1000))
    suite_sha256: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(128), index=True)
    schema_version: Mapped[int] = mapped_column(Integer)
    config: Mapped[str] = mapped_column(Text, default="{}")  # sorted-key JSON
    counts: Mapped[str] = mapped_column(Text, default="{}")
    metrics: Mapped[str] = mapped_column(Text, default="{}")


class SampleRow(Base):
    __tablename__ = "eval_samples"

    run_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("eval_runs.id", ondelete="CASCADE"), primary_key=True
    )
    sample_id: Mapped[str] = mapped_column(String(512), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)  # the sample's place in the suite
    dataset: Mapped[str] = mapped_column(String(128))
    prompt_sha256: Mapped[str] = mapped_column(String(64))
    reference_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    output: Mapped[str | None] = mapped_column(Text, nullable=True)
    finish_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    filtered: Mapped[str | None] = mapped_column(String(16), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    latency_ms: Mapped[float] = mapped_column(Float)
    cached: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    def to_output(self) -> Output:
        return Output(
            sample_id=self.sample_id,
            text=self.output,
            finish_reason=self.finish_reason,
            filtered=self.filtered,
            error=self.error,
            latency_ms=self.latency_ms,
            cached=self.cached,
            prompt_sha256=self.prompt_sha256,
            reference_sha256=self.reference_sha256,
        )


def _utc(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def jsonable(value: Any) -> Any:
    """``value`` with non-finite floats as None, so every record is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def dumps(value: Any, *, indent: int | None = None) -> str:
    return json.dumps(jsonable(value), sort_keys=True, indent=indent, allow_nan=False)


@dataclass(frozen=True)
class Run:
    id: str
    suite: str
    suite_path: str
    suite_sha256: str
    model: str
    status: RunStatus
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    schema_version: int
    config: dict[str, Any]
    counts: dict[str, Any]
    metrics: dict[str, Any]
    pid: int | None

    @classmethod
    def from_row(cls, row: RunRow) -> Run:
        return cls(
            id=row.id,
            suite=row.suite,
            suite_path=row.suite_path,
            suite_sha256=row.suite_sha256,
            model=row.model,
            status=RunStatus(row.status),
            error=row.error,
            created_at=_utc(row.created_at) or datetime.now(UTC),
            started_at=_utc(row.started_at),
            finished_at=_utc(row.finished_at),
            schema_version=row.schema_version,
            config=json.loads(row.config or "{}"),
            counts=json.loads(row.counts or "{}"),
            metrics=json.loads(row.metrics or "{}"),
            pid=row.pid,
        )

    def summary(self) -> dict[str, Any]:
        """What ``safegate eval list --json`` prints per run."""
        return {
            "id": self.id,
            "suite": self.suite,
            "model": self.model,
            "created": self.created_at.isoformat(),
            "status": self.status.value,
        }

    def record(self) -> dict[str, Any]:
        """The versioned record: ``run.json`` and ``safegate eval show --json``."""
        return {
            "schema_version": self.schema_version,
            "id": self.id,
            "status": self.status.value,
            "error": self.error,
            "suite": {"name": self.suite, "path": self.suite_path, "sha256": self.suite_sha256},
            "model": self.model,
            "config": self.config,
            "counts": self.counts,
            "metrics": self.metrics,
            "created_at": self.created_at.isoformat(),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "files": {"samples": SAMPLES_FILE, "report": [REPORT_MARKDOWN, REPORT_JSON]},
        }


# A run that has not succeeded may run again (a resume); a succeeded one never does. Runs
# are not cancelled. Any run may be finished, from whatever state it was left in.
RUNS: Lifecycle[RunStatus, RunRow, Run] = record_lifecycle(
    "run",
    RunStatus,
    row=RunRow,
    record=Run.from_row,
    start=Move(
        frozenset({RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.FAILED}),
        "{noun} {id} already {status}; start a new run instead",
    ),
    error=RunError,
    missing="no run {id!r}; 'safegate eval list' shows the runs",
)


class RunStore(LifecycleStore[RunStatus, RunRow, Run]):
    """Creates runs, stores their samples as they complete, and finishes them."""

    def __init__(self, database: Database, *, runs_dir: Path) -> None:
        super().__init__(database, RUNS)
        self.runs_dir = runs_dir

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    def create(
        self, *, suite: str, suite_path: str, suite_sha256: str, model: str, config: dict[str, Any]
    ) -> Run:
        row = RunRow(
            id=f"evrun-{uuid.uuid4().hex[:12]}",
            suite=suite,
            suite_path=suite_path,
            suite_sha256=suite_sha256,
            model=model,
            status=RunStatus.QUEUED.value,
            created_at=datetime.now(UTC),
            schema_version=SCHEMA_VERSION,
            config=dumps(config),
            counts="{}",
            metrics="{}",
        )
        return RUNS.add(self.database, row)

    def start(self, run_id: str, *, pid: int | None = None) -> Run:
        """Mark a run running (a new run, or one being resumed)."""

        def one_process(row: RunRow) -> None:
            other = row.pid if row.pid is not None and row.pid != os.getpid() else None
            if row.status == RunStatus.RUNNING and process_alive(other):
                raise RunError(f"run {run_id} is running (process {row.pid})")

        return RUNS.start(self.database, run_id, pid=pid, rule=one_process)

    def record_output(self, run_id: str, *, position: int, sample: Sample, output: Output) -> None:
        """Store one sample's outcome (again, when a resume retries a failed call)."""
        self.record_outputs(run_id, [(position, sample, output)])

    def record_outputs(self, run_id: str, items: Sequence[tuple[int, Sample, Output]]) -> None:
        """Store several samples' outcomes in one transaction (cache hits come in bulk)."""
        now = datetime.now(UTC)
        with self.database.session() as session:
            for position, sample, output in items:
                session.merge(
                    SampleRow(
                        run_id=run_id,
                        sample_id=sample.id,
                        position=position,
                        dataset=sample.dataset,
                        prompt_sha256=output.prompt_sha256,
                        reference_sha256=output.reference_sha256,
                        output=output.text,
                        finish_reason=output.finish_reason,
                        filtered=output.filtered,
                        error=output.error,
                        latency_ms=output.latency_ms,
                        cached=output.cached,
                        created_at=now,
                    )
                )

    def outputs(self, run_id: str) -> dict[str, Output]:
        """Every stored output of a run, by sample id."""
        with self.database.session() as session:
            rows = session.scalars(
                select(SampleRow).where(SampleRow.run_id == run_id).order_by(SampleRow.position)
            ).all()
            return {row.sample_id: row.to_output() for row in rows}

    def sample_records(self, run_id: str) -> builtins.list[dict[str, Any]]:
        """A run's sample rows as plain dicts (``SAMPLE_COLUMNS``), in dataset order."""
        with self.database.session() as session:
            rows = session.scalars(
                select(SampleRow).where(SampleRow.run_id == run_id).order_by(SampleRow.position)
            ).all()
            return [{column: getattr(row, column) for column in SAMPLE_COLUMNS} for row in rows]

    def finish(
        self,
        run_id: str,
        status: RunStatus,
        *,
        error: str | None = None,
        counts: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> Run:
        def write(row: RunRow) -> None:
            if counts is not None:
                row.counts = dumps(dict(counts))
            if metrics is not None:
                row.metrics = dumps(dict(metrics))

        return RUNS.finish(self.database, run_id, status, error=error, change=write)

    def scored_metric(
        self, name: str, inputs_sha256: str, *, suite: str
    ) -> tuple[str, dict[str, Any]] | None:
        """The newest succeeded run of ``suite`` whose metric ``name`` was scored on inputs
        hashing to ``inputs_sha256``, with that metric's record; None when there is none.

        The hash is matched as text first (``LIKE``), so only candidate rows are parsed.
        """
        with self.database.session() as session:
            rows = session.execute(
                select(RunRow.id, RunRow.metrics)
                .where(
                    RunRow.suite == suite,
                    RunRow.status == RunStatus.SUCCEEDED.value,
                    RunRow.metrics.contains(inputs_sha256, autoescape=True),
                )
                .order_by(RunRow.finished_at.desc())
            ).all()
        for run_id, metrics in rows:
            record = json.loads(metrics or "{}").get(name)
            if isinstance(record, dict) and record.get("inputs_sha256") == inputs_sha256:
                return run_id, record
        return None

    def delete(self, run_id: str) -> None:
        """Remove a run, its samples and its files."""
        with self.database.session() as session:
            session.execute(delete(SampleRow).where(SampleRow.run_id == run_id))
            session.delete(RUNS.find(session, run_id))
        shutil.rmtree(self.run_dir(run_id), ignore_errors=True)

    def write_files(
        self, run: Run, samples: Sequence[Sample], outputs: Mapping[str, Output]
    ) -> Path:
        """``run.json`` and ``samples.jsonl`` under the run's folder; returns the folder."""
        folder = self.run_dir(run.id)
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / RUN_FILE, dumps(run.record(), indent=2) + "\n")
        lines = [dumps(_sample_line(sample, outputs.get(sample.id))) for sample in samples]
        _write_atomic(folder / SAMPLES_FILE, "".join(line + "\n" for line in lines))
        return folder


def _sample_line(sample: Sample, output: Output | None) -> dict[str, Any]:
    line: dict[str, Any] = {"id": sample.id, "dataset": sample.dataset, "labels": sample.labels}
    if output is None:
        line.update({"output": None, "error": "not run"})
        return line
    line.update(
        {
            "prompt_sha256": output.prompt_sha256,
            "reference_sha256": output.reference_sha256,
            "output": output.text,
            "finish_reason": output.finish_reason,
            "filtered": output.filtered,
            "error": output.error,
            "latency_ms": round(output.latency_ms, 3),
            "cached": output.cached,
        }
    )
    return line


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


@contextmanager
def open_store(database_url: str | None = None) -> Iterator[RunStore]:
    """The run store on the configured database (migrated), closed afterwards."""
    settings = get_settings()
    database = Database(database_url or settings.database, timeouts=settings.database_timeouts)
    try:
        database.migrate()
        yield RunStore(database, runs_dir=settings.runs_dir)
    finally:
        database.dispose()


# -- the dashboard's read API ----------------------------------------------------------------------


def load_runs(database_url: str | None = None) -> pd.DataFrame:
    """Every run, newest first: ``RUN_COLUMNS`` plus ``metric.<name>`` (each metric's value).

    ``created_at``/``finished_at`` are timezone-aware UTC timestamps.
    """
    import pandas as pd

    with open_store(database_url) as store:
        runs = store.list()
    rows: list[dict[str, Any]] = []
    for run in runs:
        row: dict[str, Any] = {
            "id": run.id,
            "suite": run.suite,
            "model": run.model,
            "status": run.status.value,
            "created_at": run.created_at,
            "finished_at": run.finished_at,
            "error": run.error,
            "suite_sha256": run.suite_sha256,
            "schema_version": run.schema_version,
        }
        for name, scores in sorted(run.metrics.items()):
            value = scores.get("value") if isinstance(scores, Mapping) else None
            row[f"metric.{name}"] = value
        rows.append(row)
    frame = pd.DataFrame(rows, columns=_columns(RUN_COLUMNS, rows))
    for column in ("created_at", "finished_at"):
        frame[column] = pd.to_datetime(frame[column], utc=True)
    return frame


def load_samples(run_id: str, database_url: str | None = None) -> pd.DataFrame:
    """One row per sample of a run, in dataset order (``SAMPLE_COLUMNS``)."""
    import pandas as pd

    with open_store(database_url) as store:
        store.get(run_id)  # RunError for an unknown id
        rows = store.sample_records(run_id)
    return pd.DataFrame(rows, columns=list(SAMPLE_COLUMNS))


def _columns(fixed: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    extra = sorted({key for row in rows for key in row} - set(fixed))
    return [*fixed, *extra]
