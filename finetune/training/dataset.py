"""Training data: conversations from files, a seeded validation split, and the
tokenised examples and micro-batches the Trainer reads.

``load_conversations`` returns the conversations of a clean file and raises
``DataError`` naming the bad lines (``finetune.validation`` does the checking).
``encode_all`` tokenises a split (``finetune.training.encoding``) and counts what did
not fit; ``make_collator`` pads a micro-batch or packs it padding-free.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.conversation import Conversation, Role
from finetune.errors import DataError
from finetune.training.encoding import IGNORE_INDEX, EncodedExample, encode_conversation
from finetune.validation import MIN_EXAMPLES, scan_file

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

DEFAULT_VALIDATION_FRACTION = 0.1
DEFAULT_SPLIT_SEED = 42
LOAD_ERROR_LINES = 20  # error lines a DataError message shows before "... and N more"


def load_conversations(path: Path | str, *, min_examples: int = MIN_EXAMPLES) -> list[Conversation]:
    """The conversations of a clean file; ``DataError`` naming the bad lines otherwise."""
    report, conversations = scan_file(path, min_examples=min_examples)
    if not report.ok:
        shown = [str(issue) for issue in report.issues[:LOAD_ERROR_LINES]]
        more = len(report.issues) - len(shown)
        if more:
            shown.append(f"... and {more} more")
        head = (
            f"{path}: {len(report.issues)} error{'' if len(report.issues) == 1 else 's'}; "
            "'safegate finetune validate' lists them"
        )
        raise DataError("\n".join([head, *shown]))
    return conversations


def split_conversations(
    conversations: Sequence[Conversation], *, validation_fraction: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """A seeded (training, validation) split; both keep the file's order.

    With a fraction above 0 and at least 2 examples, validation gets at least one and
    training keeps at least one.
    """
    if not 0.0 <= validation_fraction < 1.0 or math.isnan(validation_fraction):
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    count = len(conversations)
    wanted = 0
    if validation_fraction > 0 and count >= 2:
        wanted = min(max(round(count * validation_fraction), 1), count - 1)
    # Not for security: a reproducible shuffle.
    chosen = set(random.Random(seed).sample(range(count), wanted))  # noqa: S311
    training = [c for i, c in enumerate(conversations) if i not in chosen]
    validation = [c for i, c in enumerate(conversations) if i in chosen]
    return training, validation


def load_splits(
    training: Path | str,
    validation: Path | str | None = None,
    *,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    seed: int = DEFAULT_SPLIT_SEED,
) -> tuple[list[Conversation], list[Conversation]]:
    """Training and validation conversations: from a validation file, or a seeded split."""
    conversations = load_conversations(training)
    if validation is not None:
        return conversations, load_conversations(validation, min_examples=1)
    return split_conversations(conversations, validation_fraction=validation_fraction, seed=seed)


@dataclass
class EncodedSet:
    """Tokenised examples of one split and what happened on the way."""

    examples: list[EncodedExample]
    conversations: int
    truncated: int = 0  # lost leading turns to fit max_seq_length
    dropped: int = 0  # even the last exchange was too long

    @property
    def tokens(self) -> int:
        return sum(len(example) for example in self.examples)


def encode_all(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Iterable[Conversation],
    *,
    max_length: int,
    also_without_system: bool = False,
) -> EncodedSet:
    """Each conversation as an example; with ``also_without_system``, a conversation
    with system messages is a second example without them (counted as examples)."""
    encoded = EncodedSet(examples=[], conversations=0)
    for conversation in conversations:
        encoded.conversations += 1
        variants = [conversation]
        if also_without_system and (bare := without_system(conversation)) is not None:
            variants.append(bare)
        for variant in variants:
            example = encode_conversation(tokenizer, variant, max_length=max_length)
            if example is None:
                encoded.dropped += 1
                continue
            encoded.truncated += example.dropped_messages > 0
            encoded.examples.append(example)
    return encoded


def without_system(conversation: Conversation) -> Conversation | None:
    """The conversation less its system messages; None when it has none."""
    kept = tuple(m for m in conversation.messages if m.role is not Role.SYSTEM)
    if len(kept) == len(conversation.messages):
        return None
    return replace(conversation, messages=kept)


class ExampleDataset:
    """A list of encoded examples as the map-style dataset the Trainer reads."""

    def __init__(self, examples: Sequence[EncodedExample]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        example = self.examples[index]
        return {
            "input_ids": example.input_ids,
            "labels": example.labels,
            "attention_mask": example.attention_mask,
        }


class PaddingCollator:
    """Right-pads a micro-batch to its longest example; padded labels are ignored."""

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        import torch

        longest = max(len(feature["input_ids"]) for feature in features)
        if self.pad_to_multiple_of:
            longest = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
        for feature in features:
            pad = longest - len(feature["input_ids"])
            batch["input_ids"].append(feature["input_ids"] + [self.pad_token_id] * pad)
            batch["labels"].append(feature["labels"] + [IGNORE_INDEX] * pad)
            batch["attention_mask"].append(feature["attention_mask"] + [0] * pad)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


def make_collator(
    tokenizer: PreTrainedTokenizerBase | None, *, packing: bool, attn_implementation: str
) -> Any:
    """Packing: transformers' padding-free collator (one row, position ids restart per
    example, so attention never crosses examples, with sdpa's block mask or flash-attn's
    varlen kernels). Otherwise right padding to the longest example."""
    if packing:
        from transformers import DataCollatorWithFlattening

        return DataCollatorWithFlattening(  # type: ignore[no-untyped-call]
            return_flash_attn_kwargs=attn_implementation == "flash_attention_2"
        )
    pad = getattr(tokenizer, "pad_token_id", None)
    return PaddingCollator(int(pad) if pad is not None else 0)
