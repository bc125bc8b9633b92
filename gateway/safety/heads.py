"""Classification heads on sentence embeddings, with their calibration and thresholds.

The artifact is one safetensors file (no pickle) holding, for L labels over D-dimensional
embeddings:

- an optional hidden layer ``hidden.weight`` [H, D] and ``hidden.bias`` [H] (ReLU),
- the output layer ``out.weight`` [L, H or D] and ``out.bias`` [L],
- Platt calibration ``calib.scale`` [L] and ``calib.shift`` [L]: p = sigmoid(scale * z + shift),
- the tuned decision ``threshold`` [L] on the calibrated probability,

and metadata naming the labels, the encoder and the format version. Raw head outputs
are logits; only calibrated probabilities leave this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

FORMAT = "safegate-heads/1"
FloatArray = npt.NDArray[np.float32]


class HeadsFormatError(Exception):
    """The heads file is missing, of another format, or inconsistent."""


@dataclass(frozen=True)
class Heads:
    labels: tuple[str, ...]
    encoder: str
    out_weight: FloatArray
    out_bias: FloatArray
    calib_scale: FloatArray
    calib_shift: FloatArray
    threshold: FloatArray
    hidden_weight: FloatArray | None = None
    hidden_bias: FloatArray | None = None

    def __post_init__(self) -> None:
        count = len(self.labels)
        for name in ("out_bias", "calib_scale", "calib_shift", "threshold"):
            if getattr(self, name).shape != (count,):
                raise HeadsFormatError(
                    f"{name} has shape {getattr(self, name).shape}, expected ({count},)"
                )
        if self.out_weight.shape[0] != count:
            raise HeadsFormatError(
                f"out.weight has {self.out_weight.shape[0]} rows for {count} labels"
            )
        if not np.all((self.threshold >= 0) & (self.threshold <= 1)):
            raise HeadsFormatError("thresholds must be probabilities in [0, 1]")

    @property
    def dimension(self) -> int:
        return int(
            (self.hidden_weight if self.hidden_weight is not None else self.out_weight).shape[1]
        )

    def logits(self, embeddings: FloatArray) -> FloatArray:
        features = embeddings
        if self.hidden_weight is not None and self.hidden_bias is not None:
            features = np.maximum(features @ self.hidden_weight.T + self.hidden_bias, 0.0)
        logits: FloatArray = (features @ self.out_weight.T + self.out_bias).astype(np.float32)
        return logits

    def probabilities(self, embeddings: FloatArray) -> FloatArray:
        """Calibrated probabilities, shape [N, L]."""
        z = self.calib_scale * self.logits(embeddings) + self.calib_shift
        probabilities: FloatArray = (1.0 / (1.0 + np.exp(-np.clip(z, -40.0, 40.0)))).astype(
            np.float32
        )
        return probabilities

    def thresholds(self) -> dict[str, float]:
        return {
            label: float(value) for label, value in zip(self.labels, self.threshold, strict=True)
        }

    def save(self, path: Path) -> None:
        tensors = {
            "out.weight": self.out_weight,
            "out.bias": self.out_bias,
            "calib.scale": self.calib_scale,
            "calib.shift": self.calib_shift,
            "threshold": self.threshold,
        }
        if self.hidden_weight is not None and self.hidden_bias is not None:
            tensors["hidden.weight"] = self.hidden_weight
            tensors["hidden.bias"] = self.hidden_bias
        metadata = {
            "format": FORMAT,
            "labels": json.dumps(list(self.labels)),
            "encoder": self.encoder,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(
            {key: np.ascontiguousarray(value, np.float32) for key, value in tensors.items()},
            str(path),
            metadata,
        )

    @classmethod
    def load(cls, path: Path) -> Heads:
        if not path.exists():
            raise HeadsFormatError(f"heads file not found: {path}")
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise HeadsFormatError(
                f"{path}: format {metadata.get('format')!r}, expected {FORMAT!r}"
            )
        tensors = load_file(str(path))
        try:
            return cls(
                labels=tuple(json.loads(metadata["labels"])),
                encoder=metadata["encoder"],
                out_weight=tensors["out.weight"],
                out_bias=tensors["out.bias"],
                calib_scale=tensors["calib.scale"],
                calib_shift=tensors["calib.shift"],
                threshold=tensors["threshold"],
                hidden_weight=tensors.get("hidden.weight"),
                hidden_bias=tensors.get("hidden.bias"),
            )
        except KeyError as error:
            raise HeadsFormatError(f"{path}: missing {error}") from error
