"""``safegate keys`` and the first-start key of ``safegate serve``, on a SQLite database
under a temporary SAFEGATE_HOME, through the root ``safegate`` command."""

from __future__ import annotations

import hashlib
import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from typer.testing import CliRunner

from gateway.access import KEY_PATTERN, KeyStore, Role
from gateway.config import get_settings
from gateway.db import Database
from gateway.errors import Unauthorized
from safegate.cli import app


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "home"
    monkeypatch.setenv("SAFEGATE_HOME", str(home))
    monkeypatch.delenv("SAFEGATE_DATABASE_URL", raising=False)
    monkeypatch.delenv("SAFEGATE_AUTH__ENABLED", raising=False)
    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()


@pytest.fixture
def store(home: Path) -> Iterator[KeyStore]:
    database = Database(get_settings().database)
    database.migrate()
    yield KeyStore(database)
    database.dispose()


def keys(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["keys", *args])
    return result.exit_code, result.stdout, result.stderr


def test_create_prints_the_key_alone_on_the_last_line_of_stdout(
    home: Path, store: KeyStore
) -> None:
    code, out, err = keys(
        "create", "--name", "ci-bot", "--role", "developer", "--policy", "strict",
        "--rate-limit", "30",
    )  # fmt: skip
    assert code == 0, err
    key = out.splitlines()[-1]
    assert KEY_PATTERN.fullmatch(key)
    assert out == key + "\n"  # nothing else on stdout: KEY=$(safegate keys create ...) works
    assert "created developer key ci-bot (key_" in err
    assert "30 requests/minute" in err
    assert "strict" in err
    assert key not in err

    principal = store.authenticate(key)
    assert (principal.name, principal.role, principal.policy, principal.rate_limit_rpm) == (
        "ci-bot",
        Role.DEVELOPER,
        "strict",
        30,
    )


def test_list_json_shows_no_secret_and_no_hash(home: Path, store: KeyStore) -> None:
    _, admin_key, _ = keys("create", "--name", "ops", "--role", "admin")
    _, dev_key, _ = keys("create", "--name", "ci-bot", "--role", "developer")
    secrets = [admin_key.strip(), dev_key.strip()]

    code, out, err = keys("list", "--json")
    assert code == 0, err
    listed = json.loads(out)
    assert [(k["name"], k["role"], k["status"]) for k in listed] == [
        ("ops", "admin", "active"),
        ("ci-bot", "developer", "active"),
    ]
    assert set(listed[0]) == {
        "id",
        "name",
        "role",
        "prefix",
        "policy",
        "rate_limit_rpm",
        "daily_token_quota",
        "monthly_token_quota",
        "monthly_budget_usd",
        "status",
        "created_at",
        "revoked_at",
        "last_used_at",
    }
    assert [k["prefix"] for k in listed] == [secret[:11] for secret in secrets]
    for secret in secrets:
        assert secret not in out
        assert secret[11:20] not in out
        assert hashlib.sha256(secret.encode()).hexdigest() not in out

    code, table, _ = keys("list")
    assert code == 0
    assert "ci-bot" in table
    assert "developer" in table
    assert all(secret not in table for secret in secrets)


def test_revoke_refuses_the_key_and_shows_in_the_list(home: Path, store: KeyStore) -> None:
    _, out, _ = keys("create", "--name", "ci-bot", "--role", "developer")
    key = out.strip()
    [listed] = json.loads(keys("list", "--json")[1])

    code, out, err = keys("revoke", listed["id"])
    assert code == 0, err
    assert out == ""
    assert f"revoked {listed['id']} (ci-bot)" in err
    with pytest.raises(Unauthorized):
        store.authenticate(key)
    [after] = json.loads(keys("list", "--json")[1])
    assert after["status"] == "revoked"
    assert after["revoked_at"] is not None

    code, _, err = keys("revoke", listed["id"])
    assert code == 0
    assert "already revoked" in err

    code, _, err = keys("revoke", "key_missing")
    assert code == 1
    assert "no API key with id 'key_missing'" in err


def test_revoke_by_name_revokes_the_active_key_of_that_name(home: Path, store: KeyStore) -> None:
    _, out, _ = keys("create", "--name", "ci-bot", "--role", "developer")
    first = out.strip()
    keys("revoke", "ci-bot")
    _, out, _ = keys("create", "--name", "ci-bot", "--role", "developer")  # the name is free
    second = out.strip()
    code, _, err = keys("revoke", "ci-bot")  # the active one: the second
    assert code == 0, err
    for secret in (first, second):
        with pytest.raises(Unauthorized):
            store.authenticate(secret)
    code, _, err = keys("revoke", "ci-bot")  # none active by that name now
    assert code == 2
    assert "no active key named 'ci-bot'" in err


@pytest.mark.parametrize(
    ("args", "exit_code", "message"),
    [
        (["--name", "bad name", "--role", "developer"], 1, "name must be"),
        (["--name", "bot", "--role", "developer", "--policy", "../x"], 1, "policy must be"),
        (["--name", "bot", "--role", "root"], 2, "root"),
        (["--name", "bot", "--role", "developer", "--rate-limit", "0"], 2, "rate-limit"),
    ],
)
def test_create_refuses_bad_input(
    home: Path, store: KeyStore, args: list[str], exit_code: int, message: str
) -> None:
    code, out, err = keys("create", *args)
    assert code == exit_code
    assert out == ""
    assert message in err
    assert store.count() == 0


def test_a_duplicate_active_name_is_refused(home: Path, store: KeyStore) -> None:
    assert keys("create", "--name", "ci-bot", "--role", "developer")[0] == 0
    code, out, err = keys("create", "--name", "ci-bot", "--role", "admin")
    assert code == 1
    assert out == ""
    assert "an active key named 'ci-bot' exists" in err


def test_the_root_command_lists_the_keys_commands() -> None:
    result = CliRunner().invoke(app, ["keys", "--help"])
    assert result.exit_code == 0
    for command in ("create", "list", "revoke"):
        assert command in result.stdout


# -- serve's first start ---------------------------------------------------------------------


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """``uvicorn.run`` records its arguments instead of serving."""
    calls: list[dict[str, object]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    return calls


def test_first_serve_makes_a_local_key_and_shows_how_to_use_it(
    home: Path, no_server: list[dict[str, object]]
) -> None:
    result = CliRunner().invoke(app, ["serve", "--port", "8123"])
    assert result.exit_code == 0, result.stderr
    assert no_server == [
        {"host": "127.0.0.1", "port": 8123, "log_level": "warning", "access_log": False}
    ]
    path = home / "local-developer.key"
    key = path.read_text().strip()
    assert KEY_PATTERN.fullmatch(key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key in result.stderr
    assert str(path) in result.stderr
    curl = (
        f'curl http://127.0.0.1:8123/v1/chat/completions -H "Authorization: Bearer {key}" '
        '-H "Content-Type: application/json" -d \'{"model": "demo", "messages": '
        '[{"role": "user", "content": "How do I reset my console?"}]}\''
    )
    assert curl in result.stderr
    assert key not in result.stdout

    database = Database(get_settings().database)
    try:
        principal = KeyStore(database).authenticate(key)
    finally:
        database.dispose()
    assert (principal.name, principal.role) == ("local-developer", Role.DEVELOPER)

    again = CliRunner().invoke(app, ["serve", "--port", "8123"])
    assert again.exit_code == 0, again.stderr
    assert key not in again.stderr
    assert f"your local developer key is in {path}" in again.stderr
    assert path.read_text().strip() == key


def test_serve_with_auth_disabled_says_so_and_makes_no_key(
    home: Path, no_server: list[dict[str, object]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAFEGATE_AUTH__ENABLED", "false")
    get_settings.cache_clear()
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 0, result.stderr
    assert "authentication is disabled" in result.stderr
    assert not (home / "local-developer.key").exists()
