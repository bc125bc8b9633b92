"""Training rows that show the heads text the way the engine reads it at run time.

The corpus holds whole prompts and whole replies, but the engine also scores parts of
texts: the increments of a streamed answer (a few words, cut at a space), the sentence
chunks of a long text, and one window that holds a harmful sentence among benign ones.
Heads that only ever saw whole texts flag benign fragments ("Your saved games stay") and
average a harmful sentence away inside a benign paragraph. Two derived kinds fix that:

- ``fragments``: word-aligned pieces and sentence chunks of benign training texts,
  benign with every label known;
- ``embedded``: a harmful training text placed before, inside or after a benign training
  text of the same direction, with the harmful text's labels.

Both are drawn from the training split only (their sources' dev and test rows stay
unseen), are added to it, and keep their source, so own examples keep their weight.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import replace

from gateway.safety.members.encoder_heads import CHUNK_CHARS, sentence_chunks
from gateway.safety.training.corpus import Example, Split

FRAGMENT_CHARS = (12, 90)  # a streamed increment up to a sentence or two
EMBED_MAX_CHARS = 420  # fits the 128-token window the top blocks are tuned on
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def fragments(examples: Sequence[Example], *, count: int, seed: int) -> list[Example]:
    """Up to ``count`` benign pieces of benign training texts longer than a fragment."""
    rng = random.Random(seed)  # noqa: S311 - data, not secrets
    benign = [
        e
        for e in examples
        if e.split == Split.TRAIN and e.benign and len(e.text) > FRAGMENT_CHARS[1]
    ]
    rng.shuffle(benign)
    pieces: list[Example] = []
    for example in benign:
        if len(pieces) >= count:
            break
        chunks = sentence_chunks(example.text, limit=CHUNK_CHARS)
        piece = rng.choice(chunks) if chunks and rng.random() < 0.5 else _piece(example.text, rng)
        if piece and piece != example.text:
            pieces.append(replace(example, text=piece))
    return pieces


def embedded(examples: Sequence[Example], *, count: int, seed: int) -> list[Example]:
    """Up to ``count`` harmful training texts set inside benign ones of their direction."""
    rng = random.Random(seed + 1)  # noqa: S311 - data, not secrets
    train = [e for e in examples if e.split == Split.TRAIN]
    contexts = {
        direction: [e for e in train if e.direction == direction and e.benign]
        for direction in ("prompt", "reply")
    }
    harmful = [e for e in train if e.positives and len(e.text) <= EMBED_MAX_CHARS // 2]
    rng.shuffle(harmful)
    rows: list[Example] = []
    for example in harmful:
        if len(rows) >= count:
            break
        pool = contexts[example.direction] or contexts["prompt"]
        if not pool:
            break
        room = EMBED_MAX_CHARS - len(example.text) - 2
        context = _sentences_within(rng.choice(pool).text, room)
        if not context:
            continue
        rows.append(replace(example, text=_place(example.text, context, rng)))
    return rows


def _piece(text: str, rng: random.Random) -> str:
    """A word-aligned run of ``FRAGMENT_CHARS`` characters, as a stream increment."""
    length = rng.randint(*FRAGMENT_CHARS)
    start = 0 if rng.random() < 0.5 else rng.randrange(0, max(1, len(text) - length))
    if start:
        space = text.find(" ", start)
        start = space + 1 if space != -1 else 0
    end = text.rfind(" ", start, start + length)
    return text[start:end].strip() if end > start else ""


def _sentences_within(text: str, room: int) -> list[str]:
    """Leading whole sentences of ``text`` that fit ``room`` characters."""
    kept: list[str] = []
    used = 0
    for sentence in filter(None, (part.strip() for part in _SENTENCE_END.split(text))):
        if used + len(sentence) + 1 > room:
            break
        kept.append(sentence)
        used += len(sentence) + 1
    return kept


def _place(harmful: str, context: list[str], rng: random.Random) -> str:
    """``harmful`` before, after or between the sentences of ``context``."""
    at = rng.randint(0, len(context))
    return " ".join([*context[:at], harmful, *context[at:]])
