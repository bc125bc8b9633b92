"""``StreamGuard`` on its own: where it cuts, what each check reads, what it withholds.
The check is a recording stand-in here; the real engine is exercised in test_chat.py."""

from __future__ import annotations

import asyncio

from gateway.chat import StreamGuard
from gateway.safety.taxonomy import Direction
from gateway.safety.verdict import Verdict


def _verdict(blocked: bool) -> Verdict:
    return Verdict(direction=Direction.COMPLETION, labels={}, azure={}, members=(), blocked=blocked)


def _run(
    pieces: list[str], *, bad: str | None = None, **options: int
) -> tuple[list[str], StreamGuard]:
    async def check(text: str) -> Verdict:
        return _verdict(bad is not None and bad in text)

    async def go() -> tuple[list[str], StreamGuard]:
        guard = StreamGuard(check=check, **options)
        out: list[str] = []
        for piece in pieces:
            released = await guard.feed(piece)
            if released is not None:
                out.append(released.text)
        final = await guard.flush()
        if final is not None:
            out.append(final.text)
        return out, guard

    return asyncio.run(go())


def _pieces(text: str, size: int = 3) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def test_releases_whole_sentences_and_everything_in_the_end() -> None:
    text = "First sentence here. Second one, a bit longer! Third? Last words without end"
    out, guard = _run(_pieces(text))
    assert "".join(out) == text
    assert out[:3] == ["First sentence here. ", "Second one, a bit longer! ", "Third? "]
    assert guard.blocked is None


def test_each_check_reads_the_sentences_before_it() -> None:
    text = "One. Two. Three."
    _, guard = _run(_pieces(text, 1), overlap_chars=7)
    assert guard.checked_windows == ["One. ", "One. Two. ", "Two. Three."]


def test_no_sentence_end_cuts_at_a_space_once_the_window_is_full() -> None:
    text = "word " * 20
    out, _ = _run(_pieces(text), window_chars=24)
    assert all(len(part) <= 24 and part.endswith(" ") for part in out[:-1])
    assert "".join(out) == text


def test_a_bad_part_is_withheld_with_everything_after_it() -> None:
    text = "Fine start. Then something bad happens. More text after. And more."
    out, guard = _run(_pieces(text), bad="bad")
    assert out == ["Fine start. "]
    assert guard.blocked is not None
    assert guard.pending == ""


def test_a_phrase_split_across_releases_is_seen_whole() -> None:
    # "bad thing" spans the cut between two parts: the overlap makes the check see it.
    out, guard = _run(["It is a bad", " thing? Yes.", " Later."], bad="bad thing", overlap_chars=40)
    assert guard.blocked is not None
    assert "".join(out) == ""
