"""Allowlist matching: the blocklists' term trie and RE2 patterns, with what each list exempts.

Terms and regexes match exactly as blocklist items do (``gateway.blocklists``); each hit
carries the categories and directions its list exempts, which is all the engine's
allowlist step (``gateway.safety.allowlist``) needs. Nothing here touches the database.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.blocklists.matching import CompiledRegex, TermTrie, regex_spans
from gateway.safety.taxonomy import Category, Direction


@dataclass(frozen=True, slots=True)
class Exempts:
    """What one allowlist exempts: categories, in directions."""

    categories: frozenset[Category]
    directions: frozenset[Direction]


@dataclass(frozen=True, slots=True)
class AllowlistHit:
    """A place in a folded text that a list's term or regex matched."""

    allowlist: str
    start: int
    end: int
    categories: frozenset[Category]
    directions: frozenset[Direction]


@dataclass(frozen=True, slots=True)
class AllowlistSnapshot:
    """Every enabled allowlist, compiled. Immutable; ``version`` is the tables' stamp."""

    terms: TermTrie
    regexes: tuple[CompiledRegex, ...]
    exempts: Mapping[str, Exempts]
    version: tuple[int, ...]

    def search(self, folded: str) -> tuple[AllowlistHit, ...]:
        """All hits in ``folded``, ordered by position; linear in the text (RE2)."""
        spans = {(hit.blocklist, hit.start, hit.end) for hit in self.terms.search(folded)}
        for compiled in self.regexes:
            spans.update(
                (compiled.blocklist, start, end)
                for start, end in regex_spans(compiled.pattern, folded)
            )
        return tuple(
            AllowlistHit(
                allowlist=name,
                start=start,
                end=end,
                categories=self.exempts[name].categories,
                directions=self.exempts[name].directions,
            )
            for name, start, end in sorted(spans, key=lambda span: (span[1], span[2], span[0]))
        )
