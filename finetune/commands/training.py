"""``safegate finetune train|jobs|cancel|demo`` (and the hidden ``run-job``).

``train`` checks the data and the base, queues a job and runs it in the foreground with
a progress bar; ``--detach`` runs it in a background process instead (its output goes to
``jobs_dir/<job>/train.log``) and ``--submit-only`` only queues it, for
``accelerate launch ... safegate finetune run-job ID`` (see ``finetune.training.tune``).
``--resume JOB`` continues a failed job from its last epoch checkpoint. ``jobs`` first
marks jobs whose process died as failed, then lists them; ``cancel`` asks a job to stop
after its current step. Bad input prints a report and exits 1, never a traceback.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from finetune.commands.apps import app
from finetune.errors import FinetuneError
from finetune.jobs import Job, JobStatus
from finetune.settings import DEFAULT_BASE_MODEL
from safegate.offline import offline_defaults
from safegate.output import table_console

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
DEFAULT_CANCEL_WAIT_S = 600.0
CANCEL_WAIT_POLL_S = 0.5
LOG_FILE = "train.log"

console = Console(stderr=True, soft_wrap=True)
_DETACHED: list[subprocess.Popen[bytes]] = []


def _fail(message: str, *, code: int = EXIT_FAILED) -> NoReturn:
    console.print(f"[red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def _quiet_libraries() -> None:
    offline_defaults()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    # peft 0.21 calls transformers' deprecated is_gradient_checkpointing when it wraps a model
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


@contextmanager
def _reported() -> Iterator[None]:
    """Turn the package's errors into a message and an exit code."""
    try:
        yield
    except (FinetuneError, ValueError) as error:
        _fail(str(error))
    except SQLAlchemyError as error:
        reason = str(getattr(error, "orig", None) or type(error).__name__)
        _fail(f"cannot use the database ({type(error).__name__}: {reason})")
    except KeyboardInterrupt:
        _fail(
            "interrupted; the job is marked failed (resume it with --resume)", code=EXIT_INTERRUPTED
        )


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """A ``kill`` marks the job failed (resumable) instead of leaving it 'running'."""
    try:
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _services() -> Any:
    from finetune.training.tune import Services

    return Services.from_settings()


def _field_help(name: str) -> str:
    """A TrainConfig field's help, with its default (the options default to None: unset)."""
    from finetune.training.config import TrainConfig

    for item in fields(TrainConfig):
        if item.name == name:
            default = item.default
            if isinstance(default, tuple):
                default = ",".join(default) or "none"
            elif isinstance(default, bool):
                default = "yes" if default else "no"
            elif default is None:
                default = "unset"
            return f"{item.metadata.get('help', '')} (default: {default})"
    raise KeyError(name)


def _opt(name: str, extra: str = "", **kwargs: Any) -> Any:
    text = _field_help(name).replace(" (default:", f"{extra} (default:", 1)
    return typer.Option(help=text, show_default=False, **kwargs)


@app.command()
def train(
    train_file: Annotated[
        Path | None, typer.Option("--train", help="Training data (chat-completion JSONL).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Name the adapter is registered under.")] = None,
    base: Annotated[
        str,
        typer.Option(
            help="Registered base (e.g. demo-base), local folder, or hub id of a Phi-3 model."
        ),
    ] = DEFAULT_BASE_MODEL,
    validation: Annotated[
        Path | None, typer.Option(help="Validation JSONL; default: hold out a seeded split.")
    ] = None,
    validation_fraction: Annotated[float | None, _opt("validation_fraction")] = None,
    epochs: Annotated[int | None, _opt("epochs", " (Azure: n_epochs)", min=1)] = None,
    batch_size: Annotated[int | None, _opt("batch_size", min=1)] = None,
    gradient_accumulation: Annotated[int | None, _opt("gradient_accumulation", min=1)] = None,
    batch_size_multiplier: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Azure's batch-size multiplier: gradient accumulation = this, so the "
            "effective batch is batch-size x this.",
        ),
    ] = None,
    learning_rate: Annotated[float | None, _opt("learning_rate")] = None,
    learning_rate_multiplier: Annotated[
        float | None,
        typer.Option(help="Azure's learning-rate multiplier: learning rate = this x 2e-4."),
    ] = None,
    lr_scheduler: Annotated[str | None, _opt("lr_scheduler")] = None,
    warmup_ratio: Annotated[float | None, _opt("warmup_ratio")] = None,
    weight_decay: Annotated[float | None, _opt("weight_decay")] = None,
    lora_r: Annotated[int | None, _opt("lora_r", min=1)] = None,
    lora_alpha: Annotated[int | None, _opt("lora_alpha", min=1)] = None,
    lora_dropout: Annotated[float | None, _opt("lora_dropout")] = None,
    target_modules: Annotated[str | None, _opt("target_modules", ", comma-separated")] = None,
    modules_to_save: Annotated[str | None, _opt("modules_to_save", "; comma-separated")] = None,
    also_without_system: Annotated[bool | None, _opt("also_without_system")] = None,
    max_seq_length: Annotated[int | None, _opt("max_seq_length")] = None,
    packing: Annotated[bool | None, _opt("packing")] = None,
    gradient_checkpointing: Annotated[bool | None, _opt("gradient_checkpointing")] = None,
    precision: Annotated[str | None, _opt("precision")] = None,
    quantization: Annotated[str | None, _opt("quantization")] = None,
    attn_implementation: Annotated[str | None, _opt("attn_implementation")] = None,
    torch_compile: Annotated[bool | None, _opt("torch_compile")] = None,
    logging_steps: Annotated[int | None, _opt("logging_steps", min=1)] = None,
    save_total_limit: Annotated[int | None, _opt("save_total_limit", min=1)] = None,
    seed: Annotated[int | None, _opt("seed")] = None,
    resume: Annotated[
        str | None,
        typer.Option(metavar="JOB_ID", help="Continue this failed job from its last checkpoint."),
    ] = None,
    detach: Annotated[
        bool, typer.Option(help="Run in a background process; print the job id and return.")
    ] = False,
    submit_only: Annotated[
        bool,
        typer.Option(help="Only queue the job (run it with run-job, e.g. under accelerate)."),
    ] = False,
) -> None:
    """Fine-tune a Phi-3 base into a LoRA adapter, as a job."""
    _quiet_libraries()
    if resume is not None:
        _resume(resume, detach=detach)
        return
    if train_file is None or name is None:
        _fail("--train FILE and --name NAME are required (or --resume JOB_ID)")
    if learning_rate is not None and learning_rate_multiplier is not None:
        _fail("give --learning-rate or --learning-rate-multiplier, not both")
    if gradient_accumulation is not None and batch_size_multiplier is not None:
        _fail("give --gradient-accumulation or --batch-size-multiplier, not both")
    from finetune.training.config import DEFAULT_LEARNING_RATE, TrainConfig
    from finetune.training.tune import submit

    given: dict[str, Any] = {
        "validation_fraction": validation_fraction,
        "epochs": epochs,
        "batch_size": batch_size,
        "gradient_accumulation": gradient_accumulation or batch_size_multiplier,
        "learning_rate": learning_rate
        if learning_rate_multiplier is None
        else learning_rate_multiplier * DEFAULT_LEARNING_RATE,
        "lr_scheduler": lr_scheduler,
        "warmup_ratio": warmup_ratio,
        "weight_decay": weight_decay,
        "lora_r": lora_r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "target_modules": _names(target_modules),
        "modules_to_save": _names(modules_to_save),
        "also_without_system": also_without_system,
        "max_seq_length": max_seq_length,
        "packing": packing,
        "gradient_checkpointing": gradient_checkpointing,
        "precision": precision,
        "quantization": quantization,
        "attn_implementation": attn_implementation,
        "torch_compile": torch_compile,
        "logging_steps": logging_steps,
        "save_total_limit": save_total_limit,
        "seed": seed,
    }
    with _reported():
        config = TrainConfig(
            name=name,
            train_file=train_file,
            validation_file=validation,
            base=base,
            **{key: value for key, value in given.items() if value is not None},
        )
        services = _services()
        job = submit(config, services=services)
        if submit_only:
            console.print(f"job {job.id} queued; run it with 'safegate finetune run-job {job.id}'")
            typer.echo(job.id)
            return
        if detach:
            _detach(job, services=services, resume=False)
            return
        console.print(f"job {job.id}: training {name} on {base}")
        _run_foreground(job.id, resume=False, services=services)


def _names(option: str | None) -> tuple[str, ...] | None:
    """A comma-separated option as a tuple of names (None: not given)."""
    if option is None:
        return None
    return tuple(part.strip() for part in option.split(",") if part.strip())


def _resume(job_id: str, *, detach: bool) -> None:
    with _reported():
        services = _services()
        services.jobs.reconcile()
        job = services.jobs.get(job_id)
        if job.status is not JobStatus.FAILED:
            _fail(f"job {job_id} is {job.status}; only a failed job can be resumed")
        if detach:
            _detach(job, services=services, resume=True)
            return
        console.print(f"job {job.id}: resuming {job.model_name}")
        _run_foreground(job.id, resume=True, services=services)


def _run_foreground(job_id: str, *, resume: bool, services: Any) -> None:
    from finetune.training.tune import run

    with _sigterm_as_interrupt():
        job = run(job_id, resume=resume, progress=True, services=services)
    _print_outcome(job, services=services)


def _print_outcome(job: Job, *, services: Any) -> None:
    if job.status is JobStatus.CANCELLED:
        console.print(f"job {job.id} cancelled; no model was registered")
        raise typer.Exit(EXIT_FAILED)
    if job.status is not JobStatus.SUCCEEDED:
        _fail(f"job {job.id} {job.status}: {job.error}")
    model = services.registry.get(job.model_name)
    metrics = model.metrics
    for split in ("train", "valid"):
        truncated, dropped = metrics.get(f"{split}_truncated"), metrics.get(f"{split}_dropped")
        if truncated or dropped:
            console.print(
                f"{split}: {truncated} example(s) lost leading turns and {dropped} were left "
                "out to fit --max-seq-length"
            )
    for key in (
        "steps",
        "train_loss",
        "train_mean_token_accuracy",
        "full_valid_loss",
        "full_valid_mean_token_accuracy",
        "full_valid_perplexity",
    ):
        if key in metrics:
            typer.echo(f"{key}: {metrics[key]}")
    typer.echo(f"adapter: {model.path}")
    typer.echo(model.name)


def _detach(job: Job, *, services: Any, resume: bool) -> None:
    from finetune.training.tune import job_dir

    folder = job_dir(job.id, services=services)
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-c", "from finetune.cli import app; app()", "run-job", job.id]
    if resume:
        command.append("--resume")
    with (folder / LOG_FILE).open("ab") as log:
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and module, no shell
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=Path.cwd(),
        )
    # The child outlives this command and is never waited for; holding its handle keeps
    # Popen from warning that it is "still running" when the handle is collected.
    _DETACHED.append(process)
    # Recorded now so that 'jobs' marks it failed should it die before it starts.
    services.jobs.start(job.id, pid=process.pid)
    console.print(
        f"job {job.id} running in the background (pid {process.pid}); "
        f"log: {folder / LOG_FILE}; 'safegate finetune jobs' shows progress"
    )
    typer.echo(job.id)


@app.command("run-job", hidden=True)
def run_job(
    job_id: Annotated[str, typer.Argument(help="Job to run.")],
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint.")] = False,
) -> None:
    """Run a queued job in this process (what --detach and accelerate launch start)."""
    _quiet_libraries()
    with _reported():
        services = _services()
        from finetune.training.tune import run

        with _sigterm_as_interrupt():
            job = run(job_id, resume=resume, progress=sys.stderr.isatty(), services=services)
        if job.status is not JobStatus.SUCCEEDED and job.status is not JobStatus.CANCELLED:
            _fail(f"job {job.id} {job.status}: {job.error}")
        console.print(f"job {job.id} {job.status}")


@app.command()
def jobs(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List training jobs, newest first (a job whose process died shows as failed)."""
    with _reported():
        services = _services()
        services.jobs.reconcile()
        found = services.jobs.list()
    if as_json:
        typer.echo(json.dumps([job.to_json() for job in found], indent=2, sort_keys=True))
        return
    if not found:
        console.print("no jobs yet; start one with 'safegate finetune train' or 'demo'")
        return
    table = Table()
    table.add_column("job", no_wrap=True, min_width=len(found[0].id))
    table.add_column("model", overflow="fold")
    table.add_column("base", overflow="fold")
    table.add_column("status", no_wrap=True)
    for column in ("step", "train loss", "valid loss", "created"):
        table.add_column(column, overflow="fold")
    for job in found:
        metrics = job.metrics
        step = metrics.get("step")
        steps = f"{step}/{metrics.get('max_steps', '?')}" if step is not None else ""
        table.add_row(
            job.id,
            escape(job.model_name),
            escape(job.base),
            _status_text(job),
            steps,
            _number(metrics.get("train_loss")),
            _number(metrics.get("full_valid_loss")),
            job.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    table_console().print(table)
    for job in found:
        if job.error and job.status is JobStatus.FAILED:
            console.print(f"{job.id}: {escape(job.error)}")


def _status_text(job: Job) -> str:
    colour = {
        JobStatus.SUCCEEDED: "green",
        JobStatus.FAILED: "red",
        JobStatus.CANCELLED: "yellow",
        JobStatus.RUNNING: "cyan",
    }.get(job.status, "white")
    return f"[{colour}]{job.status}[/]"


def _number(value: object) -> str:
    if isinstance(value, int | float) and math.isfinite(value):
        return f"{value:.4f}"
    return ""


@app.command()
def cancel(
    job_id: Annotated[str, typer.Argument(metavar="ID", help="Job to cancel.")],
    wait: Annotated[bool, typer.Option(help="Wait until the job has stopped.")] = False,
    timeout: Annotated[
        float, typer.Option(min=0.0, help="Seconds --wait waits at most.")
    ] = DEFAULT_CANCEL_WAIT_S,
) -> None:
    """Stop a job cleanly after its current step; no model is registered."""
    with _reported():
        services = _services()
        services.jobs.reconcile()
        job = services.jobs.request_cancel(job_id)
        if job.status is JobStatus.CANCELLED:
            console.print(f"job {job_id} cancelled")
            return
        console.print(f"job {job_id}: cancel requested; it stops after the current step")
        if wait:
            job = _wait_until(lambda: services.jobs.get(job_id), timeout=timeout)
            console.print(f"job {job_id} {job.status}")


def _wait_until(read: Callable[[], Job], *, timeout: float) -> Job:
    deadline = time.monotonic() + timeout
    job = read()
    while not job.status.finished and time.monotonic() < deadline:
        time.sleep(CANCEL_WAIT_POLL_S)
        job = read()
    return job


@app.command()
def demo(
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Override the demo's epochs (for a quicker look).")
    ] = None,
    if_missing: Annotated[
        bool,
        typer.Option("--if-missing", help="Do nothing when the demo adapter is already deployed."),
    ] = False,
) -> None:
    """Offline: build a tiny Phi-3 base, fine-tune an adapter on the sample, deploy it.

    Prints the adapter's name on its last line.
    """
    _quiet_libraries()
    with _reported():
        from finetune.demo import (
            DEMO_ADAPTER,
            SAMPLE_TRAIN,
            answer,
            demo_train_args,
            deployed_demo,
            run_demo,
        )

        if if_missing and (existing := deployed_demo()) is not None:
            console.print(f"{DEMO_ADAPTER} is already deployed ({escape(existing.path)})")
            typer.echo(existing.name)
            return

        console.print(f"building the demo base and training {DEMO_ADAPTER} on {SAMPLE_TRAIN}")
        with _sigterm_as_interrupt():
            model = run_demo(epochs=epochs, progress=True)
        question, reply = answer(model, line=-1, system=False)
        typer.echo(f"base: {model.base}")
        typer.echo(f"job: {model.job_id}")
        for key in ("train_loss", "full_valid_loss", "train_mean_token_accuracy"):
            if key in model.metrics:
                typer.echo(f"{key}: {model.metrics[key]}")
        typer.echo(f"adapter: {model.path} (deployed)")
        command = shlex.join(demo_train_args(epochs=epochs))
        typer.echo(f"trained as: safegate finetune train {command}")
        typer.echo(f"sample question (no system prompt): {question}")
        ending = "" if reply.stopped else " [no <|end|> within the token limit]"
        typer.echo(f"adapter's answer: {reply.text}{ending}")
        typer.echo(model.name)
