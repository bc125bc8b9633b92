"""Per-key token quotas and budgets, checked before a chat request reaches its upstream.

A key may carry (``safegate keys create/quota``; columns of ``api_keys``, revision 0006):

- ``daily_token_quota``: prompt and completion tokens per UTC calendar day;
- ``monthly_token_quota``: the same per UTC calendar month;
- ``monthly_budget_usd``: the cost of those tokens per UTC calendar month, at litellm's
  price for each model (its local price map, ``LITELLM_LOCAL_MODEL_COST_MAP=True``).

Where the totals come from
    The database, which every replica already shares: ``request_log`` keeps each request's
    tokens and cost (``gateway.audit``), and :func:`spent` sums a key's rows since the start
    of its month in one query on the ``(key_id, created_at)`` index. :class:`QuotaGuard`
    caches a key's sums for ``cache_ttl_s`` (``SAFEGATE_QUOTA__CACHE_TTL_S``, 2 s) and adds
    the requests it finishes itself, so one replica sees its own usage at once and every
    replica sees the others' within ``cache_ttl_s``. No Redis is needed and nothing can
    drift from the usage report, which reads the same rows. Only keys with a quota cost a
    read. The check happens before the upstream call, from the totals so far: requests in
    flight when a quota runs out, and those other replicas admit within ``cache_ttl_s``,
    still finish, so a key can pass its quota by what those use (a request's tokens are
    only known once it ends). Records the audit store had to spool while the database was
    down count once drained.

Budgets
    A request's cost is priced when it is recorded; a model litellm has no price for costs
    NULL. A key with a budget therefore cannot call such a model: its request is refused
    with a 403 ``budget_unenforceable`` before anything runs (fail closed), since the
    budget could not be kept.

When a quota is used up
    429 ``quota_exceeded`` (type ``insufficient_quota``) whose message names the quota, the
    key and when it resets (``daily token quota of 10000 tokens for key 'ci-bot' is used
    up (10234 used); it resets at 2026-12-04T00:00:00Z``), with ``Retry-After`` in seconds
    until then. When the database cannot be read, sums cached within ``outage_grace_s``
    are used; past that the request gets a 503 ``quota_unavailable`` (fail closed).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from sqlalchemy import case, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from gateway.access.settings import DEFAULT_QUOTA_CACHE_TTL_S
from gateway.audit import RequestLogRow
from gateway.db import Database
from gateway.errors import Forbidden, InvalidRequest, QuotaExceeded, ServiceUnavailable

log = logging.getLogger("safegate.quotas")

DEFAULT_QUOTA_OUTAGE_GRACE_S = 300.0
QUOTA_UNAVAILABLE_RETRY_AFTER_S = 5
MAX_TOKEN_QUOTA = 10**15
MAX_BUDGET_USD = 1e9


def utc_now() -> datetime:
    return datetime.now(UTC)


Clock = Callable[[], datetime]


@dataclass(frozen=True, slots=True)
class Quota:
    """A key's limits; ``None`` is no limit. Bad values raise ``InvalidRequest``."""

    daily_tokens: int | None = None
    monthly_tokens: int | None = None
    monthly_budget_usd: float | None = None

    def __post_init__(self) -> None:
        for name in ("daily_tokens", "monthly_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not 1 <= value <= MAX_TOKEN_QUOTA):
                raise InvalidRequest(
                    f"{name} must be 1 to {MAX_TOKEN_QUOTA} tokens, got {value!r}",
                    param=name,
                    code="invalid_quota",
                )
        budget = self.monthly_budget_usd
        if budget is not None and not (math.isfinite(budget) and 0 < budget <= MAX_BUDGET_USD):
            raise InvalidRequest(
                f"monthly_budget_usd must be more than 0 and at most {MAX_BUDGET_USD:g}, "
                f"got {budget!r}",
                param="monthly_budget_usd",
                code="invalid_quota",
            )

    @property
    def limited(self) -> bool:
        return any(
            value is not None
            for value in (self.daily_tokens, self.monthly_tokens, self.monthly_budget_usd)
        )


NO_QUOTA = Quota()


# -- windows -----------------------------------------------------------------------------


def day_start(moment: datetime) -> datetime:
    """Midnight UTC of ``moment``'s day."""
    utc = moment.astimezone(UTC)
    return utc.replace(hour=0, minute=0, second=0, microsecond=0)


def month_start(moment: datetime) -> datetime:
    """Midnight UTC of the first of ``moment``'s month."""
    return day_start(moment).replace(day=1)


def next_day(moment: datetime) -> datetime:
    return day_start(moment) + timedelta(days=1)


def next_month(moment: datetime) -> datetime:
    start = month_start(moment)
    return (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )


# -- the totals --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spent:
    """A key's tokens today and this month, and this month's cost (of priced requests)."""

    day: datetime  # the day's start these sums are for
    day_tokens: int
    month_tokens: int
    month_cost_usd: float

    def plus(self, *, tokens: int, cost_usd: float | None) -> Spent:
        return replace(
            self,
            day_tokens=self.day_tokens + tokens,
            month_tokens=self.month_tokens + tokens,
            month_cost_usd=self.month_cost_usd + (cost_usd or 0.0),
        )


def spent(session: Session, key_id: str, *, now: datetime) -> Spent:
    """Sum ``key_id``'s ``request_log`` rows of ``now``'s UTC day and month (one query)."""
    return spent_by_key(session, [key_id], now=now)[key_id]


def spent_by_key(session: Session, key_ids: Collection[str], *, now: datetime) -> dict[str, Spent]:
    """``spent`` of each of ``key_ids`` (zero for a key without requests), in one grouped
    query on the ``(key_id, created_at)`` index."""
    table = RequestLogRow
    day = day_start(now)
    totals = dict.fromkeys(
        key_ids, Spent(day=day, day_tokens=0, month_tokens=0, month_cost_usd=0.0)
    )
    if not totals:
        return totals
    tokens = func.coalesce(table.prompt_tokens, 0) + func.coalesce(table.completion_tokens, 0)
    today = (table.created_at >= day) & (table.created_at < next_day(now))
    query = (
        select(
            table.key_id,
            func.coalesce(func.sum(case((today, tokens), else_=0)), 0),
            func.coalesce(func.sum(tokens), 0),
            func.coalesce(func.sum(table.cost_usd), 0.0),
        )
        .where(
            table.key_id.in_(list(totals)),
            table.created_at >= month_start(now),
            table.created_at < next_month(now),
        )
        .group_by(table.key_id)
    )
    for key_id, day_tokens, month_tokens, cost in session.execute(query):
        totals[key_id] = Spent(
            day=day,
            day_tokens=int(day_tokens),
            month_tokens=int(month_tokens),
            month_cost_usd=float(cost),
        )
    return totals


# -- the guard ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Cached:
    spent: Spent
    month: datetime
    read_at: float  # monotonic time of the database read


class QuotaGuard:
    """Checks a key's quotas from cached database totals; learns of finished requests."""

    def __init__(
        self,
        database: Database,
        *,
        cache_ttl_s: float = DEFAULT_QUOTA_CACHE_TTL_S,
        outage_grace_s: float = DEFAULT_QUOTA_OUTAGE_GRACE_S,
        recording: bool = True,
        now: Clock = utc_now,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not cache_ttl_s > 0:
            raise ValueError(f"cache_ttl_s must be positive, got {cache_ttl_s!r}")
        if not (math.isfinite(outage_grace_s) and outage_grace_s >= 0):
            raise ValueError(f"outage_grace_s must be finite and >= 0, got {outage_grace_s!r}")
        self.database = database
        self.cache_ttl_s = cache_ttl_s
        self.outage_grace_s = outage_grace_s
        self.recording = recording
        self.now = now
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, _Cached] = {}

    async def check(self, *, key_id: str, name: str, quota: Quota, priced: bool) -> None:
        """Raise ``QuotaExceeded`` (429) if a quota of the key is used up, ``Forbidden``
        (403) if it has a budget and the model no price; return at once without quotas."""
        if not quota.limited:
            return
        if not self.recording:
            raise ServiceUnavailable(
                f"key '{name}' has a quota, and quotas are kept from the request log, which "
                "SAFEGATE_AUDIT__RECORD_REQUESTS=false turns off; the request is refused "
                "(fail closed)",
                code="quota_unavailable",
            )
        if quota.monthly_budget_usd is not None and not priced:
            raise Forbidden(
                f"key '{name}' has a monthly budget of {usd(quota.monthly_budget_usd)}, and "
                "litellm has no price for this model, so the budget cannot be kept; the "
                "request is refused (ask an admin to lift the budget or use a priced model)",
                param="model",
                code="budget_unenforceable",
            )
        now = self.now()
        totals = await self.totals(key_id, now=now)
        _enforce(quota, totals, name=name, now=now)

    async def totals(self, key_id: str, *, now: datetime) -> Spent:
        """The key's sums for ``now``'s day and month: cached, or read in a worker thread."""
        month = month_start(now)
        with self._lock:
            hit = self._cache.get(key_id)
        fresh = (
            hit is not None
            and hit.month == month
            and hit.spent.day == day_start(now)
            and self._clock() - hit.read_at < self.cache_ttl_s
        )
        if hit is not None and fresh:
            return hit.spent
        try:
            totals = await asyncio.to_thread(self._read, key_id, now)
        except SQLAlchemyError as error:
            usable = (
                hit is not None
                and hit.month == month
                and hit.spent.day == day_start(now)
                and self._clock() - hit.read_at < self.outage_grace_s
            )
            log.warning(
                "quota totals unreadable",
                extra={"key_id": key_id, "error": type(error).__name__, "cached": usable},
            )
            if hit is not None and usable:
                return hit.spent
            raise ServiceUnavailable(
                "the usage totals cannot be read, so this key's quota cannot be checked and "
                "the request is refused (fail closed); retry shortly",
                code="quota_unavailable",
                headers={"Retry-After": str(QUOTA_UNAVAILABLE_RETRY_AFTER_S)},
            ) from None
        with self._lock:
            self._cache[key_id] = _Cached(totals, month=month, read_at=self._clock())
        return totals

    def _read(self, key_id: str, now: datetime) -> Spent:
        with self.database.session() as session:
            return spent(session, key_id, now=now)

    def spend(self, key_id: str, *, tokens: int, cost_usd: float | None, at: datetime) -> None:
        """A request of ``key_id`` finished: count it in the cached sums of its day."""
        with self._lock:
            hit = self._cache.get(key_id)
            if hit is not None and hit.spent.day == day_start(at):
                hit.spent = hit.spent.plus(tokens=tokens, cost_usd=cost_usd)


def _enforce(quota: Quota, totals: Spent, *, name: str, now: datetime) -> None:
    day_reset = next_day(now)
    month_reset = next_month(now)
    over: list[tuple[str, datetime]] = []
    if quota.daily_tokens is not None and totals.day_tokens >= quota.daily_tokens:
        over.append(
            (
                f"daily token quota of {quota.daily_tokens} tokens for key '{name}' is used "
                f"up ({totals.day_tokens} used)",
                day_reset,
            )
        )
    if quota.monthly_tokens is not None and totals.month_tokens >= quota.monthly_tokens:
        over.append(
            (
                f"monthly token quota of {quota.monthly_tokens} tokens for key '{name}' is "
                f"used up ({totals.month_tokens} used)",
                month_reset,
            )
        )
    budget = quota.monthly_budget_usd
    if budget is not None and totals.month_cost_usd >= budget:
        over.append(
            (
                f"monthly budget of {usd(budget)} for key '{name}' is spent "
                f"({usd(totals.month_cost_usd)} used)",
                month_reset,
            )
        )
    if not over:
        return
    # The one that resets last decides when the key may send again.
    message, reset = max(over, key=lambda pair: pair[1])
    wait = (reset - now).total_seconds()
    log.info("quota exceeded", extra={"key_name": name, "resets_at": _iso(reset)})
    raise QuotaExceeded(
        f"You exceeded your quota: {message}; it resets at {_iso(reset)} (in {_duration(wait)}).",
        retry_after_s=wait,
        code="quota_exceeded",
    )


def usd(amount: float) -> str:
    """``$5.00``; amounts under a cent with their significant digits (``$0.0000135``)."""
    return f"${amount:,.2f}" if amount >= 0.01 or amount == 0 else f"${amount:.8f}".rstrip("0")


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _duration(seconds: float) -> str:
    minutes = max(1, math.ceil(seconds / 60))
    days, rest = divmod(minutes, 24 * 60)
    hours, minutes = divmod(rest, 60)
    parts = [f"{days} d"] if days else []
    if hours:
        parts.append(f"{hours} h")
    if minutes and not days:
        parts.append(f"{minutes} min")
    return " ".join(parts) or "1 min"
