"""The project's own classifier: trained heads on a shared sentence encoder.

One forward pass of the encoder per text window feeds every head (13 harm categories,
jailbreak and indirect attack). Long texts are scored at two scales and each label takes
its highest score: 256-token windows with overlap (so nothing is truncated and long
jailbreak prompts are read whole), and sentence chunks of about ``CHUNK_CHARS``
characters (so one harmful sentence buried in a long document is not averaged away by
the mean pooling of a window full of benign text). The heads, their Platt calibration
and their tuned thresholds live in one safetensors file written by
``safegate safety train``; its model card sits beside it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from gateway.safety.encoder import Backend, SentenceEncoder
from gateway.safety.heads import Heads, HeadsFormatError
from gateway.safety.members import MEMBERS, MemberKind, MemberLoadError
from gateway.safety.normalize import NormalizedText
from gateway.safety.taxonomy import Label, parse_label
from gateway.safety.verdict import Detection

SHIPPED_HEADS = Path(__file__).resolve().parent.parent / "weights" / "heads.safetensors"
CHUNK_CHARS = 100  # measured: bench/mixed_length.py, docs/BENCHMARKS.md
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\n+")


def sentence_chunks(text: str, *, limit: int = CHUNK_CHARS) -> list[str]:
    """Pack whole sentences into chunks of at most ``limit`` characters.

    Returns ``[]`` for a text short enough to be one chunk. A single sentence longer
    than ``limit`` becomes a chunk of its own (the encoder windows it).
    """
    if len(text) <= limit:
        return []
    chunks: list[str] = []
    current = ""
    for sentence in filter(None, (part.strip() for part in _SENTENCE_END.split(text))):
        if current and len(current) + 1 + len(sentence) > limit:
            chunks.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}" if current else sentence
    if current:
        chunks.append(current)
    return chunks if len(chunks) > 1 else []


class EncoderHeadsClassifier:
    """Scores every head label from one embedding per window."""

    def __init__(
        self,
        *,
        id: str = "encoder",
        heads_path: Path = SHIPPED_HEADS,
        encoder: SentenceEncoder | None = None,
        backend: Backend = Backend.ONNX,
        cache_dir: Path | None = None,
        threads: int | None = None,
        batch_size: int = 32,
    ) -> None:
        try:
            self._heads = Heads.load(heads_path)
        except HeadsFormatError as error:
            raise MemberLoadError(str(error)) from error
        try:
            self._encoder = encoder or SentenceEncoder(
                self._heads.encoder, backend=backend, cache_dir=cache_dir, threads=threads
            )
        except (OSError, RuntimeError) as error:
            raise MemberLoadError(
                f"cannot load encoder {self._heads.encoder!r}: {error}"
            ) from error
        if self._encoder.dimension != self._heads.dimension:
            raise MemberLoadError(
                f"heads expect {self._heads.dimension}-dimensional embeddings, "
                f"encoder {self._encoder.name!r} gives {self._encoder.dimension}"
            )
        self._labels = tuple(parse_label(name) for name in self._heads.labels)
        self._id = id
        self._batch_size = batch_size

    @property
    def id(self) -> str:
        return self._id

    @property
    def labels(self) -> frozenset[Label]:
        return frozenset(self._labels)

    @property
    def encoder(self) -> SentenceEncoder:
        return self._encoder

    @property
    def thresholds(self) -> Mapping[Label, float]:
        """The thresholds tuned on dev data when the heads were trained."""
        return dict(zip(self._labels, self._heads.threshold.tolist(), strict=True))

    def classify(self, texts: Sequence[NormalizedText]) -> list[Detection]:
        if not texts:
            return []
        segments = [text.folded for text in texts]
        owners = list(range(len(texts)))
        for index, text in enumerate(texts):
            chunks = sentence_chunks(text.folded, limit=CHUNK_CHARS)
            segments.extend(chunks)
            owners.extend([index] * len(chunks))
        windows = self._encoder.embed(segments, batch_size=self._batch_size)
        window_scores = self._heads.probabilities(windows.vectors)
        best = np.zeros((len(texts), len(self._labels)), np.float32)
        np.maximum.at(best, np.asarray(owners)[windows.owner], window_scores)
        return [
            Detection(scores=dict(zip(self._labels, row.tolist(), strict=True))) for row in best
        ]


MEMBERS.add(MemberKind.ENCODER, EncoderHeadsClassifier)
