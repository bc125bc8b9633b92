"""The project's own classifier: trained heads on a shared sentence encoder.

One forward pass of the encoder per text window feeds every head (13 harm categories,
jailbreak and indirect attack). Long texts are scored at two scales and each label takes
its highest score: 256-token windows with overlap (so nothing is truncated and long
jailbreak prompts are read whole), and sentence chunks of about ``CHUNK_CHARS``
characters (so one harmful sentence buried in a long document is not averaged away by
the mean pooling of a window full of benign text). The heads, their Platt calibration
and their tuned thresholds live in one safetensors file written by
``safegate safety train``; its model card sits beside it and names the encoder backend the
heads are served with (``backend``: ``onnx``, ``onnx-q8`` or ``onnx-int8``) unless
``SAFEGATE_ENCODER__BACKEND`` says otherwise. When the encoder was fine-tuned
(engine v2), the card names the delta over the bundled encoder (``gateway.safety.delta``);
a card with ``inputs: frozen+tuned`` has heads that read the frozen and the tuned
embedding side by side, which one paired ONNX graph (or a ``PairedEncoder`` on torch)
computes in one call.

Every file the card lists is checked against its sha256 before it is used: weights that
differ from what the card describes never load, so the engine is not ready (fail closed).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from gateway.safety.delta import DeltaError, verify
from gateway.safety.encoder import ONNX_BACKENDS, PairedEncoder, SentenceEncoder
from gateway.safety.heads import Heads, HeadsFormatError
from gateway.safety.members import MEMBERS, MemberKind, MemberLoadError
from gateway.safety.normalize import NormalizedText
from gateway.safety.settings import SHIPPED_HEADS, Backend
from gateway.safety.taxonomy import Label, parse_label
from gateway.safety.verdict import Detection

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


def served_segments(
    texts: Sequence[NormalizedText],
    chunking: str,
    count_windows: Callable[[Sequence[str]], list[int]],
) -> tuple[list[str], list[int]]:
    """Every segment the engine scores for ``texts``, and the index of the text each
    belongs to; a text's score per label is the highest of its segments'.

    The segments are each folded text, its sentence chunks (``chunking`` "always": every
    text past ``CHUNK_CHARS``; "long": only texts longer than one window, so a text that
    fits in one window is encoded once) and its decoded views (base64, hex, ROT13,
    leetspeak, JSON values). Training tunes thresholds on the same segments.
    """
    segments = [text.folded for text in texts]
    owners = list(range(len(texts)))
    window_counts = count_windows(segments) if chunking == "long" else []
    for index, text in enumerate(texts):
        chunks = (
            sentence_chunks(text.folded, limit=CHUNK_CHARS)
            if chunking == "always" or window_counts[index] > 1
            else []
        )
        chunks = [*chunks, *text.views]
        segments.extend(chunks)
        owners.extend([index] * len(chunks))
    return segments, owners


def highest_per_text(
    scores: npt.NDArray[np.float32], owner: npt.NDArray[np.int64], count: int
) -> npt.NDArray[np.float32]:
    """Each text's highest score per label over its segments (``owner[i]``: the text that
    row i of ``scores`` belongs to)."""
    best = np.zeros((count, scores.shape[1]), np.float32)
    np.maximum.at(best, owner, scores)
    return best


def verify_card_files(heads_path: Path) -> Path | None:
    """Check the sha256 of every file the model card beside ``heads_path`` lists; return
    the encoder delta the card names, or None when it names none.

    Raises ``MemberLoadError`` when the card is missing or a file differs from it.
    """
    card_path = heads_path.with_name("model_card.json")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MemberLoadError(f"cannot read the model card {card_path.name}: {error}") from error
    files: dict[str, str] = card.get("files") or {heads_path.name: card.get("weights_sha256", "")}
    if heads_path.name not in files:
        raise MemberLoadError(f"the model card does not list {heads_path.name}")
    try:
        for name, sha256 in files.items():
            verify(heads_path.parent / name, sha256)
    except DeltaError as error:
        raise MemberLoadError(str(error)) from error
    delta = card.get("encoder_delta")
    return heads_path.parent / delta if delta else None


def card_value(heads_path: Path, key: str, default: str) -> str:
    try:
        card = json.loads(heads_path.with_name("model_card.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default
    return str(card.get(key, default))


def card_languages(heads_path: Path) -> tuple[str, ...]:
    """The languages the model card says the model was trained and measured in."""
    try:
        card = json.loads(heads_path.with_name("model_card.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ("en",)
    languages = card.get("languages", ["en"])
    return tuple(str(language) for language in languages)


class EncoderHeadsClassifier:
    """Scores every head label from one embedding per window."""

    def __init__(
        self,
        *,
        id: str = "encoder",
        heads_path: Path = SHIPPED_HEADS,
        encoder: SentenceEncoder | PairedEncoder | None = None,
        backend: Backend | None = None,
        cache_dir: Path | None = None,
        threads: int | None = None,
        batch_size: int = 32,
    ) -> None:
        delta = verify_card_files(heads_path)
        # The heads were fitted on one backend's embeddings (int8 ones differ a little
        # from fp32 ones); serve with that backend unless told otherwise.
        if backend is None:
            named = card_value(heads_path, "backend", Backend.ONNX)
            try:
                backend = Backend(named)
            except ValueError:
                raise MemberLoadError(
                    f"the model card names an unknown backend {named!r}"
                ) from None
        try:
            self._heads = Heads.load(heads_path)
        except HeadsFormatError as error:
            raise MemberLoadError(str(error)) from error
        inputs = card_value(heads_path, "inputs", "single")
        if inputs not in {"single", "frozen+tuned"} or (inputs != "single" and delta is None):
            raise MemberLoadError(f"the model card names inputs {inputs!r} it cannot serve")
        try:
            self._encoder = encoder or self._load_encoder(
                backend, cache_dir, threads, delta, paired=inputs == "frozen+tuned"
            )
        except (OSError, RuntimeError, DeltaError) as error:
            raise MemberLoadError(
                f"cannot load encoder {self._heads.encoder!r}: {error}"
            ) from error
        if self._encoder.dimension != self._heads.dimension:
            raise MemberLoadError(
                f"heads expect {self._heads.dimension}-dimensional embeddings, "
                f"encoder {self._encoder.name!r} gives {self._encoder.dimension}"
            )
        self._labels = tuple(parse_label(name) for name in self._heads.labels)
        self.languages = card_languages(heads_path)
        self._chunking = card_value(heads_path, "chunking", "always")
        self._id = id
        self._batch_size = batch_size

    def _load_encoder(
        self,
        backend: Backend,
        cache_dir: Path | None,
        threads: int | None,
        delta: Path | None,
        *,
        paired: bool,
    ) -> SentenceEncoder | PairedEncoder:
        def load(delta: Path | None, *, paired: bool = False) -> SentenceEncoder:
            return SentenceEncoder(
                self._heads.encoder,
                backend=backend,
                cache_dir=cache_dir,
                threads=threads,
                delta=delta,
                paired=paired,
            )

        if not paired:
            return load(delta)
        if backend in ONNX_BACKENDS:
            return load(delta, paired=True)  # one graph: the lower blocks run once
        return PairedEncoder(load(None), load(delta))

    @property
    def id(self) -> str:
        return self._id

    @property
    def labels(self) -> frozenset[Label]:
        return frozenset(self._labels)

    @property
    def encoder(self) -> SentenceEncoder | PairedEncoder:
        return self._encoder

    @property
    def thresholds(self) -> Mapping[Label, float]:
        """The thresholds tuned on dev data when the heads were trained."""
        return dict(zip(self._labels, self._heads.threshold.tolist(), strict=True))

    def classify(self, texts: Sequence[NormalizedText]) -> list[Detection]:
        if not texts:
            return []
        segments, owners = served_segments(texts, self._chunking, self._encoder.count_windows)
        windows = self._encoder.embed(segments, batch_size=self._batch_size)
        window_scores = self._heads.probabilities(windows.vectors)
        best = highest_per_text(window_scores, np.asarray(owners)[windows.owner], len(texts))
        return [
            Detection(scores=dict(zip(self._labels, row.tolist(), strict=True))) for row in best
        ]


MEMBERS.add(MemberKind.ENCODER, EncoderHeadsClassifier)
