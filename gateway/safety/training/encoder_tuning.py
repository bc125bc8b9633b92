"""Fine-tune the sentence encoder end to end, with the label heads, for engine v2.

Frozen mean-pooled embeddings carry topic, not intent (issue: "kill a process" sits next
to threats). This step adapts every transformer block of all-MiniLM-L6-v2 with LoRA
(rank ``rank`` on the query, key, value and all dense layers of each block) together with
a linear multi-label head, on prompts and model replies alike, with the masked, weighted
binary cross-entropy of ``gateway.safety.training.loop``.

Top to bottom: tokenise every training text once (the normalised, folded view the engine
classifies), wrap the encoder with LoRA, train ``epochs`` passes with AdamW in the shared
step loop (``loop.train``: batches of similar length, a checkpoint every
``checkpoint_every`` steps of the LoRA factors, head, optimiser and position), and write the
LoRA factors as a delta file (``gateway.safety.delta``). A killed run started again with
the same arguments resumes from its last checkpoint; a finished one is reused.

The head trained here is returned as a ``torch.nn.Linear``; ``gateway.safety.training.train``
calibrates it, tunes its thresholds and measures it exactly as it does the frozen heads,
on embeddings from the merged encoder, so the two designs are compared in one run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gateway.safety import delta
from gateway.safety.training import loop
from gateway.safety.training.loop import Progress, TunedEncoder, TuningData

TARGET_MODULES = r".*encoder\.layer\.\d+\..*(query|key|value|dense)$"
DEFAULT_RANK = 16
DEFAULT_ALPHA = 32
DEFAULT_EPOCHS = 2
DEFAULT_LEARNING_RATE = 5e-4
DEFAULT_BATCH = 32
DEFAULT_MAX_TOKENS = 128
DEFAULT_CHECKPOINT_EVERY = 100


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


def tune(
    data: TuningData, config: TuningConfig, *, progress: Progress | None = None
) -> TunedEncoder:
    """Train (or resume, or reuse) the LoRA delta and head; see the module docstring."""
    from peft import LoraConfig, get_peft_model

    started = time.perf_counter()
    folder = loop.RunFolder.of("tuning", data, config)
    finished = folder.finished()
    if finished is not None:
        return finished

    torch.manual_seed(config.seed)
    tokenizer, base = loop.load_pretrained(config.encoder)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=0.05,
        target_modules=TARGET_MODULES,
        bias="none",
    )
    encoder = get_peft_model(base, lora)
    device = loop.training_device()
    model = _Model(encoder, labels=data.y.shape[1], hidden=int(base.config.hidden_size))
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.01)

    encoded = tokenizer(data.texts, max_length=config.max_tokens, truncation=True)
    ids: list[list[int]] = encoded["input_ids"]

    def forward(rows: list[int]) -> torch.Tensor:
        input_ids, attention = loop.padded(ids, rows)
        logits: torch.Tensor = model(input_ids.to(device), attention.to(device))
        return logits

    step = loop.train(
        model,
        optimiser,
        forward,
        plan=loop.step_plan(
            [len(row) for row in ids],
            batch=config.batch,
            seed=config.seed,
            epochs=config.epochs,
            max_steps=config.max_steps,
        ),
        targets=loop.Targets.of(data, max_pos_weight=config.max_pos_weight, device=device),
        checkpoint=folder.checkpoint,
        checkpoint_every=config.checkpoint_every,
        stage="fine-tuning",
        progress=progress,
    )

    factors = {name: tensor.cpu() for name, tensor in _lora_factors(encoder).items()}
    folder.write(
        lambda path: delta.save(factors, path, scaling=config.alpha / config.rank),
        model.head.cpu(),
    )
    return TunedEncoder(
        folder.delta, loop.load_head(folder.head), steps=step, seconds=time.perf_counter() - started
    )


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
