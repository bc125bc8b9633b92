"""What a training run reports while it trains, as transformers ``TrainerCallback``s.

``ResultsCsv`` writes ``results.csv`` (``finetune.training.results``); ``JobMonitor``
writes the latest metrics to the job and stops training on a cancel request;
``RichProgress`` draws a progress bar. Importing this module imports transformers and
torch.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from finetune.jobs import JobStore
from finetune.training.config import CONFIG_FILE, write_json
from finetune.training.results import RESULTS_COLUMNS, results_row, rounded

CANCEL_POLL_S = 0.5  # how often the training loop asks the database about a cancel


class ResultsCsv(TrainerCallback):
    """results.csv: one row per logging step, the epoch's full validation merged into
    the row of the step it ran at. Rows past a resumed checkpoint are dropped first.
    Each checkpoint also gets the training config beside it."""

    def __init__(self, path: Path, *, resume_step: int | None, config: dict[str, Any]) -> None:
        self.path = path
        self.config = config
        self.pending: dict[str, Any] | None = None
        if resume_step is None or not path.exists():
            with path.open("w", newline="", encoding="utf-8") as handle:
                csv.writer(handle).writerow(RESULTS_COLUMNS)
        else:
            with path.open(newline="", encoding="utf-8") as handle:
                rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]
            with path.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=RESULTS_COLUMNS)
                writer.writeheader()
                writer.writerows(rows)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        row = results_row(state.global_step, logs)
        if not row:
            return
        if self.pending is not None and self.pending["step"] != state.global_step:
            self.flush()
        self.pending = {**(self.pending or {}), **row}

    def on_save(self, args: TrainingArguments, state: TrainerState, *_: Any, **__: Any) -> None:
        self.flush()
        checkpoint = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():  # the config beside every artifact, checkpoints too
            write_json(checkpoint / CONFIG_FILE, self.config)

    def on_train_end(self, *_: Any, **__: Any) -> None:
        self.flush()

    def flush(self) -> None:
        if self.pending is None:
            return
        with self.path.open("a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=RESULTS_COLUMNS, restval="")
            writer.writerow(rounded(self.pending))
        self.pending = None


class JobMonitor(TrainerCallback):
    """Writes the latest metrics to the job and stops training on a cancel request.

    The main process polls the database (at most every CANCEL_POLL_S seconds); with
    several processes its answer is broadcast, so every rank stops at the same step.
    """

    def __init__(self, store: JobStore, job_id: str, *, main: bool) -> None:
        self.store = store
        self.job_id = job_id
        self.main = main
        self.cancelled = False
        self.last_poll = 0.0

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not self.main or not logs:
            return
        row = results_row(state.global_step, logs)
        if row:
            row["max_steps"] = state.max_steps
            self.store.record_metrics(self.job_id, rounded(row))

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        requested = False
        if self.main and time.monotonic() - self.last_poll >= CANCEL_POLL_S:
            self.last_poll = time.monotonic()
            requested = self.store.cancel_requested(self.job_id)
        if broadcast_flag(requested):
            self.cancelled = True
            control.should_training_stop = True
            control.should_save = False
            control.should_evaluate = False


class RichProgress(TrainerCallback):
    """A progress bar with the latest loss, on stderr, in the main process only."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.task: Any = None
        self.latest: dict[str, str] = {}

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, *_: Any, **__: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        self.progress.start()
        self.task = self.progress.add_task(
            "training", total=state.max_steps, completed=state.global_step, status=""
        )

    def on_step_end(self, args: TrainingArguments, state: TrainerState, *_: Any, **__: Any) -> None:
        if self.task is not None:
            self.progress.update(
                self.task,
                completed=state.global_step,
                description=f"epoch {math.ceil(state.epoch or 0)}/{int(args.num_train_epochs)}",
            )

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.task is None or not logs:
            return
        shown = {"loss": "loss", "mean_token_accuracy": "acc", "eval_loss": "valid loss"}
        for key, label in shown.items():
            if key in logs:
                self.latest[label] = f"{logs[key]:.3f}"
        status = "  ".join(f"{label} {value}" for label, value in self.latest.items())
        self.progress.update(self.task, status=status)

    def on_train_end(self, *_: Any, **__: Any) -> None:
        if self.task is not None:
            self.progress.stop()
            self.task = None


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's flag on every rank (the flag itself when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    device = (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    )
    tensor = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())
