"""Training data from files: loading a clean file, the seeded split, both files or one."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.conversation import Conversation, Message, Role
from finetune.errors import DataError
from finetune.training.dataset import load_conversations, load_splits, split_conversations
from tests.finetune.test_validation import SAMPLE, SAMPLE_VALIDATION, good_lines, line, write_lines


def test_load_conversations_raises_data_error_naming_the_lines(tmp_path: Path) -> None:
    lines = [*good_lines(2), b"{", *good_lines(10, 3)]
    lines += [line({"messages": []})] * 25
    path = write_lines(tmp_path / "train.jsonl", lines)
    with pytest.raises(DataError) as raised:
        load_conversations(path)
    message = str(raised.value).splitlines()
    assert message[0] == f"{path}: 26 errors; 'safegate finetune validate' lists them"
    assert message[1].startswith("line 3: not valid JSON")
    assert message[2] == 'line 14: "messages" is empty'
    assert len(message) == 1 + 20 + 1
    assert message[-1] == "... and 6 more"


def test_load_conversations_keeps_lines_roles_and_weights() -> None:
    conversations = load_conversations(SAMPLE)
    first = conversations[0]
    assert first.line == 1
    assert [m.role for m in first.messages] == [Role.SYSTEM, Role.USER, Role.ASSISTANT]
    weighted = next(c for c in conversations if any(m.weight == 0 for m in c.messages))
    assert [m.weight for m in weighted.messages if m.role is Role.ASSISTANT] == [0, None]


def _conversations(count: int) -> list[Conversation]:
    return [
        Conversation(line, (Message(Role.USER, f"q{line}"), Message(Role.ASSISTANT, f"a{line}")))
        for line in range(1, count + 1)
    ]


def test_split_is_seeded_deterministic_and_disjoint() -> None:
    conversations = load_conversations(SAMPLE)
    train, validation = split_conversations(conversations, validation_fraction=0.2, seed=7)
    again = split_conversations(conversations, validation_fraction=0.2, seed=7)
    other = split_conversations(conversations, validation_fraction=0.2, seed=8)
    assert (train, validation) == again
    assert validation != other[1]
    assert len(validation) == 10
    assert len(train) == 39
    assert {c.line for c in train}.isdisjoint({c.line for c in validation})
    assert sorted(c.line for c in train + validation) == list(range(1, 50))
    assert [c.line for c in validation] == sorted(c.line for c in validation)  # file order


@pytest.mark.parametrize(
    ("count", "fraction", "sizes"),
    [(2, 0.01, (1, 1)), (10, 0.0, (10, 0)), (1, 0.5, (1, 0)), (0, 0.5, (0, 0)), (10, 0.99, (1, 9))],
)
def test_split_sizes(count: int, fraction: float, sizes: tuple[int, int]) -> None:
    train, validation = split_conversations(
        _conversations(count), validation_fraction=fraction, seed=0
    )
    assert (len(train), len(validation)) == sizes


@pytest.mark.parametrize("fraction", [-0.1, 1.0, float("nan")])
def test_split_rejects_a_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="validation_fraction"):
        split_conversations(_conversations(4), validation_fraction=fraction, seed=0)


def test_load_splits_uses_the_validation_file_or_a_seeded_split() -> None:
    train, validation = load_splits(SAMPLE, SAMPLE_VALIDATION)
    assert (len(train), len(validation)) == (49, 12)
    train, validation = load_splits(SAMPLE, validation_fraction=0.25, seed=3)
    assert (len(train), len(validation)) == (37, 12)
    assert load_splits(SAMPLE, validation_fraction=0.25, seed=3) == (train, validation)
