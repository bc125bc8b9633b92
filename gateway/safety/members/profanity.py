"""Profanity: alt-profanity-check's linear model (a calibrated linear SVM on TF-IDF).

The model ships inside the package, so it loads with no network. Its own
``predict_prob`` goes through scikit-learn's ``CalibratedClassifierCV``, whose per-call
overhead (about 5 ms for one text here) dwarfs the arithmetic; this member takes the five
folds' weights and sigmoid calibrators out of the fitted model once at load and computes
the same average of calibrated probabilities from each text's words. The words come from
the fitted vectorizer's own analyzer (its token pattern, lower-casing and stop words);
their TF-IDF weights are looked up and L2-normalised here, because the vectorizer's
``transform`` builds a sparse matrix per call, about 1 ms for one short text, which ran
beside the encoder on the same two cores (tests/gateway/safety/test_profanity.py checks
both against ``predict_prob``). It reads the folded
view, so ``sh1t`` and ``ѕhit`` score like ``shit``. Its output is the model's
calibrated probability; it feeds the ``profanity`` shield only, because swearing is not
by itself harassment (``holy shit, what a goal``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from gateway.safety.members import MEMBERS, MemberKind, MemberLoadError
from gateway.safety.normalize import NormalizedText
from gateway.safety.taxonomy import Label, Shield
from gateway.safety.verdict import Detection


class ProfanityClassifier:
    """Scores the ``profanity`` shield with alt-profanity-check."""

    def __init__(self, *, id: str = "profanity") -> None:
        try:
            from profanity_check import profanity_check
        except ImportError as error:  # pragma: no cover - a broken install
            raise MemberLoadError(f"alt-profanity-check is not installed: {error}") from error
        vectorizer = profanity_check.vectorizer
        self._words = vectorizer.build_analyzer()
        self._index: dict[str, int] = vectorizer.vocabulary_
        self._idf: npt.NDArray[np.float64] = np.asarray(vectorizer.idf_, np.float64)
        folds = profanity_check.model.calibrated_classifiers_
        self._weights: npt.NDArray[np.float64] = np.stack(
            [fold.estimator.coef_.ravel() for fold in folds]
        ).T
        self._intercepts: npt.NDArray[np.float64] = np.array(
            [fold.estimator.intercept_[0] for fold in folds], np.float64
        )
        self._scale = np.array([fold.calibrators[0].a_ for fold in folds])
        self._shift = np.array([fold.calibrators[0].b_ for fold in folds])
        self._id = id

    @property
    def id(self) -> str:
        return self._id

    @property
    def labels(self) -> frozenset[Label]:
        return frozenset({Shield.PROFANITY})

    def classify(self, texts: Sequence[NormalizedText]) -> list[Detection]:
        if not texts:
            return []
        decision = np.stack([self._decision(text.folded) for text in texts])
        probabilities = (1.0 / (1.0 + np.exp(self._scale * decision + self._shift))).mean(axis=1)
        return [
            Detection(scores={Shield.PROFANITY: min(1.0, max(0.0, float(p)))})
            for p in probabilities
        ]

    def _decision(self, text: str) -> npt.NDArray[np.float64]:
        """Each fold's SVM decision for ``text``: TF-IDF of its known words, L2-normalised
        (the vectorizer's ``norm="l2"``), times the fold's weights."""
        counts = Counter(
            index for word in self._words(text) if (index := self._index.get(word)) is not None
        )
        if not counts:
            return self._intercepts.copy()
        indices = np.fromiter(counts.keys(), np.int64, len(counts))
        tfidf = np.fromiter(counts.values(), np.float64, len(counts)) * self._idf[indices]
        tfidf /= np.linalg.norm(tfidf)
        return tfidf @ self._weights[indices] + self._intercepts


MEMBERS.add(MemberKind.PROFANITY, ProfanityClassifier)
