"""Training jobs: one row per run, with the states a user watches.

``queued -> running -> succeeded | failed | cancelled``. A cancel is a request stored on
the row (``cancel_requested``); the training loop polls it between steps and stops
cleanly, so a cancelled job never leaves a half-written model. A run that dies without
updating its row (killed process) is found by ``reconcile()``: its recorded pid is gone,
so it is marked failed and can be resumed from its last checkpoint. Which move each state
allows is the table ``JOBS`` (a ``safegate.lifecycle.Lifecycle``).
"""

from __future__ import annotations

import builtins
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Boolean, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from finetune.db import Base, Database
from finetune.errors import JobError
from safegate.lifecycle import (
    Lifecycle,
    LifecycleStore,
    Move,
    RecordStatus,
    StatusColumns,
    process_alive,
    record_lifecycle,
)


class JobStatus(RecordStatus):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class JobRow(StatusColumns, Base):
    # status, created_at, started_at, finished_at, error and pid: StatusColumns
    __tablename__ = "finetune_jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64), index=True)
    base: Mapped[str] = mapped_column(String(300))
    config: Mapped[str] = mapped_column(Text)  # sorted-key JSON of the TrainConfig
    data_sha256: Mapped[str] = mapped_column(Text)  # JSON {"train": ..., "validation": ...}
    output_dir: Mapped[str] = mapped_column(String(1000))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    metrics: Mapped[str] = mapped_column(Text, default="{}")  # latest metrics, JSON


@dataclass(frozen=True)
class Job:
    id: str
    model_name: str
    base: str
    status: JobStatus
    config: dict[str, Any]
    data_sha256: dict[str, str | None]
    output_dir: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    pid: int | None
    cancel_requested: bool
    metrics: dict[str, Any]

    @classmethod
    def from_row(cls, row: JobRow) -> Job:
        return cls(
            id=row.id,
            model_name=row.model_name,
            base=row.base,
            status=JobStatus(row.status),
            config=json.loads(row.config),
            data_sha256=json.loads(row.data_sha256),
            output_dir=row.output_dir,
            created_at=_utc(row.created_at),
            started_at=_utc(row.started_at) if row.started_at else None,
            finished_at=_utc(row.finished_at) if row.finished_at else None,
            error=row.error,
            pid=row.pid,
            cancel_requested=row.cancel_requested,
            metrics=json.loads(row.metrics or "{}"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model_name,
            "base": self.base,
            "status": self.status.value,
            "created": self.created_at.isoformat(),
            "started": self.started_at.isoformat() if self.started_at else None,
            "finished": self.finished_at.isoformat() if self.finished_at else None,
            "error": self.error,
            "metrics": self.metrics,
            "output_dir": self.output_dir,
        }


CANCEL = "cancel"
_LIVE = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})

# A failed job runs again (``--resume``); a succeeded or cancelled one never does. A cancel
# is refused once the job has ended. Any job may be finished: a final state is written over
# by whichever process ends the job last (``reconcile`` and the training loop may race).
JOBS: Lifecycle[JobStatus, JobRow, Job] = record_lifecycle(
    "job",
    JobStatus,
    row=JobRow,
    record=Job.from_row,
    start=Move(_LIVE | {JobStatus.FAILED}, "{noun} {id} is {status}; it cannot run again"),
    moves={CANCEL: Move(_LIVE, "{noun} {id} already {status}; nothing to cancel")},
    error=JobError,
    missing="no job {id!r}; 'safegate finetune jobs' lists them",
)


class JobStore(LifecycleStore[JobStatus, JobRow, Job]):
    """Creates jobs and moves them through their states."""

    def __init__(self, database: Database) -> None:
        super().__init__(database, JOBS)

    def create(
        self,
        *,
        model_name: str,
        base: str,
        config: dict[str, Any],
        data_sha256: dict[str, str | None],
        output_dir: str,
    ) -> Job:
        row = JobRow(
            id=f"ftjob-{uuid.uuid4().hex[:12]}",
            model_name=model_name,
            base=base,
            status=JobStatus.QUEUED.value,
            config=json.dumps(config, sort_keys=True),
            data_sha256=json.dumps(data_sha256, sort_keys=True),
            output_dir=output_dir,
            created_at=datetime.now(UTC),
            cancel_requested=False,
            metrics="{}",
        )
        return JOBS.add(self.database, row)

    def record_metrics(self, job_id: str, metrics: dict[str, Any]) -> None:
        def change(row: JobRow) -> None:
            merged = {**json.loads(row.metrics or "{}"), **metrics}
            row.metrics = json.dumps(merged, sort_keys=True)

        JOBS.update(self.database, job_id, move=None, change=change)

    def request_cancel(self, job_id: str) -> Job:
        def change(row: JobRow) -> None:
            if row.status == JobStatus.QUEUED:
                row.status = JobStatus.CANCELLED.value
                row.finished_at = datetime.now(UTC)
            row.cancel_requested = True

        return JOBS.update(self.database, job_id, move=CANCEL, change=change)

    def cancel_requested(self, job_id: str) -> bool:
        return self.get(job_id).cancel_requested

    def reconcile(self) -> builtins.list[Job]:
        """Mark running jobs whose process is gone as failed; return them."""
        failed: builtins.list[Job] = []
        for job in self.list():
            if job.status is JobStatus.RUNNING and not process_alive(job.pid):
                failed.append(
                    self.finish(
                        job.id,
                        JobStatus.FAILED,
                        error="the training process stopped unexpectedly; resume with "
                        f"'safegate finetune train --resume {job.id}'",
                    )
                )
        return failed


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
