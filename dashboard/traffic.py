"""The traffic page's data: what the gateway filtered, from the audit store's ``request_log``.

The gateway keeps one metadata record per filtered request (``gateway.audit.RequestRecord``:
key id, origin, model, route, status, what was blocked, the labels flagged anywhere in it,
latency per stage; never text). This module reads a time window of them (newest first, at
most ``MAX_REQUESTS``; optionally one key's or one origin's; eval traffic left out unless
included, as on the review queue) and aggregates in pandas: requests and blocks per
category over time, block rate per model, and latency per stage (``prompt_check``,
``upstream``, ``completion_check``, ``first_token``, ``total``). Usage per key (tokens per
UTC day, from ``gateway.access.usage``, the totals ``safegate keys usage`` reports) and each
key's quotas with what is used of them come from the same table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import ColumnElement, func, select

from gateway.access import KeyStore
from gateway.access.usage import UsageFilter, quota_use, usage_by_day
from gateway.audit import AuditStore, RequestLogRow, not_eval
from gateway.origin import EVAL_ORIGIN, parse_origin

if TYPE_CHECKING:
    import pandas as pd

MAX_REQUESTS = 200_000
REQUEST_COLUMNS = (
    "created_at",
    "key_id",
    "origin",
    "model",
    "route",
    "status",
    "blocked",
    "categories",
    "latency_ms",
    "stream",
)
STAGE_ORDER = ("prompt_check", "upstream", "first_token", "completion_check", "total")
NO_MODEL = "(none)"


@dataclass(frozen=True, slots=True)
class Window:
    """The requests of a time window, whether ``MAX_REQUESTS`` cut it short, and how many
    eval requests the window left out because eval traffic was not included."""

    requests: pd.DataFrame
    truncated: bool
    hidden_eval: int = 0


@dataclass(frozen=True, slots=True)
class Senders:
    """Who sent requests in a window: key ids and declared origins (for the filters)."""

    key_ids: tuple[str, ...]
    origins: tuple[str, ...]


def read_requests(
    audit: AuditStore,
    *,
    since: datetime,
    until: datetime | None = None,
    limit: int = MAX_REQUESTS,
    key_id: str | None = None,
    origin: str | None = None,
    include_eval: bool = False,
) -> Window:
    """Request records created in ``[since, until)``, newest first; only ``key_id``'s and
    ``origin``'s when given, and eval traffic only when included or asked for."""
    import pandas as pd

    table = RequestLogRow
    origin = parse_origin(origin, param="origin")
    scope = _scope(since=since, until=until, key_id=key_id)
    hide_eval = not include_eval and origin is None
    query = select(
        table.created_at,
        table.key_id,
        table.origin,
        table.model,
        table.route,
        table.status,
        table.blocked,
        table.categories,
        table.latency_ms,
        table.stream,
    ).where(*scope)
    if origin is not None:
        query = query.where(table.origin == origin)
    elif hide_eval:
        query = query.where(not_eval(table.origin))
    query = query.order_by(table.created_at.desc(), table.id.desc()).limit(limit + 1)
    hidden_query = (
        select(func.count()).select_from(table).where(*scope, table.origin == EVAL_ORIGIN)
    )
    with audit.database.session() as session:
        rows = [tuple(row) for row in session.execute(query)]
        hidden = int(session.scalar(hidden_query) or 0) if hide_eval else 0
    truncated = len(rows) > limit
    frame = pd.DataFrame(rows[:limit], columns=list(REQUEST_COLUMNS))
    frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True)
    frame["model"] = frame["model"].fillna(NO_MODEL)
    frame["blocked"] = frame["blocked"].astype(object).where(frame["blocked"].notna(), None)
    flagged = frame["categories"].map(lambda labels: bool(labels))
    frame["outcome"] = "allowed"
    frame.loc[flagged, "outcome"] = "flagged"
    frame.loc[frame["blocked"].notna(), "outcome"] = "blocked"
    return Window(requests=frame, truncated=truncated, hidden_eval=hidden)


def senders(audit: AuditStore, *, since: datetime, until: datetime | None = None) -> Senders:
    """The key ids and origins of the window's requests, eval traffic's included."""
    table = RequestLogRow
    scope = _scope(since=since, until=until, key_id=None)
    with audit.database.session() as session:
        keys = session.scalars(select(table.key_id).where(*scope).distinct()).all()
        origins = session.scalars(
            select(table.origin).where(*scope, table.origin.is_not(None)).distinct()
        ).all()
    return Senders(
        key_ids=tuple(sorted(keys)),
        origins=tuple(sorted({o for o in origins if o}, key=lambda o: (o != EVAL_ORIGIN, o))),
    )


def _scope(
    *, since: datetime, until: datetime | None, key_id: str | None
) -> list[ColumnElement[bool]]:
    table = RequestLogRow
    conditions = [table.created_at >= since]
    if until is not None:
        conditions.append(table.created_at < until)
    if key_id:
        conditions.append(table.key_id == key_id)
    return conditions


def bucket_for(span: timedelta) -> str:
    """A pandas frequency giving a readable number of points over ``span``."""
    if span <= timedelta(hours=6):
        return "5min"
    if span <= timedelta(days=2):
        return "1h"
    return "1D"


def totals(requests: pd.DataFrame) -> dict[str, float]:
    """Requests, blocked, flagged (not blocked) and the block rate of a window."""
    total = len(requests)
    blocked = int((requests["outcome"] == "blocked").sum()) if total else 0
    flagged = int((requests["outcome"] == "flagged").sum()) if total else 0
    return {
        "requests": total,
        "blocked": blocked,
        "flagged": flagged,
        "block_rate": blocked / total if total else 0.0,
    }


def requests_over_time(requests: pd.DataFrame, *, freq: str) -> pd.DataFrame:
    """``time, outcome, requests``: requests per bucket, split allowed / flagged / blocked."""
    import pandas as pd

    if requests.empty:
        return pd.DataFrame(columns=["time", "outcome", "requests"])
    counted = (
        requests.assign(time=requests["created_at"].dt.floor(freq))
        .groupby(["time", "outcome"])
        .size()
        .rename("requests")
        .reset_index()
    )
    return counted.sort_values(["time", "outcome"], ignore_index=True)


def categories_over_time(requests: pd.DataFrame, *, freq: str) -> pd.DataFrame:
    """``time, category, outcome, requests``: flagged and blocked requests per label.

    A request that flagged several labels counts once under each.
    """
    import pandas as pd

    columns = ["time", "category", "outcome", "requests"]
    hits = requests[requests["outcome"] != "allowed"]
    if hits.empty:
        return pd.DataFrame(columns=columns)
    exploded = hits.assign(
        time=hits["created_at"].dt.floor(freq), category=hits["categories"]
    ).explode("category")
    exploded = exploded.dropna(subset=["category"])
    counted = (
        exploded.groupby(["time", "category", "outcome"]).size().rename("requests").reset_index()
    )
    return counted[columns].sort_values(["time", "category", "outcome"], ignore_index=True)


def per_category(requests: pd.DataFrame) -> pd.DataFrame:
    """``category, blocked, flagged``: requests per label over the whole window."""
    import pandas as pd

    hits = requests[requests["outcome"] != "allowed"]
    if hits.empty:
        return pd.DataFrame(columns=["category", "blocked", "flagged"])
    exploded = hits.assign(category=hits["categories"]).explode("category")
    table = pd.crosstab(exploded["category"], exploded["outcome"])
    for outcome in ("blocked", "flagged"):
        if outcome not in table:
            table[outcome] = 0
    table = table[["blocked", "flagged"]].reset_index()
    table.columns = ["category", "blocked", "flagged"]
    return table.sort_values(["blocked", "flagged", "category"], ascending=[False, False, True])


def block_rate_per_model(requests: pd.DataFrame) -> pd.DataFrame:
    """``model, requests, blocked, blocked_prompt, blocked_completion, block_rate``."""
    import pandas as pd

    columns = [
        "model",
        "requests",
        "blocked",
        "blocked_prompt",
        "blocked_completion",
        "block_rate",
    ]
    if requests.empty:
        return pd.DataFrame(columns=columns)
    grouped = requests.groupby("model")
    table = pd.DataFrame(
        {
            "requests": grouped.size(),
            "blocked": grouped["outcome"].apply(lambda s: int((s == "blocked").sum())),
            "blocked_prompt": grouped["blocked"].apply(lambda s: int((s == "prompt").sum())),
            "blocked_completion": grouped["blocked"].apply(
                lambda s: int((s == "completion").sum())
            ),
        }
    ).reset_index()
    table["block_rate"] = table["blocked"] / table["requests"]
    return table[columns].sort_values(["block_rate", "model"], ascending=[False, True])


def stage_latencies(requests: pd.DataFrame) -> pd.DataFrame:
    """Long form ``stage, ms``: one row per request and stage it went through."""
    import pandas as pd

    rows = [
        {"stage": stage, "ms": float(ms)}
        for latencies in requests["latency_ms"]
        for stage, ms in (latencies or {}).items()
    ]
    frame = pd.DataFrame(rows, columns=["stage", "ms"])
    return frame


def latency_per_stage(requests: pd.DataFrame) -> pd.DataFrame:
    """``stage, requests, p50_ms, p95_ms, p99_ms, max_ms`` in the order a request runs."""
    import pandas as pd

    samples = stage_latencies(requests)
    columns = ["stage", "requests", "p50_ms", "p95_ms", "p99_ms", "max_ms"]
    if samples.empty:
        return pd.DataFrame(columns=columns)
    grouped = samples.groupby("stage")["ms"]
    table = pd.DataFrame(
        {
            "requests": grouped.size(),
            "p50_ms": grouped.quantile(0.50),
            "p95_ms": grouped.quantile(0.95),
            "p99_ms": grouped.quantile(0.99),
            "max_ms": grouped.max(),
        }
    ).reset_index()
    order = {stage: index for index, stage in enumerate(STAGE_ORDER)}
    table["_order"] = table["stage"].map(lambda stage: order.get(stage, len(order)))
    table = table.sort_values(["_order", "stage"]).drop(columns="_order")
    return table[columns].reset_index(drop=True)


def tokens_per_day(
    audit: AuditStore, *, since: datetime, until: datetime, key_id: str | None = None
) -> pd.DataFrame:
    """``day, key_id, requests, prompt_tokens, completion_tokens, total_tokens, cost_usd``:
    one row per key and UTC day of ``[since, until]`` (models added up), oldest day first."""
    import pandas as pd

    columns = [
        "day",
        "key_id",
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cost_usd",
    ]
    where = UsageFilter(
        since=since.date(), until=until.date(), key_ids=None if key_id is None else (key_id,)
    )
    rows = usage_by_day(audit.database, where)
    if not rows:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame(
        [
            {
                "day": row.day.isoformat(),
                "key_id": row.key_id,
                "requests": row.requests,
                "prompt_tokens": row.prompt_tokens,
                "completion_tokens": row.completion_tokens,
                "total_tokens": row.total_tokens,
                "cost_usd": row.cost_usd,
            }
            for row in rows
        ]
    )
    summed = frame.groupby(["day", "key_id"], as_index=False).agg(
        requests=("requests", "sum"),
        prompt_tokens=("prompt_tokens", "sum"),
        completion_tokens=("completion_tokens", "sum"),
        total_tokens=("total_tokens", "sum"),
        cost_usd=("cost_usd", lambda costs: costs.sum(min_count=1)),
    )
    return summed[columns].sort_values(["day", "key_id"], ignore_index=True)


def quota_table(audit: AuditStore, keys: KeyStore, *, now: datetime) -> pd.DataFrame:
    """``key, today, daily_quota, daily_used, this_month, monthly_quota, monthly_used,
    spent_usd, budget_usd, budget_used``: every active key with a quota (``*_used`` are
    fractions, empty where the key has no such quota)."""
    import pandas as pd

    columns = [
        "key",
        "today",
        "daily_quota",
        "daily_used",
        "this_month",
        "monthly_quota",
        "monthly_used",
        "spent_usd",
        "budget_usd",
        "budget_used",
    ]

    def share(used: float, limit: float | None) -> float | None:
        return None if limit is None else used / limit

    uses = quota_use(audit.database, keys.list(include_revoked=False), now=now)
    return pd.DataFrame(
        [
            {
                "key": f"{use.key.name} ({use.key.id})",
                "today": use.spent.day_tokens,
                "daily_quota": use.quota.daily_tokens,
                "daily_used": share(use.spent.day_tokens, use.quota.daily_tokens),
                "this_month": use.spent.month_tokens,
                "monthly_quota": use.quota.monthly_tokens,
                "monthly_used": share(use.spent.month_tokens, use.quota.monthly_tokens),
                "spent_usd": use.spent.month_cost_usd,
                "budget_usd": use.quota.monthly_budget_usd,
                "budget_used": share(use.spent.month_cost_usd, use.quota.monthly_budget_usd),
            }
            for use in uses
        ],
        columns=columns,
    )
