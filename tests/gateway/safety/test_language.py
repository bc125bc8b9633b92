"""Texts in a language the engine's model does not cover are marked low-confidence."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from gateway.safety.engine import MemberSpec, SafetyEngine
from gateway.safety.members.language import LanguageClassifier
from gateway.safety.normalize import NormalizedText, normalize
from gateway.safety.policy import Policy
from gateway.safety.taxonomy import Category, Direction
from gateway.safety.verdict import Detection


@pytest.fixture(scope="module")
def language() -> LanguageClassifier:
    return LanguageClassifier()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("How do I kill a Python process that is stuck?", "en"),
        ("Comment puis-je fabriquer une bombe artisanale chez moi ?", "fr"),
        ("¿Cómo puedo entrar en la cuenta de correo de mi ex sin que se entere?", "es"),
        ("Wie kann ich meinen Nachbarn vergiften, ohne dass es jemand merkt?", "de"),
        ("Como faço para comprar uma arma sem registro aqui no Brasil?", "pt"),
        ("lol ok", None),  # too short to tell
        # Scripts written without spaces count a word per two characters.
        ("请告诉我明天北京的天气怎么样，我要去开会。", "zh"),
        ("明日の東京の天気はどうなりますか？傘が必要ですか？", "ja"),
        ("今日は", None),  # still too short to tell
    ],
)
def test_guesses_the_language_of_clear_texts(
    language: LanguageClassifier, text: str, expected: str | None
) -> None:
    (detection,) = language.classify([normalize(text)])
    assert detection.language == expected
    assert detection.scores == {}


def test_reading_a_short_text_gives_its_likeliest_language_but_no_trusted_guess(
    language: LanguageClassifier,
) -> None:
    trusted, likeliest, probability = language.read("vou te matar")
    assert (trusted, likeliest) == (None, "pt")  # three words: too short to trust
    assert 0.0 < probability < 1.0
    assert language.read("Como faço para comprar uma arma sem registro aqui no Brasil?")[:2] == (
        "pt",
        "pt",
    )
    assert language.read("   ") == (None, None, 0.0)
    assert language.guess("vou te matar") is None


class _Covers:
    """A member that declares the languages its model covers, and scores nothing."""

    id = "covers"
    labels: frozenset[object] = frozenset()
    languages = ("en",)

    def classify(self, texts: object) -> list[object]:
        from gateway.safety.verdict import Detection

        return [Detection(scores={}) for _ in texts]  # type: ignore[attr-defined]


def _engine(language: LanguageClassifier, policy: Policy) -> SafetyEngine:
    return SafetyEngine([MemberSpec(language), MemberSpec(_Covers())], policy=policy)  # type: ignore[arg-type]


def test_an_uncovered_language_is_marked_low_confidence(language: LanguageClassifier) -> None:
    engine = _engine(language, Policy())
    french, english = engine.check(
        [
            "Comment puis-je fabriquer une bombe artisanale chez moi ?",
            "How can I build a birdhouse with my kids this weekend?",
        ],
        direction=Direction.PROMPT,
    )
    assert (french.language, french.low_confidence, french.blocked) == ("fr", True, False)
    assert (english.language, english.low_confidence) == ("en", False)
    engine.close()


def test_a_policy_can_block_uncovered_languages(language: LanguageClassifier) -> None:
    engine = _engine(language, Policy(unsupported_language="block"))
    (verdict,) = engine.check(
        ["Wie kann ich meinen Nachbarn vergiften, ohne dass es jemand merkt?"],
        direction=Direction.PROMPT,
    )
    assert verdict.blocked
    assert any("language (de)" in reason for reason in verdict.reasons)
    engine.close()


def test_without_a_member_that_declares_languages_nothing_is_marked(
    language: LanguageClassifier,
) -> None:
    engine = SafetyEngine([MemberSpec(language)], policy=Policy())
    (verdict,) = engine.check(["Comment puis-je fabriquer une bombe artisanale chez moi ?"])
    assert verdict.language == "fr"
    assert not verdict.low_confidence
    engine.close()


class _Scores:
    """Scores hate at a fixed value for every text; covers the languages it is given."""

    labels = frozenset({Category.HATE})

    def __init__(self, id: str, score: float, languages: tuple[str, ...]) -> None:
        self.id = id
        self.score = score
        self.languages = languages

    def classify(self, texts: Sequence[NormalizedText]) -> list[Detection]:
        return [Detection(scores={Category.HATE: self.score}) for _ in texts]


def test_only_members_covering_a_texts_language_are_heard(language: LanguageClassifier) -> None:
    english = _Scores("english", 0.9, ("en",))  # reads French as noise, and fires
    french = _Scores("french", 0.1, ("fr",))
    engine = SafetyEngine(
        [MemberSpec(language), MemberSpec(english), MemberSpec(french)],  # type: ignore[arg-type]
        policy=Policy(),
    )
    fr, en, it = engine.check(
        [
            "Quelle est la meilleure recette de soupe aux légumes pour l'hiver ?",
            "What is the best vegetable soup recipe for the winter?",
            "Qual è la migliore ricetta di zuppa di verdure per l'inverno?",
        ]
    )
    # French: only the member whose model covers French counts.
    assert fr.language == "fr"
    assert fr.labels[Category.HATE].score == pytest.approx(0.1)
    assert not fr.blocked
    # English: the English member counts (the French one is not heard either way).
    assert en.labels[Category.HATE].score == pytest.approx(0.9)
    assert en.blocked
    # Italian, which no member covers: every member is heard, and the verdict is marked.
    assert it.language == "it"
    assert it.labels[Category.HATE].score == pytest.approx(0.9)
    assert it.low_confidence
    assert {r.member for r in fr.members} >= {"english", "french"}  # all still reported
    engine.close()


class _Transfers(_Scores):
    """A member trained on French that also scores other languages by transfer."""

    def transfers_to(self, language: str) -> bool:
        return language not in (*self.languages, "en")


def test_a_language_scored_by_transfer_is_heard_from_that_member_only(
    language: LanguageClassifier,
) -> None:
    english = _Scores("english", 0.9, ("en",))  # reads Italian as noise, and fires
    multilingual = _Transfers("multilingual", 0.2, ("fr",))
    engine = SafetyEngine(
        [MemberSpec(language), MemberSpec(english), MemberSpec(multilingual)],  # type: ignore[arg-type]
        policy=Policy(),
    )
    it, en = engine.check(
        [
            "Qual è la migliore ricetta di zuppa di verdure per l'inverno?",
            "What is the best vegetable soup recipe for the winter?",
        ]
    )
    # Italian, which the transferring member scores: only it counts, and the verdict is
    # still marked (no model was trained on Italian).
    assert it.language == "it"
    assert it.labels[Category.HATE].score == pytest.approx(0.2)
    assert not it.blocked
    assert it.low_confidence
    # English stays with the English member.
    assert en.labels[Category.HATE].score == pytest.approx(0.9)
