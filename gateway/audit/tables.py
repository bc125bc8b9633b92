"""The audit store's tables: flagged items, their categories and the request log."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Mapped, Session, mapped_column

from gateway.audit.records import (
    ID_CHARS,
    KEY_ID_CHARS,
    LABEL_CHARS,
    MODEL_CHARS,
    REASON_CHARS,
    REQUEST_ID_CHARS,
    ROUTE_CHARS,
    SOURCE_CHARS,
    AuditRecord,
    FlaggedItem,
    RequestRecord,
    ReviewState,
    clip,
    sha256,
    storable,
)
from gateway.db import Base, UtcDateTime
from gateway.origin import ORIGIN_CHARS

# -- tables ------------------------------------------------------------------------------


class FlaggedItemRow(Base):
    __tablename__ = "flagged_items"
    __table_args__ = (
        Index("ix_flagged_items_created_at_id", "created_at", "id"),
        Index("ix_flagged_items_review_state_created_at", "review_state", "created_at"),
        Index("ix_flagged_items_request_id", "request_id"),
        Index("ix_flagged_items_key_id_created_at", "key_id", "created_at"),
        Index("ix_flagged_items_origin_created_at", "origin", "created_at"),
        CheckConstraint("direction IN ('prompt', 'completion')", name="ck_flagged_items_direction"),
        CheckConstraint("action IN ('block', 'annotate')", name="ck_flagged_items_action"),
        CheckConstraint(
            "review_state IN ('unreviewed', 'true_positive', 'false_positive', "
            "'needs_policy_change')",
            name="ck_flagged_items_review_state",
        ),
    )

    id: Mapped[str] = mapped_column(String(ID_CHARS), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    request_id: Mapped[str] = mapped_column(String(REQUEST_ID_CHARS))
    key_id: Mapped[str] = mapped_column(String(KEY_ID_CHARS))
    model: Mapped[str | None] = mapped_column(String(MODEL_CHARS))
    direction: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(SOURCE_CHARS))
    categories: Mapped[list[str]] = mapped_column(JSON)
    scores: Mapped[dict[str, float]] = mapped_column(JSON)
    severities: Mapped[dict[str, int]] = mapped_column(JSON)
    max_severity: Mapped[int] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(16))
    reasons: Mapped[list[str]] = mapped_column(JSON)
    text: Mapped[str] = mapped_column(Text)
    text_sha256: Mapped[str] = mapped_column(String(64))
    review_state: Mapped[str] = mapped_column(String(24))
    review_note: Mapped[str | None] = mapped_column(Text)
    reviewer_key_id: Mapped[str | None] = mapped_column(String(KEY_ID_CHARS))
    reviewed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    origin: Mapped[str | None] = mapped_column(String(ORIGIN_CHARS))


class FlaggedItemCategoryRow(Base):
    """One flagged label of one item: what the category filter looks up."""

    __tablename__ = "flagged_item_categories"
    __table_args__ = (Index("ix_flagged_item_categories_category_item_id", "category", "item_id"),)

    item_id: Mapped[str] = mapped_column(
        ForeignKey(
            "flagged_items.id",
            ondelete="CASCADE",
            name="fk_flagged_item_categories_item_id_flagged_items",
        ),
        primary_key=True,
    )
    category: Mapped[str] = mapped_column(String(LABEL_CHARS), primary_key=True)


class RequestLogRow(Base):
    __tablename__ = "request_log"
    __table_args__ = (
        Index("ix_request_log_created_at", "created_at"),
        Index("ix_request_log_request_id", "request_id"),
        Index("ix_request_log_key_id_created_at", "key_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(ID_CHARS), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    request_id: Mapped[str] = mapped_column(String(REQUEST_ID_CHARS))
    key_id: Mapped[str] = mapped_column(String(KEY_ID_CHARS))
    model: Mapped[str | None] = mapped_column(String(MODEL_CHARS))
    route: Mapped[str] = mapped_column(String(ROUTE_CHARS))
    status: Mapped[int] = mapped_column(Integer)
    blocked: Mapped[str | None] = mapped_column(String(16))
    categories: Mapped[list[str]] = mapped_column(JSON)
    latency_ms: Mapped[dict[str, float]] = mapped_column(JSON)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    stream: Mapped[bool] = mapped_column(Boolean)
    origin: Mapped[str | None] = mapped_column(String(ORIGIN_CHARS))
    usage_source: Mapped[str | None] = mapped_column(String(16))
    cost_usd: Mapped[float | None] = mapped_column(Float)


ITEMS: Table = FlaggedItemRow.__table__  # type: ignore[assignment]
CATEGORIES: Table = FlaggedItemCategoryRow.__table__  # type: ignore[assignment]
REQUESTS: Table = RequestLogRow.__table__  # type: ignore[assignment]


# -- rows --------------------------------------------------------------------------------


def insert(session: Session, records: Sequence[AuditRecord]) -> None:
    """Insert records, skipping any whose id is already stored (idempotent)."""
    items = [record for record in records if isinstance(record, FlaggedItem)]
    requests = [record for record in records if isinstance(record, RequestRecord)]
    if items:
        insert_ignoring_duplicates(session, ITEMS, [item_row(item) for item in items])
        insert_ignoring_duplicates(
            session,
            CATEGORIES,
            [
                {"item_id": item.id, "category": category}
                for item in items
                for category in dict.fromkeys(clip(c, LABEL_CHARS) for c in item.categories)
            ],
        )
    if requests:
        insert_ignoring_duplicates(session, REQUESTS, [request_row(r) for r in requests])


def insert_ignoring_duplicates(
    session: Session, table: Table, rows: Sequence[Mapping[str, Any]]
) -> None:
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(postgresql.insert(table).on_conflict_do_nothing(), rows)
    elif dialect == "sqlite":
        session.execute(sqlite.insert(table).on_conflict_do_nothing(), rows)
    else:  # any other backend: look first (a concurrent insert raises IntegrityError)
        keys = list(table.primary_key.columns)
        present = {
            tuple(found)
            for found in session.execute(
                select(*keys).where(keys[0].in_({row[keys[0].name] for row in rows}))
            )
        }
        fresh = [row for row in rows if tuple(row[key.name] for key in keys) not in present]
        if fresh:
            session.execute(table.insert(), fresh)


def item_row(item: FlaggedItem) -> dict[str, Any]:
    return {
        "id": item.id,
        "created_at": item.created_at,
        "request_id": clip(item.request_id, REQUEST_ID_CHARS),
        "key_id": clip(item.key_id, KEY_ID_CHARS),
        "model": None if item.model is None else clip(item.model, MODEL_CHARS),
        "direction": item.direction.value,
        "source": clip(item.source, SOURCE_CHARS),
        "categories": [clip(category, LABEL_CHARS) for category in item.categories],
        "scores": {clip(label, LABEL_CHARS): score for label, score in item.scores.items()},
        "severities": {clip(c, LABEL_CHARS): s for c, s in item.severities.items()},
        "max_severity": item.max_severity,
        "action": item.action,
        "reasons": [clip(reason, REASON_CHARS) for reason in item.reasons],
        "text": storable(item.text),
        "text_sha256": sha256(item.text),
        "review_state": ReviewState.UNREVIEWED.value,
        "review_note": None,
        "reviewer_key_id": None,
        "reviewed_at": None,
        "origin": item.origin,
    }


def request_row(record: RequestRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "created_at": record.created_at,
        "request_id": clip(record.request_id, REQUEST_ID_CHARS),
        "key_id": clip(record.key_id, KEY_ID_CHARS),
        "model": None if record.model is None else clip(record.model, MODEL_CHARS),
        "route": clip(record.route, ROUTE_CHARS),
        "status": record.status,
        "blocked": record.blocked,
        "categories": [clip(category, LABEL_CHARS) for category in record.categories],
        "latency_ms": {clip(stage, LABEL_CHARS): ms for stage, ms in record.latency_ms.items()},
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "stream": record.stream,
        "origin": record.origin,
        "usage_source": None if record.usage_source is None else record.usage_source.value,
        "cost_usd": record.cost_usd,
    }
