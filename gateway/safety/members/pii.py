"""Personal data and secrets: a rule-based member that finds them and says where.

What it detects, each finding tagged with a :class:`PiiKind`:

Personal data
    ``email`` (a practical subset of RFC 5322 addresses), ``phone`` (national numbers
    for ``default_region`` and ``+NN`` international numbers, found and checked against
    Google's numbering plan by the ``phonenumbers`` library, grouping as that country
    writes it), ``credit_card`` (13-19 digits, plain or grouped by spaces or dashes,
    Luhn-checked and on a known card network's prefix and length), ``iban`` (the
    country's registered length and the ISO 7064 mod-97 check), ``us_ssn``
    (``AAA-GG-SSSS`` or spaced, without the never-issued ranges: area 000, 666 or 9xx,
    group 00, serial 0000) and ``ip_address`` (public IPv4 addresses only; off by
    default, see ``DEFAULT_KINDS``).
Secrets
    API keys recognised by their documented prefixes and lengths: ``aws_access_key``
    (``AKIA``/``ASIA`` + 16), ``github_token`` (``ghp_``/``gho_``/``ghu_``/``ghs_``/
    ``ghr_`` + 36, ``github_pat_`` + 82), ``openai_key`` (``sk-`` + 48, ``sk-proj-``,
    ``sk-svcacct-``, ``sk-admin-``), ``anthropic_key`` (``sk-ant-api03-``...),
    ``slack_token`` (``xoxb-``/``xoxa-``/``xoxp-``/``xoxr-``/``xoxs-``),
    ``google_api_key`` (``AIza`` + 35), ``stripe_key`` (``sk_live_``/``rk_live_``),
    ``private_key`` (PEM or OpenSSH private-key blocks, truncated ones included) and
    ``jwt`` (three base64url parts whose header decodes to a JSON object).

Numbers are validated, not merely pattern-matched, because a bare pattern flags every
order id: most 16-digit numbers fail Luhn, most ``XX00...`` strings fail mod-97. A span
claimed by two detectors goes to the more specific kind (``_SPECIFICITY``), so a card
number is reported as a card and never also as a phone number; the findings of one text
never overlap.

Why hand-written: no offline library covers secrets, Luhn, IBAN and phone numbers
together without a model download (Presidio needs spaCy models, and its recognisers
are regexes of the same kind as these). Phone numbers are the exception, because the
numbering plans of 240 regions are not something to hand-roll; ``phonenumbers`` ships
them as data and needs no network.

Spans index ``NormalizedText.light``: NFKC has already turned full-width digits into
ASCII ones and zero-width characters are gone, while digits and symbols are intact.
Nothing here logs or keeps the matched text; a finding carries only its kind and span.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

import phonenumbers

from gateway.safety.members import MEMBERS, MemberKind
from gateway.safety.normalize import NormalizedText
from gateway.safety.taxonomy import Label, Shield
from gateway.safety.verdict import Detection, Finding


class PiiKind(StrEnum):
    """What a PII finding is; the value is the finding's ``kind``."""

    EMAIL = "email"
    PHONE = "phone"
    CREDIT_CARD = "credit_card"
    IBAN = "iban"
    US_SSN = "us_ssn"
    IP_ADDRESS = "ip_address"
    AWS_ACCESS_KEY = "aws_access_key"
    GITHUB_TOKEN = "github_token"  # noqa: S105 (a kind name, not a secret)
    OPENAI_KEY = "openai_key"
    ANTHROPIC_KEY = "anthropic_key"
    SLACK_TOKEN = "slack_token"  # noqa: S105 (a kind name, not a secret)
    GOOGLE_API_KEY = "google_api_key"
    STRIPE_KEY = "stripe_key"
    PRIVATE_KEY = "private_key"
    JWT = "jwt"


# IP addresses are off unless asked for: an address is personal data only sometimes,
# and version strings (1.2.3.4) and log excerpts would flag ordinary technical prompts.
DEFAULT_KINDS: frozenset[PiiKind] = frozenset(PiiKind) - {PiiKind.IP_ADDRESS}
DEFAULT_REGION = "US"

# Higher wins when two findings overlap. Secrets have unambiguous prefixes, so they beat
# everything; phone numbers are the loosest format, so they lose to everything.
_SPECIFICITY: MappingProxyType[PiiKind, int] = MappingProxyType(
    {
        PiiKind.PRIVATE_KEY: 100,
        PiiKind.JWT: 90,
        PiiKind.AWS_ACCESS_KEY: 80,
        PiiKind.GITHUB_TOKEN: 80,
        PiiKind.OPENAI_KEY: 80,
        PiiKind.ANTHROPIC_KEY: 80,
        PiiKind.SLACK_TOKEN: 80,
        PiiKind.GOOGLE_API_KEY: 80,
        PiiKind.STRIPE_KEY: 80,
        PiiKind.IBAN: 60,
        PiiKind.CREDIT_CARD: 55,
        PiiKind.EMAIL: 50,
        PiiKind.US_SSN: 45,
        PiiKind.IP_ADDRESS: 40,
        PiiKind.PHONE: 10,
    }
)


@dataclass(frozen=True, slots=True)
class _Candidate:
    kind: PiiKind
    start: int
    end: int


# --- secrets -------------------------------------------------------------------------
# Each pattern is anchored on both sides so that a key is never found inside a longer
# token ("task-sk-..." or a 60-character run that merely starts with AKIA).
_KEY_START = r"(?<![A-Za-z0-9_-])"
_KEY_END = r"(?![A-Za-z0-9_-])"

_SECRET_PATTERNS: tuple[tuple[PiiKind, re.Pattern[str]], ...] = (
    (PiiKind.AWS_ACCESS_KEY, re.compile(_KEY_START + r"(?:AKIA|ASIA)[A-Z0-9]{16}" + _KEY_END)),
    (
        PiiKind.GITHUB_TOKEN,
        re.compile(
            _KEY_START + r"(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{82})" + _KEY_END
        ),
    ),
    (
        PiiKind.OPENAI_KEY,
        re.compile(
            _KEY_START
            + r"sk-(?:(?:proj|svcacct|admin)-[A-Za-z0-9_-]{40,}|[A-Za-z0-9]{48})"
            + _KEY_END
        ),
    ),
    (
        PiiKind.ANTHROPIC_KEY,
        re.compile(_KEY_START + r"sk-ant-(?:api|admin)[0-9]{2}-[A-Za-z0-9_-]{80,}" + _KEY_END),
    ),
    (
        PiiKind.SLACK_TOKEN,
        re.compile(_KEY_START + r"xox[baprs]-[0-9]+-[A-Za-z0-9-]{16,}" + _KEY_END),
    ),
    (PiiKind.GOOGLE_API_KEY, re.compile(_KEY_START + r"AIza[A-Za-z0-9_-]{35}" + _KEY_END)),
    (
        PiiKind.STRIPE_KEY,
        re.compile(_KEY_START + r"(?:sk|rk)_live_[A-Za-z0-9]{24,}" + _KEY_END),
    ),
)

# A JWT: base64url header (always '{"...' so it starts eyJ), payload and signature. A
# fourth and fifth part would make it a JWE, whose content is encrypted: not matched.
_JWT = re.compile(
    _KEY_START
    + r"(eyJ[A-Za-z0-9_-]+)\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+(?![A-Za-z0-9_-]|\.[A-Za-z0-9_-])"
)
_JWT_HEADER_MAX_CHARS = 8192

# PEM and OpenSSH armour. BEGIN and END markers are found in one pass and paired in a
# second, so a text full of unterminated headers costs linear time, not quadratic.
_PEM_MARKER = re.compile(r"-----(BEGIN|END) ((?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?)-----")
# Lines that may follow an unterminated BEGIN: base64 body or RFC 1421 header fields.
_PEM_BODY_LINE = re.compile(r"[A-Za-z0-9+/=]{4,}|[A-Za-z][A-Za-z-]*:[^\n]*")
_LINE_BREAK = re.compile(r"[ \t]*\r?\n")

# --- personal data -------------------------------------------------------------------
_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]+@(?:[^\W_][\w-]*\.)+[^\W\d_]{2,63}(?![\w-])")

# 13-19 digits, contiguous or in groups (first group of four, one separator throughout).
_CARD = re.compile(
    r"(?<![\w-])(?<![0-9][.,])"
    r"(?:[0-9]{13,19}|[0-9]{4}(?P<sep>[ -])[0-9]{2,7}(?:(?P=sep)[0-9]{2,7}){1,3})"
    r"(?![\w-]|[.,][0-9])"
)
_CARD_MIN_DIGITS = 13
_CARD_MAX_DIGITS = 19


@dataclass(frozen=True, slots=True)
class _CardRange:
    """Card numbers whose first ``width`` digits lie in ``low..high`` have these lengths."""

    low: int
    high: int
    width: int
    lengths: frozenset[int]


_LONG = frozenset(range(16, 20))
_CARD_RANGES: tuple[_CardRange, ...] = (
    _CardRange(4, 4, 1, frozenset({13, 16, 19})),  # Visa
    _CardRange(51, 55, 2, frozenset({16})),  # Mastercard
    _CardRange(2221, 2720, 4, frozenset({16})),  # Mastercard 2-series
    _CardRange(34, 34, 2, frozenset({15})),  # American Express
    _CardRange(37, 37, 2, frozenset({15})),  # American Express
    _CardRange(6011, 6011, 4, _LONG),  # Discover
    _CardRange(644, 649, 3, _LONG),  # Discover
    _CardRange(65, 65, 2, _LONG),  # Discover, RuPay
    _CardRange(62, 62, 2, _LONG),  # UnionPay
    _CardRange(3528, 3589, 4, _LONG),  # JCB
    _CardRange(300, 305, 3, frozenset(range(14, 20))),  # Diners Club
    _CardRange(3095, 3095, 4, frozenset(range(14, 20))),  # Diners Club
    _CardRange(36, 36, 2, frozenset(range(14, 20))),  # Diners Club
    _CardRange(38, 39, 2, _LONG),  # Diners Club
    _CardRange(2200, 2204, 4, _LONG),  # Mir
    _CardRange(60, 60, 2, frozenset({16})),  # RuPay
    _CardRange(81, 82, 2, frozenset({16})),  # RuPay
    _CardRange(5018, 5018, 4, frozenset(range(13, 20))),  # Maestro
    _CardRange(5020, 5020, 4, frozenset(range(13, 20))),  # Maestro
    _CardRange(5038, 5038, 4, frozenset(range(13, 20))),  # Maestro
    _CardRange(5893, 5893, 4, frozenset(range(13, 20))),  # Maestro
    _CardRange(6304, 6304, 4, frozenset(range(13, 20))),  # Maestro
    _CardRange(6759, 6759, 4, frozenset(range(13, 20))),  # Maestro
    _CardRange(6761, 6763, 4, frozenset(range(13, 20))),  # Maestro
)

# Country code and check digits; the rest is read character by character (see _ibans).
_IBAN_START = re.compile(r"(?<!\w)([A-Za-z]{2})[0-9]{2}")
# IBAN lengths from the SWIFT IBAN registry.
_IBAN_LENGTHS: MappingProxyType[str, int] = MappingProxyType(
    {
        "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22,
        "BH": 22, "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24,
        "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
        "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27,
        "GT": 28, "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
        "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20,
        "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20,
        "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
        "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24,
        "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25,
        "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
        "YE": 30,
    }
)  # fmt: skip
_ALNUM = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")

# Area 000, 666 and 900-999, group 00 and serial 0000 are never issued. The separator
# must be the same twice, and the number must not be part of a longer digit group.
_SSN = re.compile(
    r"(?<![\w-])(?<![0-9] )"
    r"(?!000|666|9[0-9]{2})[0-9]{3}(?P<sep>[- ])(?!00)[0-9]{2}(?P=sep)(?!0000)[0-9]{4}"
    r"(?![\w-]|(?P=sep)[0-9])"
)

_IPV4 = re.compile(r"(?<![\w.])[0-9]{1,3}(?:\.[0-9]{1,3}){3}(?![\w]|\.[0-9])")


class PiiClassifier:
    """Find personal data and secrets in ``text.light``; score 1.0 when anything is found.

    ``kinds`` picks what to report (``None``: ``DEFAULT_KINDS``, every kind except
    ``ip_address``). Every detector still runs when picking overlaps, so restricting
    ``kinds`` to phones does not turn a card number into a phone finding.
    ``default_region`` is the ISO 3166 region whose national phone numbers are
    recognised without a ``+`` prefix.
    """

    def __init__(
        self,
        *,
        id: str = "pii",
        kinds: frozenset[PiiKind] | None = None,
        default_region: str = DEFAULT_REGION,
    ) -> None:
        if not id:
            raise ValueError("a member id must not be empty")
        chosen = DEFAULT_KINDS if kinds is None else frozenset(PiiKind(kind) for kind in kinds)
        if not chosen:
            raise ValueError("kinds must name at least one PII kind")
        region = default_region.upper()
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"unknown phone region {default_region!r}; use an ISO 3166 code")
        self._id = id
        self._kinds = chosen
        self._region = region

    @property
    def id(self) -> str:
        return self._id

    @property
    def labels(self) -> frozenset[Label]:
        return frozenset({Shield.PII})

    @property
    def kinds(self) -> frozenset[PiiKind]:
        return self._kinds

    def classify(self, texts: Sequence[NormalizedText]) -> list[Detection]:
        return [self._detect(text.light) for text in texts]

    def _detect(self, light: str) -> Detection:
        findings = tuple(
            Finding(
                label=Shield.PII,
                kind=candidate.kind.value,
                start=candidate.start,
                end=candidate.end,
            )
            for candidate in _most_specific(self._candidates(light))
            if candidate.kind in self._kinds
        )
        return Detection(scores={Shield.PII: 1.0 if findings else 0.0}, findings=findings)

    def _candidates(self, light: str) -> Iterator[_Candidate]:
        yield from _private_keys(light)
        yield from _jwts(light)
        yield from _secrets(light)
        yield from _ibans(light)
        yield from _cards(light)
        yield from _emails(light)
        yield from _ssns(light)
        yield from _ipv4s(light)
        if PiiKind.PHONE in self._kinds:  # least specific, so it can shadow nothing
            yield from _phones(light, region=self._region)


def _most_specific(candidates: Iterator[_Candidate]) -> list[_Candidate]:
    """Keep the most specific of overlapping candidates (then the longest), sorted by start."""
    ranked = sorted(
        candidates,
        key=lambda c: (-_SPECIFICITY[c.kind], -(c.end - c.start), c.start),
    )
    starts: list[int] = []
    kept: list[_Candidate] = []  # sorted by start, never overlapping
    for candidate in ranked:
        index = bisect_left(starts, candidate.start)
        if index > 0 and kept[index - 1].end > candidate.start:
            continue
        if index < len(kept) and kept[index].start < candidate.end:
            continue
        starts.insert(index, candidate.start)
        kept.insert(index, candidate)
    return kept


def _secrets(text: str) -> Iterator[_Candidate]:
    for kind, pattern in _SECRET_PATTERNS:
        for match in pattern.finditer(text):
            yield _Candidate(kind, match.start(), match.end())


def _jwts(text: str) -> Iterator[_Candidate]:
    for match in _JWT.finditer(text):
        if _is_jwt_header(match.group(1)):
            yield _Candidate(PiiKind.JWT, match.start(), match.end())


def _is_jwt_header(segment: str) -> bool:
    """True when ``segment`` is base64url for a JSON object with an ``alg`` or ``typ``."""
    if len(segment) > _JWT_HEADER_MAX_CHARS:
        return False
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        header: object = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return False
    return isinstance(header, dict) and ("alg" in header or "typ" in header)


def _private_keys(text: str) -> Iterator[_Candidate]:
    """Pair each BEGIN marker with the next END of the same label.

    A BEGIN without its END (a key cut off when pasted) still leaks key material: its
    span runs over the base64 lines that follow the header.
    """
    open_marker: re.Match[str] | None = None
    for marker in _PEM_MARKER.finditer(text):
        if marker.group(1) == "BEGIN":
            if open_marker is not None:
                yield _unterminated_key(text, open_marker)
            open_marker = marker
        elif open_marker is not None and marker.group(2) == open_marker.group(2):
            yield _Candidate(PiiKind.PRIVATE_KEY, open_marker.start(), marker.end())
            open_marker = None
    if open_marker is not None:
        yield _unterminated_key(text, open_marker)


def _unterminated_key(text: str, header: re.Match[str]) -> _Candidate:
    end = header.end()
    line_break = _LINE_BREAK.match(text, end)
    while line_break is not None:
        line_start = line_break.end()
        line_end = text.find("\n", line_start)
        if line_end == -1:
            line_end = len(text)
        line = text[line_start:line_end].rstrip()
        body = line.lstrip()
        if body and _PEM_BODY_LINE.fullmatch(body) is None:
            break
        if body:
            end = line_start + len(line)
        line_break = _LINE_BREAK.match(text, line_end)
    return _Candidate(PiiKind.PRIVATE_KEY, header.start(), end)


def _ibans(text: str) -> Iterator[_Candidate]:
    """IBANs, contiguous or grouped by single spaces, of their country's exact length."""
    for match in _IBAN_START.finditer(text):
        length = _IBAN_LENGTHS.get(match.group(1).upper())
        if length is None:
            continue
        chars = [char.upper() for char in match.group()]
        position = match.end()
        while len(chars) < length and position < len(text):
            char = text[position]
            if char in _ALNUM:
                chars.append(char.upper())
            elif not (char == " " and text[position + 1 : position + 2] in _ALNUM):
                break
            position += 1
        if len(chars) != length or (position < len(text) and text[position].isalnum()):
            continue
        if _iban_checksum_ok("".join(chars)):
            yield _Candidate(PiiKind.IBAN, match.start(), position)


def _iban_checksum_ok(iban: str) -> bool:
    """ISO 7064 MOD 97-10: the country code and check digits move to the end."""
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


def _cards(text: str) -> Iterator[_Candidate]:
    for match in _CARD.finditer(text):
        separator = match.group("sep")
        groups = match.group().split(separator) if separator else [match.group()]
        # Grouped numbers may run into a following number ("... 1111 12/25"): try the
        # longest run of whole groups first, then drop groups from the end.
        length = len(match.group())
        while groups:
            digits = "".join(groups)
            if len(digits) < _CARD_MIN_DIGITS:
                break
            if len(digits) <= _CARD_MAX_DIGITS and _on_card_network(digits) and _luhn_ok(digits):
                yield _Candidate(PiiKind.CREDIT_CARD, match.start(), match.start() + length)
                break
            length -= len(groups.pop()) + 1


def _on_card_network(digits: str) -> bool:
    return any(
        len(digits) in card.lengths and card.low <= int(digits[: card.width]) <= card.high
        for card in _CARD_RANGES
    )


def _luhn_ok(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - ord("0")
        if index % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _emails(text: str) -> Iterator[_Candidate]:
    for match in _EMAIL.finditer(text):
        local = match.group().split("@", 1)[0]
        if local.startswith(".") or local.endswith(".") or ".." in local:
            continue
        yield _Candidate(PiiKind.EMAIL, match.start(), match.end())


def _ssns(text: str) -> Iterator[_Candidate]:
    for match in _SSN.finditer(text):
        yield _Candidate(PiiKind.US_SSN, match.start(), match.end())


def _ipv4s(text: str) -> Iterator[_Candidate]:
    for match in _IPV4.finditer(text):
        try:
            address = ipaddress.IPv4Address(match.group())
        except ValueError:  # an octet over 255, or a leading zero
            continue
        if address.is_global:  # private, loopback and documentation ranges name no one
            yield _Candidate(PiiKind.IP_ADDRESS, match.start(), match.end())


def _phones(text: str, *, region: str) -> Iterator[_Candidate]:
    # STRICT_GROUPING: the digits must be valid for the region and grouped as that
    # country writes them, so "2024-000123" (an order number) is not a phone number.
    matcher = phonenumbers.PhoneNumberMatcher(
        text, region, leniency=phonenumbers.Leniency.STRICT_GROUPING
    )
    for match in matcher:
        yield _Candidate(PiiKind.PHONE, match.start, match.end)


MEMBERS.add(MemberKind.PII, PiiClassifier)
