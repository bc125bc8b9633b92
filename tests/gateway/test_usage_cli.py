"""``safegate keys quota`` and ``safegate keys usage`` over a SQLite database under a
temporary SAFEGATE_HOME, through the root ``safegate`` command; request records are
written by the audit store as the gateway writes them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.access import KeyStore, Role
from gateway.access.quotas import Quota
from gateway.audit import AuditStore, RequestRecord, UsageSource
from gateway.config import get_settings
from gateway.db import Database
from safegate.cli import app
from tests.gateway.conftest import chat_record


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "home"
    monkeypatch.setenv("SAFEGATE_HOME", str(home))
    monkeypatch.delenv("SAFEGATE_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()


@pytest.fixture
def database(home: Path) -> Iterator[Database]:
    database = Database(get_settings().database)
    database.migrate()
    yield database
    database.dispose()


def cells(line: str) -> list[str]:
    """A table row's cells, without rich's borders."""
    return [cell.strip() for cell in line.split("│") if cell.strip()]


def keys(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["keys", *args])
    return result.exit_code, result.stdout, result.stderr


def _record(key_id: str, at: datetime, model: str, tokens: tuple[int, int]) -> RequestRecord:
    return chat_record(
        key_id,
        at,
        model=model,
        tokens=tokens,
        usage_source=UsageSource.COUNTED,
        cost_usd=0.0125 if model == "gpt-4o-mini" else None,
    )


def _traffic(database: Database, tmp_path: Path, key_id: str, other_id: str) -> None:
    today = datetime.now(UTC).replace(hour=0, minute=0, second=1, microsecond=0)
    records = [
        _record(key_id, today, "gpt-4o-mini", (1200, 300)),
        _record(key_id, today + timedelta(seconds=5), "gpt-4o-mini", (800, 200)),
        _record(key_id, today - timedelta(days=1), "demo", (40, 60)),
        _record(other_id, today, "demo", (7, 3)),
        _record(key_id, today - timedelta(days=40), "demo", (999, 999)),  # outside 30 days
    ]
    audit = AuditStore(database, spool_dir=tmp_path / "spool")
    try:
        for record in records:
            asyncio.run(audit.record([], request=record))
    finally:
        asyncio.run(audit.close())


def test_create_and_quota_set_and_lift_a_keys_quotas(home: Path, database: Database) -> None:
    code, _, err = keys(
        "create", "--name", "ci-bot", "--role", "developer", "--daily-tokens", "10000",
    )  # fmt: skip
    assert code == 0, err
    assert "quota: 10,000 tokens/day" in err
    store = KeyStore(database)
    [key] = store.list()
    assert key.quota == Quota(daily_tokens=10_000)

    code, _, err = keys("quota", key.id, "--monthly-tokens", "200000", "--monthly-budget-usd", "5")
    assert code == 0, err
    assert "10,000 tokens/day, 200,000 tokens/month, $5.00/month" in err
    # The shipped upstreams serve the local demo adapter, which litellm cannot price.
    assert "note: litellm has no price for demo: with a budget" in err
    assert store.get(key.id).quota == Quota(
        daily_tokens=10_000, monthly_tokens=200_000, monthly_budget_usd=5.0
    )
    code, _, err = keys("quota", key.id, "--daily-tokens", "0")  # 0 lifts that one
    assert code == 0, err
    assert store.get(key.id).quota == Quota(monthly_tokens=200_000, monthly_budget_usd=5.0)
    code, _, err = keys("quota", key.id, "--monthly-budget-usd", "0.004")  # under a cent
    assert code == 0, err
    assert "200,000 tokens/month, $0.004/month" in err
    code, out, err = keys("usage")
    assert code == 0, err
    assert cells(next(line for line in out.splitlines() if "ci-bot" in line))[-1] == "$0.004"

    code, _, err = keys("quota", key.id, "--daily-tokens", "-5")
    assert code == 2
    code, _, err = keys("quota", "key_nope", "--daily-tokens", "5")
    assert code == 1
    assert "no API key with id 'key_nope'" in err

    code, _, err = keys("quota", "ci-bot", "--daily-tokens", "20000")  # by its name
    assert code == 0, err
    assert store.get(key.id).quota.daily_tokens == 20_000
    code, _, err = keys("quota", "no-such-name", "--daily-tokens", "5")
    assert code == 2
    assert "no active key named 'no-such-name'" in err


def test_usage_reports_per_key_model_and_day_at_natural_width_when_piped(
    home: Path, database: Database, tmp_path: Path
) -> None:
    store = KeyStore(database)
    bot = store.create("ci-bot", Role.DEVELOPER, quota=Quota(daily_tokens=10_000)).key
    other = store.create("other-bot", Role.DEVELOPER).key
    _traffic(database, tmp_path, bot.id, other.id)
    today = datetime.now(UTC).date()
    yesterday = today - timedelta(days=1)

    code, out, err = keys("usage")
    assert code == 0, err
    lines = out.splitlines()
    row = next(line for line in lines if "gpt-4o-mini" in line)
    # CliRunner's stdout is not a terminal: one row per line, at natural width.
    assert cells(row) == [
        today.isoformat(), "ci-bot", "gpt-4o-mini", "2", "2,000", "500", "2,500", "0.0250",
    ]  # fmt: skip
    assert any(cells(line)[:3] == [yesterday.isoformat(), "ci-bot", "demo"] for line in lines)
    assert not any("1,998" in line for line in lines)  # 40 days ago is outside the window
    quota_row = next(line for line in lines if cells(line)[:1] == ["ci-bot"])
    assert cells(quota_row)[:3] == ["ci-bot", "2,500", "10,000"]

    code, out, err = keys("usage", "--key", "ci-bot", "--model", "demo", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert [(r["day"], r["key_name"], r["total_tokens"]) for r in report["usage"]] == [
        (yesterday.isoformat(), "ci-bot", 100)
    ]
    [quota] = report["quotas"]
    assert (quota["key_name"], quota["daily_token_quota"], quota["tokens_today"]) == (
        "ci-bot",
        10_000,
        2_500,
    )

    code, out, _ = keys("usage", "--since", (today - timedelta(days=45)).isoformat(), "--json")
    assert code == 0
    assert sum(r["total_tokens"] for r in json.loads(out)["usage"]) == 2_500 + 100 + 10 + 1_998

    code, _, err = keys("usage", "--key", "nobody")
    assert code == 1
    assert "no API key with id or name 'nobody'" in err
    code, _, err = keys("usage", "--since", "last week")
    assert code == 2


def test_a_budget_note_reads_the_bundled_prices_not_the_network(tmp_path: Path) -> None:
    # litellm fetches its price map at import unless told not to; the CLI tells it for
    # every command (the test environment sets it too, so it is removed here).
    env = {k: v for k, v in os.environ.items() if k != "LITELLM_LOCAL_MODEL_COST_MAP"}
    env["SAFEGATE_HOME"] = str(tmp_path / "home")
    done = subprocess.run(  # noqa: S603 - our own CLI
        [sys.executable, "-m", "safegate.cli", "keys", "create", "--name", "budgeted",
         "--role", "developer", "--monthly-budget-usd", "5"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "model cost map" not in done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("sg-")
