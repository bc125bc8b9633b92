"""The fine-tuning page's data: jobs, their loss curves, and the registered models.

Jobs come from ``finetune.jobs.JobStore`` (status, the training config as hyperparameters,
the sha256 of the data files). Loss curves come from each job's ``results.csv`` (Azure's
columns plus ``epoch``), written under ``SAFEGATE_HOME/jobs/<job>/`` while it trains and
copied into the adapter's folder when it is registered; a row per logging step carries
``train_loss`` and the one-batch ``valid_loss``, and the row at each epoch's end also the
full validation loss (``full_valid_loss``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.jobs import Job, JobStore
from finetune.registry import ModelRegistry
from finetune.training.results import RESULTS_FILE

if TYPE_CHECKING:
    import pandas as pd

JOB_COLUMNS = (
    "id",
    "model",
    "base",
    "status",
    "created_at",
    "started_at",
    "finished_at",
    "duration_s",
    "epochs",
    "learning_rate",
    "batch_size",
    "lora_r",
    "train_sha256",
    "validation_sha256",
    "error",
)
# The hyperparameters a job table shows; the job's page shows the whole config.
HYPERPARAMETERS = (
    "epochs",
    "batch_size",
    "gradient_accumulation",
    "learning_rate",
    "lr_scheduler",
    "warmup_ratio",
    "weight_decay",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "max_seq_length",
    "packing",
    "precision",
    "quantization",
    "seed",
)
STEP_SERIES = {"train_loss": "training", "valid_loss": "validation (one batch)"}
EPOCH_SERIES = {"train_loss": "training (mean over the epoch)", "full_valid_loss": "validation"}
MODEL_COLUMNS = ("name", "kind", "base", "deployed", "created_at", "job_id", "final_metrics")


def jobs_table(jobs: JobStore) -> pd.DataFrame:
    """Every job, newest first, with its main hyperparameters and data hashes."""
    import pandas as pd

    rows = [_job_row(job) for job in jobs.list()]
    frame = pd.DataFrame(rows, columns=list(JOB_COLUMNS))
    for column in ("created_at", "started_at", "finished_at"):
        frame[column] = pd.to_datetime(frame[column], utc=True)
    return frame


def _job_row(job: Job) -> dict[str, Any]:
    config = job.config
    return {
        "id": job.id,
        "model": job.model_name,
        "base": job.base,
        "status": job.status.value,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "duration_s": _duration(job.started_at, job.finished_at),
        "epochs": config.get("epochs"),
        "learning_rate": config.get("learning_rate"),
        "batch_size": config.get("batch_size"),
        "lora_r": config.get("lora_r"),
        "train_sha256": job.data_sha256.get("train"),
        "validation_sha256": job.data_sha256.get("validation"),
        "error": job.error,
    }


def _duration(started: datetime | None, finished: datetime | None) -> float | None:
    if started is None or finished is None:
        return None
    return round((finished - started).total_seconds(), 1)


def hyperparameters(job: Job) -> dict[str, Any]:
    """The job's training config: the usual hyperparameters first, then the rest."""
    config = job.config
    first = {name: config[name] for name in HYPERPARAMETERS if name in config}
    rest = {name: value for name, value in sorted(config.items()) if name not in first}
    return {**first, **rest}


def hyperparameter_table(job: Job) -> pd.DataFrame:
    """``parameter, value`` rows of :func:`hyperparameters`, values as JSON text."""
    import pandas as pd

    rows = [
        {"parameter": name, "value": value if isinstance(value, str) else json.dumps(value)}
        for name, value in hyperparameters(job).items()
    ]
    return pd.DataFrame(rows, columns=["parameter", "value"])


def results_path(job: Job, *, jobs_dir: Path, registry: ModelRegistry) -> Path | None:
    """The job's results.csv: in its job folder, else in its registered adapter's folder."""
    candidates = [jobs_dir / job.id / RESULTS_FILE]
    model = registry.find(job.model_name)
    if model is not None and model.job_id == job.id:
        candidates.append(Path(model.path) / RESULTS_FILE)
    return next((path for path in candidates if path.is_file()), None)


def read_results(path: Path) -> pd.DataFrame:
    """results.csv as numbers (empty cells as NaN), one row per logged step."""
    import pandas as pd

    frame = pd.read_csv(path)
    for column in frame.columns:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame.sort_values("step", ignore_index=True)


def loss_per_step(results: pd.DataFrame) -> pd.DataFrame:
    """Long form ``step, epoch, series, loss`` for the logged training and one-batch losses."""
    return _long(results, index=["step", "epoch"], series=STEP_SERIES)


def loss_per_epoch(results: pd.DataFrame) -> pd.DataFrame:
    """Long form ``epoch, series, loss``: mean training loss over each epoch's steps, and
    the full validation loss measured at the epoch's end.

    A step logged at epoch ``e`` (fractional) belongs to epoch ``ceil(e)``.
    """
    import pandas as pd

    if results.empty or "epoch" not in results:
        return pd.DataFrame(columns=["epoch", "series", "loss"])
    numbered = results.assign(
        epoch=results["epoch"].map(lambda e: max(1, math.ceil(e - 1e-9)) if e == e else None)
    ).dropna(subset=["epoch"])
    numbered["epoch"] = numbered["epoch"].astype(int)
    columns = {name: "mean" if name == "train_loss" else "last" for name in EPOCH_SERIES}
    present = {name: how for name, how in columns.items() if name in numbered}
    if not present:
        return pd.DataFrame(columns=["epoch", "series", "loss"])
    grouped = numbered.groupby("epoch").agg(present).reset_index()
    return _long(grouped, index=["epoch"], series=EPOCH_SERIES)


def _long(frame: pd.DataFrame, *, index: list[str], series: Mapping[str, str]) -> pd.DataFrame:
    import pandas as pd

    present = [name for name in series if name in frame]
    if frame.empty or not present:
        return pd.DataFrame(columns=[*index, "series", "loss"])
    kept = [column for column in index if column in frame]
    long = frame[[*kept, *present]].melt(id_vars=kept, var_name="series", value_name="loss")
    long = long.dropna(subset=["loss"])
    long["series"] = long["series"].map(series)
    return long.reset_index(drop=True)


def models_table(registry: ModelRegistry, *, deployed_only: bool = False) -> pd.DataFrame:
    """Registered bases and adapters (or only the deployed ones), oldest first."""
    import pandas as pd

    models = registry.deployed_models() if deployed_only else registry.list()
    rows = [
        {
            "name": model.name,
            "kind": model.kind.value,
            "base": model.base or "",
            "deployed": model.deployed,
            "created_at": model.created_at,
            "job_id": model.job_id or "",
            "final_metrics": _metrics_text(model.metrics),
        }
        for model in models
    ]
    frame = pd.DataFrame(rows, columns=list(MODEL_COLUMNS))
    frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True)
    return frame


def _metrics_text(metrics: Mapping[str, Any]) -> str:
    shown = []
    for name, value in sorted(metrics.items()):
        if isinstance(value, float):
            shown.append(f"{name}={value:.4g}")
        elif isinstance(value, int | str) and not isinstance(value, bool):
            shown.append(f"{name}={value}")
    return ", ".join(shown)
