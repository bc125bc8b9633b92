"""The audit store: every flagged text for human review, and metadata of every filtered request.

What is kept
    ``flagged_items``: one row per flagged text (a :class:`FlaggedItem`): where it came from
    (request id, key id, model, direction, ``source`` such as ``messages[2]``, and the
    ``origin`` its caller declared, such as ``eval``: ``gateway.origin``), every label's
    score, the flagged labels, Azure severities and their maximum, the action and reasons,
    the text and its sha256, and its review (``review_state``, note, reviewer key id, time).
    The ``text`` column is the only place the service keeps raw content; while the database
    is unreachable the same records wait in the spool (below), which is just as private.
    ``flagged_item_categories``: (item id, label) pairs, so filtering by category is an
    indexed lookup on SQLite and PostgreSQL alike. ``request_log``: a :class:`RequestRecord`
    per filtered request (key id, origin, route, status, what was blocked, labels, latencies,
    tokens with their source, ``upstream`` or ``counted``, and their cost when litellm knows
    the model's price), never its text. Texts are stored as given except that NUL and lone
    surrogates, which PostgreSQL text cannot hold, become U+FFFD; ``text_sha256`` is of the
    text as given.

The write path
    :meth:`AuditStore.record` never blocks the event loop and never raises because the
    database is down: the insert runs in a worker thread, and if it fails (or overruns
    ``write_timeout_s``) the records are appended to the spool under
    ``<SAFEGATE_HOME>/audit-spool`` (``gateway.spool``: JSON lines, fsync'd, files 0600 in a
    0700 directory) and a warning is logged with ids and counts only. After a failure the
    store writes straight to the spool until a drain finds the database again, so a dead
    database costs each request one fsync, not a timeout. Only if the spool cannot be
    written either is a record lost; that is logged as an error and counted
    (:meth:`AuditStore.lost`).

Draining
    :meth:`AuditStore.start` runs a background task that drains the spool into the database
    at once and then every ``drain_interval_s``; :meth:`AuditStore.close` makes a last
    attempt. Inserts are idempotent by id (``ON CONFLICT DO NOTHING``), so a record handed
    over twice (a crash between commit and the spool file's removal, a write that overran
    its budget and landed late) is stored once. Lines that cannot be decoded, and records
    the database refuses for good (a constraint or data error), are kept aside by the
    spool and reported by file and line number. :meth:`AuditStore.spooled_pending` counts
    what waits on disk (for metrics).

Reading and review
    :meth:`AuditStore.list_items` filters (category, minimum severity, model, direction,
    review state, key, origin, time; ``hide_eval`` leaves out eval traffic) newest first
    with keyset pagination on ``(created_at, id)``;
    :meth:`AuditStore.label` and :meth:`AuditStore.label_many` record a reviewer's verdict;
    :meth:`AuditStore.export` walks labelled items oldest first; :meth:`AuditStore.stats`
    counts. The HTTP side is ``gateway.routes.review``.

Errors are the API's (``gateway.errors``)::

    InvalidRequest      a bad filter value or cursor (``param`` says which)
    NotFound            no flagged item of that id (bulk: lists the unknown ids, never text)
    ServiceUnavailable  the database cannot be read (review routes answer 503, not 500)

Nothing here logs a text, a note or a database error message that could quote one.

Modules: ``records`` (the two kinds of record, their limits and checks), ``tables`` (the
SQLAlchemy tables), ``store`` (:class:`AuditStore`: writes, the spool, draining, review),
``queries`` (filters, pages, cursors for the reads), ``spooled`` (records as spool lines),
``settings`` (the audit settings and their defaults).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from gateway.audit.queries import ItemFilter, ItemPage, ReviewStats, StoredItem, not_eval
    from gateway.audit.records import (
        DEFAULT_PAGE_SIZE,
        EXPORT_PAGE_SIZE,
        KEY_ID_CHARS,
        MAX_BULK_IDS,
        MAX_NOTE_CHARS,
        MAX_PAGE_SIZE,
        MODEL_CHARS,
        SPOOL_DIRNAME,
        FlaggedItem,
        RequestRecord,
        ReviewLabel,
        ReviewState,
        TokenUsage,
        UsageSource,
        flagged_item,
        request_record,
    )
    from gateway.audit.settings import DEFAULT_DRAIN_INTERVAL_S, DEFAULT_WRITE_TIMEOUT_S
    from gateway.audit.store import AuditStore
    from gateway.audit.tables import FlaggedItemCategoryRow, FlaggedItemRow, RequestLogRow

__all__ = [
    "DEFAULT_DRAIN_INTERVAL_S",
    "DEFAULT_PAGE_SIZE",
    "DEFAULT_WRITE_TIMEOUT_S",
    "EXPORT_PAGE_SIZE",
    "KEY_ID_CHARS",
    "MAX_BULK_IDS",
    "MAX_NOTE_CHARS",
    "MAX_PAGE_SIZE",
    "MODEL_CHARS",
    "SPOOL_DIRNAME",
    "AuditStore",
    "FlaggedItem",
    "FlaggedItemCategoryRow",
    "FlaggedItemRow",
    "ItemFilter",
    "ItemPage",
    "RequestLogRow",
    "RequestRecord",
    "ReviewLabel",
    "ReviewState",
    "ReviewStats",
    "StoredItem",
    "TokenUsage",
    "UsageSource",
    "flagged_item",
    "not_eval",
    "request_record",
]

if not TYPE_CHECKING:
    __getattr__ = lazy_exports(
        __name__,
        {
            "queries": ("ItemFilter", "ItemPage", "ReviewStats", "StoredItem", "not_eval"),
            "records": (
                "DEFAULT_PAGE_SIZE",
                "EXPORT_PAGE_SIZE",
                "KEY_ID_CHARS",
                "MAX_BULK_IDS",
                "MAX_NOTE_CHARS",
                "MAX_PAGE_SIZE",
                "MODEL_CHARS",
                "SPOOL_DIRNAME",
                "FlaggedItem",
                "RequestRecord",
                "ReviewLabel",
                "ReviewState",
                "TokenUsage",
                "UsageSource",
                "flagged_item",
                "request_record",
            ),
            "settings": ("DEFAULT_DRAIN_INTERVAL_S", "DEFAULT_WRITE_TIMEOUT_S"),
            "store": ("AuditStore",),
            "tables": ("FlaggedItemCategoryRow", "FlaggedItemRow", "RequestLogRow"),
        },
        exported=__all__,
    )
