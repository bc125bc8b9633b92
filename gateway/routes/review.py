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
from typing import Annotated

from fastapi import APIRouter, Depends, Query, status
from fastapi.responses import StreamingResponse

from gateway.access import Principal, Role, require
from gateway.audit import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    ItemFilter,
    ReviewLabel,
    ReviewState,
    StoredItem,
)
from gateway.blocklists import (
    ItemKind,
    NewItem,
)
from gateway.errors import InvalidRequest
from gateway.origin import ORIGIN_CHARS
from gateway.review.actions import check_term_occurs, ensure_blocklist, eval_example
from gateway.review.schemas import (
    BlocklistAddition,
    BlocklistTermIn,
    BulkLabelIn,
    BulkLabelResult,
    LabelIn,
    ReviewItemList,
    ReviewItemObject,
    ReviewItemSummary,
    ReviewStatsObject,
    from_unix_seconds,
)
from gateway.routes.blocklists import BlocklistItemObject
from gateway.safety.taxonomy import Direction
from gateway.state import Audit, Blocklists

router = APIRouter(prefix="/v1/review", tags=["review"])

MAX_UNIX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z
NDJSON = "application/x-ndjson"


Reviewer = Annotated[Principal, Depends(require(Role.REVIEWER))]
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]
UnixSeconds = Annotated[int | None, Query(ge=0, le=MAX_UNIX_SECONDS)]
KeyId = Annotated[str | None, Query(min_length=1, max_length=128)]
OriginQuery = Annotated[str | None, Query(min_length=1, max_length=ORIGIN_CHARS)]
IncludeEval = Annotated[
    bool, Query(description="also list eval traffic (origin 'eval'), left out by default")
]


@router.get("/items")
def list_items(
    principal: Reviewer,
    store: Audit,
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
        since=from_unix_seconds(since),
        until=from_unix_seconds(until),
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
def get_item(item_id: str, principal: Reviewer, store: Audit) -> ReviewItemObject:
    return ReviewItemObject.of(store.get_item(item_id))


@router.post("/items/{item_id}/label")
def label_item(item_id: str, body: LabelIn, principal: Reviewer, store: Audit) -> ReviewItemObject:
    stored = store.label(
        item_id, label=body.label, note=body.note, reviewer_key_id=principal.key_id
    )
    return ReviewItemObject.of(stored)


@router.post("/labels")
def label_items(body: BulkLabelIn, principal: Reviewer, store: Audit) -> BulkLabelResult:
    updated = store.label_many(
        body.ids, label=body.label, note=body.note, reviewer_key_id=principal.key_id
    )
    return BulkLabelResult(label=body.label, updated=updated)


@router.get("/export", response_class=StreamingResponse)
def export_items(
    principal: Reviewer, store: Audit, label: ReviewLabel | None = None
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
    store: Audit,
    blocklists: Blocklists,
) -> BlocklistAddition:
    stored = store.get_item(item_id)
    value = body.term.strip() if body.kind is ItemKind.TERM else body.term
    check_term_occurs(body.kind, value, stored.item.text)
    created = ensure_blocklist(blocklists, body.blocklist)
    try:
        [entry] = blocklists.add_items(body.blocklist, [NewItem(kind=body.kind, value=value)])
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
    store: Audit,
    key_id: KeyId = None,
    origin: OriginQuery = None,
    include_eval: IncludeEval = False,
    since: UnixSeconds = None,
    until: UnixSeconds = None,
) -> ReviewStatsObject:
    where = ItemFilter(
        since=from_unix_seconds(since),
        until=from_unix_seconds(until),
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
