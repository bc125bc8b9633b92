"""Chat JSONL validation on real files: the shipped sample, broken lines, splits, the CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from finetune import validation
from finetune.conversation import SPECIAL_TOKENS, Message, Role, render_phi3
from finetune.errors import DataError
from finetune.settings import get_settings
from finetune.training.dataset import load_conversations
from finetune.validation import MIN_EXAMPLES, count_tokens, file_sha256, validate_file
from safegate.cli import app

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "finetune" / "console_support.jsonl"
SAMPLE_VALIDATION = ROOT / "data" / "finetune" / "console_support_validation.jsonl"
SYSTEM = "You are a helpful support assistant for the Nova X game console."


def example(number: int, **assistant: Any) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Question number {number}?"},
            {"role": "assistant", "content": f"Answer number {number}.", **assistant},
        ]
    }


def line(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(item + b"\n" for item in lines))
    return path


def good_lines(count: int, start: int = 1) -> list[bytes]:
    return [line(example(number)) for number in range(start, start + count)]


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """One token per word or punctuation run, one per Phi-3 special token."""
    vocab = {"[UNK]": 0, **{token: index for index, token in enumerate(SPECIAL_TOKENS, start=1)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend, unk_token="[UNK]", eos_token="<|endoftext|>"
    )


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("SAFEGATE_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


# -- the shipped sample -------------------------------------------------------------------


def test_shipped_sample_validates_clean() -> None:
    for path, count in ((SAMPLE, 49), (SAMPLE_VALIDATION, 12)):
        report = validate_file(path)
        assert report.ok, report.format()
        assert report.warnings == ()
        assert report.summary.valid_examples == count
        assert report.summary.duplicates == 0
        assert report.sha256 == file_sha256(path)


def test_sample_is_a_nova_x_support_set_with_multi_turn_and_weight_zero_turns() -> None:
    conversations = load_conversations(SAMPLE)
    assert len(conversations) == 49
    assert [c.line for c in conversations] == list(range(1, 50))
    for conversation in conversations:
        assert conversation.messages[0].role is Role.SYSTEM
        assert "Nova X" in conversation.messages[0].content
        assert conversation.messages[-1].role is Role.ASSISTANT
    multi_turn = [c for c in conversations if len(c.messages) > 3]
    unlearned = [m for c in conversations for m in c.messages if m.weight == 0]
    assert len(multi_turn) >= 4
    assert len(unlearned) >= 3
    assert all(m.role is Role.ASSISTANT for m in unlearned)
    # facts stay consistent: every answer naming NX-505 talks about overheating
    answers = [m.content for c in conversations for m in c.messages if m.role is Role.ASSISTANT]
    assert all("overheat" in a for a in answers if "NX-505" in a)
    training = {json.dumps(c.messages, default=str) for c in conversations}
    held_out = {json.dumps(c.messages, default=str) for c in load_conversations(SAMPLE_VALIDATION)}
    assert not training & held_out


# -- broken lines, each named by its number -------------------------------------------------

BROKEN = [
    pytest.param(b'{"messages": [', "not valid JSON: Expecting value at column 15", id="bad-json"),
    pytest.param(
        b"[1, 2]", 'expected a JSON object with a "messages" list, got an array', id="array"
    ),
    pytest.param(line({"conversation": []}), 'missing "messages"', id="missing-messages"),
    pytest.param(
        line({"messages": "hi"}), '"messages" must be a list, got a string', id="str-list"
    ),
    pytest.param(line({"messages": []}), '"messages" is empty', id="empty-messages"),
    pytest.param(
        line(
            {
                "messages": [
                    {"role": "robot", "content": "beep"},
                    {"role": "assistant", "content": "x"},
                ]
            }
        ),
        'message 1: role "robot" is not one of system, user, assistant',
        id="bad-role",
    ),
    pytest.param(
        line(
            {"messages": [{"role": "tool", "content": "42"}, {"role": "assistant", "content": "x"}]}
        ),
        'message 1: role "tool" is not supported by Phi-3\'s chat format (system, user, assistant)',
        id="tool-role",
    ),
    pytest.param(
        line(
            {"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "x"}]}
        ),
        'message 1: "content" must be a string, got a number',
        id="non-string-content",
    ),
    pytest.param(
        line(
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]}
        ),
        'message 2: "content" is empty',
        id="empty-content",
    ),
    pytest.param(
        line({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}),
        'message 1: missing "content"',
        id="missing-content",
    ),
    pytest.param(
        line({"messages": ["hello", {"role": "assistant", "content": "x"}]}),
        'message 1: expected an object with "role" and "content", got a string',
        id="message-not-object",
    ),
    pytest.param(
        line(
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                ]
            }
        ),
        "no assistant message",
        id="no-assistant",
    ),
    pytest.param(
        line(
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Bye"},
                ]
            }
        ),
        "the last message must be from the assistant, not the user",
        id="last-from-user",
    ),
    pytest.param(
        line(example(99, weight=2)), 'message 3: "weight" must be 0 or 1, got 2', id="weight-2"
    ),
    pytest.param(
        line(example(99, weight=True)),
        'message 3: "weight" must be 0 or 1, got true',
        id="weight-bool",
    ),
    pytest.param(
        line(
            {
                "messages": [
                    {"role": "user", "content": "Hi", "weight": 1},
                    {"role": "assistant", "content": "Hello"},
                ]
            }
        ),
        'message 1: "weight" is only allowed on assistant messages',
        id="weight-on-user",
    ),
    pytest.param(
        line(example(99, weight=0)),
        "every assistant message has weight 0; there is nothing to learn",
        id="nothing-learned",
    ),
    pytest.param(
        b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',
        "not valid UTF-8 (byte 0xe9 at byte 47)",
        id="invalid-utf8",
    ),
    pytest.param(b"[" * 100_000, "not valid JSON: nested too deeply", id="deep-nesting"),
    pytest.param(
        b"1" * 5000,
        "not valid JSON: Exceeds the limit (4300 digits) for integer string conversion",
        id="huge-number",
    ),
]


@pytest.mark.parametrize(("bad", "message"), BROKEN)
def test_a_broken_line_is_reported_by_number(tmp_path: Path, bad: bytes, message: str) -> None:
    path = write_lines(tmp_path / "train.jsonl", [*good_lines(2), bad, *good_lines(10, start=3)])
    report = validate_file(path)
    assert not report.ok
    assert [str(issue) for issue in report.issues] == [f"line 3: {message}"]
    assert report.summary.examples == 13
    assert report.summary.valid_examples == 12
    assert f"line 3: {message}" in report.format().splitlines()


def test_every_problem_of_a_line_is_reported(tmp_path: Path) -> None:
    bad = {
        "messages": [
            {"role": "user", "content": "Hi", "weight": 0},
            {"role": "narrator", "content": ["Hello"]},
        ]
    }
    path = write_lines(tmp_path / "train.jsonl", [*good_lines(10), line(bad)])
    assert [str(issue) for issue in validate_file(path).issues] == [
        'line 11: message 1: "weight" is only allowed on assistant messages',
        'line 11: message 2: role "narrator" is not one of system, user, assistant',
        'line 11: message 2: "content" must be a string, got an array',
    ]


def test_fewer_than_ten_examples_is_an_error_without_a_line(tmp_path: Path) -> None:
    report = validate_file(write_lines(tmp_path / "train.jsonl", good_lines(MIN_EXAMPLES - 1)))
    assert [str(issue) for issue in report.issues] == [
        "9 valid examples; fine-tuning needs at least 10"
    ]
    assert report.issues[0].line is None
    assert validate_file(tmp_path / "train.jsonl", min_examples=9).ok


def test_bom_crlf_and_line_separators_inside_strings_are_fine(tmp_path: Path) -> None:
    lines = good_lines(10)
    separator = {
        "messages": [
            {"role": "user", "content": "a\u2028b"},  # str.splitlines() would split here
            {"role": "assistant", "content": "ok"},
        ]
    }
    lines[4] = line(separator)
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"".join(item + b"\r\n" for item in lines))
    report = validate_file(path)
    assert report.ok, report.format()
    assert report.warnings == ()
    assert report.summary.valid_examples == 10
    assert load_conversations(path)[4].messages[0].content == "a\u2028b"


def test_blank_lines_and_unknown_keys_are_warnings(tmp_path: Path) -> None:
    named = {
        "id": "x",
        "messages": [
            {"role": "user", "content": "Hi", "name": "kim"},
            {"role": "assistant", "content": "Hello"},
        ],
    }
    path = write_lines(
        tmp_path / "train.jsonl", [*good_lines(5), b"", b"  ", line(named), *good_lines(5, start=6)]
    )
    report = validate_file(path)
    assert report.ok
    assert [str(w) for w in report.warnings] == [
        "line 6: empty line (skipped)",
        "line 7: empty line (skipped)",
        'line 8: key "id" is ignored',
        'line 8: message 1: key "name" is ignored',
    ]
    assert report.summary.examples == 11
    assert [c.line for c in load_conversations(path)][4:7] == [5, 8, 9]


def test_turns_out_of_order_are_warnings_not_errors(tmp_path: Path) -> None:
    twice = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "user", "content": "Hello?"},
            {"role": "assistant", "content": "Hi!"},
        ]
    }
    late_system = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "system", "content": "Be brief."},
            {"role": "assistant", "content": "Hi!"},
        ]
    }
    path = write_lines(tmp_path / "train.jsonl", [*good_lines(10), line(twice), line(late_system)])
    report = validate_file(path)
    assert report.ok
    assert [str(w) for w in report.warnings] == [
        "line 11: message 2: two user messages in a row; "
        "Phi-3 expects user and assistant turns to alternate",
        "line 12: message 2: a system message after the first message",
    ]


def test_missing_file_and_directory_are_one_issue_without_a_line(tmp_path: Path) -> None:
    missing = validate_file(tmp_path / "nope.jsonl")
    assert [(i.line, i.message) for i in missing.issues] == [
        (None, f"no such file: {tmp_path / 'nope.jsonl'}")
    ]
    directory = validate_file(tmp_path)
    assert [str(i) for i in directory.issues] == [f"{tmp_path} is a directory, not a JSONL file"]
    assert directory.summary.examples == 0


def test_an_overlong_line_is_reported_and_the_next_line_still_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(validation, "MAX_LINE_BYTES", 300)
    huge = line(example(2) | {"padding": "x" * 5000})
    path = write_lines(tmp_path / "train.jsonl", [*good_lines(1), huge, *good_lines(10, start=3)])
    report = validate_file(path)
    assert [str(i) for i in report.issues] == ["line 2: longer than 300 bytes"]
    assert report.summary.valid_examples == 11
    with pytest.raises(DataError, match="line 2: longer than 300 bytes"):
        load_conversations(path)


# -- duplicates, lengths, tokens --------------------------------------------------------------


def test_duplicates_are_counted_and_named(tmp_path: Path) -> None:
    lines = good_lines(10)
    path = write_lines(tmp_path / "train.jsonl", [*lines, lines[0], lines[3], lines[0]])
    report = validate_file(path)
    assert report.ok
    assert report.summary.duplicates == 3
    assert [str(w) for w in report.warnings] == [
        "line 11: duplicate of line 1",
        "line 12: duplicate of line 4",
        "line 13: duplicate of line 1",
    ]


def test_tokens_are_counted_with_phi3_format_when_the_tokenizer_has_no_template(
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    messages = (
        Message(Role.SYSTEM, "You are terse."),
        Message(Role.USER, "Hi there"),
        Message(Role.ASSISTANT, "Hello!"),
    )
    assert render_phi3(messages) == (
        "<|system|>\nYou are terse.<|end|>\n"
        "<|user|>\nHi there<|end|>\n"
        "<|assistant|>\nHello!<|end|>\n"
    )
    # <|system|> You are terse . <|end|> <|user|> Hi there <|end|> <|assistant|> Hello ! <|end|>
    assert count_tokens(messages, tiny_tokenizer) == 14
    tiny_tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    # the tokenizer's own template wins: You are terse . Hi there Hello !
    assert count_tokens(messages, tiny_tokenizer) == 8


def test_summary_counts_tokens_and_learned_assistant_tokens(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    two_turns = {
        "messages": [
            {"role": "user", "content": "Which code?"},
            {"role": "assistant", "content": "Which error code do you see?", "weight": 0},
            {"role": "user", "content": "NX-101"},
            {"role": "assistant", "content": "NX-101 means no connection.", "weight": 1},
        ]
    }
    path = write_lines(tmp_path / "train.jsonl", [line(two_turns), *good_lines(9)])
    report = validate_file(path, tokenizer=tiny_tokenizer)
    assert report.ok, report.format()
    lengths = report.summary.lengths
    assert lengths is not None
    assert report.summary.tokens_counted
    assert lengths.unit == "tokens"
    # two_turns: 4 role + 4 end tokens; Which code ? | Which error code do you see ? |
    # NX - 101 | NX - 101 means no connection . -> 8 + 3 + 7 + 3 + 7 = 28
    # each good line: 3 role + 3 end; 12 system words and "." + Question number N ? +
    # Answer number N .
    good = 6 + 13 + 4 + 4
    assert (lengths.minimum, lengths.maximum) == (good, 28)
    assert lengths.total == 28 + 9 * good
    # learned: only the weight-1 answer of two_turns (7 + <|end|>), and each good answer (4 + 1)
    assert lengths.assistant == 8 + 9 * 5
    assert report.summary.messages_by_role == {"system": 9, "user": 11, "assistant": 11}
    assert "tokens: per example: min 27, mean 27.1, max 28" in report.format().splitlines()


def test_too_long_examples_are_counted_and_named(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    long = {
        "messages": [
            {"role": "user", "content": "Tell me everything about storage."},
            {"role": "assistant", "content": "word " * 40},
        ]
    }
    path = write_lines(tmp_path / "train.jsonl", [*good_lines(10), line(long), *good_lines(2, 12)])
    report = validate_file(path, tokenizer=tiny_tokenizer, max_seq_length=30)
    assert report.ok  # too long is a warning: counted and named, not refused
    assert report.summary.too_long == 1
    # 4 special + Tell me everything about storage . (6) + 40 words
    assert [str(w) for w in report.warnings] == [
        "line 11: 50 tokens, longer than max_seq_length 30"
    ]
    assert "too long (> 30 tokens): 1" in report.format().splitlines()


def test_without_a_tokenizer_too_long_is_estimated_from_characters(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "train.jsonl", good_lines(12))
    report = validate_file(path, max_seq_length=20)  # estimate: over 80 characters
    first = load_conversations(path)[0]
    characters = sum(len(m.content) for m in first.messages)
    assert characters > 80
    assert report.summary.too_long == 12
    assert not report.summary.tokens_counted
    assert str(report.warnings[0]) == (
        f"line 1: {characters} characters, about {-(-characters // 4)} tokens, longer than "
        "max_seq_length 20 (count exactly with --base)"
    )
    lengths = report.summary.lengths
    assert lengths is not None
    assert lengths.unit == "characters"
    assert "tokens: not counted (no tokenizer)" in report.format().splitlines()


def test_report_json_is_a_versioned_record(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "train.jsonl", [*good_lines(2), b"{", *good_lines(8, 3)])
    body = json.loads(validate_file(path).to_json())
    assert body["schema_version"] == 1
    assert body["status"] == "error"
    assert body["error"] == f"1 error in {path}"
    assert body["errors"] == [
        {
            "line": 3,
            "message": "not valid JSON: "
            "Expecting property name enclosed in double quotes at column 2",
        }
    ]
    assert body["summary"]["valid_examples"] == 10
    assert body["sha256"] == file_sha256(path)


def test_a_tokenizer_that_fails_is_an_error_on_the_line_not_a_crash(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    tiny_tokenizer.chat_template = "{{ raise_exception('System role not supported') }}"
    report = validate_file(
        write_lines(tmp_path / "t.jsonl", good_lines(10)), tokenizer=tiny_tokenizer
    )
    assert len(report.issues) == 11
    assert str(report.issues[0]).startswith("line 1: could not count tokens: ")
    assert "System role not supported" in str(report.issues[0])


FUZZ_LINES = [
    line({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
    b'{"messages": [{"role": 1, "content": null, "weight": 1e999}]}',
    b'{"messages": {"role": "user"}}',
    b"\xef\xbb\xbf{}",
    b'{"messages": [{"role": "assistant", "content": "x", "weight": NaN}]}',
    b"1" * 5000,
]


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(content=st.lists(st.binary(max_size=60) | st.sampled_from(FUZZ_LINES), max_size=15))
def test_validation_never_raises_on_any_bytes(tmp_path: Path, content: list[bytes]) -> None:
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(content))
    report = validate_file(path)
    assert all(1 <= i.line <= report.summary.lines for i in report.issues if i.line is not None)
    assert report.summary.valid_examples <= report.summary.examples <= report.summary.lines
    assert report.ok == (not report.issues)
    json.loads(report.to_json())
    report.format()


def test_file_sha256_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"abc")
    assert file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# -- the CLI ----------------------------------------------------------------------------------


def invoke(*args: str) -> Any:
    result = CliRunner().invoke(app, ["finetune", "validate", *args])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result


def test_cli_passes_the_shipped_sample(home: Path) -> None:
    result = invoke(str(SAMPLE))
    assert result.exit_code == 0, result.output
    assert "OK:" in result.output
    assert "49 (49 valid)" in result.output
    assert "not counted: pass --base BASE" in result.output


def test_cli_names_the_broken_line_and_exits_1(home: Path) -> None:
    path = write_lines(home / "bad.jsonl", [*good_lines(2), b'{"messages": [', *good_lines(10, 3)])
    result = invoke(str(path))
    assert result.exit_code == 1
    assert "line 3: not valid JSON: Expecting value at column 15" in result.output
    assert "FAILED: 1 error(s)" in result.output


def test_cli_reports_a_missing_file_as_a_usage_error(home: Path) -> None:
    result = invoke(str(home / "nope.jsonl"))
    assert result.exit_code == 2  # a usage error, before any file is read
    assert "does not exist" in " ".join(result.output.replace("│", " ").split())
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_cli_json_report(home: Path) -> None:
    path = write_lines(home / "bad.jsonl", [*good_lines(2), b"[]", *good_lines(10, 3)])
    result = invoke(str(path), "--json")
    assert result.exit_code == 1
    body = json.loads(result.stdout)
    assert body["errors"] == [
        {"line": 3, "message": 'expected a JSON object with a "messages" list, got an array'}
    ]


def test_cli_prints_markup_like_text_literally(home: Path) -> None:
    bad = line(
        {"messages": [{"role": "[/red]", "content": "x"}, {"role": "assistant", "content": "y"}]}
    )
    path = write_lines(home / "bad.jsonl", [bad, *good_lines(10, 2)])
    result = invoke(str(path))
    assert result.exit_code == 1
    assert 'line 1: message 1: role "[/red]" is not one of system, user, assistant' in result.output


def test_cli_counts_tokens_with_a_local_base(
    home: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    tiny_tokenizer.save_pretrained(home / "base")
    result = invoke(str(SAMPLE), "--base", str(home / "base"), "--max-seq-length", "60")
    assert result.exit_code == 0, result.output
    assert "tokens: total" in result.output
    assert "too long (> 60 tokens)" in result.output
    assert "longer than max_seq_length 60" in result.output


def test_cli_resolves_a_registered_base(
    home: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    from finetune.db import Database
    from finetune.registry import ModelKind, ModelRegistry

    tiny_tokenizer.save_pretrained(home / "demo")
    database = Database(get_settings().database)
    database.migrate()
    ModelRegistry(database).register("demo-base", kind=ModelKind.BASE, path=home / "demo")
    database.dispose()
    result = invoke(str(SAMPLE), "--base", "demo-base", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["summary"]["tokens_counted"] is True


def test_cli_explains_a_base_it_cannot_load_offline(home: Path) -> None:
    result = invoke(str(SAMPLE), "--base", "no-such-base")
    assert result.exit_code == 2
    assert "cannot load the tokenizer of base 'no-such-base'" in result.output
    assert "Pass a local folder" in result.output
