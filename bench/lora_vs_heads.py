"""Heads on frozen embeddings vs a peft LoRA adapter on the encoder, measured on dev.

The issue asks for "category and jailbreak/injection heads that the project trains
itself: plain heads on frozen embeddings or a peft LoRA adapter on the encoder, whichever
measures better". ``gateway.safety.training.train`` implements the first; this script measures
the second against it on the same data, on CPU, in one run:

1. Build the corpus (``gateway.safety.training.corpus``) and take a deterministic, stratified-ish
   subsample of the train and dev splits: every example of the project's own, every
   positive of a rare label (anything but ``hate`` and ``harassment``), then a seeded
   random fill from the rest. Both variants see exactly the same examples.
2. Variant ``frozen_heads``: embed with the frozen encoder (``SentenceEncoder``, torch,
   first window of ``--max-tokens`` tokens, on ``normalize(text).folded`` as the engine
   classifies), then fit the MLP head of ``train.py`` with its own code and defaults
   (``heads_fit.fit``: 60 epochs, AdamW 3e-3, masked weighted BCE). The linear head is
   reported beside it.
3. Variant ``lora``: a LoRA adapter (``query`` and ``value`` of every attention layer,
   alpha = 2r, dropout 0.05) on the same encoder, plus a head of the same architecture
   and initialisation on the mean-pooled, L2-normalised embedding, trained end to end
   with the same masked weighted BCE (AdamW 5e-4, batch 32, length-bucketed batches) for
   ``--epochs``. Variant ``lora_refit_head`` keeps the adapted encoder and refits the
   head with ``train.py``'s ``heads_fit.fit``, so a short end-to-end schedule does not
   handicap the head.
4. Cost: trainable parameters, adapter bytes (safetensors), training wall time, and one
   forward pass of a ~30-token text through the frozen encoder, the unmerged adapter and
   the adapter merged into the weights (``merge_and_unload``).

Metric: mean dev AUPRC over labels with >= 3 positives and >= 3 negatives among the dev
examples that know the label (``heads_fit.mean_auprc``'s rule), plus per-label AUPRC.

Usage: HF_HUB_OFFLINE=1 .venv/bin/python bench/lora_vs_heads.py [--train-size 6000]
       [--dev-size 3000] [--epochs 1] [--max-tokens 128] [--lora-r 8] [--threads 2]
Prints one JSON record on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from sklearn.metrics import average_precision_score  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from gateway.safety.encoder import BUNDLED_ENCODER, SentenceEncoder, resolve_model_path  # noqa: E402
from gateway.safety.normalize import normalize  # noqa: E402
from gateway.safety.training.corpus import HEAD_LABELS, Corpus, Example, Split  # noqa: E402
from gateway.safety.training.heads_fit import Matrix, fit, mean_auprc  # noqa: E402
from gateway.safety.training.train import TrainConfig, _matrix  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COMMON_LABELS = frozenset({"hate", "harassment"})
BATCH = 32
BUCKET_BATCHES = 16  # length-sort within shuffled chunks of this many batches
# 30 tokens with [CLS] and [SEP] under the MiniLM tokenizer (checked at run time).
TIMING_TEXT = (
    "Hey, can you help me write a short, friendly reminder email to my whole team "
    "about tomorrow's 10am planning meeting, please?"
)


class Stopwatch:
    """Wall and process CPU time (all threads) since creation; CPU time shows contention."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- data --------------------------------------------------------------------------------


def subsample(examples: Sequence[Example], size: int, seed: int) -> list[Example]:
    """Own examples and rare-label positives first, then a seeded random fill."""
    keep = [e for e in examples if e.source == "own" or e.positives - COMMON_LABELS]
    rest = [e for e in examples if not (e.source == "own" or e.positives - COMMON_LABELS)]
    rng = random.Random(seed)
    if len(keep) > size:
        keep = rng.sample(keep, size)
    fill = rng.sample(rest, min(len(rest), size - len(keep)))
    chosen = {id(e) for e in keep + fill}
    return [e for e in examples if id(e) in chosen]  # corpus order, for determinism


def describe(examples: Sequence[Example]) -> dict[str, object]:
    positives = Counter(label for e in examples for label in e.positives)
    return {
        "examples": len(examples),
        "sources": dict(Counter(e.source for e in examples).most_common()),
        "positives": {label: positives[label] for label in HEAD_LABELS},
    }


# -- metrics -----------------------------------------------------------------------------


def auprc(logits: np.ndarray, matrix: Matrix) -> tuple[float, dict[str, float]]:
    """Mean and per-label dev AUPRC, with ``heads_fit.mean_auprc``'s inclusion rule."""
    per_label: dict[str, float] = {}
    for i, label in enumerate(HEAD_LABELS):
        mask = matrix.known[:, i] > 0
        target = matrix.y[mask, i]
        if target.sum() >= 3 and (1 - target).sum() >= 3:
            per_label[label] = float(average_precision_score(target, logits[mask, i]))
    return float(np.mean(list(per_label.values()))), per_label


def head_logits(head: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return head(torch.from_numpy(x)).numpy()


def rounded(values: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 4) for key, value in values.items()}


# -- encoder with adapter ----------------------------------------------------------------


def tokenize(
    tokenizer: transformers.PreTrainedTokenizerBase, texts: Sequence[str], max_tokens: int
):  # type: ignore[no-untyped-def]
    """First window of each folded text, unpadded (padding happens per batch)."""
    folded = [normalize(text).folded for text in texts]
    return tokenizer(folded, max_length=max_tokens, truncation=True)["input_ids"]


def collate(ids: Sequence[list[int]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    for row, tokens in enumerate(ids):
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        attention[row, : len(tokens)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "token_type_ids": torch.zeros_like(input_ids),
    }


def pooled(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled, L2-normalised embedding, as ``SentenceEncoder.embed`` computes it."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, p=2, dim=1)


def embed_ids(model: torch.nn.Module, ids: Sequence[list[int]], pad: int) -> np.ndarray:
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = np.empty((len(ids), int(model.config.hidden_size)), np.float32)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), BATCH):
            index = order[start : start + BATCH]
            out[index] = pooled(model, collate([ids[i] for i in index], pad)).numpy()
    return out


def bucketed_batches(lengths: Sequence[int], generator: torch.Generator) -> list[list[int]]:
    """Shuffle, sort by length inside chunks of BUCKET_BATCHES batches, shuffle batches."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    chunk = BATCH * BUCKET_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: -lengths[i])
        batches += [part[i : i + BATCH] for i in range(0, len(part), BATCH)]
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


def make_head(dimension: int, hidden: int, labels: int, seed: int) -> torch.nn.Sequential:
    """The MLP of ``heads_fit.fit``, with the same seed, hence the same initial weights."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(dimension, hidden),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(hidden, labels),
    )


def train_lora(
    model: torch.nn.Module,
    head: torch.nn.Module,
    ids: Sequence[list[int]],
    matrix: Matrix,
    config: TrainConfig,
    args: argparse.Namespace,
    pad: int,
) -> list[float]:
    """End-to-end masked weighted BCE, as ``heads_fit.fit`` computes it; returns epoch losses."""
    y, known = torch.from_numpy(matrix.y), torch.from_numpy(matrix.known)
    weight = torch.from_numpy(matrix.weight)
    positives = (y * known).sum(0)
    negatives = ((1 - y) * known).sum(0)
    pos_weight = (negatives / positives.clamp(min=1)).clamp(1.0, config.max_pos_weight)
    parameters = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimiser = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    lengths = [len(row) for row in ids]
    losses: list[float] = []
    for epoch in range(args.epochs):
        model.train()
        head.train()
        batches = bucketed_batches(lengths, generator)
        total, started = 0.0, time.perf_counter()
        for step, index in enumerate(batches, 1):
            embedding = pooled(model, collate([ids[i] for i in index], pad))
            logits = head(embedding)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, y[index], pos_weight=pos_weight, reduction="none"
            )
            loss = (loss * known[index] * weight[index, None]).sum() / known[index].sum().clamp(
                min=1
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach())
            if step % 25 == 0 or step == len(batches):
                elapsed = time.perf_counter() - started
                log(
                    f"lora epoch {epoch + 1}/{args.epochs} step {step}/{len(batches)} "
                    f"loss {total / step:.4f} ({elapsed:.0f} s, "
                    f"eta {elapsed / step * (len(batches) - step):.0f} s)"
                )
        losses.append(round(total / len(batches), 4))
    model.eval()
    head.eval()
    return losses


def time_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], repeats: int) -> dict:
    model.eval()
    with torch.inference_mode():
        for _ in range(20):
            model(**batch)
        timings = []
        for _ in range(repeats):
            started = time.perf_counter()
            model(**batch)
            timings.append((time.perf_counter() - started) * 1000)
    timings.sort()
    return {
        "p50_ms": round(timings[len(timings) // 2], 3),
        "p90_ms": round(timings[int(0.9 * (len(timings) - 1))], 3),
    }


# -- main --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--train-size", type=int, default=6000)
    parser.add_argument("--dev-size", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=1, help="LoRA end-to-end epochs")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4, help="LoRA + head learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timing-repeats", type=int, default=200)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument(
        "--own-examples", type=Path, default=ROOT / "data" / "safety" / "own_examples.jsonl"
    )
    parser.add_argument("--output", type=Path, help="also write the JSON record here")
    args = parser.parse_args()

    load_start = os.getloadavg()
    watch_all = Stopwatch()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    scratch = Path(tempfile.mkdtemp(prefix="lora-vs-heads-"))
    config = TrainConfig(
        data_dir=args.data_dir,
        own_examples=args.own_examples,
        output_dir=scratch / "out",
        cache_dir=scratch / "cache",
        seed=args.seed,
    )

    # 1. data
    examples = Corpus(args.data_dir, args.own_examples).training_examples()
    train_examples = subsample(
        [e for e in examples if e.split == Split.TRAIN], args.train_size, args.seed
    )
    dev_examples = subsample(
        [e for e in examples if e.split == Split.DEV], args.dev_size, args.seed
    )
    log(f"corpus {len(examples)}; train subsample {len(train_examples)}, dev {len(dev_examples)}")

    # 2. frozen heads
    encoder = SentenceEncoder(BUNDLED_ENCODER, max_tokens=args.max_tokens, threads=args.threads)

    def frozen_embed(texts: Sequence[str]) -> np.ndarray:
        folded = [normalize(text).folded for text in texts]
        return encoder.embed(folded, batch_size=BATCH, first_window_only=True).vectors

    watch = Stopwatch()
    train_m = _matrix(train_examples, frozen_embed, config)
    embed_train_s, embed_train_cpu = watch.lap()
    log(f"frozen: embedded train in {embed_train_s:.1f} s")
    dev_m = _matrix(dev_examples, frozen_embed, config)
    watch = Stopwatch()
    mlp = fit(train_m, config.hidden, config)
    fit_mlp_s, fit_mlp_cpu = watch.lap()
    linear = fit(train_m, 0, config)
    frozen_mean, frozen_labels = auprc(head_logits(mlp, dev_m.x), dev_m)
    linear_mean, linear_labels = auprc(head_logits(linear, dev_m.x), dev_m)
    assert abs(frozen_mean - mean_auprc(mlp, dev_m)) < 1e-9  # noqa: S101 - same rule as train.py
    head_params = sum(p.numel() for p in mlp.parameters())
    log(f"frozen: MLP head fitted in {fit_mlp_s:.1f} s; dev mean AUPRC {frozen_mean:.4f}")

    # 3. LoRA
    path = resolve_model_path(BUNDLED_ENCODER)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    pad = int(tokenizer.pad_token_id)
    base = AutoModel.from_pretrained(path, local_files_only=True)
    train_ids = tokenize(tokenizer, [e.text for e in train_examples], args.max_tokens)
    dev_ids = tokenize(tokenizer, [e.text for e in dev_examples], args.max_tokens)
    # Same pipeline check: the unadapted model through this script's pooling must give
    # the production encoder's embeddings.
    pipeline_diff = float(np.abs(embed_ids(base, dev_ids[:64], pad) - dev_m.x[:64]).max())
    lora_config = peft.LoraConfig(
        r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.05,
        target_modules=["query", "value"],
        bias="none",
    )
    model = peft.get_peft_model(base, lora_config)
    lora_params, _ = model.get_nb_trainable_parameters()
    head = make_head(encoder.dimension, config.hidden, len(HEAD_LABELS), args.seed)
    watch = Stopwatch()
    losses = train_lora(model, head, train_ids, train_m, config, args, pad)
    lora_train_s, lora_train_cpu = watch.lap()
    dev_x_lora = embed_ids(model, dev_ids, pad)
    lora_mean, lora_labels = auprc(head_logits(head, dev_x_lora), dev_m)
    log(f"lora: trained in {lora_train_s:.1f} s; dev mean AUPRC {lora_mean:.4f}")

    watch = Stopwatch()
    train_x_lora = embed_ids(model, train_ids, pad)
    embed_lora_s, embed_lora_cpu = watch.lap()
    watch = Stopwatch()
    refit = fit(dataclasses.replace(train_m, x=train_x_lora), config.hidden, config)
    refit_s, refit_cpu = watch.lap()
    refit_mean, refit_labels = auprc(head_logits(refit, dev_x_lora), dev_m)
    log(f"lora + refit head: dev mean AUPRC {refit_mean:.4f}")

    model.save_pretrained(scratch / "adapter")
    adapter_file = scratch / "adapter" / "adapter_model.safetensors"
    adapter_bytes = adapter_file.stat().st_size

    # 4. inference cost: frozen encoder vs unmerged adapter vs merged adapter
    batch = dict(tokenizer([TIMING_TEXT], return_tensors="pt"))
    tokens = int(batch["input_ids"].shape[1])
    timing = {"frozen_encoder": time_forward(encoder.model, batch, args.timing_repeats)}
    timing["lora_unmerged"] = time_forward(model, batch, args.timing_repeats)
    with torch.inference_mode():
        unmerged_vec = pooled(model, collate(dev_ids[:64], pad))
    merged = model.merge_and_unload()
    with torch.inference_mode():
        merged_vec = pooled(merged, collate(dev_ids[:64], pad))
    merge_diff = float((merged_vec - unmerged_vec).abs().max())
    timing["lora_merged"] = time_forward(merged, batch, args.timing_repeats)
    base_state = encoder.model.state_dict()
    merged_state = merged.state_dict()
    same_shapes = base_state.keys() == merged_state.keys() and all(
        base_state[key].shape == merged_state[key].shape for key in base_state
    )

    labels_scored = list(frozen_labels)
    record = {
        "benchmark": "lora_vs_heads",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(
            [f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')}"]
            + [os.path.relpath(sys.executable, ROOT)]
            + [os.path.relpath(sys.argv[0], ROOT) if Path(sys.argv[0]).exists() else sys.argv[0]]
            + sys.argv[1:]
        ),
        "machine": {
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "load_average_1_5_15_at_start": [round(v, 2) for v in load_start],
            "load_average_1_5_15_at_end": [round(v, 2) for v in os.getloadavg()],
        },
        "settings": {
            "encoder": BUNDLED_ENCODER,
            "max_tokens": args.max_tokens,
            "train_size": args.train_size,
            "dev_size": args.dev_size,
            "seed": args.seed,
            "head": {
                "hidden": config.hidden,
                "frozen_epochs": config.epochs,
                "frozen_lr": config.learning_rate,
                "weight_decay": config.weight_decay,
                "own_weight": config.own_weight,
                "max_pos_weight": config.max_pos_weight,
            },
            "lora": {
                "r": args.lora_r,
                "alpha": 2 * args.lora_r,
                "dropout": 0.05,
                "target_modules": ["query", "value"],
                "epochs": args.epochs,
                "lr": args.lr,
                "batch": BATCH,
            },
        },
        "data": {
            "subsample": (
                "all own examples and all positives of labels other than hate/harassment, "
                "then a seeded random fill from the rest"
            ),
            "train": describe(train_examples),
            "dev": describe(dev_examples),
            "labels_scored": labels_scored,
        },
        "metric": "dev mean AUPRC over labels with >=3 known positives and >=3 known negatives",
        "variants": {
            "frozen_heads": {
                "dev_mean_auprc": round(frozen_mean, 4),
                "dev_auprc": rounded(frozen_labels),
                "train_seconds": round(embed_train_s + fit_mlp_s, 1),
                "train_seconds_parts": {
                    "embed_train_split": round(embed_train_s, 1),
                    "fit_mlp_head": round(fit_mlp_s, 1),
                },
                "train_cpu_seconds": round(embed_train_cpu + fit_mlp_cpu, 1),
                "trainable_params": head_params,
                "artifact_bytes": head_params * 4,
                "linear_head_dev_mean_auprc": round(linear_mean, 4),
                "linear_head_dev_auprc": rounded(linear_labels),
            },
            "lora": {
                "dev_mean_auprc": round(lora_mean, 4),
                "dev_auprc": rounded(lora_labels),
                "train_seconds": round(lora_train_s, 1),
                "train_cpu_seconds": round(lora_train_cpu, 1),
                "epoch_mean_loss": losses,
                "trainable_params": lora_params + head_params,
                "trainable_params_adapter": lora_params,
                "trainable_params_head": head_params,
                "adapter_safetensors_bytes": adapter_bytes,
                "artifact_bytes": adapter_bytes + head_params * 4,
            },
            "lora_refit_head": {
                "note": "adapted encoder from 'lora', head refitted with train._fit "
                "(same recipe as frozen_heads)",
                "dev_mean_auprc": round(refit_mean, 4),
                "dev_auprc": rounded(refit_labels),
                "train_seconds": round(lora_train_s + embed_lora_s + refit_s, 1),
                "train_seconds_parts": {
                    "lora": round(lora_train_s, 1),
                    "embed_train_split": round(embed_lora_s, 1),
                    "fit_mlp_head": round(refit_s, 1),
                },
                "train_cpu_seconds": round(lora_train_cpu + embed_lora_cpu + refit_cpu, 1),
            },
        },
        "comparison": {
            "lora_minus_frozen": round(lora_mean - frozen_mean, 4),
            "lora_refit_head_minus_frozen": round(refit_mean - frozen_mean, 4),
            "better": max(
                {
                    "frozen_heads": frozen_mean,
                    "lora": lora_mean,
                    "lora_refit_head": refit_mean,
                }.items(),
                key=lambda item: item[1],
            )[0],
        },
        "inference": {
            "text_tokens": tokens,
            "forward_one_text": timing,
            "merged_vs_unmerged_max_abs_diff": merge_diff,
            "merged_same_params_as_base": bool(same_shapes),
            "params_base": sum(p.numel() for p in encoder.model.parameters()),
            "params_merged": sum(p.numel() for p in merged.parameters()),
        },
        "checks": {"script_pooling_vs_sentence_encoder_max_abs_diff": pipeline_diff},
        "wall_seconds": round(watch_all.lap()[0], 1),
        "cpu_seconds": round(watch_all.lap()[1], 1),
    }
    text = json.dumps(record, indent=2)
    if args.output:
        args.output.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
