"""The audit store: the write path with its spool, draining, and the review reads."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TypeVarTuple

from sqlalchemy import (
    and_,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
    StatementError,
)
from sqlalchemy.orm import Session

from gateway.audit.queries import (
    ItemFilter,
    ItemPage,
    ReviewStats,
    StoredItem,
    decode_cursor,
    encode_cursor,
    filtered,
    item_not_found,
    review_counts,
    review_values,
    stored_item,
)
from gateway.audit.records import (
    DEFAULT_PAGE_SIZE,
    DEFAULT_WRITERS,
    EXPORT_PAGE_SIZE,
    MAX_BULK_IDS,
    MAX_PAGE_SIZE,
    AuditRecord,
    FlaggedItem,
    RequestRecord,
    ReviewLabel,
    ReviewState,
    log,
)
from gateway.audit.settings import DEFAULT_DRAIN_INTERVAL_S, DEFAULT_WRITE_TIMEOUT_S
from gateway.audit.spooled import (
    BadRecord,
    from_spool_line,
    to_spool_line,
)
from gateway.audit.tables import (
    FlaggedItemCategoryRow,
    FlaggedItemRow,
    insert,
)
from gateway.db import Database
from gateway.errors import InvalidRequest, NotFound, ServiceUnavailable
from gateway.spool import DrainReport, SetAside, Spool, SpooledLine

# -- the store ---------------------------------------------------------------------------

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
        records: list[AuditRecord] = list(items)
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

    def _write(self, records: Sequence[AuditRecord]) -> None:
        """Worker thread: insert, or spool on any failure. Never raises."""
        try:
            with self.database.session() as session:
                insert(session, records)
            return
        except Exception as error:  # noqa: BLE001 - whatever failed, the spool keeps the records
            if not isinstance(error, (IntegrityError, DataError)):
                self._healthy = False
            reason = _describe(error)
        self._spool(records, reason)

    def _spool(self, records: Sequence[AuditRecord], reason: str | None) -> None:
        """Worker thread: append to the spool; log and count a loss if even that fails."""
        ids = _ids(records)
        try:
            self.spool.append([to_spool_line(record) for record in records])
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
        decoded: list[tuple[SpooledLine, AuditRecord]] = []
        for line in lines:
            try:
                decoded.append((line, from_spool_line(line.record)))
            except BadRecord as error:
                refused.append(SetAside(line.file, line.line, f"invalid record: {error}"))
        try:
            with self.database.session() as session:
                insert(session, [record for _, record in decoded])
        except SQLAlchemyError as error:
            if not _refused(error):
                raise
            # Some record is refused for good: find which, one at a time.
            for line, record in decoded:
                try:
                    with self.database.session() as session:
                        insert(session, [record])
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
        query = filtered(select(FlaggedItemRow), where or ItemFilter())
        if cursor is not None:
            moment, item_id = decode_cursor(cursor)
            query = query.where(
                or_(
                    FlaggedItemRow.created_at < moment,
                    and_(FlaggedItemRow.created_at == moment, FlaggedItemRow.id < item_id),
                )
            )
        query = query.order_by(FlaggedItemRow.created_at.desc(), FlaggedItemRow.id.desc())
        with self._reading() as session:
            rows = session.scalars(query.limit(limit + 1)).all()
            items = tuple(stored_item(row) for row in rows[:limit])
        has_more = len(rows) > limit
        next_cursor = encode_cursor(items[-1].item) if has_more and items else None
        return ItemPage(items=items, has_more=has_more, next_cursor=next_cursor)

    def get_item(self, item_id: str) -> StoredItem:
        with self._reading() as session:
            row = session.get(FlaggedItemRow, item_id)
            if row is None:
                raise item_not_found(item_id)
            return stored_item(row)

    def label(
        self, item_id: str, *, label: ReviewLabel, note: str | None, reviewer_key_id: str
    ) -> StoredItem:
        """Record a review of one item (a later review replaces it); return the item."""
        values = review_values(label, note=note, reviewer_key_id=reviewer_key_id)
        with self._reading() as session:
            row = session.get(FlaggedItemRow, item_id, with_for_update=True)
            if row is None:
                raise item_not_found(item_id)
            for name, value in values.items():
                setattr(row, name, value)
            session.flush()
            stored = stored_item(row)
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
        values = review_values(label, note=note, reviewer_key_id=reviewer_key_id)
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
            return [stored_item(row) for row in session.scalars(query)]

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
            total = session.scalar(filtered(select(func.count(FlaggedItemRow.id)), where))
            return ReviewStats(
                total=int(total or 0),
                by_category=review_counts(
                    session, where, FlaggedItemCategoryRow.category, query=by_category
                ),
                by_direction=review_counts(session, where, FlaggedItemRow.direction),
                by_review_state={state.value: 0 for state in ReviewState}
                | review_counts(session, where, FlaggedItemRow.review_state),
                by_action=review_counts(session, where, FlaggedItemRow.action),
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


def _ids(records: Sequence[AuditRecord]) -> dict[str, object]:
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
