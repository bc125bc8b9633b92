"""LoRA training speed of a Phi-3-mini-shaped model: safegate's path against a plain one.

The model has Phi-3-mini-4k-instruct's real architecture and size (``Phi3Config()``'s
defaults: 3.8B parameters, hidden 3072, 32 layers, vocabulary 32064) with random weights,
built on the GPU: nothing is downloaded. The data are synthetic chat-like examples of
``--min-length``..``--seq-length`` tokens (uniform), the first ``PROMPT_SHARE`` of each
masked out of the loss as a prompt would be. Both variants train the same LoRA (r 16,
alpha 32, dropout 0.05 on qkv_proj, o_proj, gate_up_proj, down_proj) on the same
examples, one after the other in this process:

- ``baseline``: what a plain transformers Trainer + peft script does: every example
  padded to ``--seq-length`` (2048), micro-batch 1 with gradient accumulation 4,
  gradient checkpointing on, bf16 autocast, transformers' default attention (sdpa).
- ``safegate``: ``finetune.training.trainer.build_trainer`` on a model made by
  ``finetune.training.model_loading.add_lora``: bf16 weights and autocast, padding-free packing (a
  micro-batch of 4 examples back to back in one row, positions restarting per example,
  so no token is padding and attention never crosses examples), flash-attention 2's
  varlen kernels when ``flash_attn`` is installed (else sdpa with a block mask),
  gradient checkpointing off (``--checkpointing`` turns it on; an out-of-memory error
  retries with it on), fused AdamW, ``--compile`` for torch.compile.

Reported per variant, over ``--steps`` optimizer steps after ``--warmup``:

- tokens/s: real (non-padding) tokens trained per second; ``padded tokens/s`` counts
  what the GPU pushed through, padding included.
- MFU: model FLOPs / (seconds x the GPU's peak dense bf16 FLOP/s). Model FLOPs of LoRA
  training per real token: 2N forward + 2N backward through the frozen weights (their
  weight gradients are never computed, hence 4N, not full fine-tuning's 6N) + 6 per
  LoRA parameter, N = the parameters of every linear layer (lm_head included, the
  embedding lookup not); attention adds 12 x layers x hidden x n^2 per example of n
  tokens (PaLM's convention: the full square, forward and backward). Recomputation by
  gradient checkpointing is not model FLOPs and is not counted.
- peak GPU memory (``torch.cuda.max_memory_allocated``).

Usage::

    .venv/bin/python bench/finetune_gpu.py [--steps 20] [--output result.json]
    .venv/bin/python bench/finetune_gpu.py --tiny      # CPU smoke test, tiny model

Without CUDA it refuses (exit 2) unless ``--tiny``. Targets on an H100: MFU >= 45% and
tokens/s >= 1.5x the baseline's.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from transformers import (
    Phi3Config,
    Phi3ForCausalLM,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from finetune.training.config import TrainConfig
from finetune.training.dataset import ExampleDataset
from finetune.training.encoding import IGNORE_INDEX, EncodedExample
from finetune.training.model_loading import add_lora
from finetune.training.trainer import build_trainer

PROMPT_SHARE = 0.3
EXIT_NO_GPU = 2
# Peak dense bf16 tensor-core FLOP/s (no sparsity), by a substring of the device name.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
}
TINY: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "original_max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


@dataclass
class Tally:
    """Filled by a forward pre-hook: what each micro-batch really held."""

    real_tokens: int = 0
    padded_tokens: int = 0
    attention_n2: int = 0  # sum over examples of length squared

    def add(self, batch: dict[str, Any]) -> None:
        ids = batch["input_ids"]
        self.padded_tokens += ids.numel()
        if batch.get("attention_mask") is not None:
            lengths = batch["attention_mask"].sum(dim=1).tolist()
        elif batch.get("position_ids") is not None:
            starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
            ends = [*starts[1:], ids.shape[1]]
            lengths = [end - start for start, end in zip(starts, ends, strict=True)]
        else:
            lengths = [ids.shape[1]] * ids.shape[0]
        self.real_tokens += sum(lengths)
        self.attention_n2 += sum(n * n for n in lengths)


@dataclass
class StepTimer(TrainerCallback):
    """Times optimizer steps after the warm-up ones and collects the tallies."""

    warmup: int
    tally: Tally
    sync: bool
    seconds: float = 0.0
    measured: Tally = field(default_factory=Tally)
    started: float = 0.0
    snapshot: Tally = field(default_factory=Tally)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.sync:
            torch.cuda.synchronize()
        self.snapshot = Tally(**vars(self.tally))
        self.started = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.sync:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self.started
        if state.global_step > self.warmup:
            self.seconds += elapsed
            for name in vars(self.measured):
                setattr(
                    self.measured,
                    name,
                    getattr(self.measured, name)
                    + getattr(self.tally, name)
                    - getattr(self.snapshot, name),
                )


def examples(
    count: int, *, vocab: int, min_length: int, max_length: int, seed: int, pad_to: int | None
) -> list[EncodedExample]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        length = rng.randint(min_length, max_length)
        ids = [rng.randrange(vocab) for _ in range(length)]
        prompt = int(length * PROMPT_SHARE)
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        mask = [1] * length
        if pad_to is not None:
            pad = pad_to - length
            ids, labels, mask = ids + [0] * pad, labels + [IGNORE_INDEX] * pad, mask + [0] * pad
        out.append(EncodedExample(input_ids=ids, labels=labels, attention_mask=mask))
    return out


def build_model(config: Phi3Config, *, device: torch.device, dtype: torch.dtype, attn: str) -> Any:
    config._attn_implementation = attn
    torch.manual_seed(0)
    with device:
        model = Phi3ForCausalLM._from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    model.config.use_cache = False
    return model


def lora_config(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    settings: dict[str, Any] = {
        "name": "bench",
        "train_file": Path("synthetic"),
        "base": "random Phi-3-mini",
        "epochs": 1,
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "max_seq_length": args.seq_length,
        "warmup_ratio": 0.0,
        "logging_steps": 1_000_000,
        "precision": "bf16" if args.device.type == "cuda" else "fp32",
    }
    settings.update(overrides)
    return TrainConfig(**settings)


def linear_parameters(model: Any) -> tuple[int, int]:
    """(frozen linear weights, trainable LoRA parameters) of a peft model."""
    frozen = lora = 0
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            lora += parameter.numel()
        elif parameter.dim() == 2 and "embed_tokens" not in name:
            frozen += parameter.numel()
    return frozen, lora


def report(
    name: str,
    timer: StepTimer,
    *,
    model: Any,
    config: Phi3Config,
    peak_flops: float | None,
    device: torch.device,
    settings: dict[str, Any],
) -> dict[str, Any]:
    frozen, lora = linear_parameters(model)
    base_parameters = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    tally = timer.measured
    flops = (4 * frozen + 6 * lora) * tally.real_tokens
    flops += 12 * config.num_hidden_layers * config.hidden_size * tally.attention_n2
    seconds = max(timer.seconds, 1e-9)
    result: dict[str, Any] = {
        "variant": name,
        "settings": settings,
        "base_parameters": base_parameters,
        "lora_parameters": lora,
        "measured_seconds": round(timer.seconds, 3),
        "real_tokens": tally.real_tokens,
        "padded_tokens": tally.padded_tokens,
        "tokens_per_s": round(tally.real_tokens / seconds, 1),
        "padded_tokens_per_s": round(tally.padded_tokens / seconds, 1),
        "model_tflops_per_s": round(flops / seconds / 1e12, 2),
        "mfu": round(flops / seconds / peak_flops, 4) if peak_flops else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if device.type == "cuda"
        else None,
    }
    return result


def run_variant(
    name: str,
    args: argparse.Namespace,
    *,
    config: Phi3Config,
    peak_flops: float | None,
    optimised: bool,
    checkpointing: bool,
) -> dict[str, Any]:
    device: torch.device = args.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    per_step = 4  # examples per optimizer step, both variants
    count = per_step * (args.warmup + args.steps)
    dtype = torch.bfloat16 if cuda else torch.float32
    if optimised:
        attn = "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"
        train_config = lora_config(
            args,
            batch_size=per_step,
            packing=True,
            gradient_checkpointing=checkpointing,
            attn_implementation=attn,
            torch_compile=args.compile,
        )
        model = add_lora(
            build_model(config, device=device, dtype=dtype, attn=attn), config=train_config
        )
        data = examples(
            count,
            vocab=config.vocab_size,
            min_length=args.min_length,
            max_length=args.seq_length,
            seed=1,
            pad_to=None,
        )
        tally = Tally()
        timer = StepTimer(warmup=args.warmup, tally=tally, sync=cuda)
        trainer = build_trainer(
            model,
            None,
            config=train_config,
            train_set=ExampleDataset(data),
            eval_set=None,
            output_dir=args.workdir / name,
            callbacks=[timer],
            max_steps=args.warmup + args.steps,
            save_checkpoints=False,
        )
        settings = {
            "micro_batch": per_step,
            "gradient_accumulation": 1,
            "packing": True,
            "attention": attn,
            "gradient_checkpointing": checkpointing,
            "dtype": str(dtype),
            "torch_compile": args.compile,
        }
    else:
        attn = "sdpa"  # transformers' default
        peft_config = peft.LoraConfig(
            task_type=peft.TaskType.CAUSAL_LM,
            r=16,
            lora_alpha=32,
            lora_dropout=0.05,
            target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        )
        model = peft.get_peft_model(
            build_model(config, device=device, dtype=dtype, attn=attn), peft_config
        )
        data = examples(
            count,
            vocab=config.vocab_size,
            min_length=args.min_length,
            max_length=args.seq_length,
            seed=1,
            pad_to=args.seq_length,
        )
        tally = Tally()
        timer = StepTimer(warmup=args.warmup, tally=tally, sync=cuda)
        # transformers 5 renamed gradient_checkpointing to activation_checkpointing
        names = {f.name for f in fields(TrainingArguments)}
        recompute = "activation" if "activation_checkpointing" in names else "gradient"
        checkpointing_args: dict[str, Any] = {
            f"{recompute}_checkpointing": True,
            f"{recompute}_checkpointing_kwargs": {"use_reentrant": False},
        }
        training_args = TrainingArguments(
            output_dir=str(args.workdir / name),
            per_device_train_batch_size=1,
            gradient_accumulation_steps=per_step,
            max_steps=args.warmup + args.steps,
            learning_rate=2e-4,
            bf16=cuda,
            **checkpointing_args,
            save_strategy="no",
            logging_steps=1_000_000,
            report_to=[],
            disable_tqdm=True,
            use_cpu=not cuda,
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=ExampleDataset(data),
            data_collator=transformers.default_data_collator,
            callbacks=[timer],
        )
        trainer.remove_callback(PrinterCallback)  # stdout is the JSON record
        settings = {
            "micro_batch": 1,
            "gradient_accumulation": per_step,
            "packing": False,
            "padded_to": args.seq_length,
            "attention": attn,
            "gradient_checkpointing": True,
            "dtype": str(dtype),
        }
    model.register_forward_pre_hook(lambda _m, _a, kwargs: tally.add(kwargs), with_kwargs=True)
    trainer.train()
    result = report(
        name,
        timer,
        model=model,
        config=config,
        peak_flops=peak_flops,
        device=device,
        settings=settings,
    )
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def peak_flops_of(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    print(f"unknown GPU {name!r}: pass --peak-tflops for MFU", file=sys.stderr)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU: a smoke test")
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps not measured")
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--min-length", type=int, default=512, help="shortest example")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--checkpointing", action="store_true", help="safegate: recompute")
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU peak (bf16)")
    parser.add_argument("--only", choices=("baseline", "safegate"), default=None)
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()

    if args.tiny:
        args.device = torch.device("cpu")
        config = Phi3Config(**TINY)
        args.seq_length = min(args.seq_length, 128)
        args.min_length = min(args.min_length, 32)
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
    elif not torch.cuda.is_available():
        print(
            "bench/finetune_gpu.py measures GPU training and needs CUDA; no CUDA device "
            "here. Run it with --tiny for a CPU smoke test.",
            file=sys.stderr,
        )
        return EXIT_NO_GPU
    else:
        args.device = torch.device("cuda", torch.cuda.current_device())
        config = Phi3Config()  # Phi-3-mini-4k-instruct's shape
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = peak_flops_of(args.device, args.peak_tflops)

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as workdir:
        args.workdir = Path(workdir)
        if args.only in (None, "baseline"):
            results.append(
                run_variant(
                    "baseline",
                    args,
                    config=config,
                    peak_flops=peak,
                    optimised=False,
                    checkpointing=True,
                )
            )
        if args.only in (None, "safegate"):
            try:
                results.append(
                    run_variant(
                        "safegate",
                        args,
                        config=config,
                        peak_flops=peak,
                        optimised=True,
                        checkpointing=args.checkpointing,
                    )
                )
            except torch.OutOfMemoryError:
                if args.checkpointing:
                    raise
                gc.collect()
                torch.cuda.empty_cache()
                results.append(
                    run_variant(
                        "safegate",
                        args,
                        config=config,
                        peak_flops=peak,
                        optimised=True,
                        checkpointing=True,
                    )
                )

    by_name = {result["variant"]: result for result in results}
    speedup = None
    if "baseline" in by_name and "safegate" in by_name:
        speedup = round(
            by_name["safegate"]["tokens_per_s"] / by_name["baseline"]["tokens_per_s"], 2
        )
    record = {
        "schema_version": 1,
        "benchmark": "finetune_gpu",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(args.device)
        if args.device.type == "cuda"
        else platform.processor() or "cpu",
        "tiny": args.tiny,
        "model": {
            "hidden_size": config.hidden_size,
            "layers": config.num_hidden_layers,
            "intermediate_size": config.intermediate_size,
            "vocab": config.vocab_size,
        },
        "seq_length": args.seq_length,
        "example_lengths": [args.min_length, args.seq_length],
        "steps": args.steps,
        "warmup": args.warmup,
        "peak_flops": peak,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "cuda": torch.version.cuda,
        },
        "results": results,
        "speedup_tokens_per_s": speedup,
    }
    text = json.dumps(record, indent=2, sort_keys=True)
    print(text)
    if args.output:
        args.output.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
