"""Which tokens a conversation teaches: assistant content and its <|end|>, nothing else."""

from __future__ import annotations

from typing import Any

import pytest

from finetune.conversation import END_OF_TURN, PHI3_CHAT_TEMPLATE, Conversation, Message, Role
from finetune.demo import build_tokenizer
from finetune.training.encoding import (
    IGNORE_INDEX,
    ChatEncodingError,
    EncodedExample,
    encode_conversation,
)

# The chat template of microsoft/Phi-3-mini-4k-instruct's tokenizer_config.json: like
# PHI3_CHAT_TEMPLATE, but it closes a conversation with eos (<|endoftext|>).
HUB_PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

CORPUS = [
    "You are a support assistant for the console.",
    "How do I reset the controller? Hold the pair button for five seconds.",
    "What does error E-12 mean? The disc cannot be read; clean it and try again.",
    "Thanks! You are welcome. assistant user system",
] * 5


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer(CORPUS, vocab_size=400, model_max_length=512)


def conversation(*messages: tuple[Role, str, int | None]) -> Conversation:
    return Conversation(
        line=1,
        messages=tuple(
            Message(role=role, content=text, weight=weight) for role, text, weight in messages
        ),
    )


SYSTEM = (Role.SYSTEM, "You are a support assistant for the console.", None)
Q1 = (Role.USER, "How do I reset the controller?", None)
A1 = (Role.ASSISTANT, "Hold the pair button for five seconds.", None)
Q2 = (Role.USER, "What does error E-12 mean?", None)
A2_SKIPPED = (Role.ASSISTANT, "I do not know.", 0)
Q3 = (Role.USER, "Thanks!", None)
A3 = (Role.ASSISTANT, "You are welcome.", 1)


def learned_spans(tokenizer: Any, example: EncodedExample) -> list[str]:
    """The learned tokens, decoded run by run."""
    spans: list[list[int]] = []
    previous = False
    for token, label in zip(example.input_ids, example.labels, strict=True):
        learned = label != IGNORE_INDEX
        if learned:
            assert label == token
            if not previous:
                spans.append([])
            spans[-1].append(token)
        previous = learned
    return [tokenizer.decode(span) for span in spans]


def test_only_assistant_content_and_its_end_token_are_learned(tokenizer: Any) -> None:
    example = encode_conversation(
        tokenizer, conversation(SYSTEM, Q1, A1, Q2, A2_SKIPPED, Q3, A3), max_length=512
    )
    assert example is not None
    assert learned_spans(tokenizer, example) == [
        "Hold the pair button for five seconds.<|end|>",
        "You are welcome.<|end|>",
    ]
    assert example.dropped_messages == 0
    assert example.attention_mask == [1] * len(example)
    expected_text = (
        "<|system|>\nYou are a support assistant for the console.<|end|>\n"
        "<|user|>\nHow do I reset the controller?<|end|>\n"
        "<|assistant|>\nHold the pair button for five seconds.<|end|>\n"
        "<|user|>\nWhat does error E-12 mean?<|end|>\n"
        "<|assistant|>\nI do not know.<|end|>\n"
        "<|user|>\nThanks!<|end|>\n"
        "<|assistant|>\nYou are welcome.<|end|>\n"
    )
    assert tokenizer.decode(example.input_ids) == expected_text


def test_end_of_turn_is_one_learned_token_and_the_newline_after_it_is_not(tokenizer: Any) -> None:
    example = encode_conversation(tokenizer, conversation(Q1, A1), max_length=512)
    assert example is not None
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    positions = [i for i, token in enumerate(example.input_ids) if token == end]
    user_end, assistant_end = positions
    assert example.labels[user_end] == IGNORE_INDEX
    assert example.labels[assistant_end] == end
    assert example.labels[assistant_end + 1 :] == [IGNORE_INDEX]  # the final "\n"
    header = tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert example.labels[example.input_ids.index(header)] == IGNORE_INDEX


def test_a_tokenizer_without_template_gets_phi3s(tokenizer: Any) -> None:
    messages = conversation(SYSTEM, Q1, A1)
    with_template = encode_conversation(tokenizer, messages, max_length=512)
    bare = build_tokenizer(CORPUS, vocab_size=400, model_max_length=512)
    bare.chat_template = None
    without = encode_conversation(bare, messages, max_length=512)
    assert with_template == without
    assert tokenizer.chat_template == PHI3_CHAT_TEMPLATE


def test_the_hub_phi3_template_trailing_eos_is_not_learned(tokenizer: Any) -> None:
    hub = build_tokenizer(CORPUS, vocab_size=400, model_max_length=512)
    hub.chat_template = HUB_PHI3_TEMPLATE
    hub.eos_token = "<|endoftext|>"  # as in Phi-3-mini's tokenizer
    example = encode_conversation(hub, conversation(SYSTEM, Q1, A1), max_length=512)
    assert example is not None
    assert example.input_ids[-1] == hub.convert_tokens_to_ids("<|endoftext|>")
    assert example.labels[-1] == IGNORE_INDEX
    assert learned_spans(hub, example) == ["Hold the pair button for five seconds.<|end|>"]


def test_an_answer_that_also_appears_in_the_question_is_found_in_the_right_place(
    tokenizer: Any,
) -> None:
    echo = (Role.USER, "assistant", None)
    answer = (Role.ASSISTANT, "assistant", None)
    example = encode_conversation(tokenizer, conversation(echo, answer), max_length=512)
    assert example is not None
    assert learned_spans(tokenizer, example) == ["assistant<|end|>"]


def test_too_long_loses_leading_turns_but_keeps_the_system_message(tokenizer: Any) -> None:
    messages = conversation(SYSTEM, Q1, A1, Q2, A2_SKIPPED, Q3, A3)
    full = encode_conversation(tokenizer, messages, max_length=512)
    last_exchange = encode_conversation(tokenizer, conversation(SYSTEM, Q3, A3), max_length=512)
    assert full is not None
    assert last_exchange is not None
    example = encode_conversation(tokenizer, messages, max_length=len(full) - 1)
    assert example is not None
    assert example.dropped_messages == 2  # Q1 and A1; the kept part starts at a user turn
    text = tokenizer.decode(example.input_ids)
    assert text.startswith("<|system|>\nYou are a support assistant")
    assert "<|user|>\nWhat does error E-12 mean?" in text
    assert "reset the controller" not in text
    shortest = encode_conversation(tokenizer, messages, max_length=len(last_exchange))
    assert shortest == EncodedExample(
        input_ids=last_exchange.input_ids,
        labels=last_exchange.labels,
        attention_mask=last_exchange.attention_mask,
        dropped_messages=4,
    )


def test_an_example_whose_last_exchange_does_not_fit_is_dropped(tokenizer: Any) -> None:
    messages = conversation(SYSTEM, Q1, A1)
    full = encode_conversation(tokenizer, messages, max_length=512)
    assert full is not None
    assert encode_conversation(tokenizer, messages, max_length=len(full) - 1) is None


def test_history_is_not_cut_down_to_turns_that_teach_nothing(tokenizer: Any) -> None:
    messages = conversation(Q1, A1, Q2, A2_SKIPPED)
    full = encode_conversation(tokenizer, messages, max_length=512)
    assert full is not None
    assert full.learned_tokens > 0
    # Dropping Q1/A1 would leave only the weight-0 answer: nothing to learn, so dropped.
    assert encode_conversation(tokenizer, messages, max_length=len(full) - 1) is None


def test_a_template_that_does_not_close_answers_with_end_is_refused(tokenizer: Any) -> None:
    odd = build_tokenizer(CORPUS, vocab_size=400, model_max_length=512)
    odd.chat_template = (
        "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}"
        "{% endfor %}"
    )
    with pytest.raises(ChatEncodingError, match="Phi-3's format"):
        encode_conversation(odd, conversation(Q1, A1), max_length=512)


def test_max_length_must_leave_room(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="max_length"):
        encode_conversation(tokenizer, conversation(Q1, A1), max_length=1)
