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
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, TypeVarTuple
from uuid import uuid4

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    ColumnElement,
    Float,
    ForeignKey,
    Index,
    Integer,
    Select,
    String,
    Table,
    Text,
    and_,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
    StatementError,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from gateway.db import Base, Database, UtcDateTime
from gateway.errors import InvalidRequest, NotFound, ServiceUnavailable
from gateway.origin import EVAL_ORIGIN, ORIGIN_CHARS, is_origin, parse_origin
from gateway.safety.taxonomy import Direction, Severity, parse_label
from gateway.safety.verdict import Verdict, check_probability
from gateway.spool import DrainReport, SetAside, Spool, SpooledLine

log = logging.getLogger("safegate.audit")

SPOOL_DIRNAME = "audit-spool"
DEFAULT_DRAIN_INTERVAL_S = 10.0
DEFAULT_WRITE_TIMEOUT_S = 2.0
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


def _now() -> datetime:
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
    created_at: datetime = field(default_factory=_now)
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
    created_at: datetime = field(default_factory=_now)
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


def _check_id(value: str, *, what: str) -> None:
    if not 0 < len(value) <= ID_CHARS or not value.isprintable() or value.strip() != value:
        raise ValueError(f"{what} must be 1 to {ID_CHARS} printable characters, got {value!r}")


def _check_time(moment: datetime) -> None:
    if moment.tzinfo is None:
        raise ValueError("created_at must be timezone-aware")


def _check_origin(origin: str | None) -> None:
    if origin is not None and not is_origin(origin):
        raise ValueError(f"origin must be a lower-case origin like {EVAL_ORIGIN!r}, got {origin!r}")


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


_ITEMS: Table = FlaggedItemRow.__table__  # type: ignore[assignment]
_CATEGORIES: Table = FlaggedItemCategoryRow.__table__  # type: ignore[assignment]
_REQUESTS: Table = RequestLogRow.__table__  # type: ignore[assignment]


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


# -- the store ---------------------------------------------------------------------------

_Record = FlaggedItem | RequestRecord
_Columns = TypeVarTuple("_Columns")


class AuditStore:
    """Flagged items and request metadata in the database, with a spool for bad times."""

    def __init__(
        self,
        database: Database,
        *,
        spool_dir: Path,
        drain_interval_s: float = DEFAULT_DRAIN_INTERVAL_S,
        write_timeout_s: float = DEFAULT_WRITE_TIMEOUT_S,
        record_requests: bool = True,
        writers: int = DEFAULT_WRITERS,
    ) -> None:
        for name, value in (
            ("drain_interval_s", drain_interval_s),
            ("write_timeout_s", write_timeout_s),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if writers < 1:
            raise ValueError(f"writers must be at least 1, got {writers!r}")
        self.database = database
        self.spool = Spool(spool_dir)
        self.drain_interval_s = drain_interval_s
        self.write_timeout_s = write_timeout_s
        self.record_requests = record_requests
        # Separate pools: a hung database write never delays a spool append or a drain.
        self._writers = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="audit-write")
        self._spooler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-spool")
        self._drainer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-drain")
        self._healthy = True  # False after a failed write, until a drain reaches the database
        self._lost = 0
        self._inflight: set[asyncio.Future[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # -- writing ---------------------------------------------------------------------------

    async def record(
        self, items: Sequence[FlaggedItem], *, request: RequestRecord | None = None
    ) -> None:
        """Store ``items`` (and ``request``'s metadata); spool them if the database fails.

        Never raises because the database is down or slow. The write goes on in its thread
        if the caller is cancelled, so a cancelled request loses nothing either.
        """
        records: list[_Record] = list(items)
        if request is not None and self.record_requests:
            records.append(request)
        if not records:
            return
        if self._closed:  # shutting down: the worker pools are gone
            await asyncio.to_thread(self._spool, records, "the audit store is closed")
            return
        loop = asyncio.get_running_loop()
        if not self._healthy:
            await self._track(loop.run_in_executor(self._spooler, self._spool, records, None))
            return
        write = self._track(loop.run_in_executor(self._writers, self._write, records))
        done, _ = await asyncio.wait({write}, timeout=self.write_timeout_s)
        if done:
            return
        # The write may still land; spooling as well is safe because inserts are idempotent.
        self._healthy = False
        await self._track(
            loop.run_in_executor(self._spooler, self._spool, records, "write timed out")
        )

    def _track(self, future: asyncio.Future[None]) -> asyncio.Future[None]:
        self._inflight.add(future)
        future.add_done_callback(self._inflight.discard)
        return asyncio.shield(future)

    def _write(self, records: Sequence[_Record]) -> None:
        """Worker thread: insert, or spool on any failure. Never raises."""
        try:
            with self.database.session() as session:
                _insert(session, records)
            return
        except Exception as error:  # noqa: BLE001 - whatever failed, the spool keeps the records
            if not isinstance(error, (IntegrityError, DataError)):
                self._healthy = False
            reason = _describe(error)
        self._spool(records, reason)

    def _spool(self, records: Sequence[_Record], reason: str | None) -> None:
        """Worker thread: append to the spool; log and count a loss if even that fails."""
        ids = _ids(records)
        try:
            self.spool.append([_to_spool(record) for record in records])
        except Exception as error:  # noqa: BLE001 - a record the service cannot keep is counted
            self._lost += len(records)
            log.error(
                "audit records lost: the database and the spool both failed",
                extra={**ids, "error": reason, "spool_error": _describe(error)},
            )
            return
        log.warning(
            "audit records spooled to disk",
            extra={**ids, "error": reason or "database marked unavailable"},
        )

    # -- draining --------------------------------------------------------------------------

    async def start(self) -> None:
        """Drain the spool now (in the background) and then every ``drain_interval_s``."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._drain_forever(), name="audit-drain"
            )

    async def close(self) -> None:
        """Stop draining, wait for writes under way, make a last drain attempt."""
        if self._closed:
            return
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._inflight:
            await asyncio.wait(set(self._inflight))
        await self.drain()
        self._closed = True
        self._writers.shutdown(wait=True)
        self._spooler.shutdown(wait=True)
        self._drainer.shutdown(wait=True)

    async def drain(self) -> DrainReport | None:
        """One drain pass in the drain thread; None when the database was unreachable."""
        loop = asyncio.get_running_loop()
        return await asyncio.shield(loop.run_in_executor(self._drainer, self.drain_spool))

    def drain_spool(self) -> DrainReport | None:
        """Blocking: move spooled records into the database. Never raises.

        Returns None when the database (or the spool) could not be used; the spool keeps
        everything it had.
        """
        try:
            if not self._healthy:
                with self.database.session() as session:
                    session.execute(select(1))
                self._healthy = True
            if not self.spool.has_waiting():
                return DrainReport(files=0, consumed=0, set_aside=())
            report = self.spool.drain(self._consume)
        except Exception as error:  # noqa: BLE001 - retried next interval; the spool keeps all
            if isinstance(error, SQLAlchemyError):
                self._healthy = False
            log.warning(
                "audit spool drain failed; will retry",
                extra={"error": _describe(error), "pending": self.spool.pending()},
            )
            return None
        if report.files:
            log.info(
                "audit spool drained",
                extra={
                    "files": report.files,
                    "records": report.consumed,
                    "set_aside": len(report.set_aside),
                    "pending": self.spool.pending(),
                },
            )
        return report

    def _consume(self, lines: Sequence[SpooledLine]) -> list[SetAside]:
        refused: list[SetAside] = []
        decoded: list[tuple[SpooledLine, _Record]] = []
        for line in lines:
            try:
                decoded.append((line, _from_spool(line.record)))
            except _BadRecord as error:
                refused.append(SetAside(line.file, line.line, f"invalid record: {error}"))
        try:
            with self.database.session() as session:
                _insert(session, [record for _, record in decoded])
        except SQLAlchemyError as error:
            if not _refused(error):
                raise
            # Some record is refused for good: find which, one at a time.
            for line, record in decoded:
                try:
                    with self.database.session() as session:
                        _insert(session, [record])
                except SQLAlchemyError as single:
                    if not _refused(single):
                        raise
                    refused.append(
                        SetAside(
                            line.file, line.line, f"refused by the database ({_describe(single)})"
                        )
                    )
        return refused

    async def _drain_forever(self) -> None:
        while True:
            await self.drain()
            await asyncio.sleep(self.drain_interval_s)

    def spooled_pending(self) -> int:
        """Records waiting in the spool (this process's view; see ``gateway.spool``)."""
        return self.spool.pending()

    def lost(self) -> int:
        """Records this process could write neither to the database nor to the spool."""
        return self._lost

    # -- reading ---------------------------------------------------------------------------

    def list_items(
        self,
        where: ItemFilter | None = None,
        *,
        limit: int = DEFAULT_PAGE_SIZE,
        cursor: str | None = None,
    ) -> ItemPage:
        """Flagged items newest first, ``limit`` at a time; ``cursor`` continues a listing."""
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise InvalidRequest(
                f"limit must be 1 to {MAX_PAGE_SIZE}, got {limit}",
                param="limit",
                code="invalid_value",
            )
        query = _filtered(select(FlaggedItemRow), where or ItemFilter())
        if cursor is not None:
            moment, item_id = _decode_cursor(cursor)
            query = query.where(
                or_(
                    FlaggedItemRow.created_at < moment,
                    and_(FlaggedItemRow.created_at == moment, FlaggedItemRow.id < item_id),
                )
            )
        query = query.order_by(FlaggedItemRow.created_at.desc(), FlaggedItemRow.id.desc())
        with self._reading() as session:
            rows = session.scalars(query.limit(limit + 1)).all()
            items = tuple(_stored(row) for row in rows[:limit])
        has_more = len(rows) > limit
        next_cursor = _encode_cursor(items[-1].item) if has_more and items else None
        return ItemPage(items=items, has_more=has_more, next_cursor=next_cursor)

    def get_item(self, item_id: str) -> StoredItem:
        with self._reading() as session:
            row = session.get(FlaggedItemRow, item_id)
            if row is None:
                raise _item_not_found(item_id)
            return _stored(row)

    def label(
        self, item_id: str, *, label: ReviewLabel, note: str | None, reviewer_key_id: str
    ) -> StoredItem:
        """Record a review of one item (a later review replaces it); return the item."""
        values = _review_values(label, note=note, reviewer_key_id=reviewer_key_id)
        with self._reading() as session:
            row = session.get(FlaggedItemRow, item_id, with_for_update=True)
            if row is None:
                raise _item_not_found(item_id)
            for name, value in values.items():
                setattr(row, name, value)
            session.flush()
            stored = _stored(row)
        log.info(
            "flagged item reviewed",
            extra={"item_id": item_id, "label": label.value, "reviewer_key_id": reviewer_key_id},
        )
        return stored

    def label_many(
        self,
        item_ids: Sequence[str],
        *,
        label: ReviewLabel,
        note: str | None,
        reviewer_key_id: str,
    ) -> int:
        """Review several items at once, all or none; return how many were labelled."""
        wanted = list(dict.fromkeys(item_ids))
        if not wanted:
            raise InvalidRequest("ids must not be empty", param="ids", code="invalid_value")
        if len(wanted) > MAX_BULK_IDS:
            raise InvalidRequest(
                f"at most {MAX_BULK_IDS} ids per request, got {len(wanted)}",
                param="ids",
                code="too_many_ids",
            )
        values = _review_values(label, note=note, reviewer_key_id=reviewer_key_id)
        with self._reading() as session:
            found = set(
                session.scalars(select(FlaggedItemRow.id).where(FlaggedItemRow.id.in_(wanted)))
            )
            missing = [item_id for item_id in wanted if item_id not in found]
            if missing:
                shown = ", ".join(repr(item_id) for item_id in missing[:20])
                more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
                raise NotFound(
                    f"no flagged items with ids {shown}{more}; nothing was labelled",
                    param="ids",
                    code="item_not_found",
                )
            session.execute(
                update(FlaggedItemRow).where(FlaggedItemRow.id.in_(wanted)).values(**values)
            )
        log.info(
            "flagged items reviewed",
            extra={"count": len(wanted), "label": label.value, "reviewer_key_id": reviewer_key_id},
        )
        return len(wanted)

    def export(self, label: ReviewLabel | None = None) -> Iterator[StoredItem]:
        """Labelled items (of ``label``, or of any label) oldest first.

        The first page is read before this returns, so an unreachable database raises here
        rather than in the middle of a response.
        """
        first = self._export_page(label, after=None)
        return self._export_rest(label, first)

    def _export_rest(
        self, label: ReviewLabel | None, page: Sequence[StoredItem]
    ) -> Iterator[StoredItem]:
        while page:
            yield from page
            if len(page) < EXPORT_PAGE_SIZE:
                return
            last = page[-1].item
            page = self._export_page(label, after=(last.created_at, last.id))

    def _export_page(
        self, label: ReviewLabel | None, *, after: tuple[datetime, str] | None
    ) -> list[StoredItem]:
        query = select(FlaggedItemRow)
        if label is None:
            query = query.where(FlaggedItemRow.review_state != ReviewState.UNREVIEWED.value)
        else:
            query = query.where(FlaggedItemRow.review_state == label.value)
        if after is not None:
            moment, item_id = after
            query = query.where(
                or_(
                    FlaggedItemRow.created_at > moment,
                    and_(FlaggedItemRow.created_at == moment, FlaggedItemRow.id > item_id),
                )
            )
        query = query.order_by(FlaggedItemRow.created_at, FlaggedItemRow.id).limit(EXPORT_PAGE_SIZE)
        with self._reading() as session:
            return [_stored(row) for row in session.scalars(query)]

    def stats(
        self,
        where: ItemFilter | None = None,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> ReviewStats:
        """Counts of flagged items (``where`` filters them) per category, direction, review
        state and action; ``since``/``until`` narrow ``where``'s time window."""
        where = where or ItemFilter()
        if since is not None or until is not None:
            where = replace(where, since=since or where.since, until=until or where.until)
        by_category = select(FlaggedItemCategoryRow.category, func.count()).join(
            FlaggedItemRow, FlaggedItemRow.id == FlaggedItemCategoryRow.item_id
        )
        with self._reading() as session:
            total = session.scalar(_filtered(select(func.count(FlaggedItemRow.id)), where))
            return ReviewStats(
                total=int(total or 0),
                by_category=_counts(
                    session, where, FlaggedItemCategoryRow.category, query=by_category
                ),
                by_direction=_counts(session, where, FlaggedItemRow.direction),
                by_review_state={state.value: 0 for state in ReviewState}
                | _counts(session, where, FlaggedItemRow.review_state),
                by_action=_counts(session, where, FlaggedItemRow.action),
            )

    @contextmanager
    def _reading(self) -> Iterator[Session]:
        """A session whose connection failures become 503s for the review API."""
        try:
            with self.database.session() as session:
                yield session
        except (OperationalError, InterfaceError) as error:
            log.warning("audit database unavailable", extra={"error": _describe(error)})
            raise ServiceUnavailable(
                "the audit database is unavailable; retry shortly", code="database_unavailable"
            ) from None


# -- rows --------------------------------------------------------------------------------


def _insert(session: Session, records: Sequence[_Record]) -> None:
    """Insert records, skipping any whose id is already stored (idempotent)."""
    items = [record for record in records if isinstance(record, FlaggedItem)]
    requests = [record for record in records if isinstance(record, RequestRecord)]
    if items:
        _insert_ignoring_duplicates(session, _ITEMS, [_item_row(item) for item in items])
        _insert_ignoring_duplicates(
            session,
            _CATEGORIES,
            [
                {"item_id": item.id, "category": category}
                for item in items
                for category in dict.fromkeys(_clip(c, LABEL_CHARS) for c in item.categories)
            ],
        )
    if requests:
        _insert_ignoring_duplicates(session, _REQUESTS, [_request_row(r) for r in requests])


def _insert_ignoring_duplicates(
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


def _item_row(item: FlaggedItem) -> dict[str, Any]:
    return {
        "id": item.id,
        "created_at": item.created_at,
        "request_id": _clip(item.request_id, REQUEST_ID_CHARS),
        "key_id": _clip(item.key_id, KEY_ID_CHARS),
        "model": None if item.model is None else _clip(item.model, MODEL_CHARS),
        "direction": item.direction.value,
        "source": _clip(item.source, SOURCE_CHARS),
        "categories": [_clip(category, LABEL_CHARS) for category in item.categories],
        "scores": {_clip(label, LABEL_CHARS): score for label, score in item.scores.items()},
        "severities": {_clip(c, LABEL_CHARS): s for c, s in item.severities.items()},
        "max_severity": item.max_severity,
        "action": item.action,
        "reasons": [_clip(reason, REASON_CHARS) for reason in item.reasons],
        "text": _storable(item.text),
        "text_sha256": _sha256(item.text),
        "review_state": ReviewState.UNREVIEWED.value,
        "review_note": None,
        "reviewer_key_id": None,
        "reviewed_at": None,
        "origin": item.origin,
    }


def _request_row(record: RequestRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "created_at": record.created_at,
        "request_id": _clip(record.request_id, REQUEST_ID_CHARS),
        "key_id": _clip(record.key_id, KEY_ID_CHARS),
        "model": None if record.model is None else _clip(record.model, MODEL_CHARS),
        "route": _clip(record.route, ROUTE_CHARS),
        "status": record.status,
        "blocked": record.blocked,
        "categories": [_clip(category, LABEL_CHARS) for category in record.categories],
        "latency_ms": {_clip(stage, LABEL_CHARS): ms for stage, ms in record.latency_ms.items()},
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "stream": record.stream,
        "origin": record.origin,
        "usage_source": None if record.usage_source is None else record.usage_source.value,
        "cost_usd": record.cost_usd,
    }


def _stored(row: FlaggedItemRow) -> StoredItem:
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


def _filtered(query: Select[*_Columns], where: ItemFilter) -> Select[*_Columns]:
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
    if where.origin is not None:
        conditions.append(FlaggedItemRow.origin == where.origin)
    elif where.hide_eval:
        conditions.append(not_eval(FlaggedItemRow.origin))
    return query.where(*conditions) if conditions else query


def not_eval(origin: ColumnElement[str | None] | Any) -> ColumnElement[bool]:
    """Rows whose origin is not ``eval`` (no origin included): the default views' rule."""
    return or_(origin.is_(None), origin != EVAL_ORIGIN)


def _counts(
    session: Session,
    where: ItemFilter,
    column: Any,
    *,
    query: Select[*tuple[Any, ...]] | None = None,
) -> dict[str, int]:
    """``{value: count}`` of ``column`` over the filtered items, sorted by value."""
    counted: Select[*tuple[Any, ...]] = select(column, func.count()) if query is None else query
    grouped = _filtered(counted, where).group_by(column).order_by(column)
    return {str(value): int(count) for value, count in session.execute(grouped)}


def _review_values(label: ReviewLabel, *, note: str | None, reviewer_key_id: str) -> dict[str, Any]:
    if note is not None and len(note) > MAX_NOTE_CHARS:
        raise InvalidRequest(
            f"note has at most {MAX_NOTE_CHARS} characters, got {len(note)}",
            param="note",
            code="value_too_long",
        )
    return {
        "review_state": ReviewState(label.value).value,
        "review_note": None if note is None else _storable(note),
        "reviewer_key_id": _clip(reviewer_key_id, KEY_ID_CHARS),
        "reviewed_at": _now(),
    }


def _item_not_found(item_id: str) -> NotFound:
    return NotFound(f"no flagged item with id {item_id!r}", param="id", code="item_not_found")


# -- cursors -----------------------------------------------------------------------------


def _encode_cursor(item: FlaggedItem) -> str:
    moment = item.created_at.astimezone(UTC)
    micros = (moment - _EPOCH) // _MICROSECOND
    raw = f"{micros}:{item.id}".encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
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


# -- the spool's records -----------------------------------------------------------------


class _BadRecord(Exception):
    """A spooled line that is JSON but not a record this version can read."""


def _to_spool(record: _Record) -> dict[str, Any]:
    if isinstance(record, FlaggedItem):
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "flagged_item",
            "id": record.id,
            "created_at": record.created_at.isoformat(),
            "request_id": record.request_id,
            "key_id": record.key_id,
            "model": record.model,
            "direction": record.direction.value,
            "source": record.source,
            "categories": list(record.categories),
            "scores": dict(record.scores),
            "severities": dict(record.severities),
            "action": record.action,
            "reasons": list(record.reasons),
            "text": record.text,
            "origin": record.origin,
        }
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "request",
        "id": record.id,
        "created_at": record.created_at.isoformat(),
        "request_id": record.request_id,
        "key_id": record.key_id,
        "model": record.model,
        "route": record.route,
        "status": record.status,
        "blocked": record.blocked,
        "categories": list(record.categories),
        "latency_ms": dict(record.latency_ms),
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "stream": record.stream,
        "origin": record.origin,
        "usage_source": None if record.usage_source is None else record.usage_source.value,
        "cost_usd": record.cost_usd,
    }


def _from_spool(data: Mapping[str, Any]) -> _Record:
    """Decode a spooled record; raise ``_BadRecord`` with a reason that quotes no content."""
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise _BadRecord(f"unknown schema_version {version!r}")
    kind = data.get("kind")
    try:
        if kind == "flagged_item":
            return FlaggedItem(
                id=_field(data, "id", str),
                created_at=_time(data),
                request_id=_field(data, "request_id", str),
                key_id=_field(data, "key_id", str),
                model=_optional(data, "model", str),
                direction=Direction(_field(data, "direction", str)),
                source=_field(data, "source", str),
                categories=tuple(_strings(data, "categories")),
                scores=_field(data, "scores", dict),
                severities=_field(data, "severities", dict),
                action=_field(data, "action", str),
                reasons=tuple(_strings(data, "reasons")),
                text=_field(data, "text", str),
                origin=_optional(data, "origin", str),  # absent in lines spooled before 0004
            )
        if kind == "request":
            return RequestRecord(
                id=_field(data, "id", str),
                created_at=_time(data),
                request_id=_field(data, "request_id", str),
                key_id=_field(data, "key_id", str),
                model=_optional(data, "model", str),
                route=_field(data, "route", str),
                status=_field(data, "status", int),
                blocked=_optional(data, "blocked", str),
                categories=tuple(_strings(data, "categories")),
                latency_ms=_field(data, "latency_ms", dict),
                prompt_tokens=_optional(data, "prompt_tokens", int),
                completion_tokens=_optional(data, "completion_tokens", int),
                stream=_field(data, "stream", bool),
                origin=_optional(data, "origin", str),
                usage_source=_optional(data, "usage_source", str),  # absent before 0006
                cost_usd=_cost(data),
            )
    except _BadRecord:
        raise
    except (TypeError, ValueError) as error:
        raise _BadRecord(f"{kind} fails validation ({type(error).__name__})") from None
    raise _BadRecord(f"unknown kind {kind!r}")


def _field(data: Mapping[str, Any], name: str, kind: type[Any]) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _BadRecord(f"field {name!r} is missing or not {kind.__name__}")
    return value


def _optional(data: Mapping[str, Any], name: str, kind: type[Any]) -> Any:
    return None if data.get(name) is None else _field(data, name, kind)


def _cost(data: Mapping[str, Any]) -> float | None:
    value = data.get("cost_usd")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _BadRecord("field 'cost_usd' is not a number")
    return float(value)


def _strings(data: Mapping[str, Any], name: str) -> list[str]:
    values = _field(data, name, list)
    if not all(isinstance(value, str) for value in values):
        raise _BadRecord(f"field {name!r} must be a list of strings")
    return list(values)


def _time(data: Mapping[str, Any]) -> datetime:
    try:
        moment = datetime.fromisoformat(_field(data, "created_at", str))
    except ValueError:
        raise _BadRecord("field 'created_at' is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise _BadRecord("field 'created_at' has no time zone")
    return moment


# -- helpers -----------------------------------------------------------------------------


def _storable(text: str) -> str:
    """``text`` with NUL and lone surrogates (unstorable in PostgreSQL text) as U+FFFD."""
    return _UNSTORABLE.sub("\ufffd", text)


def _clip(value: str, width: int) -> str:
    return _storable(value)[:width]


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _ids(records: Sequence[_Record]) -> dict[str, object]:
    """What a log line may say about records: counts and ids, never content."""
    items = [record.id for record in records if isinstance(record, FlaggedItem)]
    return {
        "items": len(items),
        "item_ids": items,
        "request_ids": sorted({record.request_id for record in records}),
    }


def _refused(error: SQLAlchemyError) -> bool:
    """True for errors about the data (retrying cannot help), not about the database."""
    if isinstance(error, (IntegrityError, DataError)):
        return True
    return isinstance(error, StatementError) and not isinstance(error, DBAPIError)


def _describe(error: BaseException) -> str:
    """An error's class, and for connection errors the driver's first line: never values.

    SQLAlchemy's own message carries the statement's parameters (texts), so it is never used.
    """
    if isinstance(error, DBAPIError):
        original = error.orig
        name = f"{type(error).__name__}({type(original).__name__})"
        if isinstance(error, (OperationalError, InterfaceError)) and original is not None:
            first = str(original).strip().splitlines()[0] if str(original).strip() else ""
            return f"{name}: {first[:200]}" if first else name
        return name
    if isinstance(error, OSError):
        return f"{type(error).__name__}(errno {error.errno})"
    return type(error).__name__
