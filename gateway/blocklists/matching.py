"""Blocklist matching: terms tokenised into one trie, regexes compiled by RE2, the snapshot.

How terms and regexes match, and why RE2, is told in ``gateway.blocklists``. Nothing here
touches the database: ``gateway.blocklists.store`` reads the lists and builds a
:class:`BlocklistSnapshot` from them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

import re2
import regex

from gateway.safety.normalize import normalize

# One regex's hits in one text: past the first the text is blocked anyway, and finding
# every match of a pattern like ``a[^z]*z|a`` rescans the rest of the text per match.
MAX_HITS_PER_REGEX = 100
# RE2's memory for one compiled pattern (its default): a pattern needing more is refused.
REGEX_MAX_MEM_BYTES = 8 << 20

# Scripts written without spaces between words: each of their characters is a token, so a
# term in them matches as a substring.
_UNSPACED = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}\p{Tibetan}"
_TOKEN: Any = regex.compile(rf"[{_UNSPACED}]|[^\W{_UNSPACED}]+|[^\w\s]")


# -- terms -------------------------------------------------------------------------------


def term_tokens(value: str) -> tuple[str, ...]:
    """The tokens a term matches as: normalised like any text, then tokenised."""
    tokens: list[str] = _TOKEN.findall(normalize(value).folded)
    return tuple(tokens)


# -- regexes -----------------------------------------------------------------------------


class UnsupportedRegex(ValueError):
    """RE2 cannot compile a pattern: the message names it (``what``) and says why.

    ``detail`` is RE2's own reason (``invalid escape sequence: \\1``).
    """

    def __init__(self, what: str, reason: str, *, detail: str) -> None:
        super().__init__(f"{what} is refused: {reason}")
        self.detail = detail


class RegexMatch(Protocol):
    """What the snapshot reads of an RE2 match (``google-re2`` ships no type stubs)."""

    def span(self) -> tuple[int, int]: ...


class RegexPattern(Protocol):
    """A compiled RE2 pattern; spans index the ``str`` searched, in characters."""

    def finditer(self, text: str) -> Iterator[RegexMatch]: ...

    def fullmatch(self, text: str) -> RegexMatch | None: ...


def _regex_options() -> Any:
    options = re2.Options()
    options.case_sensitive = False
    options.log_errors = False  # a refused pattern is the caller's error, not a log line
    options.max_mem = REGEX_MAX_MEM_BYTES
    return options


_REGEX_OPTIONS = _regex_options()
_LOOKAROUNDS = ("(?=", "(?!", "(?<=", "(?<!")
_BACKREFERENCE = re.compile(r"invalid escape sequence: \\[1-9]|invalid perl operator: \(\?P")


def compile_regex(value: str) -> RegexPattern:
    """Compile a blocklist regex the way the snapshot does (RE2, case-insensitive).

    Raises ``UnsupportedRegex`` saying why RE2 refuses it.
    """
    try:
        pattern: RegexPattern = re2.compile(value, _REGEX_OPTIONS)
    except re2.error as error:
        raw = error.args[0] if error.args else ""
        detail = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        raise UnsupportedRegex(f"regex {value!r}", _refusal(detail), detail=detail) from None
    return pattern


def regex_spans(pattern: RegexPattern, folded: str) -> Iterator[tuple[int, int]]:
    """The non-empty matches of ``pattern`` in ``folded``, at most ``MAX_HITS_PER_REGEX``."""
    found = 0
    for match in pattern.finditer(folded):
        start, end = match.span()
        if end > start:
            yield start, end
            found += 1
            if found >= MAX_HITS_PER_REGEX:
                return


def _refusal(detail: str) -> str:
    """RE2's reason for refusing a pattern, with what it means for a blocklist."""
    linear = "blocklist regexes run on RE2, which matches in linear time and has no"
    if detail.startswith("invalid perl operator: ") and detail.endswith(_LOOKAROUNDS):
        return f"lookarounds are not supported ({detail}): {linear} lookahead or lookbehind"
    if _BACKREFERENCE.fullmatch(detail):
        return f"backreferences are not supported ({detail}): {linear} backreferences"
    if detail == "invalid perl operator: (?>" or (
        detail.startswith("bad repetition operator: ") and detail.endswith("+")
    ):
        return (
            f"atomic groups and possessive quantifiers are not supported ({detail}): "
            f"{linear} backtracking to control"
        )
    if detail == "invalid escape sequence: \\Z":
        return f"RE2 cannot compile it ({detail}): write \\z for the end of the text"
    return f"RE2 cannot compile it ({detail})"


# -- the compiled snapshot ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlocklistHit:
    """A place in the folded text that a list's term or regex matched."""

    blocklist: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class CompiledRegex:
    blocklist: str
    item_id: int
    pattern: RegexPattern


@dataclass(frozen=True, slots=True)
class TermTrie:
    """Every list's terms as one trie over tokens, flattened so it can be frozen.

    Node 0 is the root; ``edges[(node, token)]`` is the next node, and ``ends[node]``
    names the lists with a term that ends there.
    """

    edges: Mapping[tuple[int, str], int]
    ends: Mapping[int, frozenset[str]]

    @classmethod
    def build(cls, terms: Iterable[tuple[str, tuple[str, ...]]]) -> TermTrie:
        edges: dict[tuple[int, str], int] = {}
        ends: dict[int, set[str]] = {}
        for blocklist, tokens in terms:
            node = 0
            for token in tokens:
                node = edges.setdefault((node, token), len(edges) + 1)
            ends.setdefault(node, set()).add(blocklist)
        frozen = {node: frozenset(names) for node, names in ends.items()}
        return cls(edges=MappingProxyType(edges), ends=MappingProxyType(frozen))

    def search(self, folded: str) -> list[BlocklistHit]:
        """Leftmost-longest hits of each list; one list's hits never overlap."""
        if not self.edges:
            return []
        matches = list(_TOKEN.finditer(folded))
        tokens: list[str] = [match.group() for match in matches]
        hits: list[BlocklistHit] = []
        free_from: dict[str, int] = {}  # per list: the first token a new hit may start at
        for first in range(len(tokens)):
            node = 0
            longest: dict[str, int] = {}
            for index in range(first, len(tokens)):
                child = self.edges.get((node, tokens[index]))
                if child is None:
                    break
                node = child
                for blocklist in self.ends.get(node, ()):
                    longest[blocklist] = index
            for blocklist, last in longest.items():
                if first >= free_from.get(blocklist, 0):
                    hits.append(
                        BlocklistHit(blocklist, matches[first].start(), matches[last].end())
                    )
                    free_from[blocklist] = last + 1
        return hits


@dataclass(frozen=True, slots=True)
class BlocklistSnapshot:
    """Every list, compiled: what the ``blocklist`` member searches. Immutable."""

    terms: TermTrie
    regexes: tuple[CompiledRegex, ...]
    version: tuple[int, ...]

    def search(self, folded: str) -> tuple[BlocklistHit, ...]:
        """All hits in ``folded`` (a ``NormalizedText.folded``), ordered by position.

        Linear in the text for every pattern (RE2): no budget, nothing to time out.
        """
        hits = set(self.terms.search(folded))
        for compiled in self.regexes:
            hits.update(
                BlocklistHit(compiled.blocklist, start, end)
                for start, end in regex_spans(compiled.pattern, folded)
            )
        return tuple(sorted(hits, key=lambda hit: (hit.start, hit.end, hit.blocklist)))
