"""``GET /v1/admin/usage``: tokens and cost per key, model and UTC day; admin only.

Filters: ``key`` (an id, or a name: revoked keys of that name included), ``model``, and
``since``/``until`` (UTC days, ``YYYY-MM-DD``, both included; ``until`` defaults to today
and ``since`` to ``DEFAULT_DAYS`` days before it). The body is an OpenAI-style list,
newest day first; ``quotas`` lists every active key with a quota and what it has used of
it today and this month. Totals come from ``request_log`` (``gateway.access.usage``).
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel

from gateway.access.quotas import next_day, next_month
from gateway.access.usage import usage_report
from gateway.state import Keys, Quotas

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


@router.get("/usage")
def usage(
    keys: Keys,
    quotas: Quotas,
    key: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
    model: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
    since: Annotated[date | None, Query(description="first UTC day, YYYY-MM-DD")] = None,
    until: Annotated[date | None, Query(description="last UTC day, YYYY-MM-DD")] = None,
) -> UsageList:
    now = quotas.now()
    report = usage_report(
        quotas.database, keys.list(), now=now, key=key, model=model, since=since, until=until
    )
    resets = {
        "day_resets_at": int(next_day(now).timestamp()),
        "month_resets_at": int(next_month(now).timestamp()),
    }
    return UsageList(
        since=report.where.since,
        until=report.where.until,
        data=[UsageObject.model_validate(record) for record in report.usage_records()],
        quotas=[
            QuotaObject.model_validate({**record, **resets}) for record in report.quota_records()
        ],
    )
