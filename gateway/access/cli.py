"""``safegate keys``: create, list and revoke API keys, set their quotas, report usage,
and the first-start local key.

``create`` prints the key's details to stderr and the key alone on the last line of
stdout, so ``KEY=$(safegate keys create --name ci --role developer)`` captures it.
``list`` never shows a key or its hash, only the display prefix. ``quota`` sets a key's
token quotas and budget (``gateway.access.quotas``); ``usage`` totals tokens and cost per key,
model and UTC day (``gateway.access.usage``). The commands work on the database directly
(``SAFEGATE_DATABASE_URL``); a running server refuses a revoked key
within ``SAFEGATE_AUTH__CACHE_TTL_S``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gateway.access.keys import (
    KEY_ID_PREFIX,
    ApiKey,
    KeyStore,
    Role,
)
from gateway.access.local_key import ensure_local_key, local_key_path
from gateway.access.quotas import MAX_TOKEN_QUOTA, Quota, usd
from gateway.access.settings import MAX_REQUESTS_PER_MINUTE
from gateway.access.usage import DEFAULT_DAYS, MAX_DAYS, usage_report
from gateway.config import Settings, get_settings
from gateway.db import Database
from gateway.errors import ApiError
from safegate.output import table_console

keys = typer.Typer(no_args_is_help=True, help="Create, list and revoke API keys; quotas and usage.")
console = Console(stderr=True)


@contextmanager
def _store(settings: Settings) -> Iterator[KeyStore]:
    database = Database(settings.database, timeouts=settings.database_timeouts)
    try:
        database.migrate()
        yield KeyStore(database, cache_ttl_s=settings.auth.cache_ttl_s)
    except ApiError as error:
        console.print(f"[red]error:[/] {escape(error.message)}")
        raise typer.Exit(1) from None
    finally:
        database.dispose()


DailyTokens = Annotated[
    int | None,
    typer.Option(
        "--daily-tokens",
        min=0,
        max=MAX_TOKEN_QUOTA,
        help="Prompt + completion tokens per UTC day (0: none).",
    ),
]
MonthlyTokens = Annotated[
    int | None,
    typer.Option(
        "--monthly-tokens",
        min=0,
        max=MAX_TOKEN_QUOTA,
        help="Prompt + completion tokens per UTC month (0: none).",
    ),
]
MonthlyBudget = Annotated[
    float | None,
    typer.Option(
        "--monthly-budget-usd",
        min=0,
        help="USD per UTC month at litellm's prices (0: none); such a key cannot call a "
        "model litellm has no price for.",
    ),
]


def _quota(daily: int | None, monthly: int | None, budget: float | None) -> Quota:
    """Options as a quota: 0 (or left out) is no limit."""
    return Quota(
        daily_tokens=daily or None,
        monthly_tokens=monthly or None,
        monthly_budget_usd=budget or None,
    )


@keys.command("create")
def create(
    name: Annotated[str, typer.Option(help="A name unique among active keys, e.g. ci-bot.")],
    role: Annotated[Role, typer.Option(help="admin, developer or reviewer.")],
    policy: Annotated[
        str | None, typer.Option(help="Policy name for this key's requests (<name>.yaml).")
    ] = None,
    rate_limit: Annotated[
        int | None,
        typer.Option(
            "--rate-limit",
            min=1,
            max=MAX_REQUESTS_PER_MINUTE,
            help="Requests per minute for this key (default: the service's).",
        ),
    ] = None,
    daily_tokens: DailyTokens = None,
    monthly_tokens: MonthlyTokens = None,
    monthly_budget_usd: MonthlyBudget = None,
) -> None:
    """Create a key; it is printed once, alone on the last line of stdout."""
    with _store(get_settings()) as store:
        issued = store.create(
            name,
            role,
            policy=policy,
            rate_limit_rpm=rate_limit,
            quota=_quota(daily_tokens, monthly_tokens, monthly_budget_usd),
        )
    key = issued.key
    console.print(f"created {key.role.value} key [bold]{escape(key.name)}[/] ({key.id})")
    console.print(f"policy: {key.policy or 'service default'}")
    limit = f"{key.rate_limit_rpm} requests/minute" if key.rate_limit_rpm else "service default"
    console.print(f"rate limit: {limit}")
    console.print(f"quota: {_describe(key.quota)}")
    _note_unpriced(key.quota)
    console.print("store it now: it cannot be shown again")
    typer.echo(issued.secret)


@keys.command("list")
def list_keys(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
) -> None:
    """List keys (never the keys themselves): id, name, role, prefix, status, times."""
    with _store(get_settings()) as store:
        listed = store.list()
    if as_json:
        typer.echo(json.dumps([_record(key) for key in listed], indent=2))
        return
    if not listed:
        console.print("no keys yet: safegate keys create --name NAME --role ROLE")
        return
    table = Table()
    for column in ("id", "name", "role", "prefix", "policy", "rpm", "status", "created", "used"):
        table.add_column(column, no_wrap=True)
    for key in listed:
        table.add_row(
            key.id,
            escape(key.name),
            key.role.value,
            key.prefix + "…",
            key.policy or "",
            str(key.rate_limit_rpm or ""),
            "active" if key.active else "revoked",
            _time(key.created_at),
            _time(key.last_used_at),
        )
    table_console().print(table)


@keys.command("quota")
def set_quota(
    key: Annotated[str, typer.Argument(help="The key's id (key_...) or its name.")],
    daily_tokens: DailyTokens = None,
    monthly_tokens: MonthlyTokens = None,
    monthly_budget_usd: MonthlyBudget = None,
) -> None:
    """Set a key's quotas: each option given replaces that quota (0 lifts it), the others
    stay. Running servers apply it within SAFEGATE_AUTH__CACHE_TTL_S."""
    with _store(get_settings()) as store:
        key_id = _active_key_id(store, key)
        current = store.get(key_id).quota
        quota = Quota(
            daily_tokens=current.daily_tokens if daily_tokens is None else daily_tokens or None,
            monthly_tokens=(
                current.monthly_tokens if monthly_tokens is None else monthly_tokens or None
            ),
            monthly_budget_usd=(
                current.monthly_budget_usd
                if monthly_budget_usd is None
                else monthly_budget_usd or None
            ),
        )
        updated = store.set_quota(key_id, quota)
    console.print(
        f"{key_id} ({escape(updated.name)}) quota: {_describe(updated.quota)}", soft_wrap=True
    )
    _note_unpriced(updated.quota)


def _active_key_id(store: KeyStore, key: str) -> str:
    """``key`` as given when it is an id; otherwise the id of the active key of that name
    (names are unique among active keys)."""
    if key.startswith(KEY_ID_PREFIX):
        return key
    named = [found.id for found in store.list(include_revoked=False) if found.name == key]
    if not named:
        raise typer.BadParameter(f"no active key named {key!r}; 'safegate keys list' lists them")
    return named[0]


@keys.command("usage")
def usage(
    key: Annotated[
        str | None, typer.Option(help="A key's id or name (default: every key).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="One model (default: every model).")] = None,
    since: Annotated[
        datetime | None,
        typer.Option(formats=["%Y-%m-%d"], help="First UTC day, YYYY-MM-DD (wins over --days)."),
    ] = None,
    days: Annotated[
        int, typer.Option(min=1, max=MAX_DAYS, help="The last N UTC days, today included.")
    ] = DEFAULT_DAYS,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
) -> None:
    """Tokens and cost per key, model and UTC day (newest first), and each quota's use."""
    with _store(get_settings()) as store:
        report = usage_report(
            store.database,
            store.list(),
            now=datetime.now(UTC),
            key=key,
            model=model,
            since=None if since is None else since.date(),
            days=days,
        )
    where, rows, uses, names = report.where, report.rows, report.quotas, report.names
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "since": where.since.isoformat(),
                    "until": where.until.isoformat(),
                    "usage": report.usage_records(),
                    "quotas": report.quota_records(),
                },
                indent=2,
            )
        )
        return
    if not rows:
        console.print(
            f"no usage from {where.since} to {where.until}: chat requests through the gateway "
            "are recorded per key (README: Chat through the filter)"
        )
    else:
        table = Table(title=f"usage {where.since} to {where.until} (UTC days)")
        for column in ("day", "key", "model", "requests", "prompt", "completion", "total"):
            table.add_column(
                column, no_wrap=True, justify="right" if column in _NUMERIC else "left"
            )
        table.add_column("cost USD", no_wrap=True, justify="right")
        for row in rows:
            table.add_row(
                row.day.isoformat(),
                escape(names.get(row.key_id, row.key_id)),
                escape(row.model or "(none)"),
                f"{row.requests:,}",
                f"{row.prompt_tokens:,}",
                f"{row.completion_tokens:,}",
                f"{row.total_tokens:,}",
                "" if row.cost_usd is None else f"{row.cost_usd:.4f}",
            )
        table_console().print(table)
    if uses:
        quotas = Table(title="quotas (UTC day and month)")
        for column in ("key", "today", "daily quota", "this month", "monthly quota"):
            quotas.add_column(column, no_wrap=True)
        quotas.add_column("spent USD", no_wrap=True)
        quotas.add_column("budget", no_wrap=True)
        for use in uses:
            quotas.add_row(
                escape(use.key.name),
                f"{use.spent.day_tokens:,}",
                _of(use.quota.daily_tokens),
                f"{use.spent.month_tokens:,}",
                _of(use.quota.monthly_tokens),
                f"{use.spent.month_cost_usd:.4f}",
                "" if use.quota.monthly_budget_usd is None else usd(use.quota.monthly_budget_usd),
            )
        table_console().print(quotas)


def _note_unpriced(quota: Quota) -> None:
    """With a budget: name the configured models it rules out (litellm has no price)."""
    if quota.monthly_budget_usd is None:
        return
    from gateway.chat.metering import priced
    from gateway.chat.upstreams import UpstreamsConfig, UpstreamsError

    try:
        config = UpstreamsConfig.load(get_settings().upstreams.file)
    except UpstreamsError as error:
        console.print(f"[yellow]cannot read the upstreams file to check prices:[/] {error}")
        return
    unpriced = [
        entry.name for entry in config.models if not priced(config.litellm_models(entry.name))
    ]
    if unpriced:
        console.print(
            "note: litellm has no price for "
            + ", ".join(escape(name) for name in unpriced)
            + ": with a budget, this key's requests to them are refused "
            "(403 budget_unenforceable), since the budget could not be kept",
            soft_wrap=True,
        )


_NUMERIC = frozenset({"requests", "prompt", "completion", "total"})


def _of(limit: int | None) -> str:
    return "" if limit is None else f"{limit:,}"


def _describe(quota: Quota) -> str:
    parts = []
    if quota.daily_tokens is not None:
        parts.append(f"{quota.daily_tokens:,} tokens/day")
    if quota.monthly_tokens is not None:
        parts.append(f"{quota.monthly_tokens:,} tokens/month")
    if quota.monthly_budget_usd is not None:
        parts.append(f"{usd(quota.monthly_budget_usd)}/month")
    return ", ".join(parts) or "none"


@keys.command("revoke")
def revoke(key: Annotated[str, typer.Argument(help="The key's id (key_...) or its name.")]) -> None:
    """Revoke a key; running servers refuse it within SAFEGATE_AUTH__CACHE_TTL_S."""
    settings = get_settings()
    with _store(settings) as store:
        key_id = _active_key_id(store, key)
        before = store.get(key_id)
        revoked = store.revoke(key_id)
    if not before.active:
        console.print(f"{key_id} ({escape(revoked.name)}) was already revoked")
        return
    console.print(
        f"revoked {key_id} ({escape(revoked.name)}); running servers refuse it within "
        f"{settings.auth.cache_ttl_s:g} s"
    )


def _record(key: ApiKey) -> dict[str, object]:
    return {
        "id": key.id,
        "name": key.name,
        "role": key.role.value,
        "prefix": key.prefix,
        "policy": key.policy,
        "rate_limit_rpm": key.rate_limit_rpm,
        "daily_token_quota": key.quota.daily_tokens,
        "monthly_token_quota": key.quota.monthly_tokens,
        "monthly_budget_usd": key.quota.monthly_budget_usd,
        "status": "active" if key.active else "revoked",
        "created_at": key.created_at.isoformat(),
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
        "last_used_at": key.last_used_at.isoformat() if key.last_used_at else None,
    }


def _time(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC") if moment else ""


def announce_local_key(settings: Settings, *, host: str, port: int) -> None:
    """Before ``serve``: migrate, make the first-start developer key, say how to use it."""
    if not settings.auth.enabled:
        console.print(
            "[bold yellow]authentication is disabled[/] (SAFEGATE_AUTH__ENABLED=false): every "
            "request acts as admin, with no per-key rate limit"
        )
        return
    path = local_key_path(settings.home_dir)
    with _store(settings) as store:
        key = ensure_local_key(store, settings.home_dir)
    where = escape(str(path))
    if key is None:
        if path.exists():
            console.print(f"your local developer key is in {where}", soft_wrap=True)
        return
    console.print(
        f"created a developer API key (saved to {where}, readable only by you):", soft_wrap=True
    )
    console.print(f"  [bold]{key}[/]", soft_wrap=True)
    console.print("try it:")
    payload = (
        '{"model": "demo", "messages": [{"role": "user", "content": "How do I reset my console?"}]}'
    )
    console.print(
        f'  curl http://{host}:{port}/v1/chat/completions -H "Authorization: Bearer {key}" '
        f"-H \"Content-Type: application/json\" -d '{payload}'",
        markup=False,
        soft_wrap=True,
    )
