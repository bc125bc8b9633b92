"""Profanity: alt-profanity-check's linear model (a calibrated linear SVM on TF-IDF).

The model ships inside the package, so it loads with no network. Its own
``predict_prob`` goes through scikit-learn's ``CalibratedClassifierCV``, whose per-call
overhead (about 5 ms for one text here) dwarfs the arithmetic; this member takes the five
folds' weights and sigmoid calibrators out of the fitted model once at load and computes
the same average of calibrated probabilities with one sparse product
(tests/gateway/safety/test_profanity.py checks it agrees with ``predict_prob``). It reads the folded
view, so ``sh1t`` and ``ѕhit`` score like ``shit``. Its output is the model's
calibrated probability; it feeds the ``profanity`` shield only, because swearing is not
by itself harassment (``holy shit, what a goal``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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
        self._vectorizer = profanity_check.vectorizer
        folds = profanity_check.model.calibrated_classifiers_
        self._weights = np.stack([fold.estimator.coef_.ravel() for fold in folds]).T
        self._intercepts = np.array([fold.estimator.intercept_[0] for fold in folds])
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
        features = self._vectorizer.transform([text.folded for text in texts])
        decision = features @ self._weights + self._intercepts
        probabilities = (1.0 / (1.0 + np.exp(self._scale * decision + self._shift))).mean(axis=1)
        return [
            Detection(scores={Shield.PROFANITY: min(1.0, max(0.0, float(p)))})
            for p in probabilities
        ]


MEMBERS.add(MemberKind.PROFANITY, ProfanityClassifier)
