"""The training machinery shared by the two ways of fine-tuning the sentence encoder.

``encoder_tuning`` (LoRA on every block) and ``top_layers`` (the upper blocks in full, over
cached outputs of the frozen lower ones) differ in what they train and what they export;
the rest lives here:

- the data a run trains on (``TuningData``) and what it returns (``TunedEncoder``);
- its work folder (``RunFolder``), named by the ``fingerprint`` of the data and of every
  option that shapes training, holding the checkpoint, the head and the delta;
- loading the tokenizer and model offline, padding, and the batches of similar length;
- the masked, weighted binary cross-entropy (``masked_loss``, also the frozen heads' loss
  in ``heads_fit``) with its capped positive weights;
- ``train``: the step loop with the warm-up then linear-decay schedule, a checkpoint every
  ``checkpoint_every`` steps, progress reports, and resuming from the last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt
import torch

from gateway.safety.encoder import resolve_model_path

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Progress = Callable[[str, int, int], None]
WARMUP_STEPS = 50
MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class TuningData:
    texts: list[str]  # already normalised (folded)
    y: npt.NDArray[np.float32]
    known: npt.NDArray[np.float32]
    weight: npt.NDArray[np.float32]


@dataclass(frozen=True)
class TunedEncoder:
    delta_path: Path
    head: torch.nn.Linear
    steps: int  # -1 when a finished run was reused
    seconds: float


class RunOptions(Protocol):
    """What every fine-tuning config has; the rest of its fields go into the fingerprint."""

    @property
    def work_dir(self) -> Path: ...


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


@dataclass(frozen=True)
class RunFolder:
    """The work folder of one run: ``<work_dir>/<kind>-<fingerprint>``."""

    path: Path

    @classmethod
    def of(cls, kind: str, data: TuningData, config: RunOptions) -> RunFolder:
        folder = cls(config.work_dir / f"{kind}-{fingerprint(data, config)}")
        folder.path.mkdir(parents=True, exist_ok=True)
        return folder

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def head(self) -> Path:
        return self.path / "head.pt"

    @property
    def delta(self) -> Path:
        return self.path / "encoder_delta.safetensors"

    def finished(self) -> TunedEncoder | None:
        """What a run that finished here wrote, to reuse instead of training again."""
        if self.delta.exists() and self.head.exists():
            return TunedEncoder(self.delta, load_head(self.head), steps=-1, seconds=0.0)
        return None

    def write(self, write_delta: Callable[[Path], None], head: torch.nn.Linear) -> None:
        """Write the delta (through ``write_delta``) and the head; the delta appears last,
        so a run killed while writing is not taken for a finished one."""
        partial = self.delta.with_suffix(".partial")
        write_delta(partial)
        torch.save(head.state_dict(), self.head)
        partial.replace(self.delta)


def load_head(path: Path) -> torch.nn.Linear:
    state = torch.load(path, weights_only=True)
    head = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    head.load_state_dict(state)
    return head.eval()


def load_pretrained(
    encoder: str, **options: object
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Tokenizer and model of ``encoder``, from local files when they are there or the
    hub is offline; ``options`` go to the model's ``from_pretrained``."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path(encoder)
    local_only = Path(path).exists() or os.environ.get("HF_HUB_OFFLINE") == "1"
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    model = AutoModel.from_pretrained(path, local_files_only=local_only, **options)
    return tokenizer, model


def training_device() -> torch.device:
    """The same run on a GPU when one is there; nothing else changes."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def padded(ids: Sequence[Sequence[int]], rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The token ids of ``rows``, zero-padded to the longest, and their attention mask."""
    width = max(len(ids[i]) for i in rows)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for row, i in enumerate(rows):
        input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
        attention[row, : len(ids[i])] = 1
    return input_ids, attention


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


def step_plan(
    lengths: Sequence[int], *, batch: int, seed: int, epochs: int, max_steps: int | None
) -> list[list[int]]:
    """The rows of every step, epoch after epoch, cut after ``max_steps``."""
    plan = [rows for epoch in range(epochs) for rows in batches(lengths, batch, seed, epoch)]
    return plan if max_steps is None else plan[: max(max_steps, 0)]


def positive_weight(y: torch.Tensor, known: torch.Tensor, cap: float) -> torch.Tensor:
    """Each label's negatives per positive among the rows where it is known, in [1, cap]."""
    positives = (y * known).sum(0)
    negatives = ((1 - y) * known).sum(0)
    return (negatives / positives.clamp(min=1)).clamp(1.0, cap)


def masked_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    known: torch.Tensor,
    weight: torch.Tensor,
    pos_weight: torch.Tensor,
) -> torch.Tensor:
    """Binary cross-entropy of the known labels only, each row weighted, per known label."""
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, y, pos_weight=pos_weight, reduction="none"
    )
    return (loss * known * weight[:, None]).sum() / known.sum().clamp(min=1)


@dataclass(frozen=True)
class Targets:
    """A run's labels, known-label mask, row weights and positive weights, on its device."""

    y: torch.Tensor
    known: torch.Tensor
    weight: torch.Tensor
    pos_weight: torch.Tensor

    @classmethod
    def of(cls, data: TuningData, *, max_pos_weight: float, device: torch.device) -> Targets:
        y, known = torch.from_numpy(data.y).to(device), torch.from_numpy(data.known).to(device)
        weight = torch.from_numpy(data.weight).to(device)
        return cls(y, known, weight, positive_weight(y, known, max_pos_weight))

    def loss(self, logits: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        picked = torch.tensor(rows, device=self.y.device)
        return masked_loss(
            logits, self.y[picked], self.known[picked], self.weight[picked], self.pos_weight
        )


def warmup_then_decay(
    optimiser: torch.optim.Optimizer, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate rises over ``WARMUP_STEPS`` steps, then falls linearly to 0."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda step: min(1.0, (step + 1) / WARMUP_STEPS) * max(0.0, 1 - step / max(total, 1)),
    )


def train(
    model: torch.nn.Module,
    optimiser: torch.optim.Optimizer,
    forward: Callable[[list[int]], torch.Tensor],
    *,
    plan: list[list[int]],
    targets: Targets,
    checkpoint: Path,
    checkpoint_every: int,
    stage: str,
    progress: Progress | None = None,
) -> int:
    """Take the steps of ``plan`` (``forward`` gives a batch's logits), from the last
    checkpoint on when there is one; return the number of steps done."""
    total = len(plan)
    schedule = warmup_then_decay(optimiser, total)
    trainable = [p for p in model.parameters() if p.requires_grad]
    step = 0
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True, map_location=targets.y.device)
        model.load_state_dict(saved["model"], strict=False)
        optimiser.load_state_dict(saved["optimiser"])
        schedule.load_state_dict(saved["schedule"])
        step = int(saved["step"])
        if progress:
            progress("resuming fine-tuning", step, total)
    model.train()
    window_loss: list[float] = []
    for index in range(step, total):
        rows = plan[index]
        loss = targets.loss(forward(rows), rows)
        optimiser.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimiser.step()
        schedule.step()
        window_loss.append(float(loss.detach()))
        step = index + 1
        if step % checkpoint_every == 0 or step == total:
            save_checkpoint(checkpoint, model, optimiser, schedule, step)
            if progress:
                progress(f"{stage} (loss {np.mean(window_loss):.4f})", step, total)
            window_loss = []
    return step


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
