"""A conversation as training inputs in Phi-3's chat format (``finetune.conversation``).

``encode_conversation`` puts labels on the content of each learned assistant message
(weight absent or 1) and on the ``<|end|>`` that closes it, so a fine-tuned model learns
to stop; everything else (system and user turns, role headers, newlines, a template's
trailing eos) is ``IGNORE_INDEX``. A template that does not close assistant turns with
``<|end|>`` raises ``ChatEncodingError`` (a ``BaseModelError``: the base's tokenizer is
not Phi-3's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from finetune.conversation import END_OF_TURN, PHI3_CHAT_TEMPLATE, Conversation, Message
from finetune.errors import BaseModelError

IGNORE_INDEX = -100  # label of a token the loss skips (PyTorch's cross-entropy default)


class ChatEncodingError(BaseModelError):
    """The tokenizer's chat template does not render conversations in Phi-3's format."""


@dataclass(frozen=True, slots=True)
class EncodedExample:
    """One conversation as model inputs.

    ``labels`` equal ``input_ids`` on the learned tokens (the content of each assistant
    message whose weight is not 0, and the ``<|end|>`` that closes it) and
    ``IGNORE_INDEX`` everywhere else. ``dropped_messages`` counts the leading messages
    removed to fit ``max_length`` (0: the whole conversation is there).
    """

    input_ids: list[int]
    labels: list[int]
    attention_mask: list[int]
    dropped_messages: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def learned_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


class _Tokenizer(Protocol):
    chat_template: str | None

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...

    def __call__(self, text: str, **kwargs: Any) -> Any: ...


def encode_conversation(
    tokenizer: _Tokenizer, conversation: Conversation, *, max_length: int
) -> EncodedExample | None:
    """Tokenise a conversation in Phi-3's chat format, with labels on what the model learns.

    The text comes from the tokenizer's own chat template (``PHI3_CHAT_TEMPLATE`` when it
    has none); token boundaries come from the tokenizer's offsets, so labels line up with
    exactly the tokens the model sees, whatever merges its vocabulary makes.

    Too long for ``max_length``: whole leading turns are dropped (the system message
    stays; the kept part starts at a user message) until it fits and an assistant
    message is still learned. When even the last exchange does not fit, ``None``: the
    example is dropped, never cut mid-answer (a cut answer would teach the model to
    stop without ``<|end|>``). Callers count both outcomes.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    messages = list(conversation.messages)
    system = [m for m in messages[:1] if m.role == "system"]
    rest = messages[len(system) :]
    starts = [0, *(i for i, m in enumerate(rest) if i > 0 and m.role == "user")]
    for start in starts:
        kept = [*system, *rest[start:]]
        if not any(m.role == "assistant" and m.weight != 0 for m in kept):
            break
        example = _encode(tokenizer, kept, dropped=start)
        if len(example) <= max_length:
            return example
    return None


def _encode(tokenizer: _Tokenizer, messages: list[Message], *, dropped: int) -> EncodedExample:
    text = tokenizer.apply_chat_template(
        [{"role": str(m.role), "content": m.content} for m in messages],
        chat_template=tokenizer.chat_template or PHI3_CHAT_TEMPLATE,
        tokenize=False,
    )
    if not isinstance(text, str):
        raise ChatEncodingError(f"the chat template returned {type(text).__name__}, not text")
    spans = _learned_spans(text, messages)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = list(encoding["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    span = 0
    for index, (start, end) in enumerate(encoding["offset_mapping"]):
        while span < len(spans) and spans[span][1] <= start:
            span += 1
        if span < len(spans) and start < spans[span][1] and end > spans[span][0]:
            labels[index] = input_ids[index]
    return EncodedExample(
        input_ids=input_ids,
        labels=labels,
        attention_mask=[1] * len(input_ids),
        dropped_messages=dropped,
    )


def _learned_spans(text: str, messages: list[Message]) -> list[tuple[int, int]]:
    """Character spans ``content + <|end|>`` of the learned assistant messages, in order.

    Each message's content is looked up after the previous one, as ``content<|end|>`` so
    that a short content never matches inside a role header. A template that leaves out a
    non-assistant message (some drop the system prompt) is fine; one that leaves out an
    assistant message, or does not close it with ``<|end|>``, is not Phi-3's format.
    """
    spans: list[tuple[int, int]] = []
    cursor = 0
    for message in messages:
        found = text.find(message.content + END_OF_TURN, cursor)
        if found < 0:
            if message.role == "assistant":
                raise ChatEncodingError(
                    "the chat template does not render assistant messages as "
                    f"'content{END_OF_TURN}' (Phi-3's format)"
                )
            continue
        cursor = found + len(message.content) + len(END_OF_TURN)
        if message.role == "assistant" and message.weight != 0:
            spans.append((found, cursor))
    return spans
