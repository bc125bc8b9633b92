"""Streamed completions, checked in small increments before (or, in ``async`` mode, right
after) they reach the client.

Completion check: a whole completion is checked before a byte leaves (non-streaming); a
stream goes through a ``StreamGuard``. In the default ``sync`` mode text is held back until
at least ``increment_chars`` have arrived (cut at the last space, so words stay whole) or a
sentence ends, checked together with the text released just before it (up to
``overlap_chars``, from a sentence start where one is in reach: a phrase cut by a release
edge is still seen whole), and released only if it passes. A part that fails ends the
stream with ``finish_reason: "content_filter"``; nothing after it reaches the client. When
the stream ends, the whole completion is checked once more, so a stream is blocked
whenever the same completion would be blocked unstreamed (its last part is withheld).

The ``async`` mode (a policy option, Azure's "asynchronous filter") sends text as it
arrives and checks it in the same increments right after; a violation ends the stream.
It is not leak-proof: the failing increment has already been sent.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from gateway.chat.settings import (
    DEFAULT_STREAM_INCREMENT_CHARS,
    DEFAULT_STREAM_OVERLAP_CHARS,
    DEFAULT_STREAM_WINDOW_CHARS,
)
from gateway.safety.verdict import Verdict

Check = Callable[[str], Awaitable[Verdict]]


@dataclass(slots=True)
class Release:
    """Text a ``StreamGuard`` let through, and the verdict on the window it was in."""

    text: str
    verdict: Verdict | None


StreamMode = Literal["sync", "async"]


@dataclass(slots=True)
class StreamGuard:
    """Checks streamed text in small increments; see the module docstring.

    ``sync``: held-back text is released at the last space once ``increment_chars`` have
    arrived, or at a sentence end, or, when ``window_chars`` arrive without a space, at
    that length. Each release is checked together with up to ``overlap_chars`` of the text
    released before it. ``async``: text is released as it arrives and checked afterwards
    in the same increments.
    """

    check: Check
    window_chars: int = DEFAULT_STREAM_WINDOW_CHARS
    overlap_chars: int = DEFAULT_STREAM_OVERLAP_CHARS
    increment_chars: int = DEFAULT_STREAM_INCREMENT_CHARS
    mode: StreamMode = "sync"
    final_check: bool = True
    pending: str = ""
    released: str = ""
    blocked: Verdict | None = None
    verdicts: list[Verdict] = field(default_factory=list)
    checked_windows: list[str] = field(default_factory=list)
    _unchecked: str = ""

    @property
    def last_verdict(self) -> Verdict | None:
        return self.verdicts[-1] if self.verdicts else None

    def checks(self) -> list[tuple[str, Verdict]]:
        """Every window checked so far with its verdict, in order."""
        return list(zip(self.checked_windows, self.verdicts, strict=True))

    async def check_text(self, text: str) -> Verdict:
        """Check text that is not streamed as content (a choice's tool calls) as part of
        this stream: a failure blocks the stream like a failing increment."""
        return await self._checked(text)

    async def feed(self, piece: str) -> Release | None:
        """Take a piece of the stream; return what may be sent now, if anything."""
        if self.blocked is not None:
            return None
        if self.mode == "async":
            return await self._feed_async(piece)
        self.pending += piece
        cut = self._cut()
        if cut is None:
            return None
        return await self._release(cut)

    async def flush(self) -> Release | None:
        """The stream ended: check and release what is still held back, then check the
        whole completion once (unless it was checked whole already)."""
        if self.blocked is not None:
            return None
        if self.mode == "async":
            if self._unchecked.strip():
                verdict = await self._checked(self._context(self._unchecked) + self._unchecked)
                self._unchecked = ""
                if verdict.blocked:
                    return None
            await self._check_whole(self.released)
            return None
        release: Release | None = None
        if not self.pending.strip():
            remainder, self.pending = self.pending, ""
            if remainder:
                release = Release(remainder, None)
        else:
            part = self.pending
            window = self._context(part) + part
            verdict = await self._checked(window)
            self.pending = ""
            if verdict.blocked:
                return None
            release = Release(part, verdict)
        whole = self.released + (release.text if release is not None else "")
        if await self._check_whole(whole):
            return None  # the whole completion fails: its last part is withheld
        self.released = whole
        return release

    async def _check_whole(self, whole: str) -> bool:
        """Check the entire completion unless the last check already read all of it."""
        if not self.final_check or not whole.strip():
            return False
        if self.checked_windows and self.checked_windows[-1] == whole:
            return False
        verdict = await self._checked(whole)
        return verdict.blocked

    async def _checked(self, window: str) -> Verdict:
        verdict = await self.check(window)
        self.verdicts.append(verdict)
        self.checked_windows.append(window)
        if verdict.blocked:
            self.blocked = verdict
        return verdict

    async def _feed_async(self, piece: str) -> Release:
        self.released += piece
        self._unchecked += piece
        verdict: Verdict | None = None
        if len(self._unchecked) >= self.increment_chars or _SENTENCE_END.search(piece):
            part, self._unchecked = self._unchecked, ""
            verdict = await self._checked(self._context(part) + part)
        return Release(piece, verdict)

    def _cut(self) -> int | None:
        """Where the held-back text may be cut for release, if anywhere yet."""
        ends = [match.end() for match in _SENTENCE_END.finditer(self.pending)]
        if len(self.pending) >= self.increment_chars:
            space = max(self.pending.rfind(" "), self.pending.rfind("\n"))
            if space > 0:
                return max(space + 1, ends[-1] if ends else 0)
        if ends:
            return ends[-1]
        if len(self.pending) < self.window_chars:
            return None
        space = self.pending.rfind(" ", 0, self.window_chars)
        return space + 1 if space > 0 else self.window_chars

    def _context(self, part: str) -> str:
        """The end of the released text (before ``part``), up to ``overlap_chars``,
        starting at a sentence start where one is in reach, else at a word."""
        released = (
            self.released[: len(self.released) - len(part)]
            if self.mode == "async"
            else (self.released)
        )
        if not self.overlap_chars or not released:
            return ""
        tail = released[-self.overlap_chars :]
        if len(tail) < len(released):
            first = _SENTENCE_END.search(tail)
            if first is not None and tail[first.end() :].strip():
                tail = tail[first.end() :]
            else:
                space = tail.find(" ")
                tail = tail[space + 1 :] if space >= 0 else tail
        return tail

    async def _release(self, cut: int) -> Release | None:
        part, rest = self.pending[:cut], self.pending[cut:]
        verdict = await self._checked(self._context(part) + part)
        if verdict.blocked:
            self.pending = ""
            return None
        self.pending = rest
        self.released += part
        return Release(part, verdict)


# A sentence ends at . ! ? ; or : followed by white space (which must have arrived, so
# "3.5" and "e.g" mid-stream do not cut), or at a line break.
_SENTENCE_END = re.compile(r"[.!?;:]+[\"')\]]*\s+|\n+")
