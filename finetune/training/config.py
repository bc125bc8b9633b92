"""What a training run depends on: ``TrainConfig``, saved as ``training_config.json``
beside every artifact (the job's folder, each checkpoint, the adapter).

Azure AI Foundry's hyperparameters map onto ``TrainConfig`` as follows:

- ``n_epochs`` -> ``epochs``.
- ``learning_rate_multiplier`` m -> ``learning_rate = m * DEFAULT_LEARNING_RATE``
  (the CLI's ``--learning-rate-multiplier`` does this; 1.0 is this module's default).
- ``batch_size`` (and the UI's batch-size multiplier k) -> the effective batch
  ``batch_size * gradient_accumulation * devices``; the CLI's
  ``--batch-size-multiplier k`` keeps the micro-batch and sets
  ``gradient_accumulation = k`` so memory use does not change.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from finetune.registry import NAME
from finetune.settings import DEFAULT_BASE_MODEL
from finetune.training.dataset import DEFAULT_SPLIT_SEED, DEFAULT_VALIDATION_FRACTION

PHI3_LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
DEFAULT_LEARNING_RATE = 2e-4
DEFAULT_MAX_SEQ_LENGTH = 2048
QUANTIZATIONS = ("none", "4bit")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ATTENTION = ("sdpa", "eager", "flash_attention_2")
CONFIG_FILE = "training_config.json"


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
