"""Fine-tune the sentence encoder end to end, with the label heads, for engine v2.

Frozen mean-pooled embeddings carry topic, not intent (issue: "kill a process" sits next
to threats). This step adapts every transformer block of all-MiniLM-L6-v2 with LoRA
(rank ``rank`` on the query, key, value and all dense layers of each block) together with
a linear multi-label head, on prompts and model replies alike, with the masked, weighted
binary cross-entropy of ``gateway.safety.training.train``.

Top to bottom: tokenise every training text once (the normalised, folded view the engine
classifies), bucket by length, train ``epochs`` passes with AdamW, checkpoint every
``checkpoint_every`` steps (LoRA factors, head, optimiser, position), and write the LoRA
factors as a delta file (``gateway.safety.delta``). A killed run started again with the
same arguments resumes from its last checkpoint; a finished one is reused.

The head trained here is returned as a ``torch.nn.Linear``; ``gateway.safety.training.train``
calibrates it, tunes its thresholds and measures it exactly as it does the frozen heads,
on embeddings from the merged encoder, so the two designs are compared in one run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from gateway.safety import delta
from gateway.safety.encoder import resolve_model_path

Progress = Callable[[str, int, int], None]
TARGET_MODULES = r".*encoder\.layer\.\d+\..*(query|key|value|dense)$"
DEFAULT_RANK = 16
DEFAULT_ALPHA = 32
DEFAULT_EPOCHS = 2
DEFAULT_LEARNING_RATE = 5e-4
DEFAULT_BATCH = 32
DEFAULT_MAX_TOKENS = 128
DEFAULT_CHECKPOINT_EVERY = 100


@dataclass(frozen=True)
class TuningData:
    texts: list[str]  # already normalised (folded)
    y: npt.NDArray[np.float32]
    known: npt.NDArray[np.float32]
    weight: npt.NDArray[np.float32]


@dataclass(frozen=True)
class TuningConfig:
    encoder: str
    work_dir: Path
    rank: int = DEFAULT_RANK
    alpha: int = DEFAULT_ALPHA
    epochs: int = DEFAULT_EPOCHS
    learning_rate: float = DEFAULT_LEARNING_RATE
    batch: int = DEFAULT_BATCH
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_pos_weight: float = 10.0
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    seed: int = 0
    max_steps: int | None = None  # stop early (tests); None trains every epoch

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha < 1:
            raise ValueError("rank and alpha must be >= 1")
        if self.epochs < 1 or self.batch < 1 or self.checkpoint_every < 1:
            raise ValueError("epochs, batch and checkpoint_every must be >= 1")


@dataclass(frozen=True)
class TunedEncoder:
    delta_path: Path
    head: torch.nn.Linear
    steps: int
    seconds: float


class _Model(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module, labels: int, hidden: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(hidden, labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        result: torch.Tensor = self.head(torch.nn.functional.normalize(pooled, p=2, dim=1))
        return result


def fingerprint(data: TuningData, config: object) -> str:
    """What a checkpoint belongs to: the data and every option that shapes training."""
    digest = hashlib.sha256()
    for text in data.texts:
        digest.update(text.encode())
        digest.update(b"\0")
    for array in (data.y, data.known, data.weight):
        digest.update(np.ascontiguousarray(array).tobytes())
    options = {k: v for k, v in sorted(vars(config).items()) if k not in {"work_dir", "max_steps"}}
    options["kind"] = type(config).__name__
    digest.update(json.dumps(options, default=str, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def tune(
    data: TuningData, config: TuningConfig, *, progress: Progress | None = None
) -> TunedEncoder:
    """Train (or resume, or reuse) the LoRA delta and head; see the module docstring."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    started = time.perf_counter()
    key = fingerprint(data, config)
    folder = config.work_dir / f"tuning-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    delta_path = folder / "encoder_delta.safetensors"
    head_path = folder / "head.pt"
    if delta_path.exists() and head_path.exists():
        state = torch.load(head_path, weights_only=True)
        head = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
        head.load_state_dict(state)
        return TunedEncoder(delta_path, head.eval(), steps=-1, seconds=0.0)

    torch.manual_seed(config.seed)
    path = resolve_model_path(config.encoder)
    local_only = Path(path).exists() or os.environ.get("HF_HUB_OFFLINE") == "1"
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    base = AutoModel.from_pretrained(path, local_files_only=local_only)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=0.05,
        target_modules=TARGET_MODULES,
        bias="none",
    )
    encoder = get_peft_model(base, lora)
    # The same run on a GPU when one is there; nothing else changes.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = _Model(encoder, labels=data.y.shape[1], hidden=int(base.config.hidden_size))
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.01)

    encoded = tokenizer(data.texts, max_length=config.max_tokens, truncation=True)
    ids: list[list[int]] = encoded["input_ids"]
    lengths = [len(row) for row in ids]
    batches_per_epoch = [
        batches(lengths, config.batch, config.seed, epoch) for epoch in range(config.epochs)
    ]
    total = sum(len(b) for b in batches_per_epoch)
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min(1.0, (step + 1) / 50) * max(0.0, 1 - step / max(total, 1))
    )
    y, known = torch.from_numpy(data.y).to(device), torch.from_numpy(data.known).to(device)
    weight = torch.from_numpy(data.weight).to(device)
    positives = (y * known).sum(0)
    negatives = ((1 - y) * known).sum(0)
    pos_weight = (negatives / positives.clamp(min=1)).clamp(1.0, config.max_pos_weight)

    step = 0
    checkpoint = folder / "checkpoint.pt"
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True, map_location=device)
        model.load_state_dict(saved["model"], strict=False)
        optimiser.load_state_dict(saved["optimiser"])
        schedule.load_state_dict(saved["schedule"])
        step = int(saved["step"])
        if progress:
            progress("resuming fine-tuning", step, total)
    model.train()
    flat = [batch for epoch in batches_per_epoch for batch in epoch][:total]
    window_loss: list[float] = []
    for index in range(step, total):
        batch = flat[index]
        width = max(len(ids[i]) for i in batch)
        input_ids = torch.zeros((len(batch), width), dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
            attention[row, : len(ids[i])] = 1
        logits = model(input_ids.to(device), attention.to(device))
        rows = torch.tensor(batch, device=device)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, y[rows], pos_weight=pos_weight, reduction="none"
        )
        loss = (loss * known[rows] * weight[rows, None]).sum() / known[rows].sum().clamp(min=1)
        optimiser.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimiser.step()
        schedule.step()
        window_loss.append(float(loss.detach()))
        step = index + 1
        if step % config.checkpoint_every == 0 or step == total:
            save_checkpoint(checkpoint, model, optimiser, schedule, step)
            if progress:
                progress(f"fine-tuning (loss {np.mean(window_loss):.4f})", step, total)
            window_loss = []

    factors = {name: tensor.cpu() for name, tensor in _lora_factors(encoder).items()}
    partial = delta_path.with_suffix(".partial")
    delta.save(factors, partial, scaling=config.alpha / config.rank)
    head = torch.nn.Linear(model.head.in_features, model.head.out_features)
    head.load_state_dict({k: v.cpu() for k, v in model.head.state_dict().items()})
    torch.save(head.state_dict(), head_path)
    partial.replace(delta_path)
    return TunedEncoder(delta_path, head.eval(), steps=step, seconds=time.perf_counter() - started)


def batches(lengths: Sequence[int], size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled batches of texts of similar length (little padding), fixed per epoch."""
    generator = random.Random(seed * 1000 + epoch)  # noqa: S311 - shuffling, not secrets
    order = list(range(len(lengths)))
    generator.shuffle(order)
    pool = size * 50
    result: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        result += [chunk[i : i + size] for i in range(0, len(chunk), size)]
    generator.shuffle(result)
    return result


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimiser: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LambdaLR,
    step: int,
) -> None:
    trainable = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    partial = path.with_suffix(".partial")
    torch.save(
        {
            "model": trainable,
            "optimiser": optimiser.state_dict(),
            "schedule": schedule.state_dict(),
            "step": step,
        },
        partial,
    )
    partial.replace(path)


def _lora_factors(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{<BertModel linear name>.lora_A|B: tensor}`` from a peft-wrapped model."""
    factors: dict[str, torch.Tensor] = {}
    prefix = "base_model.model."
    for name, module in encoder.named_modules():
        a = getattr(module, "lora_A", None)
        b = getattr(module, "lora_B", None)
        if isinstance(a, torch.nn.ModuleDict) and isinstance(b, torch.nn.ModuleDict):
            down, up = a["default"], b["default"]
            if isinstance(down, torch.nn.Linear) and isinstance(up, torch.nn.Linear):
                target = name.removeprefix(prefix)
                factors[f"{target}.lora_A"] = down.weight
                factors[f"{target}.lora_B"] = up.weight
    if not factors:
        raise RuntimeError("no LoRA factors found in the tuned encoder")
    return factors
