"""Streamed completions, checked in small increments before (or, in ``async`` mode, right
after) they reach the client.

Completion check: a whole completion is checked before a byte leaves (non-streaming); a
stream goes through a ``StreamGuard``. In the default ``sync`` mode text is held back until
at least ``increment_chars`` have arrived (cut at the last space, so words stay whole) or a
sentence ends, checked together with the text released just before it (up to
``overlap_chars``, from a sentence start where one is in reach: a phrase cut by a release
edge is still seen whole), and released only if it passes.

A part that fails stops the release there: nothing from it on reaches the client until a
check says so. The held text is checked again, with what follows, at each later sentence
end (or every ``window_chars`` without one); a small part read without the rest of its
sentence can fail where the sentence passes, and then the held text is released. When the
stream ends, the whole completion is checked once, exactly as the unstreamed check reads
it, and that verdict decides: blocked, the stream ends with ``finish_reason:
"content_filter"`` and the held text is withheld; allowed, the held text is released. So a
stream is blocked exactly when the same completion would be blocked unstreamed, and no
text reaches the client that a check has not passed. The price of that parity: a stream
that will be blocked ends when the upstream's answer does, not at its first failing part
(the client waits; nothing leaks). A check that failed and was overruled later is recorded
as annotated, not blocked.

The ``async`` mode (a policy option, Azure's "asynchronous filter") sends text as it
arrives and checks it in the same increments right after; a violation ends the stream.
It is not leak-proof: the failing increment has already been sent.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
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
    held: Verdict | None = None  # the failing check that stopped the release, until decided
    verdicts: list[Verdict] = field(default_factory=list)
    checked_windows: list[str] = field(default_factory=list)
    _unchecked: str = ""
    _held_to: int = 0  # the held text up to here has been checked (and failed)
    _overruled: set[int] = field(default_factory=set)  # failed checks a later one overruled

    @property
    def last_verdict(self) -> Verdict | None:
        return self.verdicts[-1] if self.verdicts else None

    def checks(self) -> list[tuple[str, Verdict]]:
        """Every window checked so far with its verdict, in order; a failed check that a
        later one overruled (its text was released) reads as annotated, not blocked."""
        return [
            (window, _overruled(verdict) if index in self._overruled else verdict)
            for index, (window, verdict) in enumerate(
                zip(self.checked_windows, self.verdicts, strict=True)
            )
        ]

    @property
    def overruled(self) -> int:
        """How many failed checks a later one overruled (text held, then released)."""
        return len(self._overruled)

    async def check_text(self, text: str) -> Verdict:
        """Check text that is not streamed as content (a choice's tool calls) as part of
        this stream: a failure blocks the stream like a failing increment."""
        verdict = await self._checked(text)
        if verdict.blocked:
            self.blocked = verdict
        return verdict

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
                window = await self._checked(self._context(self._unchecked) + self._unchecked)
                self._unchecked = ""
                if window.blocked:
                    self.blocked = window
                    return None
            final = await self._check_whole(self.released) if self.final_check else None
            if final is not None and final.blocked:
                self.blocked = final
            return None
        part, self.pending = self.pending, ""
        verdict: Verdict | None = None
        if part.strip() and (self.held is not None or not self._read_whole(part)):
            verdict = await self._checked(self._context(part) + part)
        whole = self.released + part
        if self.final_check:
            decided = await self._check_whole(whole)
            if decided is not None and decided.blocked:
                verdict = decided
            elif decided is not None:  # the whole completion passes: so does what is held
                self._overrule()
                if verdict is None:
                    verdict = decided
                elif verdict.blocked:
                    verdict = _overruled(verdict)
        if verdict is not None and verdict.blocked:
            self.blocked = verdict  # the completion fails: what is still held is withheld
            return None
        self.released = whole
        return Release(part, verdict) if part else None

    def _read_whole(self, part: str) -> bool:
        """Whether the whole completion is this part alone (the final check reads it)."""
        return self.final_check and not self.released and bool(part)

    async def _check_whole(self, whole: str) -> Verdict | None:
        """The entire completion's verdict (from the last check if it read all of it)."""
        if not whole.strip():
            return None
        if self.checked_windows and self.checked_windows[-1] == whole:
            return self.verdicts[-1]
        return await self._checked(whole)

    async def _checked(self, window: str) -> Verdict:
        verdict = await self.check(window)
        self.verdicts.append(verdict)
        self.checked_windows.append(window)
        return verdict

    def _overrule(self) -> None:
        """The held text passed: the failed checks on it are overruled."""
        self._overruled.update(i for i, v in enumerate(self.verdicts) if v.blocked)
        self.held = None

    async def _feed_async(self, piece: str) -> Release:
        self.released += piece
        self._unchecked += piece
        verdict: Verdict | None = None
        if len(self._unchecked) >= self.increment_chars or _SENTENCE_END.search(piece):
            part, self._unchecked = self._unchecked, ""
            verdict = await self._checked(self._context(part) + part)
            if verdict.blocked:
                self.blocked = verdict
        return Release(piece, verdict)

    def _cut(self) -> int | None:
        """Where the held-back text may be cut for release, if anywhere yet."""
        if self.held is not None:
            return self._recheck_at()
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

    def _recheck_at(self) -> int | None:
        """While text is held: the next point to check it again, with what followed."""
        ends = [m.end() for m in _SENTENCE_END.finditer(self.pending) if m.end() > self._held_to]
        if ends:
            return ends[-1]
        if len(self.pending) - self._held_to >= self.window_chars:
            space = self.pending.rfind(" ")
            return space + 1 if space + 1 > self._held_to else len(self.pending)
        return None

    async def _release(self, cut: int) -> Release | None:
        part, rest = self.pending[:cut], self.pending[cut:]
        verdict = await self._checked(self._context(part) + part)
        if verdict.blocked:
            self.held = verdict  # hold from here: a later check, or the whole one, decides
            self._held_to = cut
            return None
        if self.held is not None:
            self._overrule()
        self.pending = rest
        self.released += part
        return Release(part, verdict)


def _overruled(verdict: Verdict) -> Verdict:
    return replace(
        verdict,
        blocked=False,
        reasons=(
            *verdict.reasons,
            "held back while streaming, then released: the text with what followed passed",
        ),
    )


# A sentence ends at . ! ? ; or : followed by white space (which must have arrived, so
# "3.5" and "e.g" mid-stream do not cut), or at a line break.
_SENTENCE_END = re.compile(r"[.!?;:]+[\"')\]]*\s+|\n+")
