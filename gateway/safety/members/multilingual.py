"""Scores French, Spanish, German and Portuguese texts, which the English encoder cannot,
and by transfer texts in other languages.

Heads fitted on multilingual-e5-small embeddings (``gateway.safety.multilingual``,
trained by ``safegate safety train-multilingual``), applied to texts whose language
(py3langid, as the ``language`` member guesses it) is one the model card lists, and, with
``transfer``, to texts clearly in any language but the ones named in ``transfer``'s
exclusions (English: the English encoder's): multilingual-e5-small places a request in
Italian or Russian near the same request in the trained languages, so the heads carry
over (docs/BENCHMARKS.md measures how well, per language). Such texts stay marked
low-confidence: the heads were not trained or tuned on their language. With ``unclear``,
a text too short or mixed for a trusted guess is scored too when its likeliest language
is one the heads were trained in ("je vais te tuer", "vou te matar": the English heads read
them as noise), or, with transfer, another language than English at the usual
probability but in too few words ("ti ammazzo stanotte"); the engine hears every member
on a text without a language, so both sets of heads judge it. Short English texts,
random strings (whose likeliest language is anyone's, at a low probability) and texts
clearly in English pay only the guess.
The card lists the heads file's sha256; a file that differs does not load (fail closed),
like the English heads.

The engine compares every member's score for a label with one threshold, tuned for the
English heads. So that the two sets of heads mean the same at that threshold, this
member maps each calibrated probability piecewise-linearly so that its own tuned
threshold lands on the anchor (the English heads' threshold for that label): below it
stays below, above stays above, and 0 and 1 stay put.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np

from gateway.safety.heads import Heads, HeadsFormatError
from gateway.safety.members import MEMBERS, MemberKind, MemberLoadError
from gateway.safety.members.encoder_heads import card_languages, verify_card_files
from gateway.safety.members.language import LanguageClassifier
from gateway.safety.multilingual import ENCODER_NAME, E5Encoder
from gateway.safety.normalize import NormalizedText
from gateway.safety.policy import DEFAULT_THRESHOLD
from gateway.safety.settings import SHIPPED_MULTILINGUAL_HEADS
from gateway.safety.taxonomy import Label, parse_label
from gateway.safety.verdict import Detection


class MultilingualHeadsClassifier:
    """Scores every head label for texts in the card's languages; others get no scores."""

    def __init__(
        self,
        *,
        id: str = "multilingual",
        heads_path: Path = SHIPPED_MULTILINGUAL_HEADS,
        anchors: Mapping[Label, float] | None = None,
        encoder: E5Encoder | None = None,
        transfer_except: Collection[str] | None = None,
        unclear: bool = False,
    ) -> None:
        """``transfer_except``: score texts in every identified language but these (and
        the card's, scored anyway); None scores the card's languages only. ``unclear``:
        also score texts without a trusted language guess whose likeliest language is
        one of the card's, or one transfer covers at the usual probability."""
        if verify_card_files(heads_path) is not None:
            raise MemberLoadError("the multilingual heads take no encoder delta")
        try:
            self._heads = Heads.load(heads_path)
        except HeadsFormatError as error:
            raise MemberLoadError(str(error)) from error
        if self._heads.encoder != ENCODER_NAME:
            raise MemberLoadError(
                f"the multilingual heads were fitted on {self._heads.encoder!r}, "
                f"this member embeds with {ENCODER_NAME!r}"
            )
        try:
            self._encoder = encoder or E5Encoder()
        except OSError as error:
            raise MemberLoadError(f"cannot load {ENCODER_NAME}: {error}") from error
        self._labels = tuple(parse_label(name) for name in self._heads.labels)
        self.languages = card_languages(heads_path)
        self._transfer_except = None if transfer_except is None else frozenset(transfer_except)
        self._unclear = unclear
        self._language = LanguageClassifier()
        own = self._heads.threshold.astype(np.float64)
        target = np.array(
            [(anchors or {}).get(label, DEFAULT_THRESHOLD) for label in self._labels], np.float64
        )
        self._own = np.clip(own, 1e-6, 1 - 1e-6)
        self._target = np.clip(target, 1e-6, 1 - 1e-6)
        self._id = id

    @property
    def id(self) -> str:
        return self._id

    @property
    def labels(self) -> frozenset[Label]:
        return frozenset(self._labels)

    def classify(self, texts: Sequence[NormalizedText]) -> list[Detection]:
        detections = [Detection(scores={}) for _ in texts]
        chosen = [index for index, text in enumerate(texts) if self._reads(text.plain)]
        if not chosen:
            return detections
        vectors = self._encoder.embed([texts[index].plain for index in chosen])
        scores = self.aligned(self._heads.probabilities(vectors))
        for index, row in zip(chosen, scores, strict=True):
            detections[index] = Detection(scores=dict(zip(self._labels, row.tolist(), strict=True)))
        return detections

    def transfers_to(self, language: str) -> bool:
        """Whether texts in ``language``, which the heads were not trained on, are scored
        (the engine then hears this member, not the English one, on such texts)."""
        return (
            self._transfer_except is not None
            and language not in self.languages
            and language not in self._transfer_except
        )

    def _reads(self, text: str) -> bool:
        language, likeliest, probability = self._language.read(text)
        if language is not None:
            return language in self.languages or self.transfers_to(language)
        if not self._unclear or likeliest is None:
            return False
        # A trained language at any probability; by transfer, only a clear one (too few
        # words for a trusted guess, not too unsure: random strings stay out).
        return likeliest in self.languages or (
            probability >= self._language.min_probability and self.transfers_to(likeliest)
        )

    def aligned(self, probabilities: np.ndarray) -> np.ndarray:
        """Map each label's own tuned threshold onto its anchor, monotonically."""
        p = probabilities.astype(np.float64)
        below = p * self._target / self._own
        above = self._target + (p - self._own) * (1 - self._target) / (1 - self._own)
        return np.clip(np.where(p <= self._own, below, above), 0.0, 1.0).astype(np.float32)


MEMBERS.add(MemberKind.MULTILINGUAL, MultilingualHeadsClassifier)
