"""The profanity member computes alt-profanity-check's own calibrated probability with one
sparse product, on the folded view: it must agree with the library's ``predict_prob``."""

from __future__ import annotations

import numpy as np
import pytest
from profanity_check import predict_prob

from gateway.safety.members.profanity import ProfanityClassifier
from gateway.safety.normalize import normalize
from gateway.safety.taxonomy import Shield

TEXTS = [
    "holy shit, what a goal",
    "What a lovely afternoon in the park.",
    "you absolute fucking idiot",
    "Please restart the router and try again.",
    "damn it, the build failed again",
    "",
    "the and of to it",  # stop words only: no feature at all
    "shit shit shit, damn damn",  # repeated words weigh by their count
    "Ça suffit, espèce de crétin !",
    "x" * 5000,
]


@pytest.fixture(scope="module")
def member() -> ProfanityClassifier:
    return ProfanityClassifier()


def test_scores_agree_with_the_librarys_predict_prob(member: ProfanityClassifier) -> None:
    ours = [d.scores[Shield.PROFANITY] for d in member.classify([normalize(t) for t in TEXTS])]
    theirs = predict_prob([normalize(t).folded for t in TEXTS])
    np.testing.assert_allclose(ours, theirs, atol=1e-9)


def test_obfuscated_swearing_scores_like_the_plain_word(member: ProfanityClassifier) -> None:
    plain, leet, homoglyph = member.classify(
        [normalize("this is shit"), normalize("this is sh1t"), normalize("this is ѕhit")]
    )
    assert plain.scores[Shield.PROFANITY] > 0.5
    assert leet.scores[Shield.PROFANITY] == pytest.approx(plain.scores[Shield.PROFANITY])
    assert homoglyph.scores[Shield.PROFANITY] == pytest.approx(plain.scores[Shield.PROFANITY])
