"""Gateway fixtures: the real engine's members load once per session; each test gets
its own SAFEGATE_HOME, database and app.

``client`` (and ``ready_client``) send an admin key with a rate limit too high to matter;
``issue_key(client, role, ...)`` makes another key through the app's own ``KeyStore``.
``bare_runtime(...)`` is the ``Runtime`` for an app a test builds without ``create_app``.
``postgres_url`` gives a PostgreSQL URL whose connections live in a fresh schema;
``tagged(url)`` names its connections, ``backend_pid`` finds one at work and
``frozen(pid)`` stops that server process (SIGSTOP) for a block.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.config import Config
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace.export import SpanExporter
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.exc import OperationalError

from gateway.access import KeyStore, Role
from gateway.access.quotas import Clock, utc_now
from gateway.access.settings import MAX_REQUESTS_PER_MINUTE
from gateway.app import create_app
from gateway.audit import RequestRecord, UsageSource
from gateway.blocklists import BlocklistStore
from gateway.config import Settings
from gateway.db import MIGRATIONS, Database
from gateway.engine_factory import build_members
from gateway.metrics import Metrics
from gateway.safety.engine import MemberSpec, SafetyEngine
from gateway.safety.members.blocklist import BlocklistClassifier
from gateway.safety.policy import Policy
from gateway.state import Runtime
from gateway.tracing import build_tracing
from safegate.settings import DatabaseTimeouts

READY_TIMEOUT_S = 60.0
POSTGRES_URL = os.environ.get(
    "SAFEGATE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
POSTGRES_CONNECT_TIMEOUT_S = 3
BACKEND_WAIT_S = 10.0
# A frozen server in a test would cancel a statement after 1 s; the client gives up at 2 s.
FROZEN_TIMEOUTS = DatabaseTimeouts(connect_s=2.0, statement_s=1.0, deadline_s=2.0)
FREEZE_MARGIN_S = 3.0  # what a busy two-core machine may add to a deadline


@pytest.fixture(scope="session")
def members_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SAFEGATE_HOME the members load from; its cache keeps the exported encoder, so
    a server a test starts over it loads without exporting again."""
    return tmp_path_factory.mktemp("members-home")


@pytest.fixture(scope="session")
def loaded_members(members_home: Path) -> list[MemberSpec]:
    """Encoder heads, profanity and PII, loaded once: the expensive edge."""
    return build_members(Settings(home=members_home), blocklists=None)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home")


@pytest.fixture
def real_engine(settings: Settings, loaded_members: list[MemberSpec]) -> Iterator[SafetyEngine]:
    engine = SafetyEngine(loaded_members, policy=Policy.load(settings.policy_file))
    yield engine
    engine.close()


EngineFactory = Callable[[Settings, BlocklistStore], SafetyEngine]


@pytest.fixture
def engine_factory(loaded_members: list[MemberSpec]) -> EngineFactory:
    def factory(settings: Settings, store: BlocklistStore) -> SafetyEngine:
        members = [*loaded_members, MemberSpec(BlocklistClassifier(source=store))]
        return SafetyEngine(
            members,
            policy=Policy.load(settings.policy_file),
            max_text_chars=settings.engine.max_text_chars,
        )

    return factory


def bare_runtime(settings: Settings | None = None, **parts: Any) -> Runtime:
    """The ``Runtime`` for an app a test builds itself: ``settings`` (the defaults unless
    given), its own metrics, tracing as the settings say, and the ``parts`` given (``keys``,
    ``limiter``, ``audit``, ``state``...); what is not given stays ``None``."""
    settings = settings or Settings()
    return Runtime(
        settings=settings, metrics=Metrics(), tracing=build_tracing(settings.tracing), **parts
    )


def issue_key(
    client: TestClient,
    role: Role = Role.DEVELOPER,
    *,
    name: str | None = None,
    policy: str | None = None,
    rate_limit_rpm: int | None = None,
) -> str:
    """A new key made through the started app's ``KeyStore``; returns the secret."""
    keys: KeyStore = client.app.state.runtime.keys  # type: ignore[attr-defined]
    issued = keys.create(
        name or f"test-{role.value}-{uuid.uuid4().hex[:8]}",
        role,
        policy=policy,
        rate_limit_rpm=rate_limit_rpm,
    )
    return issued.secret


def ready_client(
    app_settings: Settings,
    factory: EngineFactory,
    *,
    now: Clock = utc_now,
    span_exporter: SpanExporter | None = None,
) -> TestClient:
    """A started app whose requests carry an admin key (``client.headers``); ``now`` is its
    clock for request records and quota windows; its spans go to ``span_exporter`` when
    ``app_settings`` turn tracing on."""
    client = TestClient(
        create_app(app_settings, engine_factory=factory, now=now, span_exporter=span_exporter)
    )
    client.__enter__()
    admin = issue_key(client, Role.ADMIN, name="test-admin", rate_limit_rpm=MAX_REQUESTS_PER_MINUTE)
    client.headers["Authorization"] = f"Bearer {admin}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while client.get("/readyz").status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError(client.get("/readyz").json())
        time.sleep(0.05)
    return client


@pytest.fixture
def client(settings: Settings, engine_factory: EngineFactory) -> Iterator[TestClient]:
    client = ready_client(settings, engine_factory)
    yield client
    client.__exit__(None, None, None)


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[Engine]:
    """The local PostgreSQL server; tests that need it skip when it is unreachable."""
    engine = create_engine(
        POSTGRES_URL,
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S},
    )
    try:
        with engine.connect():
            pass
    except OperationalError as error:
        engine.dispose()
        reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
        pytest.skip(
            f"PostgreSQL at {engine.url.render_as_string()} is unreachable ({reason}); "
            "start it or set SAFEGATE_TEST_POSTGRES_URL"
        )
    yield engine
    engine.dispose()


@pytest.fixture
def postgres_url(postgres_admin: Engine) -> Iterator[str]:
    """A URL whose connections live in a fresh schema, dropped after the test."""
    with fresh_schema(postgres_admin) as url:
        yield url


@contextlib.contextmanager
def fresh_schema(postgres_admin: Engine) -> Iterator[str]:
    """A URL whose connections live in a new schema, dropped on leaving."""
    schema = f"safegate_test_{uuid.uuid4().hex[:12]}"
    with postgres_admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = postgres_admin.url.set(
        query={**postgres_admin.url.query, "options": f"-csearch_path={schema}"}
    )
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with postgres_admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


def tagged(url: str) -> tuple[str, str]:
    """``url`` whose connections carry a fresh ``application_name`` (``pg_stat_activity``
    shows it), and that name."""
    name = f"safegate-test-{uuid.uuid4().hex[:8]}"
    named = make_url(url).update_query_dict({"application_name": name})
    return named.render_as_string(hide_password=False), name


def backend_pid(postgres_admin: Engine, application_name: str, *, waiting_on: str) -> int:
    """The server process of an ``application_name`` connection once it waits on
    ``waiting_on`` (a ``wait_event_type``: ``Lock``, ``Timeout`` for ``pg_sleep``)."""
    deadline = time.monotonic() + BACKEND_WAIT_S
    while True:
        with postgres_admin.connect() as connection:
            pid = connection.execute(
                text(
                    "SELECT pid FROM pg_stat_activity "
                    "WHERE application_name = :name AND wait_event_type = :waiting"
                ),
                {"name": application_name, "waiting": waiting_on},
            ).scalar()
        if pid is not None:
            return int(pid)
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {application_name} backend waited on {waiting_on}")
        time.sleep(0.02)


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """The PostgreSQL server process ``pid`` stopped (SIGSTOP) until the block ends: it
    keeps its socket, so its host still acknowledges packets, but it answers nothing and
    runs no timer. Skips when ``pid`` is not a PostgreSQL process this test may signal (a
    server on another host or in a container: the number would name some other process)."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        title = cmdline.read_bytes()
        os.kill(pid, 0)
    except (FileNotFoundError, ProcessLookupError, PermissionError) as error:
        pytest.skip(f"cannot signal PostgreSQL backend {pid} ({error.strerror})")
    if not title.startswith(b"postgres"):
        pytest.skip(f"process {pid} is not this machine's PostgreSQL backend")
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test that asks runs twice: on a SQLite file and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/safegate.db"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    """The gateway's database at head, on SQLite and on PostgreSQL."""
    db = Database(database_url)
    db.migrate()
    yield db
    db.dispose()


@pytest.fixture
def sqlite_database(tmp_path: Path) -> Iterator[Database]:
    db = Database(f"sqlite:///{tmp_path}/safegate.db")
    db.migrate()
    yield db
    db.dispose()


def alembic_config(connection: object) -> Config:
    """Alembic pointed at the gateway's migrations, on an open connection."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts connections and never answers (a hung upstream)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                continue
            held.append(connection)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    server.close()


def chat_record(
    key_id: str, at: datetime, *, model: str = "m", tokens: tuple[int, int] = (10, 5), **extra: Any
) -> RequestRecord:
    """A finished chat request's metadata, as the usage report and quotas read it."""
    return RequestRecord(
        request_id=f"r-{at.timestamp()}-{key_id}-{model}",
        key_id=key_id,
        model=model,
        route="chat.completions",
        status=200,
        blocked=None,
        categories=(),
        latency_ms={"total": 1.0},
        prompt_tokens=tokens[0],
        completion_tokens=tokens[1],
        stream=False,
        created_at=at,
        **{"usage_source": UsageSource.UPSTREAM, **extra},
    )
