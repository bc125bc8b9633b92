"""Fine-tune a Phi-3 base into a LoRA adapter: one job, start to registered model.

``submit(config)`` checks the data and the names, records a *queued* job and returns it;
``run(job_id)`` trains it with transformers' ``Trainer`` and peft, top to bottom:

1. Resolve the base (``finetune.registry.resolve_base``): a registered base name
   (``demo-base``), a local folder, or a hub id (offline, only from the local cache).
   It must load as ``Phi3ForCausalLM`` (``finetune.training.model_loading``).
2. Load the conversations (``finetune.training.dataset``); validation comes from its own
   file or a seeded split. Each conversation is tokenised in Phi-3's chat format with
   labels on the learned assistant tokens and their ``<|end|>``
   (``finetune.training.encoding``); over-long ones lose leading turns or are dropped,
   and both are counted. ``also_without_system`` trains each conversation that has a
   system message twice, with and without it.
3. Wrap the base with LoRA on Phi-3's fused projections (``qkv_proj``, ``o_proj``,
   ``gate_up_proj``, ``down_proj``); optionally 4-bit (QLoRA, CUDA + bitsandbytes only).
4. Train (``finetune.training.trainer``): bf16 where CUDA supports it, fp32 on CPU;
   optional gradient checkpointing and padding-free packing. An adapter-only checkpoint
   every epoch under ``jobs_dir/<job>/checkpoints``, all of them kept unless
   ``save_total_limit`` keeps only the newest; ``run(job_id, resume=True)`` continues
   from the last. Each logging step and each epoch append a row to
   ``jobs_dir/<job>/results.csv`` (``finetune.training.results``: Azure's columns, plus
   epoch, learning rate and perplexities) and update the job's metrics; a cancel request
   stops training after the current step (``finetune.training.callbacks``).
5. Save the adapter into a hidden temporary folder beside its final place, then rename it
   into ``models_dir/<name>`` in one step, so a half-written folder is never a model;
   register it with its hyperparameters, data hashes and final metrics.

How Azure AI Foundry's hyperparameters map onto ``TrainConfig``: see
``finetune.training.config``. Importing this module stays light (no torch); ``run``
imports the training libraries.

Several GPUs: create the job with ``safegate finetune train ... --submit-only``, then run
it under accelerate; the Trainer takes the distribution from the launcher, and only the
main process writes the job, results.csv and the model::

    # multi_gpu.yaml
    compute_environment: LOCAL_MACHINE
    distributed_type: MULTI_GPU
    num_machines: 1
    num_processes: 4        # GPUs on this machine
    mixed_precision: bf16
    main_training_function: main
    machine_rank: 0
    gpu_ids: all

    accelerate launch --config_file multi_gpu.yaml "$(which safegate)" finetune run-job ID
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.db import Database
from finetune.errors import DataError, FinetuneError, JobError, RegistryError
from finetune.jobs import Job, JobStatus, JobStore
from finetune.registry import Model, ModelKind, ModelRegistry, resolve_base
from finetune.settings import get_settings
from finetune.training.config import CONFIG_FILE, TrainConfig, write_json
from finetune.training.dataset import (
    ExampleDataset,
    encode_all,
    load_conversations,
    split_conversations,
)
from finetune.training.model_loading import add_lora, check_base, load_base, torch_dtype
from finetune.training.results import (
    METRICS_FILE,
    METRICS_SCHEMA_VERSION,
    RESULTS_FILE,
    perplexity,
    results_row,
    rounded,
)
from finetune.validation import file_sha256

if TYPE_CHECKING:
    from transformers import TrainerCallback

ADAPTER_HINT = "train on"  # "... is an adapter, not a base; train on its base ... instead"


@dataclass(frozen=True)
class Services:
    """The database-backed stores a run uses (built from settings unless given)."""

    jobs: JobStore
    registry: ModelRegistry
    models_dir: Path
    jobs_dir: Path

    @classmethod
    def from_settings(cls) -> Services:
        settings = get_settings()
        database = Database(settings.database, timeouts=settings.database_timeouts)
        database.migrate()
        return cls(
            jobs=JobStore(database),
            registry=ModelRegistry(database),
            models_dir=settings.models_dir,
            jobs_dir=settings.jobs_dir,
        )


def submit(config: TrainConfig, *, services: Services | None = None) -> Job:
    """Check the data and names now (bad input fails before any job exists); queue a job."""
    services = services or Services.from_settings()
    if services.registry.find(config.name) is not None:
        raise RegistryError(
            f"a model named {config.name!r} already exists; pick another --name "
            f"or delete it with 'safegate models delete {config.name}'"
        )
    target = services.models_dir / config.name
    if target.exists():
        raise RegistryError(f"{target} already exists; pick another --name or remove it")
    check_base(resolve_base(config.base, registry=services.registry, use=ADAPTER_HINT))
    load_conversations(config.train_file)
    if config.validation_file is not None:
        load_conversations(config.validation_file, min_examples=1)
    data_sha256 = {
        "train": file_sha256(config.train_file),
        "validation": file_sha256(config.validation_file) if config.validation_file else None,
    }
    return services.jobs.create(
        model_name=config.name,
        base=config.base,
        config=config.to_json(),
        data_sha256=data_sha256,
        output_dir=str(target),
    )


def job_dir(job_id: str, *, services: Services) -> Path:
    return services.jobs_dir / job_id


def last_checkpoint(job_id: str, *, services: Services) -> Path | None:
    """The newest complete epoch checkpoint of a job, or None."""
    root = job_dir(job_id, services=services) / "checkpoints"
    done = [
        path
        for path in root.glob("checkpoint-*")
        if path.name.split("-")[-1].isdigit() and _complete(path)
    ]
    return max(done, key=lambda path: int(path.name.split("-")[-1]), default=None)


def _complete(checkpoint: Path) -> bool:
    """The Trainer writes trainer_state.json last: a readable one marks a whole checkpoint."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "global_step" in state


def run(
    job_id: str,
    *,
    resume: bool = False,
    progress: bool = False,
    callbacks: Sequence[TrainerCallback] = (),
    services: Services | None = None,
) -> Job:
    """Train a queued (or, with ``resume``, a failed) job; return it in its final state.

    Raises ``FinetuneError`` (the job is then marked failed with the same message);
    a cancel request ends the run with the job cancelled and no model registered.
    """
    from accelerate import PartialState

    services = services or Services.from_settings()
    main = PartialState().is_main_process
    store = services.jobs
    job = store.get(job_id)
    if main:
        store.reconcile()
        job = store.get(job_id)
        if job.status is JobStatus.RUNNING and job.pid != os.getpid():
            raise JobError(f"job {job_id} is already running (process {job.pid})")
        if job.status is JobStatus.CANCELLED:
            raise JobError(f"job {job_id} was cancelled; submit a new one")
        job = store.start(job_id)
    config = TrainConfig.from_json(job.config)
    workdir = job_dir(job_id, services=services)
    try:
        outcome = _train(
            job,
            config,
            workdir=workdir,
            resume=resume,
            progress=progress and main,
            extra_callbacks=callbacks,
            services=services,
            main=main,
        )
    except KeyboardInterrupt:
        if main:
            store.finish(
                job_id,
                JobStatus.FAILED,
                error=f"interrupted; resume with 'safegate finetune train --resume {job_id}'",
            )
        raise
    except FinetuneError as error:
        if main:
            store.finish(job_id, JobStatus.FAILED, error=str(error))
        raise
    except Exception as error:
        message = f"training failed: {type(error).__name__}: {error}"
        if main:
            store.finish(job_id, JobStatus.FAILED, error=message)
        raise FinetuneError(message) from error
    if not main:
        return store.get(job_id)
    if outcome is None:
        shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
        return store.finish(job_id, JobStatus.CANCELLED)
    return store.finish(job_id, JobStatus.SUCCEEDED)


def _check_unchanged(config: TrainConfig, job: Job) -> None:
    """The data a job trains (or resumes) on is the data it was submitted with."""
    files = {"train": config.train_file, "validation": config.validation_file}
    for split, path in files.items():
        if path is None:
            continue
        try:
            digest = file_sha256(path)
        except OSError as error:
            raise DataError(f"cannot read {path}: {error.strerror or error}") from error
        if digest != job.data_sha256.get(split):
            raise DataError(
                f"{path} changed since job {job.id} was submitted (sha256 {digest[:12]}..., "
                f"was {str(job.data_sha256.get(split))[:12]}...); submit a new job"
            )


def _train(
    job: Job,
    config: TrainConfig,
    *,
    workdir: Path,
    resume: bool,
    progress: bool,
    extra_callbacks: Sequence[TrainerCallback],
    services: Services,
    main: bool,
) -> Model | None:
    """Everything between ``start`` and ``finish``; None when the job was cancelled."""
    from transformers import set_seed

    from finetune.training.callbacks import JobMonitor, ResultsCsv, RichProgress, broadcast_flag
    from finetune.training.trainer import build_trainer

    checkpoint = last_checkpoint(job.id, services=services) if resume else None
    if main:
        workdir.mkdir(parents=True, exist_ok=True)
        if checkpoint is None:  # a fresh start: nothing of an earlier attempt counts
            shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
            (workdir / RESULTS_FILE).unlink(missing_ok=True)
        write_json(workdir / CONFIG_FILE, config.to_json())
    set_seed(config.seed)

    _check_unchanged(config, job)
    base = resolve_base(config.base, registry=services.registry, use=ADAPTER_HINT)
    check_base(base)
    model, tokenizer = load_base(base, config=config)
    train_conversations = load_conversations(config.train_file)
    if config.validation_file is not None:
        valid_conversations = load_conversations(config.validation_file, min_examples=1)
    else:
        train_conversations, valid_conversations = split_conversations(
            train_conversations, validation_fraction=config.validation_fraction, seed=config.seed
        )
    train = encode_all(
        tokenizer,
        train_conversations,
        max_length=config.max_seq_length,
        also_without_system=config.also_without_system,
    )
    valid = encode_all(tokenizer, valid_conversations, max_length=config.max_seq_length)
    if not train.examples:
        raise FinetuneError(
            f"no training example fits max_seq_length {config.max_seq_length}; "
            "raise --max-seq-length"
        )
    data_report = {
        "train_examples": len(train.examples),
        "train_tokens": train.tokens,
        "train_truncated": train.truncated,
        "train_dropped": train.dropped,
        "valid_examples": len(valid.examples),
        "valid_truncated": valid.truncated,
        "valid_dropped": valid.dropped,
        "resumed_from_step": int(checkpoint.name.split("-")[-1]) if checkpoint else None,
    }
    if main:
        services.jobs.record_metrics(job.id, data_report)

    peft_model = add_lora(model, config=config)
    monitor = JobMonitor(services.jobs, job.id, main=main)
    callbacks: list[Any] = [monitor, *extra_callbacks]
    if main:
        resume_step = data_report["resumed_from_step"]
        callbacks.append(
            ResultsCsv(workdir / RESULTS_FILE, resume_step=resume_step, config=config.to_json())
        )
    if progress:
        callbacks.append(RichProgress())
    trainer = build_trainer(
        peft_model,
        tokenizer,
        config=config,
        train_set=ExampleDataset(train.examples),
        eval_set=ExampleDataset(valid.examples) if valid.examples else None,
        output_dir=workdir / "checkpoints",
        callbacks=callbacks,
    )
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    late_cancel = main and services.jobs.cancel_requested(job.id)  # after the last poll
    if monitor.cancelled or broadcast_flag(late_cancel):
        return None

    final: dict[str, Any] = {**data_report, "steps": trainer.state.global_step}
    final["train_runtime_s"] = round(float(output.metrics.get("train_runtime", 0.0)), 3)
    for entry in trainer.state.log_history:
        row = results_row(int(entry.get("step", 0)), entry)
        final.update({key: value for key, value in row.items() if key != "step"})
    if "train_loss" not in final:  # fewer steps than logging_steps: the run's mean loss
        final["train_loss"] = float(output.training_loss)
        final["train_perplexity"] = perplexity(final["train_loss"])
    final = rounded(final)

    staging = services.models_dir / f".{config.name}.partial-{job.id}"
    if main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(staging))
    if not main:
        return None
    (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; the JSON says it all
    write_json(staging / CONFIG_FILE, config.to_json())
    write_json(
        staging / METRICS_FILE,
        {
            "schema_version": METRICS_SCHEMA_VERSION,
            "status": JobStatus.SUCCEEDED.value,
            "error": None,
            "job": job.id,
            "name": config.name,
            "base": base.name,
            "data_sha256": job.data_sha256,
            "metrics": final,
        },
    )
    shutil.copyfile(workdir / RESULTS_FILE, staging / RESULTS_FILE)
    target = Path(job.output_dir)
    if target.exists():
        raise RegistryError(f"{target} appeared while training; the adapter is in {staging}")
    staging.replace(target)
    services.jobs.record_metrics(job.id, final)
    hyperparameters = {
        **config.to_json(),
        "effective_batch_size": config.effective_batch_size * trainer.args.world_size,
        "dtype": str(torch_dtype(config)).removeprefix("torch."),
        "devices": trainer.args.world_size,
    }
    return services.registry.register(
        config.name,
        kind=ModelKind.ADAPTER,
        path=target,
        base=base.name,
        job_id=job.id,
        hyperparameters=hyperparameters,
        data_sha256=job.data_sha256,
        metrics=final,
    )
