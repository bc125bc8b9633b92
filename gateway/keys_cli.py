"""``safegate keys``: create, list and revoke API keys, and the first-start local key.

``create`` prints the key's details to stderr and the key alone on the last line of
stdout, so ``KEY=$(safegate keys create --name ci --role developer)`` captures it.
``list`` never shows a key or its hash, only the display prefix. The commands work on the
database directly (``SAFEGATE_DATABASE_URL``); a running server refuses a revoked key
within ``SAFEGATE_AUTH__CACHE_TTL_S``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gateway.auth.keys import ApiKey, KeyStore, Role, ensure_local_key, local_key_path
from gateway.config import Settings, get_settings
from gateway.db import Database
from gateway.errors import ApiError
from gateway.ratelimit import MAX_REQUESTS_PER_MINUTE
from safegate.output import table_console

keys = typer.Typer(no_args_is_help=True, help="Create, list and revoke API keys.")
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
) -> None:
    """Create a key; it is printed once, alone on the last line of stdout."""
    with _store(get_settings()) as store:
        issued = store.create(name, role, policy=policy, rate_limit_rpm=rate_limit)
    key = issued.key
    console.print(f"created {key.role.value} key [bold]{escape(key.name)}[/] ({key.id})")
    console.print(f"policy: {key.policy or 'service default'}")
    limit = f"{key.rate_limit_rpm} requests/minute" if key.rate_limit_rpm else "service default"
    console.print(f"rate limit: {limit}")
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


@keys.command("revoke")
def revoke(key_id: Annotated[str, typer.Argument(help="The key's id (key_...).")]) -> None:
    """Revoke a key; running servers refuse it within SAFEGATE_AUTH__CACHE_TTL_S."""
    settings = get_settings()
    with _store(settings) as store:
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
