"""Checking a chat-completion JSONL file for fine-tuning, line by line.

Each line is ``{"messages": [{"role": ..., "content": ..., "weight": 0|1?}, ...]}``, the
shape Azure AI Foundry and OpenAI fine-tuning take. ``validate_file`` checks a file and
returns a ``ValidationReport``; it never raises on bad content. ``scan_file`` returns the
report with the valid conversations (``finetune.training.dataset.load_conversations``
reads training data through it).

What is an error (the file cannot be trained on as it is) and what is a warning (it can,
but probably not the way the author meant):

==========================================================  =======
check                                                       kind
==========================================================  =======
file missing, a directory, unreadable, over MAX_FILE_BYTES  error
line over MAX_LINE_BYTES, not UTF-8, not JSON, not object   error
``messages`` missing, not a list, empty                     error
role unknown, or ``tool`` (Phi-3's chat format has none)    error
content missing, not a string, blank                        error
``weight`` not 0/1, or on a non-assistant message           error
no assistant message; last message not from the assistant   error
every assistant message has weight 0 (nothing to learn)     error
fewer than MIN_EXAMPLES valid examples                      error
blank line (skipped, as the gateway's JSONL reader does)    warning
unknown keys (ignored by training)                          warning
system message not first; user/assistant not alternating    warning
duplicate example (counted)                                 warning
example longer than max_seq_length (counted and named)      warning
==========================================================  =======

Phi-3's template renders any order of turns, so alternation is a warning, not an error.
A UTF-8 byte-order mark at the start of the file is accepted. Lengths are tokens of the
conversation rendered with the tokenizer's chat template (``PHI3_CHAT_TEMPLATE`` when it
has none); without a tokenizer they are characters of content, and "too long" is an
estimate at CHARS_PER_TOKEN_ESTIMATE characters a token. Messages quote no content:
reports name lines, message positions, keys and types, never what a user wrote.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from finetune.conversation import (
    END_OF_TURN,
    PHI3_ROLES,
    Conversation,
    Message,
    Role,
    as_dicts,
    render_phi3,
)

MIN_EXAMPLES = 10  # Azure's minimum for a training file
DEFAULT_MAX_SEQ_LENGTH = 4096  # Phi-3-mini-4k's context
MAX_FILE_BYTES = 512 * 1024 * 1024  # Azure's limit for a training file
MAX_LINE_BYTES = 8 * 1024 * 1024  # one example; longer lines are reported, never parsed
CHARS_PER_TOKEN_ESTIMATE = 4  # English text, Llama-style tokenizers; only without a tokenizer
PREVIEW_CHARS = 40  # how much of a bad role or key a message quotes
SCHEMA_VERSION = 1

TOP_LEVEL_KEYS = frozenset({"messages"})
MESSAGE_KEYS = frozenset({"role", "content", "weight"})
UTF8_BOM = b"\xef\xbb\xbf"
_ROLE_NAMES = frozenset(role.value for role in Role)
_READ_CHUNK = 1024 * 1024


class ChatTokenizer(Protocol):
    """What validation needs of a tokenizer (any ``transformers`` tokenizer fits)."""

    chat_template: str | None

    def encode(self, text: str, *, add_special_tokens: bool = ...) -> list[int]: ...

    def apply_chat_template(
        self, conversation: list[dict[str, Any]], *, tokenize: bool = ..., **kwargs: Any
    ) -> Any: ...


@dataclass(frozen=True, slots=True)
class ValidationIssue:
    line: int | None  # None: the file as a whole
    message: str

    def __str__(self) -> str:
        return self.message if self.line is None else f"line {self.line}: {self.message}"


@dataclass(frozen=True, slots=True)
class LengthStats:
    """Lengths of the valid examples, in ``unit`` (tokens, or characters of content)."""

    unit: str
    total: int
    minimum: int
    mean: float
    maximum: int
    assistant: int  # in the assistant messages that are learned (weight absent or 1)


@dataclass(frozen=True, slots=True)
class ValidationSummary:
    lines: int
    examples: int  # non-blank lines
    valid_examples: int
    messages_by_role: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    too_long: int = 0
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH
    tokens_counted: bool = False
    lengths: LengthStats | None = None


@dataclass(frozen=True, slots=True)
class ValidationReport:
    path: str
    sha256: str | None
    issues: tuple[ValidationIssue, ...]  # errors: the file cannot be trained on
    warnings: tuple[ValidationIssue, ...]
    summary: ValidationSummary

    @property
    def ok(self) -> bool:
        return not self.issues

    def format(self) -> str:
        """Plain text lines for people: errors, warnings (each ``line N: ...``), a summary."""
        out: list[str] = []
        if self.issues:
            out.append(f"{_plural(len(self.issues), 'error')}:")
            out.extend(str(issue) for issue in self.issues)
        if self.warnings:
            out.append(f"{_plural(len(self.warnings), 'warning')}:")
            out.extend(str(warning) for warning in self.warnings)
        out.extend(f"{name}: {value}" for name, value in self.summary_rows())
        return "\n".join(out)

    def summary_rows(self) -> list[tuple[str, str]]:
        """The summary as (name, value) rows, for ``format`` and the CLI's table."""
        s = self.summary
        unit = "tokens" if s.tokens_counted else "characters"
        roles = ", ".join(f"{role} {count}" for role, count in s.messages_by_role.items())
        estimated = "" if s.tokens_counted else ", estimated"
        rows = [
            ("file", self.path),
            ("status", "ok" if self.ok else "error"),
            ("examples", f"{s.examples} ({s.valid_examples} valid)"),
            ("errors", str(len(self.issues))),
            ("warnings", str(len(self.warnings))),
            ("messages", roles or "none"),
            ("duplicates", str(s.duplicates)),
            (f"too long (> {s.max_seq_length} tokens{estimated})", str(s.too_long)),
        ]
        if s.lengths is not None:
            lengths = s.lengths
            rows += [
                (f"{unit}: total", str(lengths.total)),
                (
                    f"{unit}: per example",
                    f"min {lengths.minimum}, mean {lengths.mean:.1f}, max {lengths.maximum}",
                ),
                (f"{unit}: learned assistant", str(lengths.assistant)),
            ]
        if not s.tokens_counted:
            rows.append(("tokens", "not counted (no tokenizer)"))
        if self.sha256:
            rows.append(("sha256", self.sha256))
        return rows

    def to_dict(self) -> dict[str, Any]:
        s = self.summary
        return {
            "schema_version": SCHEMA_VERSION,
            "status": "ok" if self.ok else "error",
            "error": None if self.ok else f"{_plural(len(self.issues), 'error')} in {self.path}",
            "path": self.path,
            "sha256": self.sha256,
            "errors": [{"line": i.line, "message": i.message} for i in self.issues],
            "warnings": [{"line": w.line, "message": w.message} for w in self.warnings],
            "summary": {
                "lines": s.lines,
                "examples": s.examples,
                "valid_examples": s.valid_examples,
                "messages_by_role": dict(s.messages_by_role),
                "duplicates": s.duplicates,
                "too_long": s.too_long,
                "max_seq_length": s.max_seq_length,
                "tokens_counted": s.tokens_counted,
                "lengths": None
                if s.lengths is None
                else {
                    "unit": s.lengths.unit,
                    "total": s.lengths.total,
                    "min": s.lengths.minimum,
                    "mean": round(s.lengths.mean, 3),
                    "max": s.lengths.maximum,
                    "assistant": s.lengths.assistant,
                },
            },
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=False)


def validate_file(
    path: Path | str,
    *,
    tokenizer: ChatTokenizer | None = None,
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
    min_examples: int = MIN_EXAMPLES,
) -> ValidationReport:
    """Check a chat-completion JSONL file. Never raises on bad content; see the module doc."""
    return scan_file(
        path, tokenizer=tokenizer, max_seq_length=max_seq_length, min_examples=min_examples
    )[0]


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def count_tokens(messages: Sequence[Message], tokenizer: ChatTokenizer) -> int:
    """Tokens of a conversation rendered with the tokenizer's chat template, or Phi-3's."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(as_dicts(messages), tokenize=False)
    else:
        text = render_phi3(messages)
    if not isinstance(text, str):
        raise TypeError(f"the chat template returned {type(text).__name__}, not text")
    return len(tokenizer.encode(text, add_special_tokens=False))


# -- the scan ---------------------------------------------------------------------------


@dataclass
class _Tally:
    lines: int = 0
    examples: int = 0
    issues: list[ValidationIssue] = field(default_factory=list)
    warnings: list[ValidationIssue] = field(default_factory=list)
    conversations: list[Conversation] = field(default_factory=list)
    roles: Counter[str] = field(default_factory=Counter)
    lengths: list[int] = field(default_factory=list)
    assistant_length: int = 0
    seen: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    too_long: int = 0

    def error(self, line: int | None, message: str) -> None:
        self.issues.append(ValidationIssue(line, message))

    def warn(self, line: int | None, message: str) -> None:
        self.warnings.append(ValidationIssue(line, message))


def scan_file(
    path: Path | str,
    *,
    tokenizer: ChatTokenizer | None = None,
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
    min_examples: int = MIN_EXAMPLES,
) -> tuple[ValidationReport, list[Conversation]]:
    """The report on a file and the conversations of its valid lines, in file order."""
    path = Path(path)
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be at least 1, got {max_seq_length}")
    tally = _Tally()
    sha256: str | None = None
    problem = _file_problem(path)
    if problem is None:
        try:
            with path.open("rb") as handle:
                for number, raw in enumerate(_physical_lines(handle), start=1):
                    tally.lines = number
                    _check_line(
                        tally, number, raw, tokenizer=tokenizer, max_seq_length=max_seq_length
                    )
            sha256 = file_sha256(path)
        except OSError as error:
            problem = f"cannot read {path}: {error.strerror or error}"
    if problem is not None:
        tally = _Tally()
        tally.error(None, problem)
    elif len(tally.conversations) < min_examples:
        tally.error(
            None,
            f"{_plural(len(tally.conversations), 'valid example')}; "
            f"fine-tuning needs at least {min_examples}",
        )
    report = ValidationReport(
        path=str(path),
        sha256=sha256,
        issues=tuple(tally.issues),
        warnings=tuple(tally.warnings),
        summary=ValidationSummary(
            lines=tally.lines,
            examples=tally.examples,
            valid_examples=len(tally.conversations),
            messages_by_role={role: tally.roles[role] for role in Role if tally.roles[role]},
            duplicates=tally.duplicates,
            too_long=tally.too_long,
            max_seq_length=max_seq_length,
            tokens_counted=tokenizer is not None,
            lengths=_length_stats(tally, tokens=tokenizer is not None),
        ),
    )
    return report, tally.conversations


def _file_problem(path: Path) -> str | None:
    try:
        if not path.exists():
            return f"no such file: {path}"
        if path.is_dir():
            return f"{path} is a directory, not a JSONL file"
        size = path.stat().st_size
    except OSError as error:
        return f"cannot read {path}: {error.strerror or error}"
    if size > MAX_FILE_BYTES:
        return f"{path} is {size} bytes; the limit is {MAX_FILE_BYTES} bytes"
    return None


def _physical_lines(handle: BinaryIO) -> Iterator[bytes | None]:
    """Lines split on ``\\n`` only (JSON strings may hold U+2028); None for an over-long line."""
    while chunk := handle.readline(MAX_LINE_BYTES + 1):
        if len(chunk) > MAX_LINE_BYTES and not chunk.endswith(b"\n"):
            while chunk and not chunk.endswith(b"\n"):
                chunk = handle.readline(_READ_CHUNK)
            yield None
        else:
            yield chunk


def _check_line(
    tally: _Tally,
    number: int,
    raw: bytes | None,
    *,
    tokenizer: ChatTokenizer | None,
    max_seq_length: int,
) -> None:
    if raw is None:
        tally.examples += 1
        tally.error(number, f"longer than {MAX_LINE_BYTES} bytes")
        return
    raw = raw.removesuffix(b"\n").removesuffix(b"\r")
    if number == 1:
        raw = raw.removeprefix(UTF8_BOM)
    if not raw.strip():
        tally.warn(number, "empty line (skipped)")
        return
    tally.examples += 1
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        tally.error(
            number, f"not valid UTF-8 (byte 0x{raw[error.start]:02x} at byte {error.start + 1})"
        )
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        tally.error(number, f"not valid JSON: {error.msg} at column {error.colno}")
        return
    except RecursionError:
        tally.error(number, "not valid JSON: nested too deeply")
        return
    except ValueError as error:  # e.g. an integer longer than Python converts
        tally.error(number, f"not valid JSON: {str(error).split(':')[0][:100]}")
        return
    errors: list[str] = []
    warnings: list[str] = []
    conversation = _conversation(value, number, errors, warnings)
    for message in warnings:
        tally.warn(number, message)
    if conversation is None or errors:
        for message in errors:
            tally.error(number, message)
        return
    try:
        length, assistant = _lengths(conversation, tokenizer)
    except Exception as error:  # a tokenizer's template may raise anything; report, not crash
        tally.error(number, f"could not count tokens: {type(error).__name__}: {error}"[:200])
        return
    _record(tally, conversation, length, assistant, max_seq_length, tokens=tokenizer is not None)


def _record(
    tally: _Tally,
    conversation: Conversation,
    length: int,
    assistant: int,
    max_seq_length: int,
    *,
    tokens: bool,
) -> None:
    line = conversation.line
    key = hashlib.sha256(
        json.dumps(as_dicts(conversation.messages, weights=True), sort_keys=True).encode()
    ).hexdigest()
    if key in tally.seen:
        tally.duplicates += 1
        tally.warn(line, f"duplicate of line {tally.seen[key]}")
    else:
        tally.seen[key] = line
    if tokens and length > max_seq_length:
        tally.too_long += 1
        tally.warn(line, f"{length} tokens, longer than max_seq_length {max_seq_length}")
    elif not tokens and length > max_seq_length * CHARS_PER_TOKEN_ESTIMATE:
        tally.too_long += 1
        estimate = math.ceil(length / CHARS_PER_TOKEN_ESTIMATE)
        tally.warn(
            line,
            f"{length} characters, about {estimate} tokens, longer than max_seq_length "
            f"{max_seq_length} (count exactly with --base)",
        )
    tally.conversations.append(conversation)
    tally.roles.update(message.role.value for message in conversation.messages)
    tally.lengths.append(length)
    tally.assistant_length += assistant


def _conversation(
    value: object, line: int, errors: list[str], warnings: list[str]
) -> Conversation | None:
    if not isinstance(value, dict):
        errors.append(f'expected a JSON object with a "messages" list, got {_json_type(value)}')
        return None
    for key in value:
        if key not in TOP_LEVEL_KEYS:
            warnings.append(f"key {_preview(key)} is ignored")
    if "messages" not in value:
        errors.append('missing "messages"')
        return None
    raw_messages = value["messages"]
    if not isinstance(raw_messages, list):
        errors.append(f'"messages" must be a list, got {_json_type(raw_messages)}')
        return None
    if not raw_messages:
        errors.append('"messages" is empty')
        return None
    messages = [
        _message(raw, position, errors, warnings)
        for position, raw in enumerate(raw_messages, start=1)
    ]
    known = [message for message in messages if message is not None]
    if len(known) < len(messages):
        return None  # a message was unusable; its error says why
    assistants = [message for message in known if message.role is Role.ASSISTANT]
    if not assistants:
        errors.append("no assistant message")
    elif known[-1].role is not Role.ASSISTANT:
        errors.append(f"the last message must be from the assistant, not the {known[-1].role}")
    if assistants and all(message.weight == 0 for message in assistants):
        errors.append("every assistant message has weight 0; there is nothing to learn")
    order = _order_warning(known)
    if order:
        warnings.append(order)
    return Conversation(line=line, messages=tuple(known))


def _message(raw: object, position: int, errors: list[str], warnings: list[str]) -> Message | None:
    where = f"message {position}"
    if not isinstance(raw, dict):
        errors.append(
            f'{where}: expected an object with "role" and "content", got {_json_type(raw)}'
        )
        return None
    for key in raw:
        if key not in MESSAGE_KEYS:
            warnings.append(f"{where}: key {_preview(key)} is ignored")
    found = len(errors)
    role: Role | None = None
    if "role" not in raw:
        errors.append(f'{where}: missing "role"')
    elif not isinstance(raw["role"], str) or raw["role"] not in _ROLE_NAMES:
        names = ", ".join(PHI3_ROLES)
        errors.append(f"{where}: role {_preview(raw['role'])} is not one of {names}")
    elif Role(raw["role"]) not in PHI3_ROLES:
        errors.append(
            f"{where}: role {_preview(raw['role'])} is not supported by Phi-3's chat format "
            f"({', '.join(PHI3_ROLES)})"
        )
    else:
        role = Role(raw["role"])
    content = raw.get("content")
    if "content" not in raw:
        errors.append(f'{where}: missing "content"')
    elif not isinstance(content, str):
        errors.append(f'{where}: "content" must be a string, got {_json_type(content)}')
    elif not content.strip():
        errors.append(f'{where}: "content" is empty')
    weight = raw.get("weight")
    if "weight" in raw:
        if role is not None and role is not Role.ASSISTANT:
            errors.append(f'{where}: "weight" is only allowed on assistant messages')
        elif isinstance(weight, bool) or weight not in (0, 1) or not isinstance(weight, int):
            errors.append(f'{where}: "weight" must be 0 or 1, got {_preview(weight)}')
    if len(errors) > found or role is None or not isinstance(content, str):
        return None
    return Message(role=role, content=content, weight=weight if isinstance(weight, int) else None)


def _order_warning(messages: Sequence[Message]) -> str | None:
    """Phi-3 is trained on an optional system message, then user and assistant in turn."""
    expected = Role.USER
    for position, message in enumerate(messages, start=1):
        if message.role is Role.SYSTEM:
            if position > 1:
                return f"message {position}: a system message after the first message"
            continue
        if message.role is not expected:
            if position > 1 and messages[position - 2].role is message.role:
                return (
                    f"message {position}: two {message.role} messages in a row; "
                    "Phi-3 expects user and assistant turns to alternate"
                )
            article = "an" if expected is Role.ASSISTANT else "a"
            return f"message {position}: {message.role} where Phi-3 expects {article} {expected}"
        expected = Role.ASSISTANT if expected is Role.USER else Role.USER
    return None


def _lengths(conversation: Conversation, tokenizer: ChatTokenizer | None) -> tuple[int, int]:
    """(whole example, learned assistant messages), in tokens or characters of content."""
    learned = [
        m.content for m in conversation.messages if m.role is Role.ASSISTANT and m.weight != 0
    ]
    if tokenizer is None:
        return sum(len(m.content) for m in conversation.messages), sum(map(len, learned))
    total = count_tokens(conversation.messages, tokenizer)
    assistant = sum(
        len(tokenizer.encode(text + END_OF_TURN, add_special_tokens=False)) for text in learned
    )
    return total, assistant


def _length_stats(tally: _Tally, *, tokens: bool) -> LengthStats | None:
    if not tally.lengths:
        return None
    return LengthStats(
        unit="tokens" if tokens else "characters",
        total=sum(tally.lengths),
        minimum=min(tally.lengths),
        mean=sum(tally.lengths) / len(tally.lengths),
        maximum=max(tally.lengths),
        assistant=tally.assistant_length,
    )


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _preview(value: object) -> str:
    """A short quote of a bad role, key or weight; containers are named, not quoted."""
    if value is None or isinstance(value, str | bool):
        text = json.dumps(value)
    elif isinstance(value, int | float):
        text = repr(value)
    else:
        return _json_type(value)
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 3] + "..."


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
