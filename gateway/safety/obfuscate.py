"""Ways an attacker hides text from a filter, each as a function of the plain text.

``normalize`` undoes every one of them (a folded text or a decoded view). They are here,
not in the tests, so that the tests that pin each decoder and ``bench/evasion.py``, which
measures the engine under each, apply the same disguises; a red-team eval can use them too.
"""

from __future__ import annotations

import base64
import codecs
import urllib.parse
from collections.abc import Callable

_LOWER = "abcdefghijklmnopqrstuvwxyz"
_LEET = str.maketrans({"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7"})
_CYRILLIC = str.maketrans({"a": "а", "e": "е", "o": "о", "c": "с", "p": "р", "x": "х"})
# Turned letters as upside-down text generators write them.
_TURNED = str.maketrans(dict(zip(_LOWER, "ɐqɔpǝɟƃɥᴉɾʞlɯuodbɹsʇnʌʍxʎz", strict=True)))
_REGIONAL = str.maketrans({letter: chr(0x1F1E6 + i) for i, letter in enumerate(_LOWER)})
_SHIFTED_3 = _LOWER[3:] + _LOWER[:3]
_CAESAR_3 = str.maketrans(_LOWER + _LOWER.upper(), _SHIFTED_3 + _SHIFTED_3.upper())
_ATBASH = str.maketrans(_LOWER + _LOWER.upper(), _LOWER[::-1] + _LOWER[::-1].upper())
_MORSE_CODES = (
    ".- -... -.-. -.. . ..-. --. .... .. .--- -.- .-.. -- -. --- .--. --.- .-. ... - ..- ...- "
    ".-- -..- -.-- --.. ----- .---- ..--- ...-- ....- ..... -.... --... ---.. ----."
)
_MORSE = dict(zip(_LOWER + "0123456789", _MORSE_CODES.split(), strict=True))


def spaced(text: str) -> str:
    """Letters one space apart, words two: "k i l l  y o u"."""
    return "  ".join(" ".join(word) for word in text.split())


def dotted(text: str) -> str:
    return " ".join(".".join(word) for word in text.split())


def dashed(text: str) -> str:
    return " ".join("-".join(word) for word in text.split())


def leetspeak(text: str) -> str:
    return text.lower().translate(_LEET)


def base64_encoded(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def hex_encoded(text: str) -> str:
    return text.encode().hex()


def binary(text: str) -> str:
    return " ".join(f"{byte:08b}" for byte in text.encode())


def decimal_codes(text: str) -> str:
    return " ".join(str(byte) for byte in text.encode())


def rot13(text: str) -> str:
    return codecs.encode(text, "rot13")


def caesar_3(text: str) -> str:
    return text.translate(_CAESAR_3)


def atbash(text: str) -> str:
    return text.translate(_ATBASH)


def morse(text: str) -> str:
    """Letters and digits in Morse code, words parted by a slash; other characters dropped."""
    return " / ".join(
        " ".join(_MORSE[char] for char in word if char in _MORSE)
        for word in text.lower().split()
        if any(char in _MORSE for char in word)
    )


def reversed_text(text: str) -> str:
    return text[::-1]


def upside_down(text: str) -> str:
    return text.lower().translate(_TURNED)[::-1]


def percent_encoded(text: str) -> str:
    return urllib.parse.quote(text)


def html_entities(text: str) -> str:
    return "".join(f"&#{ord(char)};" for char in text)


def doubled(text: str) -> str:
    return "".join(char * 2 if char.isalpha() else char for char in text)


def glued(text: str) -> str:
    return text.replace(" ", "")


def camel_case(text: str) -> str:
    return "".join(word[:1].upper() + word[1:] for word in text.split())


def snake_case(text: str) -> str:
    return text.replace(" ", "_")


def regional_indicators(text: str) -> str:
    return text.lower().translate(_REGIONAL)


def homoglyphs(text: str) -> str:
    """Latin letters swapped for the Cyrillic ones that look the same."""
    return text.translate(_CYRILLIC)


def zero_width(text: str) -> str:
    return "\u200b".join(text)


OBFUSCATIONS: dict[str, Callable[[str], str]] = {
    "spaced letters": spaced,
    "dotted letters": dotted,
    "dashed letters": dashed,
    "leetspeak": leetspeak,
    "base64": base64_encoded,
    "hex": hex_encoded,
    "binary": binary,
    "decimal codes": decimal_codes,
    "rot13": rot13,
    "Caesar shift 3": caesar_3,
    "Atbash": atbash,
    "Morse code": morse,
    "reversed": reversed_text,
    "upside down": upside_down,
    "percent-encoded": percent_encoded,
    "HTML entities": html_entities,
    "doubled letters": doubled,
    "glued words": glued,
    "camel case": camel_case,
    "snake case": snake_case,
    "regional indicators": regional_indicators,
    "homoglyphs": homoglyphs,
    "zero-width": zero_width,
}
