"""A chat conversation and Phi-3's chat format, shared by validation, training, the demo
tokenizer and serving.

A conversation is what one line of a chat-completion JSONL file holds: messages with a
role, content and, on assistant messages, an optional ``weight`` (0: not learned).

Phi-3-mini-instruct formats a conversation as::

    <|system|>\\n{system}<|end|>\\n<|user|>\\n{question}<|end|>\\n<|assistant|>\\n{answer}<|end|>\\n

and generation stops when the model emits ``<|end|>``. ``PHI3_CHAT_TEMPLATE`` is the
same format as a Jinja chat template, used for tokenizers that do not carry one (the demo
tokenizer) and as the reference the tests check real tokenizers against;
``render_phi3`` renders it without a tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jinja2 import Template


class Role(StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str
    weight: int | None = None  # assistant turns only: 0 = not learned, 1 = learned


@dataclass(frozen=True, slots=True)
class Conversation:
    line: int  # 1-based line number in its file
    messages: tuple[Message, ...]


PHI3_ROLES = (Role.SYSTEM, Role.USER, Role.ASSISTANT)

END_OF_TURN = "<|end|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = ("<|endoftext|>", END_OF_TURN, *ROLE_TOKENS.values())

PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'user', 'assistant'] %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def render_phi3(messages: Sequence[Message]) -> str:
    """A conversation in Phi-3's chat format (``PHI3_CHAT_TEMPLATE``)."""
    return _phi3_template().render(messages=as_dicts(messages), add_generation_prompt=False)


def as_dicts(messages: Sequence[Message], *, weights: bool = False) -> list[dict[str, Any]]:
    """Messages as the ``{"role", "content"}`` dicts chat templates take (``weight`` too)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        item: dict[str, Any] = {"role": message.role.value, "content": message.content}
        if weights and message.weight is not None:
            item["weight"] = message.weight
        out.append(item)
    return out


@lru_cache(maxsize=1)
def _phi3_template() -> Template:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(PHI3_CHAT_TEMPLATE)
