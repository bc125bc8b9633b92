"""The review queue's data: flagged items from the audit store, labels, export, blocklists.

Everything goes through the gateway's own stores and rules, the same ones
``/v1/review`` uses: ``AuditStore.list_items`` (filters, newest first, keyset pages; eval
traffic left out unless the page includes it, as the API does),
``label``/``label_many`` (recorded with the reviewer's key id), ``export`` as the eval
set the API streams (``gateway.routes.review.eval_example``), and adding a term to a
blocklist only when it matches the item's text as the engine would (admin only).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING

from dashboard.access import can_edit_lists
from gateway.access import KeyStore, Principal, Role
from gateway.audit import (
    MAX_PAGE_SIZE,
    AuditStore,
    ItemFilter,
    ReviewLabel,
    ReviewState,
    StoredItem,
)
from gateway.blocklists import BlocklistItem, BlocklistStore, ItemKind, NewItem
from gateway.errors import Forbidden
from gateway.origin import EVAL_ORIGIN
from gateway.review.actions import check_term_occurs, ensure_blocklist, eval_example
from gateway.safety.taxonomy import Direction, Severity

if TYPE_CHECKING:
    import pandas as pd

PREVIEW_CHARS = 160
QUEUE_COLUMNS = (
    "id",
    "created_at",
    "key",
    "origin",
    "model",
    "direction",
    "categories",
    "max_severity",
    "action",
    "review_state",
    "reviewer_key_id",
    "preview",
)
SEVERITY_NAMES = {int(severity): severity.name.lower() for severity in Severity}


@dataclass(frozen=True, slots=True)
class QueuePage:
    """One page of the queue as a table, and the cursor of the next page (None: last)."""

    items: pd.DataFrame
    next_cursor: str | None


def item_filter(
    *,
    category: str | None = None,
    severity_min: int | None = None,
    model: str | None = None,
    direction: str | None = None,
    review_state: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    key_id: str | None = None,
    origin: str | None = None,
    include_eval: bool = False,
) -> ItemFilter:
    """The store's filter from the page's choices (``None`` or ``""``: any).

    Eval traffic is left out unless ``include_eval`` or ``origin`` is ``eval``.
    """
    return ItemFilter(
        category=category or None,
        severity_min=severity_min,
        model=model or None,
        direction=Direction(direction) if direction else None,
        review_state=ReviewState(review_state) if review_state else None,
        since=since,
        until=until,
        key_id=key_id or None,
        origin=origin or None,
        hide_eval=not include_eval,
    )


def queue(
    audit: AuditStore,
    where: ItemFilter,
    *,
    limit: int = 50,
    cursor: str | None = None,
    names: Mapping[str, str] | None = None,
) -> QueuePage:
    """Flagged items matching ``where``, newest first, ``limit`` at a time."""
    import pandas as pd

    page = audit.list_items(where, limit=min(limit, MAX_PAGE_SIZE), cursor=cursor)
    rows = [_queue_row(stored, names or {}) for stored in page.items]
    frame = pd.DataFrame(rows, columns=list(QUEUE_COLUMNS))
    frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True)
    return QueuePage(items=frame, next_cursor=page.next_cursor)


def _queue_row(stored: StoredItem, names: Mapping[str, str]) -> dict[str, object]:
    item = stored.item
    preview = " ".join(item.text.split())
    if len(preview) > PREVIEW_CHARS:
        preview = preview[: PREVIEW_CHARS - 1] + "…"
    return {
        "id": item.id,
        "created_at": item.created_at,
        "key": names.get(item.key_id, item.key_id),
        "origin": item.origin or "",
        "model": item.model or "",
        "direction": item.direction.value,
        "categories": ", ".join(item.categories),
        "max_severity": stored.max_severity,
        "action": item.action,
        "review_state": stored.review_state.value,
        "reviewer_key_id": stored.reviewer_key_id or "",
        "preview": preview,
    }


def queue_models(audit: AuditStore, *, scan: int = MAX_PAGE_SIZE) -> list[str]:
    """Model names among the newest ``scan`` flagged items, for the model filter."""
    page = audit.list_items(ItemFilter(), limit=scan)
    return sorted({stored.item.model for stored in page.items if stored.item.model})


def queue_origins(audit: AuditStore, *, scan: int = MAX_PAGE_SIZE) -> list[str]:
    """Origins among the newest ``scan`` flagged items (eval first, when seen)."""
    page = audit.list_items(ItemFilter(), limit=scan)
    seen = {stored.item.origin for stored in page.items if stored.item.origin}
    return sorted(seen, key=lambda origin: (origin != EVAL_ORIGIN, origin))


def queue_keys(audit: AuditStore, *, scan: int = MAX_PAGE_SIZE) -> list[str]:
    """Key ids among the newest ``scan`` flagged items (eval traffic's too), for the filter."""
    page = audit.list_items(ItemFilter(), limit=scan)
    return sorted({stored.item.key_id for stored in page.items})


def key_names(keys: KeyStore) -> dict[str, str]:
    """``key id -> "name (key id)"`` of every key, revoked ones too, for display."""
    return {key.id: f"{key.name} ({key.id})" for key in keys.list(include_revoked=True)}


def review_counts(audit: AuditStore, where: ItemFilter | None = None) -> dict[str, int]:
    """Items per review state (every state present, zero when none), and the total, of the
    items ``where`` matches (every item when None)."""
    stats = audit.stats(where)
    return {"total": stats.total, **dict(stats.by_review_state)}


def hidden_eval(audit: AuditStore, where: ItemFilter) -> int:
    """How many eval items ``where`` leaves out only because it hides eval traffic."""
    if not where.hide_eval or where.origin is not None:
        return 0
    return audit.stats(replace(where, origin=EVAL_ORIGIN, hide_eval=False)).total


# -- one item ----------------------------------------------------------------------------


def item_scores(stored: StoredItem) -> pd.DataFrame:
    """Every label's score for the item, highest first, and whether it was flagged."""
    import pandas as pd

    flagged = set(stored.item.categories)
    rows = [
        {"label": label, "score": float(score), "flagged": label in flagged}
        for label, score in stored.item.scores.items()
    ]
    frame = pd.DataFrame(rows, columns=["label", "score", "flagged"])
    return frame.sort_values(["score", "label"], ascending=[False, True], ignore_index=True)


def item_severities(stored: StoredItem) -> pd.DataFrame:
    """The item's Azure severities (0/2/4/6) with their names."""
    import pandas as pd

    rows = [
        {"category": category, "severity": int(value), "level": SEVERITY_NAMES[int(value)]}
        for category, value in sorted(stored.item.severities.items())
    ]
    return pd.DataFrame(rows, columns=["category", "severity", "level"])


# -- changing things ---------------------------------------------------------------------


def label_items(
    audit: AuditStore,
    item_ids: Sequence[str],
    *,
    label: ReviewLabel | str,
    note: str | None,
    principal: Principal,
) -> int:
    """Label one or many items as ``principal`` (its key id is recorded); return the count.

    Many items are labelled all or none (``NotFound`` lists unknown ids).
    """
    if not principal.allows(Role.REVIEWER):
        raise Forbidden("labelling needs a reviewer or admin key", code="insufficient_role")
    verdict = ReviewLabel(label)
    note = note.strip() if note and note.strip() else None
    ids = list(dict.fromkeys(item_ids))
    if len(ids) == 1:
        audit.label(ids[0], label=verdict, note=note, reviewer_key_id=principal.key_id)
        return 1
    return audit.label_many(ids, label=verdict, note=note, reviewer_key_id=principal.key_id)


def export_jsonl(audit: AuditStore, label: ReviewLabel | str | None = None) -> str:
    """Labelled items (of ``label``, or of any label) oldest first, as the API exports them."""
    chosen = ReviewLabel(label) if label else None
    return "".join(
        json.dumps(eval_example(stored), ensure_ascii=False) + "\n"
        for stored in audit.export(chosen)
    )


@dataclass(frozen=True, slots=True)
class BlocklistAddition:
    blocklist: str
    created: bool
    entry: BlocklistItem


def add_to_blocklist(
    audit: AuditStore,
    blocklists: BlocklistStore,
    item_id: str,
    *,
    blocklist: str,
    term: str,
    kind: ItemKind | str = ItemKind.TERM,
    principal: Principal,
) -> BlocklistAddition:
    """Add ``term`` (found in the item's text) to ``blocklist``, creating the list if needed.

    Admin only, like ``POST /v1/review/items/{id}/blocklist``; ``InvalidRequest`` when the
    term does not match the item's text the way the blocklist member would match it.
    """
    if not can_edit_lists(principal):
        raise Forbidden("adding to a blocklist needs an admin key", code="insufficient_role")
    chosen = ItemKind(kind)
    stored = audit.get_item(item_id)
    value = term.strip() if chosen is ItemKind.TERM else term
    check_term_occurs(chosen, value, stored.item.text)
    created = ensure_blocklist(blocklists, blocklist)
    [entry] = blocklists.add_items(blocklist, [NewItem(kind=chosen, value=value)])
    return BlocklistAddition(blocklist=blocklist, created=created, entry=entry)
