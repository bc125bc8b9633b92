"""Fine-tune the encoder's top transformer blocks over cached outputs of the frozen lower ones.

The second way ``safegate safety train`` adapts the encoder (``encoder_tuning`` is LoRA on
every block; the step loop, checkpoints and loss both use are in ``loop``). Here the lower
``layers - top_layers`` blocks of all-MiniLM-L6-v2 stay frozen, so their output for a text
never changes between epochs: it is computed once, stored as float16 in the work folder,
and every epoch only runs (and back-propagates through) the top blocks and a linear
multi-label head. On this 2-core machine that makes a step several times cheaper than a
pass through the whole encoder.

Top to bottom: tokenise every training text once (the folded view the engine classifies);
run the frozen blocks over them in chunks, saving each chunk (a killed run keeps what was
cached); train ``epochs`` passes with AdamW (the blocks at ``learning_rate``, the head at
``head_learning_rate``), checkpointing every ``checkpoint_every`` steps; write the change
of every parameter of the tuned blocks as a delta file (``gateway.safety.delta``, float16
differences that loading adds to the bundled weights). A killed run started again with the
same arguments resumes from its last checkpoint; a finished one is reused.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch

from gateway.safety import delta
from gateway.safety.training import loop
from gateway.safety.training.loop import Progress, TunedEncoder, TuningData

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_TOP_LAYERS = 2
DEFAULT_EPOCHS = 3
DEFAULT_LEARNING_RATE = 1e-4
DEFAULT_HEAD_LEARNING_RATE = 2e-3
DEFAULT_BATCH = 32
DEFAULT_MAX_TOKENS = 128
DEFAULT_CHECKPOINT_EVERY = 50
CACHE_CHUNK = 1024


@dataclass(frozen=True)
class TopLayersConfig:
    encoder: str
    work_dir: Path
    top_layers: int = DEFAULT_TOP_LAYERS
    epochs: int = DEFAULT_EPOCHS
    learning_rate: float = DEFAULT_LEARNING_RATE
    head_learning_rate: float = DEFAULT_HEAD_LEARNING_RATE
    batch: int = DEFAULT_BATCH
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_pos_weight: float = 10.0
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    seed: int = 0
    max_steps: int | None = None  # stop early (tests); None trains every epoch

    def __post_init__(self) -> None:
        if self.top_layers < 1:
            raise ValueError("top_layers must be >= 1")
        if self.epochs < 1 or self.batch < 1 or self.checkpoint_every < 1:
            raise ValueError("epochs, batch and checkpoint_every must be >= 1")


class LowerStates:
    """The frozen blocks' output for each text, float16, one array of all tokens."""

    def __init__(self, states: npt.NDArray[np.float16], offsets: npt.NDArray[np.int64]) -> None:
        self.states = states
        self.offsets = offsets  # text i owns states[offsets[i]:offsets[i + 1]]

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def batch(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded hidden states [batch, width, hidden] and the attention mask."""
        width = max(self.length(i) for i in rows)
        hidden = torch.zeros((len(rows), width, self.states.shape[1]), dtype=torch.float32)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, i in enumerate(rows):
            part = self.states[self.offsets[i] : self.offsets[i + 1]]
            hidden[row, : len(part)] = torch.from_numpy(part.astype(np.float32))
            mask[row, : len(part)] = 1
        return hidden, mask


class TopBlocks(torch.nn.Module):
    """The top blocks of a BERT encoder, mean pooling, L2 normalisation and a linear head."""

    def __init__(self, model: torch.nn.Module, top_layers: int, labels: int) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(list(blocks_of(model))[-top_layers:])
        self.head = torch.nn.Linear(int(model.config.hidden_size), labels)  # type: ignore[union-attr,arg-type]

    def embed(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled, normalised output of the top blocks (what ``SentenceEncoder`` gives)."""
        # Eager attention adds this to the scores: 0 for tokens, the dtype's minimum for pads.
        extended = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for block in self.blocks:
            output = block(hidden, attention_mask=extended)
            hidden = output[0] if isinstance(output, tuple) else output
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.head(self.embed(hidden, mask))
        return result


def load_encoder(encoder: str) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Tokenizer and model with eager attention (the blocks take an additive mask)."""
    return loop.load_pretrained(encoder, attn_implementation="eager")


def lower_states(
    model: torch.nn.Module,
    ids: list[list[int]],
    frozen: int,
    folder: Path,
    progress: Progress | None = None,
) -> LowerStates:
    """Run the embeddings and the first ``frozen`` blocks over every text, once, resumably."""
    folder.mkdir(parents=True, exist_ok=True)
    encoder = model.get_submodule("encoder")
    blocks = blocks_of(model)
    chunks = []
    try:
        encoder.layer = torch.nn.ModuleList(list(blocks)[:frozen])
        model.eval()
        for number, start in enumerate(range(0, len(ids), CACHE_CHUNK)):
            path = folder / f"chunk-{number:05d}.npy"
            if not path.exists():
                part = _lower_chunk(model, ids[start : start + CACHE_CHUNK])
                partial = path.with_suffix(".partial.npy")
                np.save(partial, part)
                partial.replace(path)
            chunks.append(np.load(path))
            if progress:
                progress("caching frozen layers", min(start + CACHE_CHUNK, len(ids)), len(ids))
    finally:
        encoder.layer = blocks
    lengths = np.array([len(row) for row in ids], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    states = np.concatenate(chunks) if chunks else np.zeros((0, 1), np.float16)
    if states.shape[0] != offsets[-1]:
        raise RuntimeError(f"cached frozen-layer states in {folder} do not match the texts")
    return LowerStates(states, offsets)


def _lower_chunk(model: torch.nn.Module, ids: list[list[int]]) -> npt.NDArray[np.float16]:
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    outputs: dict[int, npt.NDArray[np.float16]] = {}
    with torch.inference_mode():
        for start in range(0, len(order), 64):
            rows = order[start : start + 64]
            input_ids, attention = loop.padded(ids, rows)
            hidden = model(input_ids=input_ids, attention_mask=attention).last_hidden_state
            for row, i in enumerate(rows):
                outputs[i] = hidden[row, : len(ids[i])].numpy().astype(np.float16)
    return np.concatenate([outputs[i] for i in range(len(ids))])


def tune(
    data: TuningData, config: TopLayersConfig, *, progress: Progress | None = None
) -> TunedEncoder:
    """Train (or resume, or reuse) the top blocks and head; see the module docstring."""
    started = time.perf_counter()
    folder = loop.RunFolder.of("top-layers", data, config)
    finished = folder.finished()
    if finished is not None:
        return finished

    torch.manual_seed(config.seed)
    tokenizer, model = load_encoder(config.encoder)
    layers = len(blocks_of(model))
    if config.top_layers >= layers:
        raise ValueError(f"top_layers must be below the encoder's {layers} layers")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    encoded = tokenizer(data.texts, max_length=config.max_tokens, truncation=True)
    ids: list[list[int]] = encoded["input_ids"]
    cache = lower_states(
        model, ids, layers - config.top_layers, folder.path / "lower-states", progress=progress
    )
    base = {
        name: parameter.detach().clone()
        for name, parameter in _block_parameters(model, config.top_layers).items()
    }
    top = TopBlocks(model, config.top_layers, labels=data.y.shape[1])
    for parameter in top.blocks.parameters():
        parameter.requires_grad_(True)
    device = loop.training_device()
    top.to(device)
    optimiser = torch.optim.AdamW(
        [
            {"params": list(top.blocks.parameters()), "lr": config.learning_rate},
            {"params": list(top.head.parameters()), "lr": config.head_learning_rate},
        ],
        weight_decay=0.01,
    )

    def forward(rows: list[int]) -> torch.Tensor:
        hidden, mask = cache.batch(rows)
        logits: torch.Tensor = top(hidden.to(device), mask.to(device))
        return logits

    step = loop.train(
        top,
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
        stage="fine-tuning top layers",
        progress=progress,
    )

    top.cpu()
    tuned = _block_parameters(model, config.top_layers)
    differences = {name: tuned[name].detach() - base[name] for name in base}
    folder.write(lambda path: delta.save_differences(differences, path), top.head)
    (folder.path / "run.json").write_text(
        json.dumps({"steps": step, "seconds": round(time.perf_counter() - started, 1)}) + "\n"
    )
    return TunedEncoder(
        folder.delta, loop.load_head(folder.head), steps=step, seconds=time.perf_counter() - started
    )


def blocks_of(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks of a BERT-style model (``encoder.layer``)."""
    blocks = getattr(model.get_submodule("encoder"), "layer", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise ValueError("the encoder is not BERT-style: it has no encoder.layer blocks")
    return blocks


def _block_parameters(model: torch.nn.Module, top_layers: int) -> dict[str, torch.Tensor]:
    """``{<BertModel parameter name>: tensor}`` of the top blocks."""
    layers = len(blocks_of(model))
    prefixes = tuple(f"encoder.layer.{i}." for i in range(layers - top_layers, layers))
    return {name: p for name, p in model.named_parameters() if name.startswith(prefixes)}
