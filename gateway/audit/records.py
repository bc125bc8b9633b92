"""What the audit store keeps: flagged items and request records, their limits and checks."""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Final, Protocol
from uuid import uuid4

from gateway.origin import EVAL_ORIGIN, is_origin
from gateway.safety.taxonomy import Direction, Severity
from gateway.safety.verdict import Verdict, check_probability

log = logging.getLogger("safegate.audit")

SPOOL_DIRNAME = "audit-spool"
DEFAULT_WRITERS = 4
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_BULK_IDS = 500
MAX_NOTE_CHARS = 2000
EXPORT_PAGE_SIZE = 500
SCHEMA_VERSION = 1

# Column widths. Identifiers past their width are a caller's bug and raise; free-form
# metadata (a model name, a source) is clipped to fit rather than lose the record.
ID_CHARS = 64
REQUEST_ID_CHARS = 64
KEY_ID_CHARS = 128
MODEL_CHARS = 200
SOURCE_CHARS = 64
ROUTE_CHARS = 200
LABEL_CHARS = 64
REASON_CHARS = 1000

ACTIONS: Final = frozenset({"block", "annotate"})
SEVERITIES: Final = frozenset(int(severity) for severity in Severity)
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


class ReviewState(StrEnum):
    UNREVIEWED = "unreviewed"
    TRUE_POSITIVE = "true_positive"
    FALSE_POSITIVE = "false_positive"
    NEEDS_POLICY_CHANGE = "needs_policy_change"


class UsageSource(StrEnum):
    """Where a request's token counts come from."""

    UPSTREAM = "upstream"  # the upstream's (or litellm's) usage report
    COUNTED = "counted"  # safegate counted them with litellm.token_counter


class ReviewLabel(StrEnum):
    """What a reviewer may say about a flagged item."""

    TRUE_POSITIVE = "true_positive"
    FALSE_POSITIVE = "false_positive"
    NEEDS_POLICY_CHANGE = "needs_policy_change"


# -- the records -------------------------------------------------------------------------


def utc_now() -> datetime:
    return datetime.now(UTC)


def _new_id() -> str:
    return uuid4().hex


@dataclass(frozen=True, slots=True)
class FlaggedItem:
    """One flagged text and why it was flagged."""

    request_id: str
    key_id: str
    model: str | None
    direction: Direction
    source: str  # where in the request: "messages[2]", "choices[0]", "input[0]"
    categories: tuple[str, ...]  # flagged label names (categories and shields)
    scores: Mapping[str, float]  # every label's score
    severities: Mapping[str, int]  # Azure category -> 0/2/4/6
    action: str  # "block" | "annotate"
    reasons: tuple[str, ...]
    text: str
    id: str = field(default_factory=_new_id)
    created_at: datetime = field(default_factory=utc_now)
    origin: str | None = None  # what the caller said its traffic is ("eval"); gateway.origin

    def __post_init__(self) -> None:
        _check_id(self.id, what="item id")
        _check_time(self.created_at)
        _check_origin(self.origin)
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {sorted(ACTIONS)}, got {self.action!r}")
        object.__setattr__(self, "direction", Direction(self.direction))
        object.__setattr__(self, "categories", tuple(self.categories))
        object.__setattr__(self, "reasons", tuple(self.reasons))
        scores = {
            str(label): check_probability(score, what=f"score for {label}")
            for label, score in self.scores.items()
        }
        object.__setattr__(self, "scores", MappingProxyType(scores))
        for category, severity in self.severities.items():
            if severity not in SEVERITIES:
                raise ValueError(f"severity for {category} must be 0, 2, 4 or 6, got {severity!r}")
        severities = {str(c): int(s) for c, s in self.severities.items()}
        object.__setattr__(self, "severities", MappingProxyType(severities))

    @property
    def max_severity(self) -> int:
        return max(self.severities.values(), default=0)


def flagged_item(
    verdict: Verdict,
    *,
    text: str,
    request_id: str,
    key_id: str,
    model: str | None,
    source: str,
    origin: str | None = None,
) -> FlaggedItem:
    """The audit record of a flagged verdict; raises ``ValueError`` if nothing was flagged."""
    if not verdict.flagged:
        raise ValueError("the verdict flagged nothing; only flagged texts are audited")
    return FlaggedItem(
        request_id=request_id,
        key_id=key_id,
        model=model,
        direction=verdict.direction,
        source=source,
        categories=tuple(label.value for label in verdict.flagged_labels),
        scores={label.value: result.score for label, result in verdict.labels.items()},
        severities={azure.value: int(result.severity) for azure, result in verdict.azure.items()},
        action="block" if verdict.blocked else "annotate",
        reasons=verdict.reasons,
        text=text,
        origin=origin,
    )


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """Metadata of one filtered request; never its text."""

    request_id: str
    key_id: str
    model: str | None
    route: str
    status: int
    blocked: str | None  # None, "prompt" or "completion"
    categories: tuple[str, ...]  # labels flagged anywhere in the request
    latency_ms: Mapping[str, float]  # per stage: prompt_check, upstream, completion_check, total
    prompt_tokens: int | None  # None: the request never reached the upstream
    completion_tokens: int | None
    stream: bool
    created_at: datetime = field(default_factory=utc_now)
    id: str = field(default_factory=_new_id)
    origin: str | None = None  # what the caller said its traffic is ("eval"); gateway.origin
    usage_source: UsageSource | None = None  # set whenever the token counts are
    cost_usd: float | None = None  # litellm's price of the tokens; None when it has none

    def __post_init__(self) -> None:
        _check_id(self.id, what="request record id")
        _check_time(self.created_at)
        _check_origin(self.origin)
        if self.blocked is not None:
            object.__setattr__(self, "blocked", Direction(self.blocked).value)
        object.__setattr__(self, "categories", tuple(self.categories))
        latency: dict[str, float] = {}
        for stage, value in self.latency_ms.items():
            number = float(value)
            if not math.isfinite(number) or number < 0:
                raise ValueError(f"latency for {stage} must be finite and >= 0, got {value!r}")
            latency[str(stage)] = number
        object.__setattr__(self, "latency_ms", MappingProxyType(latency))
        for name in ("prompt_tokens", "completion_tokens"):
            tokens = getattr(self, name)
            if tokens is not None and tokens < 0:
                raise ValueError(f"{name} must be >= 0, got {tokens!r}")
        if self.usage_source is not None:
            object.__setattr__(self, "usage_source", UsageSource(self.usage_source))
        if self.cost_usd is not None and not (math.isfinite(self.cost_usd) and self.cost_usd >= 0):
            raise ValueError(f"cost_usd must be finite and >= 0, got {self.cost_usd!r}")


class TokenUsage(Protocol):
    """What a request that reached its upstream used (``gateway.chat.metering.Metered``)."""

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def completion_tokens(self) -> int: ...

    @property
    def source(self) -> UsageSource: ...

    @property
    def cost_usd(self) -> float | None: ...


def request_record(
    *,
    request_id: str,
    key_id: str,
    model: str | None,
    route: str,
    status: int,
    items: Sequence[FlaggedItem],
    latency_ms: Mapping[str, float],
    stream: bool,
    origin: str | None,
    blocked: str | None = None,
    usage: TokenUsage | None = None,
    created_at: datetime | None = None,
) -> RequestRecord:
    """The metadata record of one filtered request: its categories are those its flagged
    ``items`` name; its tokens, their source and cost come from ``usage`` (None: the
    request never reached the upstream); ``created_at`` is now unless given."""
    return RequestRecord(
        request_id=request_id,
        key_id=key_id,
        model=model,
        route=route,
        status=status,
        blocked=blocked,
        categories=tuple(sorted({c for item in items for c in item.categories})),
        latency_ms=latency_ms,
        prompt_tokens=None if usage is None else usage.prompt_tokens,
        completion_tokens=None if usage is None else usage.completion_tokens,
        stream=stream,
        origin=origin,
        usage_source=None if usage is None else usage.source,
        cost_usd=None if usage is None else usage.cost_usd,
        created_at=utc_now() if created_at is None else created_at,
    )


def _check_id(value: str, *, what: str) -> None:
    if not 0 < len(value) <= ID_CHARS or not value.isprintable() or value.strip() != value:
        raise ValueError(f"{what} must be 1 to {ID_CHARS} printable characters, got {value!r}")


def _check_time(moment: datetime) -> None:
    if moment.tzinfo is None:
        raise ValueError("created_at must be timezone-aware")


def _check_origin(origin: str | None) -> None:
    if origin is not None and not is_origin(origin):
        raise ValueError(f"origin must be a lower-case origin like {EVAL_ORIGIN!r}, got {origin!r}")


# -- helpers -----------------------------------------------------------------------------


def storable(text: str) -> str:
    """``text`` with NUL and lone surrogates (unstorable in PostgreSQL text) as U+FFFD."""
    return _UNSTORABLE.sub("\ufffd", text)


def clip(value: str, width: int) -> str:
    return storable(value)[:width]


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# Either kind of record, as the store writes and spools them.
AuditRecord = FlaggedItem | RequestRecord
