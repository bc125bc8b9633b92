"""Reading the audit store: filters, pages, review values and keyset cursors."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVarTuple

from sqlalchemy import (
    ColumnElement,
    Select,
    func,
    or_,
    select,
)
from sqlalchemy.orm import Session

from gateway.audit.records import (
    ID_CHARS,
    KEY_ID_CHARS,
    MAX_NOTE_CHARS,
    SEVERITIES,
    FlaggedItem,
    ReviewLabel,
    ReviewState,
    clip,
    storable,
    utc_now,
)
from gateway.audit.tables import (
    FlaggedItemCategoryRow,
    FlaggedItemRow,
)
from gateway.errors import InvalidRequest, NotFound
from gateway.origin import EVAL_ORIGIN, parse_origin
from gateway.safety.taxonomy import Direction, parse_label

# -- what reads return -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredItem:
    """A flagged item as stored, with its review."""

    item: FlaggedItem
    text_sha256: str
    max_severity: int
    review_state: ReviewState
    review_note: str | None
    reviewer_key_id: str | None
    reviewed_at: datetime | None


@dataclass(frozen=True, slots=True)
class ItemFilter:
    """Which flagged items to list; every field left ``None`` matches everything.

    ``since`` is inclusive and ``until`` exclusive. ``hide_eval`` leaves out items whose
    origin is ``eval`` unless ``origin`` asks for exactly those (the review API and the
    dashboard set it unless told to include eval traffic). Bad values raise
    ``InvalidRequest``.
    """

    category: str | None = None
    severity_min: int | None = None
    model: str | None = None
    direction: Direction | None = None
    review_state: ReviewState | None = None
    since: datetime | None = None
    until: datetime | None = None
    key_id: str | None = None
    origin: str | None = None
    hide_eval: bool = False
    request_id: str | None = None

    def __post_init__(self) -> None:
        if self.key_id is not None and not 0 < len(self.key_id) <= KEY_ID_CHARS:
            raise InvalidRequest(
                f"key_id must be 1 to {KEY_ID_CHARS} characters",
                param="key_id",
                code="invalid_value",
            )
        object.__setattr__(self, "origin", parse_origin(self.origin, param="origin"))
        if self.category is not None:
            try:
                parse_label(self.category)
            except ValueError as error:
                raise InvalidRequest(str(error), param="category", code="invalid_value") from None
        if self.severity_min is not None and self.severity_min not in SEVERITIES:
            raise InvalidRequest(
                f"severity_min must be 0, 2, 4 or 6, got {self.severity_min}",
                param="severity_min",
                code="invalid_value",
            )
        for name in ("since", "until"):
            moment = getattr(self, name)
            if moment is not None and moment.tzinfo is None:
                raise ValueError(f"{name} must be timezone-aware")


@dataclass(frozen=True, slots=True)
class ItemPage:
    items: tuple[StoredItem, ...]
    has_more: bool
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class ReviewStats:
    total: int
    by_category: Mapping[str, int]
    by_direction: Mapping[str, int]
    by_review_state: Mapping[str, int]
    by_action: Mapping[str, int]


_Columns = TypeVarTuple("_Columns")


def stored_item(row: FlaggedItemRow) -> StoredItem:
    return StoredItem(
        item=FlaggedItem(
            id=row.id,
            created_at=row.created_at,
            request_id=row.request_id,
            key_id=row.key_id,
            model=row.model,
            direction=Direction(row.direction),
            source=row.source,
            categories=tuple(row.categories),
            scores=row.scores,
            severities=row.severities,
            action=row.action,
            reasons=tuple(row.reasons),
            text=row.text,
            origin=row.origin,
        ),
        text_sha256=row.text_sha256,
        max_severity=row.max_severity,
        review_state=ReviewState(row.review_state),
        review_note=row.review_note,
        reviewer_key_id=row.reviewer_key_id,
        reviewed_at=row.reviewed_at,
    )


def filtered(query: Select[*_Columns], where: ItemFilter) -> Select[*_Columns]:
    conditions: list[ColumnElement[bool]] = []
    if where.category is not None:
        conditions.append(
            FlaggedItemRow.id.in_(
                select(FlaggedItemCategoryRow.item_id).where(
                    FlaggedItemCategoryRow.category == where.category
                )
            )
        )
    if where.severity_min is not None:
        conditions.append(FlaggedItemRow.max_severity >= where.severity_min)
    if where.model is not None:
        conditions.append(FlaggedItemRow.model == where.model)
    if where.direction is not None:
        conditions.append(FlaggedItemRow.direction == where.direction.value)
    if where.review_state is not None:
        conditions.append(FlaggedItemRow.review_state == where.review_state.value)
    if where.since is not None:
        conditions.append(FlaggedItemRow.created_at >= where.since)
    if where.until is not None:
        conditions.append(FlaggedItemRow.created_at < where.until)
    if where.key_id is not None:
        conditions.append(FlaggedItemRow.key_id == where.key_id)
    if where.request_id is not None:
        conditions.append(FlaggedItemRow.request_id == where.request_id)
    if where.origin is not None:
        conditions.append(FlaggedItemRow.origin == where.origin)
    elif where.hide_eval:
        conditions.append(not_eval(FlaggedItemRow.origin))
    return query.where(*conditions) if conditions else query


def not_eval(origin: ColumnElement[str | None] | Any) -> ColumnElement[bool]:
    """Rows whose origin is not ``eval`` (no origin included): the default views' rule."""
    return or_(origin.is_(None), origin != EVAL_ORIGIN)


def review_counts(
    session: Session,
    where: ItemFilter,
    column: Any,
    *,
    query: Select[*tuple[Any, ...]] | None = None,
) -> dict[str, int]:
    """``{value: count}`` of ``column`` over the filtered items, sorted by value."""
    counted: Select[*tuple[Any, ...]] = select(column, func.count()) if query is None else query
    grouped = filtered(counted, where).group_by(column).order_by(column)
    return {str(value): int(count) for value, count in session.execute(grouped)}


def review_values(label: ReviewLabel, *, note: str | None, reviewer_key_id: str) -> dict[str, Any]:
    if note is not None and len(note) > MAX_NOTE_CHARS:
        raise InvalidRequest(
            f"note has at most {MAX_NOTE_CHARS} characters, got {len(note)}",
            param="note",
            code="value_too_long",
        )
    return {
        "review_state": ReviewState(label.value).value,
        "review_note": None if note is None else storable(note),
        "reviewer_key_id": clip(reviewer_key_id, KEY_ID_CHARS),
        "reviewed_at": utc_now(),
    }


def item_not_found(item_id: str) -> NotFound:
    return NotFound(f"no flagged item with id {item_id!r}", param="id", code="item_not_found")


# -- cursors -----------------------------------------------------------------------------


def encode_cursor(item: FlaggedItem) -> str:
    moment = item.created_at.astimezone(UTC)
    micros = (moment - _EPOCH) // _MICROSECOND
    raw = f"{micros}:{item.id}".encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    invalid = InvalidRequest(
        "cursor is not one this API returned", param="cursor", code="invalid_cursor"
    )
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        micros_text, item_id = raw.split(":", 1)
        micros = int(micros_text)
        moment = _EPOCH + micros * _MICROSECOND
    except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError):
        raise invalid from None
    if not item_id or len(item_id) > ID_CHARS:
        raise invalid
    return moment, item_id


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC) - _EPOCH
