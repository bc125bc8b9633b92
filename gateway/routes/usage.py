"""``GET /v1/admin/usage``: tokens and cost per key, model and UTC day; admin only.

Filters: ``key`` (an id, or a name: revoked keys of that name included), ``model``, and
``since``/``until`` (UTC days, ``YYYY-MM-DD``, both included; ``until`` defaults to today
and ``since`` to ``DEFAULT_DAYS`` days before it). The body is an OpenAI-style list,
newest day first; ``quotas`` lists every active key with a quota and what it has used of
it today and this month. Totals come from ``request_log`` (``gateway.access.usage``).
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel

from gateway.access import KeyStore
from gateway.access.quotas import QuotaGuard, next_day, next_month
from gateway.access.usage import DEFAULT_DAYS, UsageFilter, key_ids_for, quota_use, usage_by_day
from gateway.db import Database
from gateway.errors import ServiceUnavailable

router = APIRouter(prefix="/v1/admin", tags=["usage"])


class UsageObject(BaseModel):
    object: Literal["usage.bucket"] = "usage.bucket"
    key_id: str
    key_name: str | None
    model: str | None
    day: date
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float | None


class QuotaObject(BaseModel):
    object: Literal["usage.quota"] = "usage.quota"
    key_id: str
    key_name: str
    daily_token_quota: int | None
    monthly_token_quota: int | None
    monthly_budget_usd: float | None
    tokens_today: int
    tokens_this_month: int
    cost_this_month_usd: float
    day_resets_at: int
    month_resets_at: int


class UsageList(BaseModel):
    object: Literal["list"] = "list"
    since: date
    until: date
    data: list[UsageObject]
    quotas: list[QuotaObject]


class _Running:
    """What the route reads: the key store, and the quota guard's database and clock."""

    def __init__(self, keys: KeyStore, quotas: QuotaGuard) -> None:
        self.keys = keys
        self.quotas = quotas

    @property
    def database(self) -> Database:
        return self.quotas.database


def running(request: Request) -> _Running:
    keys: KeyStore | None = getattr(request.app.state, "keys", None)
    quotas: QuotaGuard | None = getattr(request.app.state, "quotas", None)
    if keys is None or quotas is None:
        raise ServiceUnavailable("the key store is not running yet", code="usage_unavailable")
    return _Running(keys, quotas)


Running = Annotated[_Running, Depends(running)]


@router.get("/usage")
def usage(
    service: Running,
    key: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
    model: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
    since: Annotated[date | None, Query(description="first UTC day, YYYY-MM-DD")] = None,
    until: Annotated[date | None, Query(description="last UTC day, YYYY-MM-DD")] = None,
) -> UsageList:
    now = service.quotas.now()
    last = until or now.date()
    keys = service.keys.list()
    where = UsageFilter(
        since=since or last - timedelta(days=DEFAULT_DAYS - 1),
        until=last,
        key_ids=None if key is None else key_ids_for(keys, key),
        model=model,
    )
    names = {listed.id: listed.name for listed in keys}
    rows = usage_by_day(service.database, where)
    uses = quota_use(
        service.database,
        [k for k in keys if where.key_ids is None or k.id in where.key_ids],
        now=now,
    )
    return UsageList(
        since=where.since,
        until=where.until,
        data=[
            UsageObject(
                key_id=row.key_id,
                key_name=names.get(row.key_id),
                model=row.model,
                day=row.day,
                requests=row.requests,
                prompt_tokens=row.prompt_tokens,
                completion_tokens=row.completion_tokens,
                total_tokens=row.total_tokens,
                cost_usd=row.cost_usd,
            )
            for row in rows
        ],
        quotas=[
            QuotaObject(
                key_id=use.key.id,
                key_name=use.key.name,
                daily_token_quota=use.quota.daily_tokens,
                monthly_token_quota=use.quota.monthly_tokens,
                monthly_budget_usd=use.quota.monthly_budget_usd,
                tokens_today=use.spent.day_tokens,
                tokens_this_month=use.spent.month_tokens,
                cost_this_month_usd=round(use.spent.month_cost_usd, 6),
                day_resets_at=int(next_day(now).timestamp()),
                month_resets_at=int(next_month(now).timestamp()),
            )
            for use in uses
        ],
    )
