"""Usage per key, model and UTC day, and how much of its quotas each key has used.

Both read ``request_log`` (``gateway.audit``: each chat request's prompt and completion
tokens, upstream-reported or counted, and its cost when litellm prices the model), the
rows quota checks sum (``gateway.access.quotas``), so the report and the enforcement never
disagree. ``safegate keys usage``, ``GET /v1/admin/usage`` and the dashboard's traffic page
show them. Days are UTC calendar days, grouped in the database (SQLite's ``substr`` of its
ISO timestamps, PostgreSQL's ``to_char`` at UTC). Bad filters raise ``InvalidRequest``;
an unknown key, ``NotFound``; a database that cannot be reached, ``ServiceUnavailable``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from gateway.access.keys import ApiKey
from gateway.access.quotas import Quota, Spent, spent_by_key
from gateway.audit import KEY_ID_CHARS, MODEL_CHARS, RequestLogRow
from gateway.db import Database
from gateway.errors import InvalidRequest, NotFound, ServiceUnavailable

log = logging.getLogger("safegate.usage")

DEFAULT_DAYS = 30
MAX_DAYS = 366
MAX_ROWS = 10_000


@dataclass(frozen=True, slots=True)
class UsageFilter:
    """Which requests to total: ``key_ids`` (``None``: every key), ``model``, and the UTC
    days from ``since`` up to and including ``until`` (at most ``MAX_DAYS``)."""

    since: date
    until: date
    key_ids: tuple[str, ...] | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        if self.until < self.since:
            raise InvalidRequest(
                f"until ({self.until}) is before since ({self.since})",
                param="until",
                code="invalid_value",
            )
        if (self.until - self.since).days + 1 > MAX_DAYS:
            raise InvalidRequest(
                f"at most {MAX_DAYS} days at once, got {(self.until - self.since).days + 1}",
                param="since",
                code="invalid_value",
            )
        if self.model is not None and not 0 < len(self.model) <= MODEL_CHARS:
            raise InvalidRequest(
                f"model must be 1 to {MODEL_CHARS} characters", param="model", code="invalid_value"
            )

    @classmethod
    def last_days(
        cls,
        days: int = DEFAULT_DAYS,
        *,
        today: date,
        key_ids: tuple[str, ...] | None = None,
        model: str | None = None,
    ) -> UsageFilter:
        if not 1 <= days <= MAX_DAYS:
            raise InvalidRequest(
                f"days must be 1 to {MAX_DAYS}, got {days}", param="days", code="invalid_value"
            )
        return cls(
            since=today - timedelta(days=days - 1), until=today, key_ids=key_ids, model=model
        )


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One key's use of one model on one UTC day."""

    key_id: str
    model: str | None
    day: date
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None  # None when no request of the row had a price

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage_by_day(database: Database, where: UsageFilter) -> list[UsageRow]:
    """Totals per key, model and day, newest day first (then key and model)."""
    table = RequestLogRow
    day = _day(table.created_at, dialect=database.engine.dialect.name)
    conditions: list[ColumnElement[bool]] = [
        table.created_at >= _midnight(where.since),
        table.created_at < _midnight(where.until + timedelta(days=1)),
    ]
    if where.key_ids is not None:
        conditions.append(table.key_id.in_(where.key_ids))
    if where.model is not None:
        conditions.append(table.model == where.model)
    query = (
        select(
            table.key_id,
            table.model,
            day,
            func.count(),
            func.coalesce(func.sum(table.prompt_tokens), 0),
            func.coalesce(func.sum(table.completion_tokens), 0),
            func.sum(table.cost_usd),
        )
        .where(*conditions)
        .group_by(table.key_id, table.model, day)
        .order_by(day.desc(), table.key_id, table.model)
        .limit(MAX_ROWS)
    )
    with _reading(database) as session:
        return [
            UsageRow(
                key_id=key_id,
                model=model,
                day=date.fromisoformat(str(when)),
                requests=int(requests),
                prompt_tokens=int(prompt or 0),
                completion_tokens=int(completion or 0),
                cost_usd=None if cost is None else float(cost),
            )
            for key_id, model, when, requests, prompt, completion, cost in session.execute(query)
        ]


def _day(column: Any, *, dialect: str) -> ColumnElement[str]:
    """A row's UTC day as ``YYYY-MM-DD`` text."""
    if dialect == "postgresql":
        return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD")
    # SQLite keeps UtcDateTime as ISO text in UTC ("2026-12-03 06:51:40.123456").
    return func.substr(column, 1, 10)


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


def key_ids_for(keys: Sequence[ApiKey], wanted: str) -> tuple[str, ...]:
    """The ids of the keys ``wanted`` names: an id, or a name (revoked keys of that name
    included, so a rotated key's history shows)."""
    if not 0 < len(wanted) <= KEY_ID_CHARS:
        raise InvalidRequest(
            f"key must be 1 to {KEY_ID_CHARS} characters", param="key", code="invalid_value"
        )
    found = tuple(key.id for key in keys if wanted in (key.id, key.name))
    if not found:
        raise NotFound(f"no API key with id or name {wanted!r}", param="key", code="key_not_found")
    return found


@dataclass(frozen=True, slots=True)
class QuotaUse:
    """A key with a quota, and how much of it is used now."""

    key: ApiKey
    quota: Quota
    spent: Spent


def quota_use(database: Database, keys: Sequence[ApiKey], *, now: datetime) -> list[QuotaUse]:
    """For every active key with a quota: its quotas and today's and this month's use (one
    grouped query for them all)."""
    limited = [key for key in keys if key.active and key.quota.limited]
    with _reading(database) as session:
        totals = spent_by_key(session, [key.id for key in limited], now=now)
    return [QuotaUse(key=key, quota=key.quota, spent=totals[key.id]) for key in limited]


@dataclass(frozen=True, slots=True)
class UsageReport:
    """What ``safegate keys usage`` and ``GET /v1/admin/usage`` report: the totals of the
    filter's days, the quota use of the keys it covers, and each key id's name."""

    where: UsageFilter
    rows: list[UsageRow]
    quotas: list[QuotaUse]
    names: dict[str, str]

    def usage_records(self) -> list[dict[str, Any]]:
        """``rows`` as JSON objects, each with its key's name."""
        return [
            {
                "day": row.day.isoformat(),
                "key_id": row.key_id,
                "key_name": self.names.get(row.key_id),
                "model": row.model,
                "requests": row.requests,
                "prompt_tokens": row.prompt_tokens,
                "completion_tokens": row.completion_tokens,
                "total_tokens": row.total_tokens,
                "cost_usd": row.cost_usd,
            }
            for row in self.rows
        ]

    def quota_records(self) -> list[dict[str, Any]]:
        """``quotas`` as JSON objects."""
        return [
            {
                "key_id": use.key.id,
                "key_name": use.key.name,
                "daily_token_quota": use.quota.daily_tokens,
                "monthly_token_quota": use.quota.monthly_tokens,
                "monthly_budget_usd": use.quota.monthly_budget_usd,
                "tokens_today": use.spent.day_tokens,
                "tokens_this_month": use.spent.month_tokens,
                "cost_this_month_usd": round(use.spent.month_cost_usd, 6),
            }
            for use in self.quotas
        ]


def usage_report(
    database: Database,
    keys: Sequence[ApiKey],
    *,
    now: datetime,
    key: str | None = None,
    model: str | None = None,
    since: date | None = None,
    until: date | None = None,
    days: int = DEFAULT_DAYS,
) -> UsageReport:
    """The report of ``keys`` (every key, revoked ones included) or of the one ``key`` names:
    from ``since`` (default: the last ``days`` days) to ``until`` (default: ``now``'s day)."""
    key_ids = None if key is None else key_ids_for(keys, key)
    last = until or now.date()
    where = (
        UsageFilter(since=since, until=last, key_ids=key_ids, model=model)
        if since is not None
        else UsageFilter.last_days(days, today=last, key_ids=key_ids, model=model)
    )
    rows = usage_by_day(database, where)
    covered = [listed for listed in keys if key_ids is None or listed.id in key_ids]
    return UsageReport(
        where=where,
        rows=rows,
        quotas=quota_use(database, covered, now=now),
        names={listed.id: listed.name for listed in keys},
    )


@contextmanager
def _reading(database: Database) -> Iterator[Session]:
    """A session whose connection failures are 503s, not 500s."""
    try:
        with database.session() as session:
            yield session
    except (OperationalError, InterfaceError) as error:
        log.warning("usage database unavailable", extra={"error": type(error).__name__})
        raise ServiceUnavailable(
            "the usage totals cannot be read; retry shortly", code="database_unavailable"
        ) from None
