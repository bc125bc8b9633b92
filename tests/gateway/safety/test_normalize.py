"""Normalisation against evasion: obfuscated variants fold to the plain word."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.safety.normalize import fold, normalize

OBFUSCATED = [
    # (input, expected folded text, trick)
    ("k1ll", "kill", "leetspeak digit"),
    ("h@te", "hate", "leetspeak symbol"),
    ("$h1t", "shit", "leading symbol"),
    ("n1gg3r", "nigger", "several digits"),
    ("k i l l", "kill", "letter spacing"),
    ("k.i.l.l", "kill", "dotted spacing"),
    ("k-i-l-l them", "kill them", "dashed spacing"),
    ("w.i.l.l k.i.l.l y.o.u", "will kill you", "dotted letters, words parted by spaces"),
    ("k-i-l-l t-h-e-m", "kill them", "dashed letters, words parted by spaces"),
    (
        "w.h.a.t h.a.p.p.e.n.s i.f I k.i.l.l",
        "what happens if i kill",
        "a dotted two-letter word and a lone letter between dotted words",
    ),
    ("\U0001f1f0\U0001f1ee\U0001f1f1\U0001f1f1", "kill", "regional indicator letters"),
    ("h o w  c a n  i  p o i s o n  m y  d o g", "how can i poison my dog", "spaced words"),
    ("ki\u200bll", "kill", "zero-width space"),
    ("ki\u00adll", "kill", "soft hyphen"),
    ("k\u202eill", "kill", "bidi override"),
    ("ｋｉｌｌ", "kill", "full-width letters"),
    ("𝐤𝐢𝐥𝐥", "kill", "mathematical bold"),
    ("Κіll", "kill", "Greek and Cyrillic homoglyphs"),
    ("ѕех", "sex", "all-Cyrillic lookalike word"),
    ("kïll", "kill", "diacritic"),
    ("KILL", "kill", "case"),
    ("Ｋ1ＬＬ", "kill", "full-width with leetspeak"),
]


@pytest.mark.parametrize(("text", "expected", "trick"), OBFUSCATED)
def test_obfuscated_variants_fold_to_the_plain_word(text: str, expected: str, trick: str) -> None:
    assert normalize(text).folded == expected, trick


KEPT = [
    ("python3 and mp3 on the 4th at 10am", "identifiers, ordinals and times keep their digits"),
    ("тоже хорошо", "ordinary Russian stays Cyrillic"),
    ("a, b, c", "lists of letters are not letter spacing"),
    ("i am a cat", "two single letters are not letter spacing"),
    ("version 1.2.3 costs $5", "numbers and prices"),
    ("e.g. 3.5 kg, i.e. a lot", "abbreviations and decimals in text with no dotted words"),
]


@pytest.mark.parametrize(("text", "why"), KEPT)
def test_ordinary_text_is_not_damaged(text: str, why: str) -> None:
    assert normalize(text).folded == text, why


def test_a_letter_pair_is_joined_only_in_letter_spaced_text() -> None:
    assert normalize("see a b  and the rest").folded == "see a b and the rest"
    assert normalize("s e e  a b  a n d  t h e  r e s t").folded == "see ab and the rest"


def test_light_view_keeps_symbols_that_personal_data_needs() -> None:
    text = normalize("mail me: jo\u200bhn@example.com or call +1 (555) 010-9999")
    assert text.light == "mail me: john@example.com or call +1 (555) 010-9999"
    assert "john@example.com" in text.folded  # addresses are not leetspeak


def test_light_view_applies_nfkc() -> None:
    assert normalize("ｆｕｌｌ-width ①").light == "full-width 1"


def test_newlines_and_tabs_survive() -> None:
    assert normalize("line one\nline\ttwo").light == "line one\nline\ttwo"


@given(st.text(max_size=200))
def test_folding_is_idempotent(text: str) -> None:
    once = normalize(text).folded
    assert fold(once) == once


@given(st.text(max_size=200))
def test_light_view_has_no_invisible_format_characters(text: str) -> None:
    light = normalize(text).light
    assert "\u200b" not in light
    assert "\u202e" not in light
    assert "\x00" not in light


@pytest.mark.parametrize(
    ("text", "expected"),
    [("JIRA-1234", "jira-1234"), ("falcon-42", "falcon-42"), ("k1ll-them", "kill-them")],
)
def test_joined_parts_fold_on_their_own(text: str, expected: str) -> None:
    assert normalize(text).folded == expected


@pytest.mark.parametrize(
    "address",
    ["maria.lopez@example.com", "https://example.com/a$b?x=1", "www.example.org/p@ge"],
)
def test_addresses_keep_their_symbols(address: str) -> None:
    assert normalize(f"write to {address} today").folded == f"write to {address} today"


def test_the_dictionary_split_reads_a_bounded_part_of_a_long_glued_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # It costs about 30 µs a character: a text of one 32,000-letter token must not cost
    # a second of CPU.
    from gateway.safety import normalize as module

    read: list[int] = []

    def splitter(part: str) -> list[str]:
        read.append(len(part))
        return [part]

    monkeypatch.setattr(module, "_word_splitter", lambda: splitter)
    normalize("a" * 32_000)
    normalize(" ".join(["howtomakeapipebombathome"] * 1_000))
    assert read
    assert sum(read) <= 2 * module._SPLIT_CHARS  # two texts, each within the budget
