"""Allowlists in the engine: which categories a text is exempt from, judged on a masked text.

An allowlist names terms or regexes (a product name, an internal code word) and the
categories and directions whose false positives they cause. The engine never trusts the
match itself: a text that matches is scored again with every match of the lists that
apply replaced by :data:`PLACEHOLDER`, and for those categories in that direction the
verdict uses, member by member, the lower of the two scores. Every other category keeps
the text's own scores, and if the masked text still crosses a threshold, the flag stands.
So "Shooter Burger. I will find you and kill you." stays blocked for violence when
"Shooter Burger" is allowlisted for violence: the masked text ("name. i will find you and
kill you.") is a text anyone could have sent, and it is judged like one. An allowlist
adds no way around the filter that sending the masked text would not already give.

Matching is the blocklists' (``gateway.blocklists``: terms as whole words over the
normalised, folded text; regexes on RE2, linear in the text), run over the folded text
and over each decoded view (base64, hex, ROT13, leetspeak), each masked on its own. The
masked text is the folded text, read only by the members that score categories (the LLM
judge too, which otherwise reads the lightly normalised one). A match longer than
:data:`MAX_MASKED_CHARS` is never masked, so a careless pattern such as ``.*burger.*``
cannot exempt whole texts.

Allowlists never touch shields: a blocklist hit, a jailbreak or PII is judged as if no
allowlist existed (blocklists win).

The database store behind the :class:`AllowlistSource` protocol is
``gateway.allowlists.AllowlistStore``; the engine depends only on the protocols here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.safety.normalize import NormalizedText
from gateway.safety.taxonomy import Category, Direction

# What a match becomes in the masked text: a neutral noun that, measured on the shipped
# engine, neither adds to nor hides the harm of the words around it
# (tests/gateway/test_allowlists.py has the sentences).
PLACEHOLDER = "name"
# The id the allowlist step reports under among a verdict's members.
ALLOWLIST_MEMBER = "allowlist"
# Allowlisted things are names and code words: a longer match is not masked (fail closed).
MAX_MASKED_CHARS = 100


class AllowlistHit(Protocol):
    """Where one allowlist matched in a folded text, and what it exempts."""

    @property
    def allowlist(self) -> str: ...

    @property
    def start(self) -> int: ...

    @property
    def end(self) -> int: ...

    @property
    def categories(self) -> frozenset[Category]: ...

    @property
    def directions(self) -> frozenset[Direction]: ...


class AllowlistMatcher(Protocol):
    """Compiled enabled allowlists: every hit in a folded text, or an exception."""

    def search(self, folded: str) -> Sequence[AllowlistHit]: ...


class AllowlistSource(Protocol):
    """Hands out the current compiled allowlists."""

    def snapshot(self) -> AllowlistMatcher: ...


@dataclass(frozen=True, slots=True)
class Masking:
    """A text with the matches of ``allowlists`` masked, and where its scores may apply."""

    allowlists: tuple[str, ...]
    scopes: tuple[tuple[Direction, frozenset[Category]], ...]
    text: NormalizedText


def maskings(text: NormalizedText, matcher: AllowlistMatcher) -> list[Masking]:
    """The masked readings ``text`` needs: one per distinct set of lists that apply.

    For each direction and category, the lists that matched and exempt it there are
    masked together; categories that the same lists exempt share one masked text.
    """
    readings = (text.folded, *text.views)
    hits = [
        [hit for hit in matcher.search(reading) if hit.end - hit.start <= MAX_MASKED_CHARS]
        for reading in readings
    ]
    found = [hit for reading_hits in hits for hit in reading_hits]
    if not found:
        return []
    groups: dict[tuple[str, ...], dict[Direction, set[Category]]] = {}
    for direction in Direction:
        for category in Category:
            names = tuple(
                sorted(
                    {
                        hit.allowlist
                        for hit in found
                        if category in hit.categories and direction in hit.directions
                    }
                )
            )
            if names:
                groups.setdefault(names, {}).setdefault(direction, set()).add(category)
    out: list[Masking] = []
    for names, scopes in groups.items():
        chosen = set(names)
        masked = [
            mask(reading, (hit for hit in reading_hits if hit.allowlist in chosen))
            for reading, reading_hits in zip(readings, hits, strict=True)
        ]
        out.append(
            Masking(
                allowlists=names,
                scopes=tuple(
                    (direction, frozenset(categories)) for direction, categories in scopes.items()
                ),
                text=NormalizedText(
                    original=masked[0],
                    light=masked[0],
                    plain=masked[0],
                    folded=masked[0],
                    views=tuple(masked[1:]),
                ),
            )
        )
    return out


def mask(text: str, hits: Iterable[AllowlistHit]) -> str:
    """``text`` with each hit (overlapping ones merged) replaced by :data:`PLACEHOLDER`."""
    spans = sorted((hit.start, hit.end) for hit in hits)
    if not spans:
        return text
    parts: list[str] = []
    position = 0
    current_start, current_end = spans[0]
    for start, end in spans[1:]:
        if start <= current_end:
            current_end = max(current_end, end)
            continue
        parts += [text[position:current_start], PLACEHOLDER]
        position = current_end
        current_start, current_end = start, end
    parts += [text[position:current_start], PLACEHOLDER, text[current_end:]]
    return "".join(parts)
