"""Custom blocklists: a member that flags texts matching an admin's terms or regexes.

It reads a snapshot of the lists from a ``BlocklistSource`` once per batch (in the service,
``gateway.blocklists.BlocklistStore``, which says how terms and regexes match; the engine
depends only on the small protocols below, not on the database). A text with any hit
scores 1.0 on the ``blocklist`` shield and carries one finding per hit, its ``kind`` the
list's name and its span indexing ``NormalizedText.folded``; a text without one scores 0.0.
Regexes run on RE2, in time linear in the text, so a search has no time budget to overrun
on a loaded machine. A snapshot that cannot be read or compiled raises: the engine fails
closed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from gateway.safety.members import MEMBERS, MemberKind
from gateway.safety.normalize import NormalizedText
from gateway.safety.taxonomy import Label, Shield
from gateway.safety.verdict import Detection, Finding


class BlocklistHit(Protocol):
    """Where one list matched, in the folded text."""

    @property
    def blocklist(self) -> str: ...

    @property
    def start(self) -> int: ...

    @property
    def end(self) -> int: ...


class BlocklistMatcher(Protocol):
    """Compiled lists: every hit in a folded text, or an exception."""

    def search(self, folded: str) -> Sequence[BlocklistHit]: ...


class BlocklistSource(Protocol):
    """Hands out the current compiled lists."""

    def snapshot(self) -> BlocklistMatcher: ...


class BlocklistClassifier:
    """Scores the ``blocklist`` shield: 1.0 with findings on a hit, else 0.0."""

    def __init__(self, *, id: str = "blocklist", source: BlocklistSource) -> None:
        self._id = id
        self._source = source

    @property
    def id(self) -> str:
        return self._id

    @property
    def labels(self) -> frozenset[Label]:
        return frozenset({Shield.BLOCKLIST})

    def classify(self, texts: Sequence[NormalizedText]) -> list[Detection]:
        if not texts:
            return []
        matcher = self._source.snapshot()
        detections: list[Detection] = []
        for text in texts:
            findings = tuple(
                Finding(label=Shield.BLOCKLIST, kind=hit.blocklist, start=hit.start, end=hit.end)
                for hit in matcher.search(text.folded)
            )
            score = 1.0 if findings else 0.0
            detections.append(Detection(scores={Shield.BLOCKLIST: score}, findings=findings))
        return detections


MEMBERS.add(MemberKind.BLOCKLIST, BlocklistClassifier)
