"""``/v1/review``: read flagged items, label them, export an eval set, grow blocklists.

Bodies follow OpenAI's object conventions (an ``object`` field, lists as
``{"object": "list", "data": [...], "has_more", "next_cursor"}``, times as Unix seconds).
Every route needs the ``reviewer`` role (admin keys pass), except adding a term to a
blocklist, which is admin's like the rest of ``/v1/blocklists``.

Eval traffic (items whose ``origin`` is ``eval``: ``gateway.origin``) is left out of the
listing and the stats unless ``include_eval=true`` or ``origin=eval`` asks for it; the
other filters include ``key_id`` (the key that sent the request) and ``origin``.

Listing is newest first with keyset pagination: pass ``next_cursor`` back as ``cursor``;
items recorded meanwhile never shift a page, so no item repeats and none is skipped. A
list entry carries the first ``PREVIEW_CHARS`` characters of the text; the item itself
(``GET /v1/review/items/{id}``) carries all of it and every label's score.

Adding a term from an item (``POST /v1/review/items/{id}/blocklist``): the term (or
regex) must match the item's text the way the engine matches it (after normalisation,
whole words), so a reviewer adds what they saw and the item's text would now be
blocked. A list that does not exist yet is created (the term blocks from whichever list
holds it, so a new list never weakens the filter); the response says so.

The routes are plain ``def``: the store does blocking database I/O, so FastAPI runs
them in its thread pool. The export streams from a generator that reads a page at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from gateway.audit import (
    DEFAULT_PAGE_SIZE,
    MAX_BULK_IDS,
    MAX_NOTE_CHARS,
    MAX_PAGE_SIZE,
    AuditStore,
    ItemFilter,
    ReviewLabel,
    ReviewState,
    StoredItem,
)
from gateway.auth import Principal, Role, require
from gateway.blocklists import (
    ItemKind,
    NewItem,
)
from gateway.errors import InvalidRequest, ServiceUnavailable
from gateway.origin import ORIGIN_CHARS
from gateway.review_actions import check_term_occurs, ensure_blocklist, eval_example
from gateway.routes.blocklists import BlocklistItemObject
from gateway.safety.taxonomy import Direction
from gateway.state import AppState, app_state

router = APIRouter(prefix="/v1/review", tags=["review"])

PREVIEW_CHARS = 200
MAX_UNIX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z
NDJSON = "application/x-ndjson"


def audit_store(request: Request) -> AuditStore:
    """The running audit store (made in the lifespan, before the engine loads)."""
    store: AuditStore | None = getattr(request.app.state, "audit", None)
    if store is None:
        raise ServiceUnavailable("the audit store is not running yet", code="audit_unavailable")
    return store


Store = Annotated[AuditStore, Depends(audit_store)]
Reviewer = Annotated[Principal, Depends(require(Role.REVIEWER))]
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]
UnixSeconds = Annotated[int | None, Query(ge=0, le=MAX_UNIX_SECONDS)]
KeyId = Annotated[str | None, Query(min_length=1, max_length=128)]
OriginQuery = Annotated[str | None, Query(min_length=1, max_length=ORIGIN_CHARS)]
IncludeEval = Annotated[
    bool, Query(description="also list eval traffic (origin 'eval'), left out by default")
]


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


def _moment(seconds: int | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


# -- routes ------------------------------------------------------------------------------


@router.get("/items")
def list_items(
    principal: Reviewer,
    store: Store,
    category: str | None = None,
    severity_min: int | None = None,
    model: Annotated[str | None, Query(max_length=200)] = None,
    direction: Direction | None = None,
    review_state: ReviewState | None = None,
    key_id: KeyId = None,
    origin: OriginQuery = None,
    include_eval: IncludeEval = False,
    since: UnixSeconds = None,
    until: UnixSeconds = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> ReviewItemList:
    where = ItemFilter(
        category=category,
        severity_min=severity_min,
        model=model,
        direction=direction,
        review_state=review_state,
        since=_moment(since),
        until=_moment(until),
        key_id=key_id,
        origin=origin,
        hide_eval=not include_eval,
    )
    page = store.list_items(where, limit=limit, cursor=cursor)
    return ReviewItemList(
        data=[ReviewItemSummary.of(stored) for stored in page.items],
        has_more=page.has_more,
        next_cursor=page.next_cursor,
    )


@router.get("/items/{item_id}")
def get_item(item_id: str, principal: Reviewer, store: Store) -> ReviewItemObject:
    return ReviewItemObject.of(store.get_item(item_id))


@router.post("/items/{item_id}/label")
def label_item(item_id: str, body: LabelIn, principal: Reviewer, store: Store) -> ReviewItemObject:
    stored = store.label(
        item_id, label=body.label, note=body.note, reviewer_key_id=principal.key_id
    )
    return ReviewItemObject.of(stored)


@router.post("/labels")
def label_items(body: BulkLabelIn, principal: Reviewer, store: Store) -> BulkLabelResult:
    updated = store.label_many(
        body.ids, label=body.label, note=body.note, reviewer_key_id=principal.key_id
    )
    return BulkLabelResult(label=body.label, updated=updated)


@router.get("/export", response_class=StreamingResponse)
def export_items(
    principal: Reviewer, store: Store, label: ReviewLabel | None = None
) -> StreamingResponse:
    """Labelled items as an eval set, one JSON object per line, oldest first."""
    items = store.export(label)
    suffix = label.value if label is not None else "labelled"
    return StreamingResponse(
        _ndjson(items),
        media_type=NDJSON,
        headers={"content-disposition": f'attachment; filename="review-{suffix}.jsonl"'},
    )


def _ndjson(items: Iterator[StoredItem]) -> Iterator[bytes]:
    for stored in items:
        yield (json.dumps(eval_example(stored), ensure_ascii=False) + "\n").encode()


@router.post("/items/{item_id}/blocklist", status_code=status.HTTP_201_CREATED)
def add_to_blocklist(
    item_id: str,
    body: BlocklistTermIn,
    principal: Admin,
    store: Store,
    state: Annotated[AppState, Depends(app_state)],
) -> BlocklistAddition:
    stored = store.get_item(item_id)
    value = body.term.strip() if body.kind is ItemKind.TERM else body.term
    check_term_occurs(body.kind, value, stored.item.text)
    created = ensure_blocklist(state.blocklists, body.blocklist)
    try:
        [entry] = state.blocklists.add_items(body.blocklist, [NewItem(kind=body.kind, value=value)])
    except InvalidRequest as error:
        param = "term" if (error.param or "").startswith("items") else error.param
        raise InvalidRequest(error.message, param=param, code=error.code) from None
    return BlocklistAddition(
        item_id=item_id,
        blocklist=body.blocklist,
        blocklist_created=created,
        entry=BlocklistItemObject.of(entry),
    )


@router.get("/stats")
def review_stats(
    principal: Reviewer,
    store: Store,
    key_id: KeyId = None,
    origin: OriginQuery = None,
    include_eval: IncludeEval = False,
    since: UnixSeconds = None,
    until: UnixSeconds = None,
) -> ReviewStatsObject:
    where = ItemFilter(
        since=_moment(since),
        until=_moment(until),
        key_id=key_id,
        origin=origin,
        hide_eval=not include_eval,
    )
    stats = store.stats(where)
    return ReviewStatsObject(
        total=stats.total,
        by_category=dict(stats.by_category),
        by_direction=dict(stats.by_direction),
        by_review_state=dict(stats.by_review_state),
        by_action=dict(stats.by_action),
        spooled_pending=store.spooled_pending(),
    )


# -- helpers -----------------------------------------------------------------------------
