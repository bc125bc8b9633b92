"""API keys and roles: the store on real SQLite and PostgreSQL, ``require`` on a small app,
and the service's routes behind it (401, 403, 429 bodies, revocation, per-key limits).

Stores run on a SQLite file under ``tmp_path`` and, for the tests marked ``postgres``, on
the local PostgreSQL server in a fresh schema (``postgres_url`` in the conftest). Every
schema comes from the Alembic migrations, as in the service. Where the safety engine does
not matter the app gets a one-member engine that flags nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import pytest
import redis
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi import APIRouter, Depends, FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import Engine, event, inspect, text
from sqlalchemy.exc import IntegrityError

from gateway import errors
from gateway.access import (
    ANONYMOUS,
    KEY_PATTERN,
    LOCAL_KEY_NAME,
    ApiKeyRow,
    KeyStore,
    Principal,
    Role,
    ensure_local_key,
    local_key_path,
    require,
    require_by_method,
)
from gateway.access.ratelimit import InProcessRateLimiter, RateLimiter, RedisRateLimiter
from gateway.app import create_app
from gateway.blocklists import BlocklistStore
from gateway.config import AuthSettings, RateLimitSettings, Settings
from gateway.db import Base, Database
from gateway.errors import Conflict, InvalidRequest, NotFound, ServiceUnavailable, Unauthorized
from gateway.logs import JsonFormatter
from gateway.safety.engine import MemberSpec, SafetyEngine
from gateway.safety.normalize import NormalizedText
from gateway.safety.policy import Policy
from gateway.safety.taxonomy import Category
from gateway.safety.verdict import Detection
from safegate.database import make_engine
from tests.gateway.conftest import (
    FREEZE_MARGIN_S,
    FROZEN_TIMEOUTS,
    alembic_config,
    backend_pid,
    bare_runtime,
    frozen,
    issue_key,
    ready_client,
    tagged,
)

REDIS_URL = os.environ.get("SAFEGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class WallClock:
    """A UTC wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def error(message: str, *, type: str, code: str | None) -> dict[str, object]:
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


# -- databases ---------------------------------------------------------------------------


@pytest.fixture
def store(sqlite_database: Database) -> KeyStore:
    return KeyStore(sqlite_database)


# -- the migration -----------------------------------------------------------------------


def test_migration_matches_the_table_and_downgrades(database: Database) -> None:
    def ours(item: object, name: str | None, type_: str, reflected: bool, other: object) -> bool:
        table = item if type_ == "table" else getattr(item, "table", None)
        return getattr(table, "name", None) == "api_keys"

    with database.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"include_object": ours})
        assert compare_metadata(context, Base.metadata) == []
    indexes = {index["name"]: index for index in inspect(database.engine).get_indexes("api_keys")}
    assert indexes["uq_api_keys_active_name"]["unique"]
    assert indexes["uq_api_keys_secret_hash"]["unique"]

    with database.engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0001")
    tables = set(inspect(database.engine).get_table_names())
    assert "api_keys" not in tables
    assert {"blocklists", "blocklist_items"} <= tables
    database.migrate()
    assert "api_keys" in inspect(database.engine).get_table_names()


# -- the store ---------------------------------------------------------------------------


def test_only_a_hash_and_a_display_prefix_are_stored(database: Database) -> None:
    store = KeyStore(database)
    issued = store.create("ci-bot", Role.DEVELOPER, policy="strict", rate_limit_rpm=30)
    secret = issued.secret
    assert KEY_PATTERN.fullmatch(secret)
    assert secret not in repr(issued)
    assert re.fullmatch(r"key_[0-9a-f]{24}", issued.key.id)
    assert issued.key.prefix == secret[:11]

    with database.engine.connect() as connection:
        row = connection.execute(
            text("SELECT * FROM api_keys WHERE id = :id"), {"id": issued.key.id}
        ).one()
    stored = row._asdict()
    assert stored["secret_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    assert stored["prefix"] == secret[:11]
    assert (stored["name"], stored["role"], stored["policy"], stored["rate_limit_rpm"]) == (
        "ci-bot",
        "developer",
        "strict",
        30,
    )
    assert stored["revoked_at"] is None
    assert stored["last_used_at"] is None
    # The secret, or any long piece of it past the prefix, is in no column.
    for value in stored.values():
        assert secret[11:] not in str(value)


def test_create_list_get(database: Database) -> None:
    store = KeyStore(database)
    before = datetime.now(UTC)
    admin = store.create("ops", Role.ADMIN).key
    reviewer = store.create("moderator", "reviewer").key
    assert admin.role is Role.ADMIN
    assert reviewer.role is Role.REVIEWER
    assert before - timedelta(seconds=1) <= admin.created_at <= datetime.now(UTC)
    assert admin.created_at.utcoffset() == timedelta(0)
    assert admin.active
    assert [key.id for key in store.list()] == [admin.id, reviewer.id]
    assert store.get(admin.id) == admin
    assert store.count() == 2
    with pytest.raises(NotFound) as missing:
        store.get("key_missing")
    assert (missing.value.param, missing.value.code) == ("key_id", "key_not_found")
    with pytest.raises(NotFound):
        store.revoke("key_missing")


def test_names_are_unique_among_active_keys(database: Database) -> None:
    store = KeyStore(database)
    first = store.create("ci-bot", Role.DEVELOPER)
    with pytest.raises(Conflict) as taken:
        store.create("ci-bot", Role.ADMIN)
    assert (taken.value.param, taken.value.code) == ("name", "key_name_exists")

    store.revoke(first.key.id)
    second = store.create("ci-bot", Role.DEVELOPER)  # a rotated key takes the old name
    assert [(k.name, k.active) for k in store.list()] == [("ci-bot", False), ("ci-bot", True)]
    assert [k.id for k in store.list(include_revoked=False)] == [second.key.id]

    # The database enforces it too, for a create that raced past the check.
    duplicate = ApiKeyRow(
        id="key_" + uuid.uuid4().hex[:24],
        name="ci-bot",
        role="developer",
        secret_hash="0" * 64,
        prefix="sg-xxxxxxxx",
        created_at=datetime.now(UTC),
    )
    with pytest.raises(IntegrityError), database.session() as session:
        session.add(duplicate)


@pytest.mark.parametrize(
    ("name", "role", "policy", "rpm", "param", "code"),
    [
        ("", "developer", None, None, "name", "invalid_name"),
        ("has space", "developer", None, None, "name", "invalid_name"),
        ("-leading", "developer", None, None, "name", "invalid_name"),
        ("x" * 65, "developer", None, None, "name", "invalid_name"),
        ("bot\n", "developer", None, None, "name", "invalid_name"),
        ("bot", "root", None, None, "role", "invalid_role"),
        ("bot", "developer", "Strict", None, "policy", "invalid_policy"),
        ("bot", "developer", "../etc/passwd", None, "policy", "invalid_policy"),
        ("bot", "developer", "", None, "policy", "invalid_policy"),
        ("bot", "developer", None, 0, "rate_limit_rpm", "invalid_rate_limit"),
        ("bot", "developer", None, 10_000_000, "rate_limit_rpm", "invalid_rate_limit"),
    ],
)
def test_bad_keys_are_refused(
    store: KeyStore,
    name: str,
    role: str,
    policy: str | None,
    rpm: int | None,
    param: str,
    code: str,
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        store.create(name, role, policy=policy, rate_limit_rpm=rpm)
    assert (refused.value.param, refused.value.code) == (param, code)
    assert store.count() == 0


def test_authenticate_returns_the_principal(database: Database) -> None:
    store = KeyStore(database)
    issued = store.create("ci-bot", Role.DEVELOPER, policy="strict", rate_limit_rpm=30)
    assert store.authenticate(issued.secret) == Principal(
        key_id=issued.key.id,
        name="ci-bot",
        role=Role.DEVELOPER,
        policy="strict",
        rate_limit_rpm=30,
    )
    for wrong in [
        "",
        "sg-",
        issued.secret[:-1],
        issued.secret + "x",
        issued.secret[:-1] + ("A" if issued.secret[-1] != "A" else "B"),
        "sk-" + issued.secret[3:],
        "sg-" + "A" * 43,
    ]:
        with pytest.raises(Unauthorized) as refused:
            store.authenticate(wrong)
        assert refused.value.code == "invalid_api_key"


def test_last_used_is_written_at_most_once_a_minute(sqlite_database: Database) -> None:
    clock, wall = Clock(), WallClock()
    store = KeyStore(sqlite_database, cache_ttl_s=5.0, clock=clock, now=wall)
    issued = store.create("ci-bot", Role.DEVELOPER)
    first_use = wall.now
    store.authenticate(issued.secret)
    assert store.get(issued.key.id).last_used_at == first_use

    wall.now += timedelta(seconds=30)
    clock.now += 30  # past the cache: read again, but too soon to write
    store.authenticate(issued.secret)
    assert store.get(issued.key.id).last_used_at == first_use

    wall.now += timedelta(seconds=31)
    clock.now += 31
    store.authenticate(issued.secret)
    assert store.get(issued.key.id).last_used_at == wall.now


def test_a_cached_key_costs_no_database_read(store: KeyStore) -> None:
    issued = store.create("ci-bot", Role.DEVELOPER)
    principal = store.authenticate(issued.secret)
    statements: list[str] = []

    def record(*args: object) -> None:
        statements.append(str(args[2]))

    event.listen(store.database.engine, "before_cursor_execute", record)
    try:
        assert store.cached(issued.secret) == principal
        assert store.authenticate(issued.secret) == principal
    finally:
        event.remove(store.database.engine, "before_cursor_execute", record)
    assert statements == []


def test_revoke_takes_effect_at_once_through_the_same_store(database: Database) -> None:
    store = KeyStore(database, cache_ttl_s=3600)
    issued = store.create("ci-bot", Role.DEVELOPER)
    other = store.create("other", Role.DEVELOPER)
    store.authenticate(issued.secret)
    store.authenticate(other.secret)
    assert store.cached(issued.secret) is not None

    revoked = store.revoke(issued.key.id)
    assert revoked.revoked_at is not None
    assert not revoked.active
    assert store.cached(issued.secret) is None
    with pytest.raises(Unauthorized) as refused:
        store.authenticate(issued.secret)
    assert refused.value.code == "invalid_api_key"
    assert "revoked" in refused.value.message
    assert store.cached(other.secret) is not None  # other keys stay cached

    again = store.revoke(issued.key.id)  # idempotent: the first revocation time stays
    assert again.revoked_at == revoked.revoked_at


def test_a_lookup_that_overlaps_a_revoke_is_not_cached(store: KeyStore) -> None:
    issued = store.create("ci-bot", Role.DEVELOPER)
    original = store._lookup

    def lookup_then_revoke(digest: str) -> Principal:
        principal = original(digest)  # read before the revoke committed
        store.revoke(issued.key.id)
        return principal

    store._lookup = lookup_then_revoke  # type: ignore[method-assign]
    store.authenticate(issued.secret)
    store._lookup = original  # type: ignore[method-assign]
    assert store.cached(issued.secret) is None
    with pytest.raises(Unauthorized):
        store.authenticate(issued.secret)


def test_another_replicas_revoke_applies_within_the_cache_ttl(database: Database) -> None:
    clock = Clock()
    here = KeyStore(database, cache_ttl_s=5.0, clock=clock)
    there = KeyStore(Database(database.url))
    try:
        issued = here.create("ci-bot", Role.DEVELOPER)
        here.authenticate(issued.secret)
        there.revoke(issued.key.id)
        clock.now += 4.9
        assert here.authenticate(issued.secret).key_id == issued.key.id  # still cached
        clock.now += 0.2
        with pytest.raises(Unauthorized):
            here.authenticate(issued.secret)
    finally:
        there.database.dispose()


def test_the_cache_is_bounded(sqlite_database: Database) -> None:
    store = KeyStore(sqlite_database, cache_max_entries=2)
    secrets = [store.create(f"bot-{i}", Role.DEVELOPER).secret for i in range(3)]
    for secret in secrets:
        store.authenticate(secret)
    assert store.cached(secrets[0]) is None  # the least recently used went
    assert store.cached(secrets[1]) is not None
    assert store.cached(secrets[2]) is not None


def test_an_unreadable_key_store_fails_closed(store: KeyStore) -> None:
    issued = store.create("ci-bot", Role.DEVELOPER)
    with store.database.engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0001")
    with pytest.raises(ServiceUnavailable) as refused:
        store.authenticate(issued.secret)
    assert refused.value.code == "key_store_unavailable"


# -- when the key store cannot be reached --------------------------------------------------


class Captured(logging.Handler):
    """Every record of ``safegate.auth``, formatted as the service writes them."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self) -> list[str]:
        return [self.format(record) for record in self.records]


@pytest.fixture
def auth_log() -> Iterator[Captured]:
    handler = Captured()
    logger = logging.getLogger("safegate.auth")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def unreachable(tmp_path: Path) -> Iterator[Database]:
    """A real SQLite database that cannot be opened: its folder is gone."""
    folder = tmp_path / "gone"
    db = Database(f"sqlite:///{folder}/safegate.db")  # makes the folder and an empty file
    shutil.rmtree(folder)
    yield db
    db.dispose()


def connection_attempts(database: Database) -> list[float]:
    """Every time ``database`` tries to open a connection (the attempt still goes ahead)."""
    attempts: list[float] = []

    @event.listens_for(database.engine, "do_connect")
    def count(*args: object) -> None:
        attempts.append(time.monotonic())

    return attempts


def test_a_seen_key_works_within_the_outage_grace_and_an_unseen_one_gets_a_503(
    sqlite_database: Database, unreachable: Database, auth_log: Captured
) -> None:
    clock = Clock()
    stale: list[None] = []
    store = KeyStore(
        sqlite_database,
        cache_ttl_s=5.0,
        outage_grace_s=60.0,
        clock=clock,
        on_stale=lambda: stale.append(None),
    )
    seen = store.create("seen", Role.DEVELOPER, rate_limit_rpm=30)
    unseen = store.create("unseen", Role.DEVELOPER)
    assert store.authenticate(seen.secret).key_id == seen.key.id  # checked at 1000
    store.database = unreachable  # the database goes away
    attempts = connection_attempts(unreachable)

    clock.now += 10  # past the cache TTL: the database is asked, and cannot answer
    principal = store.authenticate(seen.secret)
    assert (principal.key_id, principal.role, principal.rate_limit_rpm) == (
        seen.key.id,
        Role.DEVELOPER,
        30,
    )
    assert len(attempts) == 1
    assert len(stale) == 1
    [warning] = [r for r in auth_log.records if r.levelno == logging.WARNING]
    assert warning.getMessage() == "key store unreachable; admitting a key checked earlier"
    assert (warning.key_id, warning.checked_s_ago) == (seen.key.id, 10.0)  # type: ignore[attr-defined]
    assert warning.error == "OperationalError(OperationalError)"  # type: ignore[attr-defined]

    clock.now += 4.9  # within a TTL of that try, the database is not tried again
    assert store.cached(seen.secret) == principal
    assert store.authenticate(seen.secret) == principal
    assert len(attempts) == 1
    assert len(stale) == 3  # every request admitted stale is counted

    with pytest.raises(ServiceUnavailable) as refused:  # never checked: cannot be verified
        store.authenticate(unseen.secret)
    assert refused.value.code == "key_store_unavailable"
    assert refused.value.headers == {"Retry-After": "5"}
    assert "cannot be verified" in refused.value.message

    clock.now = 1000 + 59.9  # still within 60 s of the last successful check
    assert store.authenticate(seen.secret) == principal
    clock.now = 1000 + 60.0  # the grace is over: a 503 too, and the entry is gone
    with pytest.raises(ServiceUnavailable) as expired:
        store.authenticate(seen.secret)
    assert expired.value.code == "key_store_unavailable"
    assert store._cache == {}
    assert len(stale) == 4

    for line in auth_log.lines():  # ids and hash prefixes only, never a key
        assert seen.secret not in line
        assert unseen.secret not in line


def test_a_key_revoked_during_an_outage_is_refused_within_the_ttl_of_the_return(
    sqlite_database: Database, unreachable: Database
) -> None:
    clock = Clock()
    here = KeyStore(sqlite_database, cache_ttl_s=5.0, outage_grace_s=300.0, clock=clock)
    there = KeyStore(sqlite_database)  # another replica, which still reaches the database
    issued = here.create("ci-bot", Role.DEVELOPER)
    here.authenticate(issued.secret)

    here.database = unreachable
    clock.now += 6
    assert here.authenticate(issued.secret).key_id == issued.key.id  # admitted stale
    there.revoke(issued.key.id)  # revoked while this replica cannot see it
    clock.now += 1
    here.database = sqlite_database  # the database is back
    assert here.authenticate(issued.secret).key_id == issued.key.id  # within the TTL
    clock.now += 5.0  # one TTL after the database came back: asked again, and refused
    with pytest.raises(Unauthorized) as refused:
        here.authenticate(issued.secret)
    assert "revoked" in refused.value.message
    assert here.cached(issued.secret) is None

    here.database = unreachable  # a second outage does not bring the refused key back
    with pytest.raises(ServiceUnavailable):
        here.authenticate(issued.secret)


def test_an_unknown_key_is_never_served_stale(
    sqlite_database: Database, unreachable: Database
) -> None:
    store = KeyStore(sqlite_database, outage_grace_s=300.0)
    unknown = "sg-" + "A" * 43
    with pytest.raises(Unauthorized):
        store.authenticate(unknown)  # the database answered: no
    store.database = unreachable
    with pytest.raises(ServiceUnavailable) as refused:
        store.authenticate(unknown)
    assert refused.value.code == "key_store_unavailable"


def test_a_zero_outage_grace_admits_nothing_stale(
    sqlite_database: Database, unreachable: Database
) -> None:
    clock = Clock()
    store = KeyStore(sqlite_database, cache_ttl_s=5.0, outage_grace_s=0.0, clock=clock)
    issued = store.create("ci-bot", Role.DEVELOPER)
    store.authenticate(issued.secret)
    store.database = unreachable
    assert store.authenticate(issued.secret).key_id == issued.key.id  # the plain cache
    clock.now += 5.0
    with pytest.raises(ServiceUnavailable):
        store.authenticate(issued.secret)
    assert store._cache == {}


def test_an_answer_about_the_schema_admits_nothing_stale(sqlite_database: Database) -> None:
    """SQLite reports a missing table as an OperationalError: that is an answer, not an outage."""
    clock = Clock()
    store = KeyStore(sqlite_database, cache_ttl_s=5.0, outage_grace_s=300.0, clock=clock)
    issued = store.create("ci-bot", Role.DEVELOPER)
    store.authenticate(issued.secret)
    with store.database.engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0001")
    clock.now += 5.0
    with pytest.raises(ServiceUnavailable) as refused:
        store.authenticate(issued.secret)
    assert refused.value.code == "key_store_unavailable"


@pytest.mark.parametrize("grace", [-1.0, float("inf"), float("nan")])
def test_the_outage_grace_is_checked(sqlite_database: Database, grace: float) -> None:
    with pytest.raises(ValueError, match="outage_grace_s"):
        KeyStore(sqlite_database, outage_grace_s=grace)
    with pytest.raises(ValidationError):
        AuthSettings(outage_grace_s=grace)


def test_admin_allows_every_role_and_others_only_their_own() -> None:
    def principal(role: Role) -> Principal:
        return Principal(key_id="k", name="n", role=role, policy=None, rate_limit_rpm=None)

    assert all(principal(Role.ADMIN).allows(role) for role in Role)
    assert [principal(Role.DEVELOPER).allows(role) for role in Role] == [False, True, False]
    assert [principal(Role.REVIEWER).allows(role) for role in Role] == [False, False, True]
    assert ANONYMOUS.role is Role.ADMIN
    assert ANONYMOUS.key_id == "anonymous"


# -- first start ---------------------------------------------------------------------------


def test_the_first_start_creates_a_developer_key_in_a_private_file(
    store: KeyStore, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    key = ensure_local_key(store, home)
    assert key is not None
    path = local_key_path(home)
    assert path == home / "local-developer.key"
    assert path.read_text() == key + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    principal = store.authenticate(key)
    assert (principal.name, principal.role) == (LOCAL_KEY_NAME, Role.DEVELOPER)
    assert [p.name for p in home.iterdir()] == ["local-developer.key"]  # no temporary left

    assert ensure_local_key(store, home) is None  # later starts: the file tells the key
    assert path.read_text() == key + "\n"
    assert store.count() == 1


def test_no_local_key_once_any_key_exists_even_revoked(store: KeyStore, tmp_path: Path) -> None:
    issued = store.create("ops", Role.ADMIN)
    store.revoke(issued.key.id)
    assert ensure_local_key(store, tmp_path) is None
    assert not local_key_path(tmp_path).exists()


def test_a_local_key_that_cannot_be_saved_is_revoked(store: KeyStore, tmp_path: Path) -> None:
    home = tmp_path / "not-a-dir"
    home.write_text("a file where the home folder should be")
    with pytest.raises(OSError, match="exists|directory"):
        ensure_local_key(store, home)
    [key] = store.list()
    assert not key.active


def test_concurrent_first_starts_make_one_key(sqlite_database: Database, tmp_path: Path) -> None:
    stores = [KeyStore(sqlite_database) for _ in range(4)]
    results: list[str | None] = []
    barrier = threading.Barrier(len(stores))

    def start(store: KeyStore) -> None:
        barrier.wait()
        results.append(ensure_local_key(store, tmp_path))

    threads = [threading.Thread(target=start, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    created = [key for key in results if key is not None]
    assert len(created) == 1
    assert [k.name for k in stores[0].list(include_revoked=False)] == [LOCAL_KEY_NAME]
    assert local_key_path(tmp_path).read_text() == created[0] + "\n"


# -- require on a small app ----------------------------------------------------------------


def auth_app(
    store: KeyStore, *, limiter: RateLimiter | None = None, settings: Settings | None = None
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await app.state.runtime.limiter.close()

    app = FastAPI(lifespan=lifespan)
    errors.install(app)
    app.state.runtime = bare_runtime(
        settings, keys=store, limiter=limiter or InProcessRateLimiter()
    )

    @app.post("/filter")
    async def filter_text(
        principal: Annotated[Principal, Depends(require(Role.DEVELOPER))],
    ) -> dict[str, str]:
        return {"key_id": principal.key_id, "role": principal.role.value}

    @app.get(
        "/lists", dependencies=[Depends(require_by_method(read=Role.REVIEWER, write=Role.ADMIN))]
    )
    @app.post(
        "/lists", dependencies=[Depends(require_by_method(read=Role.REVIEWER, write=Role.ADMIN))]
    )
    async def lists() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/either")
    async def either(
        principal: Annotated[Principal, Depends(require(Role.DEVELOPER, Role.REVIEWER))],
    ) -> dict[str, str]:
        return {"role": principal.role.value}

    return app


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_missing_key_is_a_401_in_openai_style(store: KeyStore) -> None:
    with TestClient(auth_app(store)) as client:
        response = client.post("/filter")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    body = response.json()
    assert body == error(
        body["error"]["message"], type="authentication_error", code="missing_api_key"
    )
    assert "Authorization: Bearer" in body["error"]["message"]


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer sg-" + "A" * 43},
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer "},
        {"api-key": "sg-" + "B" * 43},
    ],
)
def test_a_wrong_key_is_a_401_in_openai_style(store: KeyStore, headers: dict[str, str]) -> None:
    store.create("ci-bot", Role.DEVELOPER)
    with TestClient(auth_app(store)) as client:
        response = client.post("/filter", headers=headers)
    assert response.status_code == 401
    body = response.json()
    assert body == error(
        body["error"]["message"], type="authentication_error", code="invalid_api_key"
    )
    presented = next(iter(headers.values())).split()[-1]
    if len(presented) > 8:
        assert presented not in response.text  # the key is never echoed


def test_bearer_and_azure_headers_both_authenticate(store: KeyStore) -> None:
    issued = store.create("ci-bot", Role.DEVELOPER)
    with TestClient(auth_app(store)) as client:
        for headers in (
            bearer(issued.secret),
            {"Authorization": f"bearer   {issued.secret} "},
            {"api-key": issued.secret},
        ):
            response = client.post("/filter", headers=headers)
            assert response.status_code == 200, response.text
            assert response.json() == {"key_id": issued.key.id, "role": "developer"}


def test_roles_are_enforced_with_a_403_that_names_the_role(store: KeyStore) -> None:
    developer = store.create("dev", Role.DEVELOPER).secret
    reviewer = store.create("rev", Role.REVIEWER).secret
    admin = store.create("ops", Role.ADMIN).secret
    with TestClient(auth_app(store)) as client:
        forbidden = client.post("/filter", headers=bearer(reviewer))
        assert forbidden.status_code == 403
        assert forbidden.json() == error(
            "This route needs the 'developer' role (or 'admin'); the key 'rev' has the "
            "'reviewer' role.",
            type="permission_error",
            code="insufficient_role",
        )
        assert client.post("/filter", headers=bearer(admin)).json()["role"] == "admin"

        assert client.get("/lists", headers=bearer(reviewer)).status_code == 200
        assert client.get("/lists", headers=bearer(admin)).status_code == 200
        assert client.get("/lists", headers=bearer(developer)).status_code == 403
        write = client.post("/lists", headers=bearer(reviewer))
        assert write.status_code == 403
        assert "'admin'" in write.json()["error"]["message"]
        assert client.post("/lists", headers=bearer(admin)).status_code == 200

        assert client.get("/either", headers=bearer(developer)).status_code == 200
        assert client.get("/either", headers=bearer(reviewer)).status_code == 200


def test_a_revoked_key_is_refused_at_once(store: KeyStore) -> None:
    issued = store.create("ci-bot", Role.DEVELOPER)
    with TestClient(auth_app(store)) as client:
        assert client.post("/filter", headers=bearer(issued.secret)).status_code == 200
        store.revoke(issued.key.id)
        response = client.post("/filter", headers=bearer(issued.secret))
    assert response.status_code == 401
    assert response.json() == error(
        "This API key was revoked; ask an admin for a new one.",
        type="authentication_error",
        code="invalid_api_key",
    )


def test_a_keys_own_rate_limit_applies_with_retry_after(store: KeyStore) -> None:
    slow = store.create("slow", Role.DEVELOPER, rate_limit_rpm=2)
    fast = store.create("fast", Role.DEVELOPER)
    settings = Settings(rate_limit=RateLimitSettings(requests_per_minute=600))
    with TestClient(auth_app(store, settings=settings)) as client:
        first = client.post("/filter", headers=bearer(slow.secret))
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert client.post("/filter", headers=bearer(slow.secret)).status_code == 200
        limited = client.post("/filter", headers=bearer(slow.secret))
        for _ in range(5):  # the service's default (600/min) applies to the other key
            assert client.post("/filter", headers=bearer(fast.secret)).status_code == 200
    assert limited.status_code == 429
    assert 29 <= int(limited.headers["retry-after"]) <= 30  # one token every 30 s
    body = limited.json()
    assert body == error(body["error"]["message"], type="requests", code="rate_limit_exceeded")
    assert body["error"]["message"].startswith(
        "Rate limit reached for key 'slow': 2 requests per minute."
    )


def test_forbidden_requests_spend_no_tokens(store: KeyStore) -> None:
    reviewer = store.create("rev", Role.REVIEWER, rate_limit_rpm=1)
    with TestClient(auth_app(store)) as client:
        for _ in range(3):
            assert client.post("/filter", headers=bearer(reviewer.secret)).status_code == 403
        assert client.get("/lists", headers=bearer(reviewer.secret)).status_code == 200


def test_stacked_requires_take_one_token_and_check_every_role(store: KeyStore) -> None:
    app = auth_app(store)
    router = APIRouter(dependencies=[Depends(require(Role.DEVELOPER))])

    @router.get("/stacked")
    async def stacked(
        principal: Annotated[Principal, Depends(require(Role.DEVELOPER))],
    ) -> dict[str, str]:
        return {"key_id": principal.key_id}

    @router.get("/stricter", dependencies=[Depends(require(Role.ADMIN))])
    async def stricter() -> dict[str, bool]:
        return {"ok": True}

    app.include_router(router)
    developer = store.create("dev", Role.DEVELOPER, rate_limit_rpm=2)
    with TestClient(app) as client:
        statuses = [
            client.get("/stacked", headers=bearer(developer.secret)).status_code for _ in range(3)
        ]
        assert statuses == [200, 200, 429]  # two tokens, not four
    other = store.create("dev-2", Role.DEVELOPER)
    with TestClient(app) as client:
        refused = client.get("/stricter", headers=bearer(other.secret))
    assert refused.status_code == 403
    assert "'admin'" in refused.json()["error"]["message"]


def test_disabled_auth_makes_every_request_the_anonymous_admin(store: KeyStore) -> None:
    settings = Settings(auth=AuthSettings(enabled=False))
    with TestClient(auth_app(store, settings=settings)) as client:
        response = client.post("/filter")
        assert client.post("/lists").status_code == 200
    assert response.status_code == 200
    assert response.json() == {"key_id": "anonymous", "role": "admin"}


def test_an_app_without_key_store_fails_closed() -> None:
    app = FastAPI()
    errors.install(app)
    app.state.runtime = bare_runtime(Settings())

    @app.get("/guarded", dependencies=[Depends(require(Role.DEVELOPER))])
    async def guarded() -> dict[str, bool]:
        return {"ok": True}

    with TestClient(app) as client:
        response = client.get("/guarded", headers=bearer("sg-" + "A" * 43))
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "auth_unavailable"


def test_limits_are_shared_through_redis(store: KeyStore) -> None:
    client_redis = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client_redis.ping()
    except redis.RedisError as failure:
        pytest.skip(f"Redis at {REDIS_URL} is unreachable ({failure})")
    prefix = f"safegate-test:{uuid.uuid4().hex}:"
    issued = store.create("slow", Role.DEVELOPER, rate_limit_rpm=3)
    try:
        # Two "replicas", each with its own limiter, share the key's bucket in Redis.
        with (
            TestClient(
                auth_app(store, limiter=RedisRateLimiter(REDIS_URL, key_prefix=prefix))
            ) as a,
            TestClient(
                auth_app(store, limiter=RedisRateLimiter(REDIS_URL, key_prefix=prefix))
            ) as b,
        ):
            statuses = [
                (a, b)[i % 2].post("/filter", headers=bearer(issued.secret)).status_code
                for i in range(5)
            ]
        assert statuses == [200, 200, 200, 429, 429]
        assert client_redis.exists(prefix + issued.key.id)
    finally:
        for key in client_redis.scan_iter(match=prefix + "*"):
            client_redis.delete(key)
        client_redis.close()


def test_an_unreachable_redis_is_a_503_not_a_pass(store: KeyStore) -> None:
    issued = store.create("ci-bot", Role.DEVELOPER)
    limiter = RedisRateLimiter("redis://127.0.0.1:1/0", timeout_s=0.5)
    with TestClient(auth_app(store, limiter=limiter)) as client:
        response = client.post("/filter", headers=bearer(issued.secret))
    assert response.status_code == 503
    body = response.json()
    assert body == error(
        body["error"]["message"], type="service_unavailable", code="rate_limiter_unavailable"
    )
    assert "fail closed" in body["error"]["message"]


# -- the service's routes ------------------------------------------------------------------


class Calm:
    """A member that flags nothing: where the engine does not matter."""

    id = "calm"
    labels = frozenset({Category.HATE})

    def classify(self, texts: Sequence[NormalizedText]) -> list[Detection]:
        return [Detection(scores={Category.HATE: 0.0}) for _ in texts]


def calm_engine(settings: Settings, store: BlocklistStore) -> SafetyEngine:
    return SafetyEngine([MemberSpec(Calm())], policy=Policy())


@pytest.fixture
def service(settings: Settings) -> Iterator[TestClient]:
    """The real app with a cheap engine; requests carry an admin key (``ready_client``)."""
    client = ready_client(settings, calm_engine)
    yield client
    client.__exit__(None, None, None)


def test_the_service_routes_need_the_right_role(service: TestClient) -> None:
    developer = issue_key(service, Role.DEVELOPER)
    reviewer = issue_key(service, Role.REVIEWER)
    anonymous = TestClient(service.app)  # same app, no key

    moderation = {"input": "What time does the museum open?"}
    missing = anonymous.post("/v1/moderations", json=moderation)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "missing_api_key"
    assert (
        service.post("/v1/moderations", json=moderation, headers=bearer(developer)).status_code
        == 200
    )
    assert (
        service.post("/v1/moderations", json=moderation, headers=bearer(reviewer)).status_code
        == 403
    )
    assert service.post("/v1/moderations", json=moderation).status_code == 200  # admin

    assert anonymous.get("/v1/blocklists").status_code == 401
    assert service.get("/v1/blocklists", headers=bearer(reviewer)).status_code == 200
    assert service.get("/v1/blocklists", headers=bearer(developer)).status_code == 403
    create = {"name": "codenames"}
    refused = service.post("/v1/blocklists", json=create, headers=bearer(reviewer))
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "insufficient_role"
    assert service.post("/v1/blocklists", json=create).status_code == 201  # admin

    for path in ("/healthz", "/readyz", "/metrics"):
        assert anonymous.get(path).status_code == 200, path


def test_the_service_applies_revocation_and_per_key_limits(service: TestClient) -> None:
    keys: KeyStore = service.app.state.runtime.keys  # type: ignore[attr-defined]
    issued = keys.create("slow", Role.DEVELOPER, rate_limit_rpm=1)
    moderation = {"input": "hello"}
    assert (
        service.post("/v1/moderations", json=moderation, headers=bearer(issued.secret)).status_code
        == 200
    )
    limited = service.post("/v1/moderations", json=moderation, headers=bearer(issued.secret))
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) == 60
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"

    keys.revoke(issued.key.id)
    revoked = service.post("/v1/moderations", json=moderation, headers=bearer(issued.secret))
    assert revoked.status_code == 401
    assert revoked.json()["error"]["code"] == "invalid_api_key"


def test_the_service_admits_seen_keys_while_the_key_store_is_down(
    tmp_path: Path, unreachable: Database
) -> None:
    settings = Settings(home=tmp_path / "home", auth=AuthSettings(cache_ttl_s=0.2))
    client = ready_client(settings, calm_engine)
    try:
        keys: KeyStore = client.app.state.runtime.keys  # type: ignore[attr-defined]
        seen = issue_key(client, Role.DEVELOPER)
        unseen = issue_key(client, Role.DEVELOPER)
        moderation = {"input": "What time does the museum open?"}
        assert (
            client.post("/v1/moderations", json=moderation, headers=bearer(seen)).status_code == 200
        )

        working, keys.database = keys.database, unreachable  # the key store goes away
        try:
            time.sleep(0.3)  # past the cache TTL
            admitted = client.post("/v1/moderations", json=moderation, headers=bearer(seen))
            refused = client.post("/v1/moderations", json=moderation, headers=bearer(unseen))
        finally:
            keys.database = working
        metrics = client.get("/metrics").text
    finally:
        client.__exit__(None, None, None)
    assert admitted.status_code == 200, admitted.text
    assert admitted.json()["results"][0]["flagged"] is False
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "5"
    assert refused.json() == error(
        "the key store cannot be reached, so this API key cannot be verified and the request "
        "is refused (fail closed); retry shortly",
        type="service_unavailable",
        code="key_store_unavailable",
    )
    assert unseen not in refused.text
    assert "safegate_auth_stale_admissions_total 1.0" in metrics


@pytest.mark.postgres
def test_a_hung_key_store_answers_503_within_the_statement_timeout(
    tmp_path: Path, postgres_url: str
) -> None:
    """A lock on ``api_keys`` makes key lookups hang; the statement timeout bounds them."""
    settings = Settings(
        home=tmp_path / "home",
        database_url=postgres_url,
        database_statement_timeout_s=1.0,
        auth=AuthSettings(cache_ttl_s=0.2),
    )
    client = ready_client(settings, calm_engine)
    locker = make_engine(postgres_url)
    try:
        seen = issue_key(client, Role.DEVELOPER)
        unseen = issue_key(client, Role.DEVELOPER)
        moderation = {"input": "What time does the museum open?"}
        assert (
            client.post("/v1/moderations", json=moderation, headers=bearer(seen)).status_code == 200
        )
        with locker.begin() as connection:
            connection.execute(text("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE"))
            time.sleep(0.3)  # past the cache TTL
            started = time.monotonic()
            refused = client.post("/v1/moderations", json=moderation, headers=bearer(unseen))
            refused_s = time.monotonic() - started
            started = time.monotonic()
            admitted = client.post("/v1/moderations", json=moderation, headers=bearer(seen))
            admitted_s = time.monotonic() - started
    finally:
        locker.dispose()
        client.__exit__(None, None, None)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "key_store_unavailable"
    assert 0.9 <= refused_s < 5.0  # waited for the statement timeout, not for the lock
    assert admitted.status_code == 200, admitted.text
    assert admitted_s < 5.0


@pytest.mark.postgres
def test_a_frozen_key_store_answers_503_within_the_deadline(
    tmp_path: Path, postgres_admin: Engine, postgres_url: str
) -> None:
    """The server process of the key lookup's connection is stopped mid-statement: its
    1 s statement timeout never fires, and the request waits for the gateway's 2 s
    client-side deadline, not for the server. The key gets the outage's 503; the cut
    connection is dropped, so the next lookup, on a fresh one, succeeds while the stopped
    process is still stopped."""
    url, name = tagged(postgres_url)
    settings = Settings(
        home=tmp_path / "home",
        database_url=url,
        database_statement_timeout_s=FROZEN_TIMEOUTS.statement_s,
        database_deadline_s=FROZEN_TIMEOUTS.deadline_s,
        auth=AuthSettings(cache_ttl_s=0.2),
    )
    client = ready_client(settings, calm_engine)
    locker = make_engine(postgres_url)
    moderation = {"input": "What time does the museum open?"}
    try:
        unseen = issue_key(client, Role.DEVELOPER)
        with ExitStack() as stack:  # unwinds in reverse: the stopped process resumes first
            pool = stack.enter_context(ThreadPoolExecutor(max_workers=1))
            with locker.begin() as connection:  # holds the lookup until its server is stopped
                connection.execute(text("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE"))
                started = time.monotonic()
                request = pool.submit(
                    client.post, "/v1/moderations", json=moderation, headers=bearer(unseen)
                )
                stack.enter_context(frozen(backend_pid(postgres_admin, name, waiting_on="Lock")))
            refused = request.result(timeout=30)
            refused_s = time.monotonic() - started
            started = time.monotonic()
            admitted = client.post("/v1/moderations", json=moderation, headers=bearer(unseen))
            admitted_s = time.monotonic() - started
    finally:
        locker.dispose()
        client.__exit__(None, None, None)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "key_store_unavailable"
    assert refused.headers["retry-after"] == "5"
    cutoff = FROZEN_TIMEOUTS.call_deadline_s  # not the statement timeout, and no hang
    assert cutoff <= refused_s < cutoff + FREEZE_MARGIN_S
    assert admitted.status_code == 200, admitted.text
    assert admitted_s < cutoff  # a fresh connection: no wait on the stopped process


def test_keys_work_while_the_engine_loads(settings: Settings) -> None:
    release = threading.Event()

    def slow_engine(app_settings: Settings, store: BlocklistStore) -> SafetyEngine:
        release.wait(timeout=30)
        return calm_engine(app_settings, store)

    with TestClient(create_app(settings, engine_factory=slow_engine)) as client:
        try:
            key = issue_key(client, Role.DEVELOPER)
            unauthenticated = client.post("/v1/moderations", json={"input": "hi"})
            loading = client.post("/v1/moderations", json={"input": "hi"}, headers=bearer(key))
        finally:
            release.set()
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert unauthenticated.status_code == 401
    assert loading.status_code == 503
    assert loading.json()["error"]["code"] == "engine_not_ready"
