"""Which language a text is written in, so texts the engine's model does not cover are
marked low-confidence instead of silently scored as if they were English.

py3langid's model ships inside its wheel (numeric arrays, loaded with
``allow_pickle=False``). The guess is restricted to ``CANDIDATES`` and trusted only for
texts of at least ``DEFAULT_MIN_WORDS`` words at a normalised probability of at least
``DEFAULT_MIN_PROBABILITY``: short or mixed texts get no language, and are not marked.
Whether a language is covered is the engine's business (the model card's ``languages``);
this member only says what it sees, as ``Detection.language``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from gateway.safety.members import MEMBERS, MemberKind, MemberLoadError
from gateway.safety.normalize import NormalizedText
from gateway.safety.taxonomy import Label
from gateway.safety.verdict import Detection

DEFAULT_MIN_WORDS = 4
DEFAULT_MIN_PROBABILITY = 0.9
# Widely used languages; restricting the guess keeps short texts from landing on rare
# languages whose n-grams happen to match.
CANDIDATES = [
    "ar",
    "bg",
    "bn",
    "cs",
    "da",
    "de",
    "el",
    "en",
    "es",
    "et",
    "fa",
    "fi",
    "fr",
    "he",
    "hi",
    "hr",
    "hu",
    "id",
    "it",
    "ja",
    "ko",
    "lt",
    "lv",
    "ms",
    "nl",
    "no",
    "pl",
    "pt",
    "ro",
    "ru",
    "sk",
    "sl",
    "sr",
    "sv",
    "sw",
    "th",
    "tl",
    "tr",
    "uk",
    "ur",
    "vi",
    "zh",
]


class LanguageClassifier:
    """Guesses each text's language; scores no label."""

    def __init__(
        self,
        *,
        id: str = "language",
        min_words: int = DEFAULT_MIN_WORDS,
        min_probability: float = DEFAULT_MIN_PROBABILITY,
    ) -> None:
        if min_words < 1 or not 0.0 < min_probability <= 1.0:
            raise MemberLoadError("min_words must be >= 1 and min_probability within (0, 1]")
        try:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            self._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
            self._identifier.set_languages(CANDIDATES)
        except (ImportError, OSError, ValueError) as error:
            raise MemberLoadError(f"cannot load the language identifier: {error}") from error
        self._id = id
        self._min_words = min_words
        self._min_probability = min_probability

    @property
    def id(self) -> str:
        return self._id

    @property
    def labels(self) -> frozenset[Label]:
        return frozenset()

    def classify(self, texts: Sequence[NormalizedText]) -> list[Detection]:
        return [Detection(scores={}, language=self.guess(text.plain)) for text in texts]

    def guess(self, text: str) -> str | None:
        """The language of ``text``, or None when it is too short or mixed to tell."""
        if _word_count(text) < self._min_words:
            return None  # short: no need to ask the identifier
        return self.read(text)[0]

    def read(self, text: str) -> tuple[str | None, str | None, float]:
        """The trusted guess (as ``guess``), and the likeliest language of ``text`` with its
        probability however short or mixed the text is ((None, 0.0) for a text with no
        words): not a guess to report, a hint of which model may read it. One pass of
        the identifier serves both."""
        if not text.split():
            return None, None, 0.0
        language, probability = self._identifier.classify(text)
        likeliest, probability = str(language), float(probability)
        trusted = _word_count(text) >= self._min_words and probability >= self._min_probability
        return (likeliest if trusted else None), likeliest, probability

    @property
    def min_probability(self) -> float:
        return self._min_probability


def _word_count(text: str) -> int:
    """Words parted by spaces, and for scripts written without spaces (Chinese, Japanese,
    Thai) one word per two characters, about their average word length."""
    unspaced = len(_UNSPACED.findall(text))
    return len(text.split()) + unspaced // 2


# Han ideographs, kana and Thai: scripts that part no words with spaces.
_UNSPACED = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\u0e00-\u0e7f]")

MEMBERS.add(MemberKind.LANGUAGE, LanguageClassifier)
