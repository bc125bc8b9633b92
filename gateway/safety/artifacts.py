"""Where the engine's own model files live and how the encoder may run them.

A leaf module (no torch, no transformers), so settings and commands can name the backend
and the shipped weights without loading a model.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights"
SHIPPED_HEADS = SHIPPED_WEIGHTS / "heads.safetensors"
SHIPPED_MULTILINGUAL_HEADS = SHIPPED_WEIGHTS / "multilingual" / "heads.safetensors"


class Backend(StrEnum):
    TORCH = "torch"
    ONNX = "onnx"
    ONNX_INT8 = "onnx-int8"  # the ONNX graph with int8 weights (dynamic quantisation)
