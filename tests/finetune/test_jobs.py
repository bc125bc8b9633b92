"""Job states in a real database: transitions, cancel requests, killed runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from finetune.db import Database
from finetune.errors import JobError
from finetune.jobs import JobStatus, JobStore


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    database = Database(f"sqlite:///{tmp_path / 'jobs.db'}")
    database.migrate()
    return JobStore(database)


def new_job(store: JobStore) -> str:
    job = store.create(
        model_name="support-v1",
        base="demo-base",
        config={"epochs": 2, "learning_rate": 0.001},
        data_sha256={"train": "a" * 64, "validation": None},
        output_dir="jobs/support-v1",
    )
    assert job.status is JobStatus.QUEUED
    return job.id


def test_a_job_runs_to_success_and_keeps_its_metrics(store: JobStore) -> None:
    job_id = new_job(store)
    running = store.start(job_id, pid=123)
    assert running.status is JobStatus.RUNNING
    assert running.pid == 123
    store.record_metrics(job_id, {"train_loss": 1.5})
    store.record_metrics(job_id, {"valid_loss": 1.7})
    done = store.finish(job_id, JobStatus.SUCCEEDED)
    assert done.status is JobStatus.SUCCEEDED
    assert done.metrics == {"train_loss": 1.5, "valid_loss": 1.7}
    assert done.finished_at is not None
    assert done.config == {"epochs": 2, "learning_rate": 0.001}


def test_cancelling_a_queued_job_ends_it_and_a_running_one_is_flagged(store: JobStore) -> None:
    queued = new_job(store)
    assert store.request_cancel(queued).status is JobStatus.CANCELLED
    running = new_job(store)
    store.start(running)
    flagged = store.request_cancel(running)
    assert flagged.status is JobStatus.RUNNING
    assert store.cancel_requested(running)


def test_finished_jobs_refuse_cancel_and_rerun(store: JobStore) -> None:
    job_id = new_job(store)
    store.start(job_id)
    store.finish(job_id, JobStatus.SUCCEEDED)
    with pytest.raises(JobError, match="already succeeded"):
        store.request_cancel(job_id)
    with pytest.raises(JobError, match="cannot run again"):
        store.start(job_id)


def test_a_failed_job_may_resume(store: JobStore) -> None:
    job_id = new_job(store)
    store.start(job_id)
    store.finish(job_id, JobStatus.FAILED, error="killed")
    assert store.start(job_id).status is JobStatus.RUNNING


def test_reconcile_marks_a_job_whose_process_died_as_failed(store: JobStore) -> None:
    job_id = new_job(store)
    process = subprocess.Popen([sys.executable, "-c", "pass"])  # noqa: S603
    process.wait()
    store.start(job_id, pid=process.pid)
    alive = new_job(store)
    store.start(alive)  # this process: alive
    failed = store.reconcile()
    assert [job.id for job in failed] == [job_id]
    assert store.get(job_id).status is JobStatus.FAILED
    assert "--resume" in (store.get(job_id).error or "")
    assert store.get(alive).status is JobStatus.RUNNING


def test_unknown_job_is_a_clear_error(store: JobStore) -> None:
    with pytest.raises(JobError, match="no job 'ftjob-nope'"):
        store.get("ftjob-nope")
