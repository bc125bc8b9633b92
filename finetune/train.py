"""Fine-tune a Phi-3 base into a LoRA adapter: one job, start to registered model.

``submit(config)`` checks the data and the names, records a *queued* job and returns it;
``run(job_id)`` trains it with transformers' ``Trainer`` and peft, top to bottom:

1. Resolve the base: a registered base name (``demo-base``), a local folder, or a hub id
   (offline, only from the local cache). It must load as ``Phi3ForCausalLM``.
2. Load the conversations (``finetune.dataset``); validation comes from its own file or
   a seeded split. Each conversation is tokenised in Phi-3's chat format with labels on
   the learned assistant tokens and their ``<|end|>`` (``finetune.chat``); over-long ones
   lose leading turns or are dropped, and both are counted. ``also_without_system``
   trains each conversation that has a system message twice, with and without it.
3. Wrap the base with LoRA on Phi-3's fused projections (``qkv_proj``, ``o_proj``,
   ``gate_up_proj``, ``down_proj``); optionally 4-bit (QLoRA, CUDA + bitsandbytes only).
4. Train: bf16 where CUDA supports it, fp32 on CPU; optional gradient checkpointing and
   padding-free packing. An adapter-only checkpoint every epoch under
   ``jobs_dir/<job>/checkpoints``, all of them kept unless ``save_total_limit`` keeps
   only the newest; ``run(job_id, resume=True)`` continues from the last.
   Each logging step and each epoch append a row to ``jobs_dir/<job>/results.csv``
   (Azure's columns, plus epoch, learning rate and perplexities) and update the job's
   metrics; a cancel request stops training after the current step.
5. Save the adapter into a hidden temporary folder beside its final place, then rename it
   into ``models_dir/<name>`` in one step, so a half-written folder is never a model;
   register it with its hyperparameters, data hashes and final metrics.

Azure AI Foundry's hyperparameters map onto ``TrainConfig`` as follows:

- ``n_epochs`` -> ``epochs``.
- ``learning_rate_multiplier`` m -> ``learning_rate = m * DEFAULT_LEARNING_RATE``
  (the CLI's ``--learning-rate-multiplier`` does this; 1.0 is this module's default).
- ``batch_size`` (and the UI's batch-size multiplier k) -> the effective batch
  ``batch_size * gradient_accumulation * devices``; the CLI's
  ``--batch-size-multiplier k`` keeps the micro-batch and sets
  ``gradient_accumulation = k`` so memory use does not change.

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

import csv
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.chat import IGNORE_INDEX, EncodedExample, encode_conversation
from finetune.dataset import (
    DEFAULT_SPLIT_SEED,
    DEFAULT_VALIDATION_FRACTION,
    Conversation,
    Role,
    file_sha256,
    load_conversations,
    split_conversations,
)
from finetune.db import Database
from finetune.errors import BaseModelError, DataError, FinetuneError, JobError, RegistryError
from finetune.jobs import Job, JobStatus, JobStore
from finetune.registry import NAME, Model, ModelKind, ModelRegistry
from finetune.settings import DEFAULT_BASE_MODEL, DEMO_BASE, get_settings

if TYPE_CHECKING:
    import torch
    from transformers import (
        PreTrainedModel,
        PreTrainedTokenizerBase,
        TrainerCallback,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )

PHI3_LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
DEFAULT_LEARNING_RATE = 2e-4
DEFAULT_MAX_SEQ_LENGTH = 2048
QUANTIZATIONS = ("none", "4bit")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ATTENTION = ("sdpa", "eager", "flash_attention_2")
CANCEL_POLL_S = 0.5  # how often the training loop asks the database about a cancel
CONFIG_FILE = "training_config.json"
METRICS_FILE = "metrics.json"
METRICS_SCHEMA_VERSION = 1
RESULTS_FILE = "results.csv"
RESULTS_COLUMNS = (
    # Azure AI Foundry's results.csv, in its order ...
    "step",
    "train_loss",
    "train_mean_token_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
    "full_valid_loss",
    "full_valid_mean_token_accuracy",
    # ... and safegate's additions
    "epoch",
    "learning_rate",
    "train_perplexity",
    "valid_perplexity",
    "full_valid_perplexity",
)
# Trainer log keys -> results.csv columns
_LOG_COLUMNS = {
    "loss": "train_loss",
    "mean_token_accuracy": "train_mean_token_accuracy",
    "valid_loss": "valid_loss",
    "valid_mean_token_accuracy": "valid_mean_token_accuracy",
    "eval_loss": "full_valid_loss",
    "eval_mean_token_accuracy": "full_valid_mean_token_accuracy",
    "learning_rate": "learning_rate",
    "epoch": "epoch",
}
_PERPLEXITY = {
    "train_loss": "train_perplexity",
    "valid_loss": "valid_perplexity",
    "full_valid_loss": "full_valid_perplexity",
}
_MAX_PERPLEXITY_LOSS = 50.0  # exp() of a larger loss is reported as inf, not an overflow


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; saved as ``training_config.json``.

    See the module docstring for how Azure's epochs, batch size and learning-rate
    multiplier map onto these fields.
    """

    name: str = field(metadata=_help("name the adapter is registered under"))
    train_file: Path = field(metadata=_help("training data, chat-completion JSONL"))
    base: str = field(
        default=DEFAULT_BASE_MODEL,
        metadata=_help("registered base name, local folder or hub id of a Phi-3 model"),
    )
    validation_file: Path | None = field(
        default=None, metadata=_help("validation JSONL; without it a seeded split is held out")
    )
    validation_fraction: float = field(
        default=DEFAULT_VALIDATION_FRACTION,
        metadata=_help("share of the training file held out when no validation file is given"),
    )
    epochs: int = field(default=3, metadata=_help("passes over the training data"))
    batch_size: int = field(default=4, metadata=_help("examples per device per micro-batch"))
    gradient_accumulation: int = field(
        default=1, metadata=_help("micro-batches per optimizer step")
    )
    learning_rate: float = field(
        default=DEFAULT_LEARNING_RATE, metadata=_help("peak AdamW learning rate")
    )
    lr_scheduler: str = field(default="linear", metadata=_help("transformers scheduler name"))
    warmup_ratio: float = field(
        default=0.03, metadata=_help("share of the steps spent warming the learning rate up")
    )
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping norm"))
    lora_r: int = field(default=16, metadata=_help("LoRA rank"))
    lora_alpha: int = field(default=32, metadata=_help("LoRA alpha (scale = alpha / r)"))
    lora_dropout: float = field(default=0.05, metadata=_help("dropout on the LoRA input"))
    target_modules: tuple[str, ...] = field(
        default=PHI3_LORA_TARGETS, metadata=_help("modules that get LoRA matrices")
    )
    modules_to_save: tuple[str, ...] = field(
        default=(),
        metadata=_help("modules trained in full and saved in the adapter, e.g. lm_head"),
    )
    also_without_system: bool = field(
        default=False,
        metadata=_help(
            "train each conversation that has a system message a second time without it, "
            "so the adapter answers with or without one (twice the examples)"
        ),
    )
    max_seq_length: int = field(
        default=DEFAULT_MAX_SEQ_LENGTH, metadata=_help("longest example in tokens")
    )
    packing: bool = field(
        default=False,
        metadata=_help("padding-free micro-batches: examples back to back in one row"),
    )
    gradient_checkpointing: bool = field(
        default=False, metadata=_help("recompute activations in the backward pass")
    )
    precision: str = field(
        default="auto", metadata=_help("auto (bf16 on CUDA when supported), fp32, bf16, fp16")
    )
    quantization: str = field(
        default="none", metadata=_help("none, or 4bit (QLoRA; needs CUDA and bitsandbytes)")
    )
    attn_implementation: str = field(
        default="sdpa", metadata=_help("sdpa, eager or flash_attention_2")
    )
    torch_compile: bool = field(
        default=False, metadata=_help("compile the model with torch.compile (pays off on GPUs)")
    )
    logging_steps: int = field(default=10, metadata=_help("steps between results.csv rows"))
    save_total_limit: int | None = field(
        default=None,
        metadata=_help("epoch checkpoints kept, the newest ones; unset: every epoch's"),
    )
    seed: int = field(default=DEFAULT_SPLIT_SEED, metadata=_help("seed of split, init, order"))

    def __post_init__(self) -> None:
        object.__setattr__(self, "train_file", Path(self.train_file))
        if self.validation_file is not None:
            object.__setattr__(self, "validation_file", Path(self.validation_file))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save))
        problems = self._problems()
        if problems:
            raise ValueError("; ".join(problems))

    def _problems(self) -> list[str]:
        checks = [
            (
                bool(NAME.match(self.name)),
                f"name {self.name!r} must be 1-64 letters, digits, '.', '_' or '-'",
            ),
            (bool(self.base.strip()), "base must not be empty"),
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.gradient_accumulation >= 1, "gradient_accumulation must be at least 1"),
            (
                math.isfinite(self.learning_rate) and self.learning_rate > 0,
                "learning_rate must be a positive number",
            ),
            (0.0 <= self.warmup_ratio < 1.0, "warmup_ratio must be in [0, 1)"),
            (self.weight_decay >= 0.0, "weight_decay must be >= 0"),
            (self.max_grad_norm > 0.0, "max_grad_norm must be > 0"),
            (self.lora_r >= 1, "lora_r must be at least 1"),
            (self.lora_alpha > 0, "lora_alpha must be positive"),
            (0.0 <= self.lora_dropout < 1.0, "lora_dropout must be in [0, 1)"),
            (bool(self.target_modules), "target_modules must name at least one module"),
            (self.max_seq_length >= 16, "max_seq_length must be at least 16"),
            (
                0.0 <= self.validation_fraction < 1.0,
                "validation_fraction must be in [0, 1)",
            ),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            (
                self.quantization in QUANTIZATIONS,
                f"quantization must be one of {', '.join(QUANTIZATIONS)}",
            ),
            (
                self.attn_implementation in ATTENTION,
                f"attn_implementation must be one of {', '.join(ATTENTION)}",
            ),
            (self.logging_steps >= 1, "logging_steps must be at least 1"),
            (
                self.save_total_limit is None or self.save_total_limit >= 1,
                "save_total_limit must be at least 1",
            ),
        ]
        return [message for ok, message in checks if not ok]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in sorted(asdict(self).items()):
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[key] = value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    @property
    def effective_batch_size(self) -> int:
        """Examples per optimizer step on one device (times the number of devices)."""
        return self.batch_size * self.gradient_accumulation


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Sorted-key JSON, written whole or not at all."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data, sort_keys=True, indent=2) + "\n", encoding="utf-8")
    partial.replace(path)


# -- jobs ---------------------------------------------------------------------------------


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
    resolve_base(config.base, registry=services.registry)
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


# -- base models --------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedBase:
    name: str  # what the adapter records as its base: the registry name, path or hub id
    location: str  # what from_pretrained loads


def resolve_base(base: str, *, registry: ModelRegistry) -> ResolvedBase:
    """A registered base, a local folder, or a hub id (offline: only if it is cached)."""
    model = registry.find(base)
    if model is not None:
        if model.kind is not ModelKind.BASE:
            raise BaseModelError(
                f"{base!r} is an adapter, not a base model; train on its base {model.base!r}"
            )
        return ResolvedBase(name=base, location=model.path)
    path = Path(base).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise BaseModelError(
                f"cannot load base model '{base}': {path} has no config.json; "
                "pass the folder of a Phi-3 model saved with save_pretrained"
            )
        return ResolvedBase(name=str(path.resolve()), location=str(path.resolve()))
    if base == DEMO_BASE:
        raise BaseModelError(
            f"base model '{base}' is not registered yet; 'safegate finetune demo' builds it"
        )
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(base, "config.json")
        except Exception:  # an id the hub would reject (bad characters, too many slashes)
            cached = None
        if not isinstance(cached, str):
            raise BaseModelError(_base_error(base, "it is not in the local Hugging Face cache"))
    return ResolvedBase(name=base, location=base)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _base_error(base: str, reason: str) -> str:
    if _offline():
        return (
            f"cannot load base model '{base}' offline: {reason}; pass a local path with "
            "--base /path/to/model or set HF_HUB_OFFLINE=0 with network"
        )
    return (
        f"cannot load base model '{base}': {reason}; pass a local path with --base /path/to/model"
    )


def load_base(
    base: ResolvedBase, *, config: TrainConfig
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The Phi-3 model and its tokenizer; ``BaseModelError`` naming the model otherwise."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        model_config = AutoConfig.from_pretrained(base.location)
        tokenizer = AutoTokenizer.from_pretrained(base.location)
    except (OSError, ValueError, KeyError) as error:
        raise BaseModelError(_base_error(base.name, _first_line(error))) from error
    if model_config.model_type != "phi3":
        raise BaseModelError(
            f"base model '{base.name}' is a {model_config.model_type!r} model; "
            "safegate fine-tunes Phi-3 (Phi3ForCausalLM) models"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise BaseModelError(f"base model '{base.name}' has no fast tokenizer (tokenizer.json)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict[str, Any] = {
        "dtype": _dtype(config),
        "attn_implementation": config.attn_implementation,
    }
    if config.quantization == "4bit":
        from accelerate import PartialState

        kwargs["quantization_config"] = _bnb_config()
        kwargs["device_map"] = {"": PartialState().local_process_index}  # one GPU per process
    try:
        model = AutoModelForCausalLM.from_pretrained(base.location, **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as error:
        raise BaseModelError(_base_error(base.name, _first_line(error))) from error
    return model, tokenizer  # the Trainer moves an unquantized model to its device


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _dtype(config: TrainConfig) -> torch.dtype:
    import torch

    if config.precision == "bf16" or (config.precision == "auto" and _bf16()):
        return torch.bfloat16
    if config.precision == "fp16":
        return torch.float16
    return torch.float32


def _bnb_config() -> Any:
    import torch

    if not torch.cuda.is_available():
        raise BaseModelError("4-bit quantization (QLoRA) needs a CUDA GPU; use --quantization none")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise BaseModelError(
            "4-bit quantization (QLoRA) needs bitsandbytes: pip install bitsandbytes"
        ) from error
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if _bf16() else torch.float16,
    )


def add_lora(model: PreTrainedModel, *, config: TrainConfig) -> Any:
    """The base wrapped by peft: LoRA on ``config.target_modules``, everything else frozen."""
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    missing = [
        name
        for name in config.target_modules
        if not any(module.endswith(name) for module, _ in model.named_modules())
    ]
    if missing:
        raise BaseModelError(f"the base model has no modules named {', '.join(missing)}")
    if config.quantization == "4bit":
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=config.gradient_checkpointing
        )
    elif config.gradient_checkpointing:
        reentrant = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=reentrant)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=reentrant)  # type: ignore[no-untyped-call]
        model.enable_input_require_grads()  # type: ignore[no-untyped-call]
    if model.generation_config is not None:
        model.config.use_cache = False
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        modules_to_save=list(config.modules_to_save) or None,
        bias="none",
    )
    with warnings.catch_warnings():
        # peft reads transformers' deprecated is_gradient_checkpointing (transformers 5.x)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        wrapped = get_peft_model(model, lora)
    import torch

    for parameter in wrapped.parameters():  # trained weights in fp32 (modules_to_save too)
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    return wrapped


# -- data ---------------------------------------------------------------------------------


@dataclass
class EncodedSet:
    """Tokenised examples of one split and what happened on the way."""

    examples: list[EncodedExample]
    conversations: int
    truncated: int = 0  # lost leading turns to fit max_seq_length
    dropped: int = 0  # even the last exchange was too long

    @property
    def tokens(self) -> int:
        return sum(len(example) for example in self.examples)


def encode_all(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Iterable[Conversation],
    *,
    max_length: int,
    also_without_system: bool = False,
) -> EncodedSet:
    """Each conversation as an example; with ``also_without_system``, a conversation
    with system messages is a second example without them (counted as examples)."""
    encoded = EncodedSet(examples=[], conversations=0)
    for conversation in conversations:
        encoded.conversations += 1
        variants = [conversation]
        if also_without_system and (bare := without_system(conversation)) is not None:
            variants.append(bare)
        for variant in variants:
            example = encode_conversation(tokenizer, variant, max_length=max_length)
            if example is None:
                encoded.dropped += 1
                continue
            encoded.truncated += example.dropped_messages > 0
            encoded.examples.append(example)
    return encoded


def without_system(conversation: Conversation) -> Conversation | None:
    """The conversation less its system messages; None when it has none."""
    kept = tuple(m for m in conversation.messages if m.role is not Role.SYSTEM)
    if len(kept) == len(conversation.messages):
        return None
    return replace(conversation, messages=kept)


class ExampleDataset:
    """A list of encoded examples as the map-style dataset the Trainer reads."""

    def __init__(self, examples: Sequence[EncodedExample]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        example = self.examples[index]
        return {
            "input_ids": example.input_ids,
            "labels": example.labels,
            "attention_mask": example.attention_mask,
        }


class PaddingCollator:
    """Right-pads a micro-batch to its longest example; padded labels are ignored."""

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        import torch

        longest = max(len(feature["input_ids"]) for feature in features)
        if self.pad_to_multiple_of:
            longest = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
        for feature in features:
            pad = longest - len(feature["input_ids"])
            batch["input_ids"].append(feature["input_ids"] + [self.pad_token_id] * pad)
            batch["labels"].append(feature["labels"] + [IGNORE_INDEX] * pad)
            batch["attention_mask"].append(feature["attention_mask"] + [0] * pad)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


def make_collator(
    tokenizer: PreTrainedTokenizerBase | None, *, packing: bool, attn_implementation: str
) -> Any:
    """Packing: transformers' padding-free collator (one row, position ids restart per
    example, so attention never crosses examples, with sdpa's block mask or flash-attn's
    varlen kernels). Otherwise right padding to the longest example."""
    if packing:
        from transformers import DataCollatorWithFlattening

        return DataCollatorWithFlattening(  # type: ignore[no-untyped-call]
            return_flash_attn_kwargs=attn_implementation == "flash_attention_2"
        )
    pad = getattr(tokenizer, "pad_token_id", None)
    return PaddingCollator(int(pad) if pad is not None else 0)


# -- the trainer --------------------------------------------------------------------------


def _token_counts(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per example [correct, counted] next-token predictions on the learned tokens."""
    import torch

    predicted = logits[:, :-1].argmax(dim=-1)
    target = labels[:, 1:]
    counted = target != IGNORE_INDEX
    correct = (predicted == target) & counted
    return torch.stack([correct.sum(dim=1), counted.sum(dim=1)], dim=1).float()


def preprocess_logits_for_metrics(logits: Any, labels: torch.Tensor) -> torch.Tensor:
    """Reduce each evaluation batch to token counts, so evaluation never keeps logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return _token_counts(logits, labels)


def compute_metrics(prediction: Any) -> dict[str, float]:
    counts = prediction.predictions
    counted = float(counts[:, 1].sum())
    return {"mean_token_accuracy": float(counts[:, 0].sum()) / counted if counted else 0.0}


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < _MAX_PERPLEXITY_LOSS else math.inf


def _trainer_class() -> type:
    from transformers import Trainer

    class ChatTrainer(Trainer):
        """The Trainer, plus token accuracy on the learned tokens (as TRL's SFTTrainer
        reports it) and a validation loss on one validation batch at every log, the way
        Azure's results.csv has ``valid_loss`` per step beside the per-epoch full one."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._train_counts: torch.Tensor | None = None
            self._valid_batches: Any = None

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            if model.training and "labels" in inputs:
                import torch

                with torch.no_grad():
                    counts = _token_counts(outputs.logits.detach(), inputs["labels"]).sum(dim=0)
                self._train_counts = (
                    counts if self._train_counts is None else self._train_counts + counts
                )
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs:
                if self._train_counts is not None:
                    counts = self.accelerator.reduce(self._train_counts, reduction="sum")
                    if counts[1] > 0:
                        logs["mean_token_accuracy"] = float(counts[0] / counts[1])
                    self._train_counts = None
                if self.eval_dataset is not None and not self._full_evaluation_follows():
                    logs.update(self._one_validation_batch())
            super().log(logs, start_time)

        def _full_evaluation_follows(self) -> bool:
            """At an epoch's last step the full validation runs next; it says more."""
            epoch = self.state.epoch
            by_epoch = self.args.eval_strategy == "epoch"
            return self.control.should_evaluate or (
                by_epoch and epoch is not None and epoch > 0 and epoch == round(epoch)
            )

        def _one_validation_batch(self) -> dict[str, float]:
            import torch

            if self._valid_batches is None:
                self._valid_batches = iter(self.get_eval_dataloader())
            try:
                batch = next(self._valid_batches)
            except StopIteration:
                self._valid_batches = iter(self.get_eval_dataloader())
                batch = next(self._valid_batches)
            model = self.model
            if model is None:
                raise RuntimeError("the trainer has no model")
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad(), self.compute_loss_context_manager():
                    batch = self._prepare_inputs(batch)
                    outputs = model(**batch)
                    counts = _token_counts(outputs.logits, batch["labels"]).sum(dim=0)
                    loss = outputs.loss.detach()
            finally:
                model.train(was_training)
            loss = self.accelerator.reduce(loss, reduction="mean")
            counts = self.accelerator.reduce(counts, reduction="sum")
            metrics = {"valid_loss": float(loss)}
            if counts[1] > 0:
                metrics["valid_mean_token_accuracy"] = float(counts[0] / counts[1])
            return metrics

    return ChatTrainer


def _callbacks() -> tuple[type, ...]:
    """Callback classes, defined once transformers is imported."""
    from transformers import TrainerCallback

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
                    rows = [
                        row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step
                    ]
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
                writer.writerow(_rounded(self.pending))
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
                self.store.record_metrics(self.job_id, _rounded(row))

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
            if _broadcast_flag(requested):
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

        def on_step_end(
            self, args: TrainingArguments, state: TrainerState, *_: Any, **__: Any
        ) -> None:
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

    return ResultsCsv, JobMonitor, RichProgress


def _broadcast_flag(flag: bool) -> bool:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    device = (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    )
    tensor = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def results_row(step: int, logs: dict[str, float]) -> dict[str, Any]:
    """The results.csv columns found in one Trainer log (empty if none)."""
    row: dict[str, Any] = {}
    for key, column in _LOG_COLUMNS.items():
        if key in logs:
            row[column] = logs[key]
    if not set(row) - {"epoch", "learning_rate"}:
        return {}
    for loss, column in _PERPLEXITY.items():
        if loss in row:
            row[column] = perplexity(row[loss])
    row["step"] = step
    return row


def _rounded(row: dict[str, Any]) -> dict[str, Any]:
    return {
        key: round(value, 6) if isinstance(value, float) and math.isfinite(value) else value
        for key, value in row.items()
    }


def build_trainer(
    model: Any,
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    config: TrainConfig,
    train_set: ExampleDataset,
    eval_set: ExampleDataset | None,
    output_dir: Path,
    callbacks: Sequence[TrainerCallback] = (),
    max_steps: int = -1,
    save_checkpoints: bool = True,
) -> Any:
    """A Trainer for an already wrapped model (``add_lora``); the benchmark uses it too."""
    import torch
    from transformers import PrinterCallback, TrainingArguments

    micro_batches = math.ceil(len(train_set) / config.batch_size)
    steps = max(1, math.ceil(micro_batches / config.gradient_accumulation)) * config.epochs
    bf16 = config.precision == "bf16" or (config.precision == "auto" and _bf16())
    args = TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=config.epochs,
        max_steps=max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=math.ceil(config.warmup_ratio * (max_steps if max_steps > 0 else steps)),
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        bf16=bf16,
        fp16=config.precision == "fp16",
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        eval_strategy="epoch" if eval_set is not None else "no",
        save_strategy="epoch" if save_checkpoints else "no",
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        data_seed=config.seed,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        optim="adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch",
        use_cpu=not torch.cuda.is_available(),
        torch_compile=config.torch_compile,
    )
    trainer = _trainer_class()(
        model=model,
        args=args,
        data_collator=make_collator(
            tokenizer, packing=config.packing, attn_implementation=config.attn_implementation
        ),
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        compute_metrics=compute_metrics if eval_set is not None else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics
        if eval_set is not None
        else None,
        callbacks=list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


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

    checkpoint = last_checkpoint(job.id, services=services) if resume else None
    if main:
        workdir.mkdir(parents=True, exist_ok=True)
        if checkpoint is None:  # a fresh start: nothing of an earlier attempt counts
            shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
            (workdir / RESULTS_FILE).unlink(missing_ok=True)
        write_json(workdir / CONFIG_FILE, config.to_json())
    set_seed(config.seed)

    _check_unchanged(config, job)
    base = resolve_base(config.base, registry=services.registry)
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
    results_csv, job_monitor, rich_progress = _callbacks()
    monitor = job_monitor(services.jobs, job.id, main=main)
    callbacks: list[Any] = [monitor, *extra_callbacks]
    if main:
        resume_step = data_report["resumed_from_step"]
        callbacks.append(
            results_csv(workdir / RESULTS_FILE, resume_step=resume_step, config=config.to_json())
        )
    if progress:
        callbacks.append(rich_progress())
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
    if monitor.cancelled or _broadcast_flag(late_cancel):
        return None

    final: dict[str, Any] = {**data_report, "steps": trainer.state.global_step}
    final["train_runtime_s"] = round(float(output.metrics.get("train_runtime", 0.0)), 3)
    for entry in trainer.state.log_history:
        row = results_row(int(entry.get("step", 0)), entry)
        final.update({key: value for key, value in row.items() if key != "step"})
    if "train_loss" not in final:  # fewer steps than logging_steps: the run's mean loss
        final["train_loss"] = float(output.training_loss)
        final["train_perplexity"] = perplexity(final["train_loss"])
    final = _rounded(final)

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
        "dtype": str(_dtype(config)).removeprefix("torch."),
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
