"""Settings of the safety engine and its members, with their defaults; where the engine's
own model files and policy ship, and how the encoder may run them.

A leaf (pydantic only, no torch, no transformers): ``gateway.config`` composes these
sections into ``Settings``, commands name the backend and the shipped files without
loading a model, and the engine's modules take their defaults from here.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Final

from pydantic import BaseModel, Field, model_validator

SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights"
SHIPPED_HEADS = SHIPPED_WEIGHTS / "heads.safetensors"
SHIPPED_MULTILINGUAL_HEADS = SHIPPED_WEIGHTS / "multilingual" / "heads.safetensors"
SHIPPED_POLICY = Path(__file__).resolve().parent.parent / "policies" / "default.yaml"

# The budget is a guard against a member that hangs, not a latency target: a loaded
# 2-core machine can take a second or two for a batch, and a budget overrun blocks.
DEFAULT_MEMBER_TIMEOUT_S = 5.0
# A batch's budget grows with its text: a member gets timeout_s plus this much per
# 1,000 characters, so 64 long documents are not held to the budget of one prompt.
DEFAULT_TIMEOUT_PER_KCHAR_S = 0.1
DEFAULT_MAX_TEXT_CHARS = 32_000

DEFAULT_MAX_BATCH = 32
DEFAULT_MAX_WAIT_S = 0.0
# One slice: about half a second of the shipped engine's work on a 2-core machine
# (~8,000 characters a second), and room for 32 prompts of 125 characters.
DEFAULT_MAX_BATCH_CHARS = 4_000
# Room for the largest request the default body limit (2 MB) lets in, so a request
# within the documented limits is admitted beside the one-liners that keep arriving.
DEFAULT_QUEUE_CAPACITY_CHARS = 2_000_000

DEFAULT_JUDGE_TIMEOUT_S: Final = 10.0
"""Seconds one judge call may take (litellm's ``timeout``); a batch makes one call per text."""


class Backend(StrEnum):
    TORCH = "torch"
    ONNX = "onnx"
    ONNX_INT8 = "onnx-int8"  # the ONNX graph with int8 weights (dynamic quantisation)
    # 8-bit weights in blocks of 64, activations quantised per token (MatMulNBits): a
    # text's embedding does not depend on what shares its forward pass.
    ONNX_Q8 = "onnx-q8"


class EncoderSettings(BaseModel):
    """The project's heads; the encoder they need is named inside the heads file."""

    enabled: bool = True
    heads: Path = SHIPPED_HEADS
    backend: Backend | None = Field(
        default=None,
        description="onnx, onnx-q8, onnx-int8 or torch; unset: the backend the heads' model card "
        "names (onnx when it names none)",
    )
    timeout_s: float = Field(default=DEFAULT_MEMBER_TIMEOUT_S, gt=0)
    threads: int | None = Field(
        default=None,
        ge=1,
        description="intra-op threads of the encoder; unset: every core while one request "
        "is in flight, one while several are (gateway.safety.contention)",
    )


class MultilingualSettings(BaseModel):
    """Heads on multilingual-e5-small for the languages its model card lists."""

    enabled: bool = True
    heads: Path = SHIPPED_MULTILINGUAL_HEADS
    transfer: bool = Field(
        default=True,
        description="also score texts clearly in a language neither model was trained on "
        "(cross-lingual transfer, measured per language in docs/BENCHMARKS.md); they stay "
        "marked low-confidence",
    )
    unclear: bool = Field(
        default=True,
        description="also score texts too short or mixed for a trusted language guess "
        '("je vais te tuer"), beside the English heads, when their likeliest language is '
        "one the heads were trained in, or another than English at the usual probability",
    )
    timeout_s: float = Field(default=DEFAULT_MEMBER_TIMEOUT_S, gt=0)


class LanguageSettings(BaseModel):
    """Language identification: texts the engine's model does not cover are marked."""

    enabled: bool = True
    timeout_s: float = Field(default=DEFAULT_MEMBER_TIMEOUT_S, gt=0)


class ProfanitySettings(BaseModel):
    enabled: bool = True
    timeout_s: float = Field(default=DEFAULT_MEMBER_TIMEOUT_S, gt=0)


class PiiSettings(BaseModel):
    enabled: bool = True
    default_region: str = "US"
    timeout_s: float = Field(default=DEFAULT_MEMBER_TIMEOUT_S, gt=0)


class DetoxifySettings(BaseModel):
    """Detoxify. Off by default: its official checkpoints download from GitHub."""

    enabled: bool = False
    model_type: str = "original"
    checkpoint: Path | None = None
    huggingface_config_path: Path | None = None
    allowed_sha256: list[str] = Field(default_factory=list)
    timeout_s: float = Field(default=DEFAULT_MEMBER_TIMEOUT_S, gt=0)

    @model_validator(mode="after")
    def _pinned(self) -> DetoxifySettings:
        if self.enabled and not self.allowed_sha256:
            raise ValueError(
                "detoxify is enabled but allowed_sha256 is empty: its checkpoints are "
                "pickles, so list the sha256 of the checkpoint you trust"
            )
        return self


class LlmJudgeSettings(BaseModel):
    """An LLM judge reached through litellm. Off by default."""

    enabled: bool = False
    model: str = "ollama/llama-guard3:1b"
    api_base: str | None = None
    api_key: str | None = None
    timeout_s: float = Field(default=DEFAULT_JUDGE_TIMEOUT_S, gt=0)
    mock_response: str | None = None


class EngineSettings(BaseModel):
    max_text_chars: int = Field(default=DEFAULT_MAX_TEXT_CHARS, ge=1)
    timeout_per_kchar_s: float = Field(
        default=DEFAULT_TIMEOUT_PER_KCHAR_S,
        ge=0,
        description="extra time budget per member per 1,000 characters in a batch "
        "(a batch holds at most max_batch_chars, or one longer text)",
    )
    max_batch: int = Field(default=DEFAULT_MAX_BATCH, ge=1)
    max_batch_chars: int = Field(
        default=DEFAULT_MAX_BATCH_CHARS,
        ge=1,
        description="characters in one detection batch (a longer text runs alone); "
        "requests take turns, so a short one waits about one such batch per request ahead",
    )
    queue_capacity_chars: int = Field(
        default=DEFAULT_QUEUE_CAPACITY_CHARS,
        ge=1,
        description="characters waiting for detection; a request past it gets a 429 "
        "engine_overloaded with Retry-After (an idle engine admits any valid request)",
    )
    max_wait_s: float = Field(
        default=DEFAULT_MAX_WAIT_S,
        ge=0,
        description="how long an idle engine waits for more texts before a forward pass; "
        "0 starts at once and lets batches form from what arrives during one",
    )
