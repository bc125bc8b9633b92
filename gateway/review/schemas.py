"""The review API's request and response bodies (``/v1/review``), in OpenAI's object
conventions: an ``object`` field, lists as ``{"object": "list", "data": [...]}``, times as
Unix seconds."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.audit import (
    MAX_BULK_IDS,
    MAX_NOTE_CHARS,
    ReviewLabel,
    ReviewState,
    StoredItem,
)
from gateway.blocklists import (
    ItemKind,
)
from gateway.routes.blocklists import BlocklistItemObject
from gateway.safety.taxonomy import Direction

PREVIEW_CHARS = 200


# -- requests ----------------------------------------------------------------------------


class LabelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: ReviewLabel
    note: str | None = Field(default=None, max_length=MAX_NOTE_CHARS)


class BulkLabelIn(LabelIn):
    ids: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        min_length=1, max_length=MAX_BULK_IDS
    )


class BlocklistTermIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    blocklist: str = Field(description="the list's name; created if it does not exist")
    term: str = Field(description="a term (or regex) that occurs in the item's text")
    kind: ItemKind = ItemKind.TERM


# -- responses ---------------------------------------------------------------------------


class ReviewFields(BaseModel):
    id: str
    created_at: int
    request_id: str
    key_id: str
    model: str | None
    origin: str | None
    direction: Direction
    source: str
    categories: list[str]
    severities: dict[str, int]
    max_severity: int
    action: str
    reasons: list[str]
    text_sha256: str
    text_chars: int
    review_state: ReviewState
    review_note: str | None
    reviewer_key_id: str | None
    reviewed_at: int | None


def _fields(stored: StoredItem) -> dict[str, object]:
    item = stored.item
    return {
        "id": item.id,
        "created_at": _seconds(item.created_at),
        "request_id": item.request_id,
        "key_id": item.key_id,
        "model": item.model,
        "origin": item.origin,
        "direction": item.direction,
        "source": item.source,
        "categories": list(item.categories),
        "severities": dict(item.severities),
        "max_severity": stored.max_severity,
        "action": item.action,
        "reasons": list(item.reasons),
        "text_sha256": stored.text_sha256,
        "text_chars": len(item.text),
        "review_state": stored.review_state,
        "review_note": stored.review_note,
        "reviewer_key_id": stored.reviewer_key_id,
        "reviewed_at": None if stored.reviewed_at is None else _seconds(stored.reviewed_at),
    }


class ReviewItemSummary(ReviewFields):
    object: Literal["review.item"] = "review.item"
    text_preview: str

    @classmethod
    def of(cls, stored: StoredItem) -> ReviewItemSummary:
        return cls.model_validate(
            {**_fields(stored), "text_preview": stored.item.text[:PREVIEW_CHARS]}
        )


class ReviewItemObject(ReviewFields):
    object: Literal["review.item"] = "review.item"
    text: str
    scores: dict[str, float]

    @classmethod
    def of(cls, stored: StoredItem) -> ReviewItemObject:
        return cls.model_validate(
            {**_fields(stored), "text": stored.item.text, "scores": dict(stored.item.scores)}
        )


class ReviewItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ReviewItemSummary]
    has_more: bool
    next_cursor: str | None


class BulkLabelResult(BaseModel):
    object: Literal["review.labels"] = "review.labels"
    label: ReviewLabel
    updated: int


class BlocklistAddition(BaseModel):
    object: Literal["review.blocklist_addition"] = "review.blocklist_addition"
    item_id: str
    blocklist: str
    blocklist_created: bool
    entry: BlocklistItemObject


class ReviewStatsObject(BaseModel):
    object: Literal["review.stats"] = "review.stats"
    total: int
    by_category: dict[str, int]
    by_direction: dict[str, int]
    by_review_state: dict[str, int]
    by_action: dict[str, int]
    spooled_pending: int


def _seconds(moment: datetime) -> int:
    return int(moment.timestamp())


def from_unix_seconds(seconds: int | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)
