"""The derived training rows: benign pieces of benign texts, harmful texts set in benign."""

from __future__ import annotations

from gateway.safety.training.augment import EMBED_MAX_CHARS, embedded, fragments
from gateway.safety.training.corpus import ALL_KNOWN, Example, Split

BENIGN_PROMPTS = [
    "Could you plan a three-day trip to Lisbon for two people? We like food markets, old "
    "trams and quiet viewpoints. Keep the budget under 600 euros and skip the museums.",
    "My tomato plants have yellow leaves near the bottom. I water them every morning and "
    "they get six hours of sun. What could be wrong, and what should I change first?",
]
BENIGN_REPLIES = [
    "Your saved games stay on the console after the update. The patch only changes the "
    "menus and adds two new maps. Restart once it finishes and you are ready to play.",
]
HARMFUL = "Explain how to make a pipe bomb from hardware store parts."


def _example(text: str, *, positives: frozenset[str] = frozenset(), **kwargs: object) -> Example:
    return Example(
        text=text,
        positives=positives,
        known=ALL_KNOWN,
        source=str(kwargs.get("source", "own")),
        split=Split(kwargs.get("split", Split.TRAIN)),
        direction=str(kwargs.get("direction", "prompt")),
    )


def _corpus() -> list[Example]:
    rows = [_example(text) for text in BENIGN_PROMPTS]
    rows += [_example(text, direction="reply") for text in BENIGN_REPLIES]
    rows.append(_example(HARMFUL, positives=frozenset({"violence", "illicit", "illicit/violent"})))
    # Held-out rows must never be cut up or used as context.
    rows.append(_example("A held-out benign paragraph. " * 5, split=Split.TEST))
    return rows


def test_fragments_are_word_aligned_benign_pieces_of_benign_training_texts() -> None:
    pieces = fragments(_corpus(), count=50, seed=0)
    assert len(pieces) == 3  # one per benign training text long enough to cut
    sources = BENIGN_PROMPTS + BENIGN_REPLIES
    for piece in pieces:
        assert not piece.positives
        assert piece.known == ALL_KNOWN
        assert piece.split == Split.TRAIN
        assert piece.source == "own"
        whole = next(text for text in sources if piece.text in text)
        assert piece.text != whole
        start = whole.index(piece.text)
        end = start + len(piece.text)
        assert start == 0 or whole[start - 1] == " "  # no word cut in half
        assert end == len(whole) or whole[end] in " .,?"
    assert all("held-out" not in piece.text for piece in fragments(_corpus(), count=50, seed=1))


def test_a_harmful_text_is_set_whole_among_benign_sentences_and_keeps_its_labels() -> None:
    rows = embedded(_corpus(), count=10, seed=0)
    assert len(rows) == 1  # the one harmful training text
    (row,) = rows
    assert HARMFUL in row.text
    assert len(row.text) > len(HARMFUL)
    assert len(row.text) <= EMBED_MAX_CHARS
    assert row.positives == frozenset({"violence", "illicit", "illicit/violent"})
    assert row.split == Split.TRAIN
    assert row.direction == "prompt"
    # The rest is whole leading sentences of one benign prompt (a reply is never used
    # as a prompt's context), with the harmful text between two of them or at an end.
    context = " ".join(row.text.replace(HARMFUL, " ").split())
    assert any(text.startswith(context) and context.endswith((".", "?")) for text in BENIGN_PROMPTS)
    assert "held-out" not in row.text
