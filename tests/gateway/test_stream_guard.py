"""``StreamGuard`` on its own: where it cuts, what each check reads, what it withholds.
The check is a recording stand-in here; the real engine is exercised in test_chat.py."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.chat import StreamGuard
from gateway.safety.taxonomy import Direction
from gateway.safety.verdict import Verdict


def _verdict(blocked: bool) -> Verdict:
    return Verdict(direction=Direction.COMPLETION, labels={}, azure={}, members=(), blocked=blocked)


def _run(
    pieces: list[str], *, bad: str | None = None, **options: Any
) -> tuple[list[str], StreamGuard]:
    async def check(text: str) -> Verdict:
        return _verdict(bad is not None and bad in text)

    return _run_with(check, pieces, **options)


def _pieces(text: str, size: int = 3) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


SENTENCES = 10_000  # an increment no stream reaches: release at sentence ends only


def test_releases_whole_sentences_and_everything_in_the_end() -> None:
    text = "First sentence here. Second one, a bit longer! Third? Last words without end"
    out, guard = _run(_pieces(text), increment_chars=SENTENCES)
    assert "".join(out) == text
    assert out[:3] == ["First sentence here. ", "Second one, a bit longer! ", "Third? "]
    assert guard.blocked is None


def test_each_check_reads_the_sentences_before_it() -> None:
    text = "One. Two. Three."
    _, guard = _run(_pieces(text, 1), overlap_chars=7, increment_chars=SENTENCES)
    # ... and when the stream ends, the whole completion is checked once more
    assert guard.checked_windows == ["One. ", "One. Two. ", "Two. Three.", text]


def test_no_sentence_end_cuts_at_a_space_once_the_window_is_full() -> None:
    text = "word " * 20
    out, _ = _run(_pieces(text), window_chars=24, increment_chars=SENTENCES)
    assert all(len(part) <= 24 and part.endswith(" ") for part in out[:-1])
    assert "".join(out) == text


def test_a_bad_part_is_withheld_with_everything_after_it() -> None:
    text = "Fine start. Then something bad happens. More text after. And more."
    out, guard = _run(_pieces(text), bad="bad", increment_chars=SENTENCES)
    assert out == ["Fine start. "]
    assert guard.blocked is not None
    assert guard.pending == ""


def test_a_phrase_split_across_releases_is_seen_whole() -> None:
    # "bad thing" spans the cut between two parts: the overlap makes the check see it.
    out, guard = _run(
        ["It is a bad", " thing? Yes.", " Later."],
        bad="bad thing",
        overlap_chars=40,
        increment_chars=SENTENCES,
    )
    assert guard.blocked is not None
    assert "".join(out) == ""


def test_text_is_released_a_few_words_at_a_time() -> None:
    text = "word " * 20
    out, guard = _run(_pieces(text), increment_chars=10)
    assert "".join(out) == text
    assert len(out) >= 8
    assert all(part.endswith(" ") and len(part) >= 10 for part in out[:-1])
    assert guard.blocked is None


def test_a_run_on_sentence_is_cut_before_the_bad_words() -> None:
    text = (
        "sure here is what you asked for and i mean every word of it so listen "
        "i will find you and kill you tonight and nobody will stop me and then"
    )
    out, guard = _run(_pieces(text), bad="kill", increment_chars=12)
    released = "".join(out)
    assert guard.blocked is not None
    assert "kill" not in released
    assert released.startswith("sure here is what you asked for")
    assert text.index("kill") - len(released) < 30  # cut close to the harm, not a sentence early


def test_the_whole_completion_is_checked_when_the_stream_ends() -> None:
    # The two halves are far apart: no increment with its overlap reads both, the final
    # check of the whole completion does, so the stream fails as the unstreamed one would.
    text = "alpha " + "filler words here " * 20 + "omega end"

    async def check(window: str) -> Verdict:
        return _verdict("alpha" in window and "omega" in window)

    async def go() -> tuple[str, StreamGuard]:
        guard = StreamGuard(check=check, increment_chars=12, overlap_chars=30)
        out = []
        for piece in _pieces(text):
            released = await guard.feed(piece)
            if released is not None:
                out.append(released.text)
        final = await guard.flush()
        assert final is None  # the last part is withheld
        return "".join(out), guard

    released, guard = asyncio.run(go())
    assert guard.blocked is not None
    assert guard.checked_windows[-1] == text
    assert "omega" not in released


def test_async_mode_sends_at_once_and_ends_the_stream_at_a_violation() -> None:
    text = "All fine here and then bad words follow and more text after them"
    out, guard = _run(_pieces(text), bad="bad", increment_chars=12, mode="async")
    released = "".join(out)
    assert guard.blocked is not None
    assert "bad" in released  # not leak-proof, by design: the increment was sent first
    assert len(released) < len(text)  # ... but the stream ended there


def test_a_part_that_fails_alone_is_held_and_released_once_its_sentence_passes() -> None:
    # "kill" alone fails; the sentence it is in ("kill the python process") passes.
    async def check(window: str) -> Verdict:
        return _verdict("kill" in window and "process" not in window)

    async def go() -> tuple[list[str], StreamGuard]:
        guard = StreamGuard(check=check, increment_chars=12, overlap_chars=30)
        out = []
        for piece in _pieces("You can kill the python process. Then start it again. "):
            released = await guard.feed(piece)
            if released is not None:
                out.append(released.text)
                if "process" in released.text:
                    assert guard.held is None
        final = await guard.flush()
        if final is not None:
            out.append(final.text)
        return out, guard

    out, guard = asyncio.run(go())
    assert "".join(out) == "You can kill the python process. Then start it again. "
    # "kill ..." waited for its sentence: released in one part with "process", not before
    assert [part for part in out if "kill" in part][0].startswith("kill the python process.")
    assert guard.blocked is None
    held = [v for w, v in guard.checks() if "kill" in w and "process" not in w]
    assert held
    assert all(not v.blocked for v in held)  # recorded as annotated, not blocked
    assert all("held back while streaming" in v.reasons[-1] for v in held)


def test_held_text_is_released_at_the_end_when_the_whole_completion_passes() -> None:
    # The failing part reads fine only with the start of the completion, which is beyond
    # the overlap: no window check passes it, the whole-completion check does. The stream
    # then ends as the unstreamed check decides: allowed, everything released.
    text = "start " + "filler words here " * 10 + "alpha end"

    async def check(window: str) -> Verdict:
        return _verdict("alpha" in window and "start" not in window)

    out, guard = _run_with(check, _pieces(text), increment_chars=12, overlap_chars=30)
    assert "".join(out) == text
    assert out[-1].endswith("alpha end")
    assert guard.blocked is None
    assert guard.checked_windows[-1] == text


def test_held_text_is_withheld_when_the_whole_completion_fails() -> None:
    text = "Fine start here. Then bad words. " + "More after them. " * 3
    out, guard = _run(_pieces(text), bad="bad", increment_chars=12)
    assert "".join(out) == "Fine start here. "
    assert guard.blocked is not None
    assert guard.checked_windows[-1] == text  # the whole completion decided


def _run_with(check: Any, pieces: list[str], **options: Any) -> tuple[list[str], StreamGuard]:
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


def test_async_mode_blocks_when_the_last_part_or_the_whole_fails() -> None:
    text = "All fine here and the words go on and on and then the end is bad"
    out, guard = _run(_pieces(text), bad="bad", increment_chars=1000, mode="async")
    assert "".join(out) == text  # async sends at once: not leak-proof, by design
    assert guard.blocked is not None  # ... but the stream still ends as blocked
