"""The audit store on real SQLite and PostgreSQL: records, the spool, draining, queries.

"The database is down" is a real one: a PostgreSQL URL on a port nothing listens on
(connection refused), swapped in for the store's database and back; "frozen" is the real
server process of the store's connection, stopped (``frozen`` in the conftest). Texts are
marked with ``SECRET`` so the tests can check that no log line ever carries one.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import re
import sqlite3
import stat
import time
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, inspect, select, text

import gateway.spool
from gateway.audit import (
    AuditStore,
    FlaggedItem,
    FlaggedItemCategoryRow,
    FlaggedItemRow,
    ItemFilter,
    RequestLogRow,
    RequestRecord,
    ReviewLabel,
    ReviewState,
    UsageSource,
    flagged_item,
    records,
)
from gateway.chat.metering import Metered
from gateway.db import Base, Database
from gateway.errors import InvalidRequest, NotFound, ServiceUnavailable
from gateway.logs import JsonFormatter
from gateway.safety.engine import SafetyEngine
from gateway.safety.taxonomy import Category, Direction, Shield
from gateway.spool import DRAINING_SUFFIX, SET_ASIDE_SUFFIX, SPOOL_FILE
from safegate.database import make_engine
from tests.gateway.conftest import (
    FREEZE_MARGIN_S,
    FROZEN_TIMEOUTS,
    alembic_config,
    backend_pid,
    frozen,
    tagged,
)

TABLES = {"flagged_items", "flagged_item_categories", "request_log"}
# Nothing listens on the discard port: connecting is refused at once.
DOWN_URL = "postgresql+psycopg://postgres@127.0.0.1:9/safegate?connect_timeout=2"
HATEFUL = "All Muslims are terrorists and should be thrown out of this country."
SECRET = "SECRET-CONTENT"
T0 = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def down() -> Iterator[Database]:
    db = Database(DOWN_URL)
    yield db
    db.dispose()


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "home" / "audit-spool"


@pytest.fixture
def store(database: Database, spool_dir: Path) -> Iterator[AuditStore]:
    audit = AuditStore(database, spool_dir=spool_dir)
    yield audit
    asyncio.run(audit.close())


class Captured(logging.Handler):
    """Every record of the audit and spool loggers, formatted as the service logs them."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record))


@pytest.fixture
def logs() -> Iterator[Captured]:
    handler = Captured()
    loggers = [logging.getLogger("safegate.audit"), logging.getLogger("safegate.spool")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    yield handler
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)


def item(number: int = 0, **changes: Any) -> FlaggedItem:
    fields: dict[str, Any] = {
        "request_id": f"req-{number}",
        "key_id": "key_0123456789abcdef01234567",
        "model": "gpt-4o-mini",
        "direction": Direction.PROMPT,
        "source": f"messages[{number}]",
        "categories": ("hate", "harassment"),
        "scores": {"hate": 0.97, "harassment": 0.81, "violence": 0.12},
        "severities": {"hate": 4, "sexual": 0, "violence": 2, "self_harm": 0},
        "action": "block",
        "reasons": ("prompt flagged for hate (score 0.97 >= threshold 0.50; members: heads)",),
        "text": f"{SECRET} number {number}: {HATEFUL}",
    }
    fields.update(changes)
    return FlaggedItem(**fields)


def request_record(number: int = 0, **changes: Any) -> RequestRecord:
    fields: dict[str, Any] = {
        "request_id": f"req-{number}",
        "key_id": "key_0123456789abcdef01234567",
        "model": "gpt-4o-mini",
        "route": "chat.completions",
        "status": 400,
        "blocked": "prompt",
        "categories": ("harassment", "hate"),
        "latency_ms": {"prompt_check": 12.5, "total": 13.0},
        "prompt_tokens": None,
        "completion_tokens": None,
        "stream": False,
    }
    fields.update(changes)
    return RequestRecord(**fields)


def count(database: Database, row: type[Base]) -> int:
    with database.session() as session:
        return int(session.scalar(select(func.count()).select_from(row)) or 0)


def item_ids(database: Database) -> list[str]:
    with database.session() as session:
        return sorted(session.scalars(select(FlaggedItemRow.id)))


def spool_files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name != "spool.lock")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def no_content_logged(logs: Captured) -> None:
    for line in logs.lines:
        assert SECRET not in line
        assert "Muslims" not in line


# -- the migration -----------------------------------------------------------------------


def test_migration_matches_the_tables_and_downgrades(database: Database) -> None:
    def ours(name: str | None, type_: str, parents: object) -> bool:
        return type_ != "table" or name in TABLES

    def our_object(obj: Any, name: str | None, type_: str, reflected: bool, other: Any) -> bool:
        table = obj if type_ == "table" else getattr(obj, "table", None)
        return table is None or table.name in TABLES

    with database.engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"include_name": ours, "include_object": our_object}
        )
        assert compare_metadata(context, Base.metadata) == []
    with database.engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0002")
    remaining = set(inspect(database.engine).get_table_names())
    assert TABLES.isdisjoint(remaining)
    assert "api_keys" in remaining
    database.migrate()
    assert set(inspect(database.engine).get_table_names()) >= TABLES


# -- records -----------------------------------------------------------------------------


def test_flagged_item_of_a_real_verdict(real_engine: SafetyEngine) -> None:
    hateful, benign = real_engine.check([HATEFUL, "Can you give me a recipe for a curry?"])
    audited = flagged_item(
        hateful, text=HATEFUL, request_id="req-1", key_id="key_a", model=None, source="input[0]"
    )
    assert "hate" in audited.categories
    assert audited.severities["hate"] >= 4
    assert audited.max_severity >= 4
    assert audited.action == "block"
    assert audited.direction is Direction.PROMPT
    assert set(audited.scores) == {label.value for label in (*Category, *Shield)}
    assert audited.scores["hate"] >= 0.5
    assert any("hate" in reason for reason in audited.reasons)
    assert audited.text == HATEFUL
    assert len(audited.id) == 32
    with pytest.raises(ValueError, match="flagged nothing"):
        flagged_item(
            benign, text="curry", request_id="req-1", key_id="key_a", model=None, source="x"
        )


def test_a_request_record_takes_categories_from_its_items_and_tokens_from_its_usage() -> None:
    items = [item(1), item(2, categories=("violence", "hate"))]
    common: dict[str, Any] = {
        "request_id": "req-1",
        "key_id": "key_a",
        "model": "m",
        "route": "chat.completions",
        "status": 200,
        "latency_ms": {"total": 2.0},
        "stream": True,
        "origin": "eval",
    }
    used = Metered(prompt_tokens=7, completion_tokens=3, source=UsageSource.COUNTED, cost_usd=0.5)
    record = records.request_record(items=items, usage=used, created_at=T0, **common)
    assert record.categories == ("harassment", "hate", "violence")
    assert (record.prompt_tokens, record.completion_tokens) == (7, 3)
    assert (record.usage_source, record.cost_usd) == (UsageSource.COUNTED, 0.5)
    assert (record.created_at, record.blocked, record.stream) == (T0, None, True)
    assert record.origin == "eval"
    unmetered = records.request_record(items=[], blocked="prompt", **common)
    assert unmetered.categories == ()
    assert (unmetered.prompt_tokens, unmetered.usage_source, unmetered.cost_usd) == (None,) * 3
    assert unmetered.blocked == "prompt"
    assert unmetered.created_at.tzinfo is not None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"action": "allow"}, "action must be one of"),
        ({"scores": {"hate": 1.5}}, "probability"),
        ({"severities": {"hate": 3}}, "0, 2, 4 or 6"),
        ({"id": ""}, "item id"),
        ({"id": "x" * 65}, "item id"),
        ({"created_at": datetime(2026, 1, 1)}, "timezone-aware"),  # noqa: DTZ001
        ({"direction": "sideways"}, "sideways"),
    ],
)
def test_bad_items_are_refused_where_they_are_built(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        item(**changes)


def test_record_stores_items_and_request_metadata(store: AuditStore) -> None:
    first, second = item(1), item(2, direction=Direction.COMPLETION, source="choices[0]")
    record = request_record(1)
    asyncio.run(store.record([first, second], request=record))

    got = store.get_item(first.id)
    assert got.item == first
    assert got.text_sha256 == hashlib.sha256(first.text.encode()).hexdigest()
    assert got.max_severity == 4
    assert (got.review_state, got.review_note, got.reviewer_key_id, got.reviewed_at) == (
        ReviewState.UNREVIEWED,
        None,
        None,
        None,
    )
    assert store.get_item(second.id).item.direction is Direction.COMPLETION
    with store.database.session() as session:
        pairs = sorted(
            session.execute(
                select(FlaggedItemCategoryRow.item_id, FlaggedItemCategoryRow.category)
            ).all()
        )
        logged = session.scalars(select(RequestLogRow)).one()
    assert pairs == sorted(
        [
            (first.id, "harassment"),
            (first.id, "hate"),
            (second.id, "harassment"),
            (second.id, "hate"),
        ]
    )
    assert (logged.id, logged.request_id, logged.route, logged.status, logged.blocked) == (
        record.id,
        "req-1",
        "chat.completions",
        400,
        "prompt",
    )
    assert logged.latency_ms == {"prompt_check": 12.5, "total": 13.0}
    assert logged.categories == ["harassment", "hate"]
    assert logged.stream is False
    assert logged.created_at == record.created_at
    # The request log never holds content.
    columns = {
        column["name"] for column in inspect(store.database.engine).get_columns("request_log")
    }
    assert not columns & {"text", "prompt", "completion", "messages", "content"}
    assert store.spooled_pending() == 0


def test_texts_postgres_cannot_hold_are_kept_readable(store: AuditStore) -> None:
    text = f"{SECRET} with a NUL \x00 and a lone surrogate \ud800 inside"
    stored = item(text=text, model="m\x00odel")
    asyncio.run(store.record([stored]))
    got = store.get_item(stored.id)
    assert got.item.text == f"{SECRET} with a NUL \ufffd and a lone surrogate \ufffd inside"
    assert got.item.model == "m\ufffdodel"
    assert got.text_sha256 == hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    assert store.spooled_pending() == 0


def test_long_metadata_is_clipped_not_lost(store: AuditStore) -> None:
    stored = item(model="m" * 500, source="s" * 100)
    asyncio.run(store.record([stored]))
    got = store.get_item(stored.id).item
    assert (got.model, got.source) == ("m" * 200, "s" * 64)


def test_request_records_can_be_turned_off(database: Database, spool_dir: Path) -> None:
    audit = AuditStore(database, spool_dir=spool_dir, record_requests=False)
    try:
        asyncio.run(audit.record([item(1)], request=request_record(1)))
        asyncio.run(audit.record([], request=request_record(2)))
    finally:
        asyncio.run(audit.close())
    assert (count(database, FlaggedItemRow), count(database, RequestLogRow)) == (1, 0)


# -- the spool ---------------------------------------------------------------------------


def test_a_dead_database_spools_and_the_drain_stores_each_record_once(
    database: Database, down: Database, spool_dir: Path, logs: Captured
) -> None:
    audit = AuditStore(down, spool_dir=spool_dir)
    items = [item(1), item(2), item(3)]
    record = request_record(1)

    async def scenario() -> None:
        await audit.record(items[:2], request=record)  # the write fails: spooled
        await audit.record(items[2:])  # the store knows: straight to the spool
        assert audit.spooled_pending() == 4
        assert await audit.drain() is None  # still down: nothing moves, nothing is lost
        assert audit.spooled_pending() == 4

        audit.database = database  # the database is back
        report = await audit.drain()
        assert report is not None
        assert (report.files, report.consumed, report.set_aside) == (1, 4, ())
        again = await audit.drain()
        assert again is not None
        assert (again.files, again.consumed) == (0, 0)
        await audit.record([item(4)])  # healthy again: written at once
        await audit.close()

    spool = spool_dir / SPOOL_FILE
    asyncio.run(scenario())
    assert count(database, FlaggedItemRow) == 4
    assert count(database, RequestLogRow) == 1
    assert audit.spooled_pending() == 0
    assert spool_files(spool_dir) == []
    assert not spool.exists()
    assert mode(spool_dir) == 0o700
    # Warnings say which records went to disk, by id, and never what they said.
    spooled = [r for r in logs.records if r.getMessage() == "audit records spooled to disk"]
    assert [r.levelno for r in spooled] == [logging.WARNING, logging.WARNING]
    assert spooled[0].__dict__["item_ids"] == [items[0].id, items[1].id]
    assert spooled[0].__dict__["request_ids"] == ["req-1", "req-2"]
    assert "OperationalError" in spooled[0].__dict__["error"]
    assert spooled[1].__dict__["item_ids"] == [items[2].id]
    no_content_logged(logs)


def test_spool_files_are_private_and_fsynced_lines(
    down: Database, spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(gateway.spool.os, "fsync", fsync)
    audit = AuditStore(down, spool_dir=spool_dir)
    stored = item(1, text=f"{SECRET} \x00 \ud800 naïve")
    asyncio.run(audit.record([stored], request=request_record(1)))
    spool = spool_dir / SPOOL_FILE
    assert mode(spool_dir) == 0o700
    assert mode(spool) == 0o600
    assert synced  # the append was fsync'd before record() returned
    lines = spool.read_bytes().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert (first["kind"], first["id"], first["text"]) == ("flagged_item", stored.id, stored.text)
    assert json.loads(lines[1])["kind"] == "request"
    assert all(line.isascii() for line in lines)


def test_a_crash_between_commit_and_spool_removal_duplicates_nothing(
    database: Database, down: Database, spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit = AuditStore(down, spool_dir=spool_dir)
    items = [item(1), item(2), item(3)]
    asyncio.run(audit.record(items, request=request_record(1)))
    audit.database = database

    real_unlink = os.unlink

    def crash(path: Any, *args: Any, **kwargs: Any) -> None:
        if str(path).endswith(DRAINING_SUFFIX):
            raise OSError(5, "simulated crash after commit")
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(gateway.spool.os, "unlink", crash)
    assert audit.drain_spool() is None  # committed, then "crashed" before removing the file
    assert count(database, FlaggedItemRow) == 3
    [left] = spool_files(spool_dir)
    assert left.endswith(DRAINING_SUFFIX)
    assert audit.spooled_pending() == 4

    monkeypatch.setattr(gateway.spool.os, "unlink", real_unlink)
    report = audit.drain_spool()  # the restart: the same file is drained again
    assert report is not None
    assert (report.files, report.consumed, report.set_aside) == (1, 4, ())
    assert report.files == 1
    assert count(database, FlaggedItemRow) == 3
    assert count(database, FlaggedItemCategoryRow) == 6
    assert count(database, RequestLogRow) == 1
    assert spool_files(spool_dir) == []
    assert audit.spooled_pending() == 0
    assert audit.drain_spool() is not None
    assert count(database, FlaggedItemRow) == 3
    asyncio.run(audit.close())


def test_corrupt_lines_are_reported_by_number_and_kept_aside(
    sqlite_database: Database, down: Database, spool_dir: Path, logs: Captured
) -> None:
    audit = AuditStore(down, spool_dir=spool_dir)
    spool = spool_dir / SPOOL_FILE
    asyncio.run(audit.record([item(1), item(2)]))  # lines 1 and 2
    garbage = [
        b"{not json at all\n",  # line 3
        b'{"schema_version": 1, "kind": "flagged_item", "id": "abc"}\n',  # line 4
        b"[1, 2, 3]\n",  # line 5
        b'{"schema_version": 99, "kind": "flagged_item"}\n',  # line 6
    ]
    with spool.open("ab") as handle:
        handle.writelines(garbage)
    asyncio.run(audit.record([item(7)]))  # line 7
    cut = b'{"schema_version":1,"kind":"flagged_item","id":"cut","text":"' + SECRET.encode()
    with spool.open("ab") as handle:
        handle.write(cut)  # line 8: a write cut off by a crash

    audit.database = sqlite_database
    report = audit.drain_spool()
    assert report is not None
    assert report.consumed == 3
    assert [(p.line, p.reason) for p in report.set_aside] == [
        (3, "not valid JSON: Expecting property name enclosed in double quotes (column 2)"),
        (4, "invalid record: field 'created_at' is missing or not str"),
        (5, "not a JSON object but list"),
        (6, "invalid record: unknown schema_version 99"),
        (8, "incomplete last line (a write was cut off)"),
    ]
    assert count(sqlite_database, FlaggedItemRow) == 3
    [aside] = spool_files(spool_dir)
    assert aside.endswith(SET_ASIDE_SUFFIX)
    assert mode(spool_dir / aside) == 0o600
    kept = [json.loads(line) for line in (spool_dir / aside).read_text().splitlines()]
    assert [entry["line"] for entry in kept] == [3, 4, 5, 6, 8]
    assert [base64.b64decode(entry["raw_base64"]) for entry in kept] == [*garbage, cut]
    assert {entry["file"] for entry in kept} == {report.set_aside[0].file}
    warned = [r for r in logs.records if r.getMessage() == "spooled line set aside"]
    assert [r.__dict__["line"] for r in warned] == [3, 4, 5, 6, 8]
    no_content_logged(logs)
    # A second drain finds nothing new and leaves the set-aside file alone.
    again = audit.drain_spool()
    assert again is not None
    assert (again.consumed, again.set_aside) == (0, ())
    assert spool_files(spool_dir) == [aside]
    asyncio.run(audit.close())


def test_an_append_after_a_cut_line_starts_a_fresh_line(
    sqlite_database: Database, down: Database, spool_dir: Path
) -> None:
    spool_dir.mkdir(parents=True)
    (spool_dir / SPOOL_FILE).write_bytes(b'{"schema_version":1,"kind":"flag')
    audit = AuditStore(down, spool_dir=spool_dir)
    kept = item(1)
    asyncio.run(audit.record([kept]))
    audit.database = sqlite_database
    report = audit.drain_spool()
    assert report is not None
    assert report.consumed == 1
    assert [(p.line, p.reason) for p in report.set_aside] == [
        (1, "not valid JSON: Invalid control character at (column 33)")
    ]
    assert item_ids(sqlite_database) == [kept.id]
    asyncio.run(audit.close())


def test_a_record_the_database_refuses_is_set_aside_and_the_rest_stored(
    sqlite_database: Database, down: Database, spool_dir: Path
) -> None:
    with sqlite_database.engine.begin() as connection:
        connection.exec_driver_sql(
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON flagged_items "
            "WHEN NEW.source = 'poison' BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
    audit = AuditStore(down, spool_dir=spool_dir)
    good, poison, also_good = item(1), item(2, source="poison"), item(3)
    asyncio.run(audit.record([good, poison, also_good]))
    audit.database = sqlite_database
    report = audit.drain_spool()
    assert report is not None
    assert report.consumed == 2
    assert [(p.line, p.reason) for p in report.set_aside] == [
        (2, "refused by the database (IntegrityError(IntegrityError))")
    ]
    assert item_ids(sqlite_database) == sorted([good.id, also_good.id])
    assert audit.spooled_pending() == 0
    asyncio.run(audit.close())


def test_a_write_that_overruns_is_spooled_and_still_stored_once(
    sqlite_database: Database, spool_dir: Path, tmp_path: Path
) -> None:
    audit = AuditStore(sqlite_database, spool_dir=spool_dir, write_timeout_s=0.2)
    blocker = sqlite3.connect(tmp_path / "safegate.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # holds the write lock: the insert waits
    slow, next_one = item(1), item(2)

    async def scenario() -> float:
        started = time.monotonic()
        await audit.record([slow])
        elapsed = time.monotonic() - started
        assert audit.spooled_pending() == 1
        await audit.record([next_one])  # marked unhealthy: spooled without waiting
        assert audit.spooled_pending() == 2
        blocker.execute("ROLLBACK")  # the lock goes; the first insert lands late
        await audit.close()  # waits for it, then drains the spool
        return elapsed

    try:
        elapsed = asyncio.run(scenario())
    finally:
        blocker.close()
    assert elapsed < 1.5
    assert item_ids(sqlite_database) == sorted([slow.id, next_one.id])
    assert count(sqlite_database, FlaggedItemCategoryRow) == 4
    assert audit.spooled_pending() == 0


@pytest.mark.postgres
def test_a_write_to_a_frozen_database_is_spooled_and_stored_once(
    postgres_admin: Engine, postgres_url: str, spool_dir: Path
) -> None:
    """The insert's server process is stopped mid-statement: the record is spooled after
    the write timeout, the stuck write is cut at the database deadline (so closing the
    store does not wait for the server), and the drain stores the record once, on a
    fresh connection, while that process is still stopped."""
    url, name = tagged(postgres_url)
    database = Database(url, timeouts=FROZEN_TIMEOUTS)
    database.migrate()
    audit = AuditStore(database, spool_dir=spool_dir, write_timeout_s=0.5)
    locker = make_engine(postgres_url)
    kept = item(1)

    async def scenario(stack: ExitStack) -> tuple[float, float]:
        with locker.begin() as connection:  # holds the insert until its server is stopped
            connection.execute(
                text(
                    "LOCK TABLE flagged_items, flagged_item_categories, request_log "
                    "IN ACCESS EXCLUSIVE MODE"
                )
            )
            started = time.monotonic()
            writing = asyncio.create_task(audit.record([kept], request=request_record(1)))
            pid = await asyncio.to_thread(backend_pid, postgres_admin, name, waiting_on="Lock")
            stack.enter_context(frozen(pid))
        await writing
        recorded = time.monotonic() - started
        assert audit.spooled_pending() >= 1
        await audit.close()  # waits for the cut write, then drains on a fresh connection
        return recorded, time.monotonic() - started

    try:
        with ExitStack() as stack:  # the stopped process resumes when the checks are done
            recorded, closed = asyncio.run(scenario(stack))
            assert item_ids(database) == [kept.id]
            assert count(database, RequestLogRow) == 1
    finally:
        locker.dispose()
        database.dispose()
    assert recorded < 0.5 + 2.0  # the write timeout: the request never waits for the server
    cutoff = FROZEN_TIMEOUTS.call_deadline_s
    assert cutoff <= closed < cutoff + FREEZE_MARGIN_S
    assert audit.spooled_pending() == 0


def test_start_drains_at_once_and_then_every_interval(
    database: Database, down: Database, spool_dir: Path
) -> None:
    earlier = AuditStore(down, spool_dir=spool_dir)
    asyncio.run(earlier.record([item(1)]))  # spooled by a previous run of the service

    audit = AuditStore(database, spool_dir=spool_dir, drain_interval_s=0.05)

    async def wait_for(rows: int) -> None:
        deadline = time.monotonic() + 10
        while count(database, FlaggedItemRow) < rows:
            assert time.monotonic() < deadline, "the drain task did not run"
            await asyncio.sleep(0.02)

    async def scenario() -> None:
        await audit.start()
        await wait_for(1)  # drained at start
        audit.database = down
        await audit.record([item(2)])
        audit.database = database
        await wait_for(2)  # drained by the periodic task once the database is back
        await audit.close()

    asyncio.run(scenario())
    assert count(database, FlaggedItemRow) == 2
    assert audit.spooled_pending() == 0


def test_duplicated_spool_lines_store_one_row(
    sqlite_database: Database, down: Database, spool_dir: Path
) -> None:
    audit = AuditStore(down, spool_dir=spool_dir)
    twice = item(1)
    asyncio.run(audit.record([twice], request=request_record(1)))
    asyncio.run(audit.record([twice]))
    audit.database = sqlite_database
    report = audit.drain_spool()
    assert report is not None
    assert report.consumed == 3
    assert (count(sqlite_database, FlaggedItemRow), count(sqlite_database, RequestLogRow)) == (1, 1)
    asyncio.run(audit.close())


def test_when_even_the_spool_fails_the_loss_is_counted_and_logged(
    down: Database, tmp_path: Path, logs: Captured
) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    audit = AuditStore(down, spool_dir=blocked / "audit-spool")
    lost = item(1)
    asyncio.run(audit.record([lost]))  # never raises
    assert audit.lost() == 1
    [error] = [r for r in logs.records if r.levelno == logging.ERROR]
    assert error.__dict__["item_ids"] == [lost.id]
    no_content_logged(logs)


@settings(max_examples=40, deadline=None)
@given(text=st.text(alphabet=st.characters(exclude_categories=()), max_size=300))
def test_any_text_survives_the_spool_and_the_database(text: str) -> None:
    with TemporaryDirectory() as directory:
        database = Database(f"sqlite:///{directory}/safegate.db")
        database.migrate()
        down = Database(DOWN_URL)
        audit = AuditStore(down, spool_dir=Path(directory) / "spool")
        stored = item(text=text)
        try:
            asyncio.run(audit.record([stored]))
            assert audit.spooled_pending() == 1
            audit.database = database
            report = audit.drain_spool()
            assert report is not None
            assert (report.consumed, report.set_aside) == (1, ())
            got = audit.get_item(stored.id)
            assert got.item.text == re.sub("[\x00\ud800-\udfff]", "\ufffd", text)
            assert (
                got.text_sha256 == hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
            )
            asyncio.run(audit.close())
        finally:
            down.dispose()
            database.dispose()


# -- queries -----------------------------------------------------------------------------


def seed(store: AuditStore) -> dict[str, FlaggedItem]:
    """Items with known categories, severities, models, directions and times."""
    items = {
        "hate": item(
            1,
            created_at=T0,
            categories=("hate",),
            severities={"hate": 4, "violence": 0},
        ),
        "threat": item(
            2,
            created_at=T0 + timedelta(minutes=1),
            categories=("harassment", "harassment/threatening"),
            severities={"hate": 6, "violence": 6},
            model="llama-3",
        ),
        "selfharm": item(
            3,
            created_at=T0 + timedelta(minutes=2),
            direction=Direction.COMPLETION,
            categories=("self-harm",),
            severities={"self_harm": 4},
        ),
        "pii": item(
            4,
            created_at=T0 + timedelta(minutes=3),
            categories=("pii",),
            severities={"hate": 0},
            action="annotate",
        ),
        "mild": item(
            5,
            created_at=T0 + timedelta(minutes=4),
            categories=("harassment",),
            severities={"hate": 2},
            model=None,
        ),
    }
    asyncio.run(store.record(list(items.values())))
    return items


def names(found: Any, items: dict[str, FlaggedItem]) -> list[str]:
    by_id = {value.id: key for key, value in items.items()}
    return [by_id[stored.item.id] for stored in found.items]


def test_filters(store: AuditStore) -> None:
    items = seed(store)

    def listed(**where: Any) -> list[str]:
        return names(store.list_items(ItemFilter(**where)), items)

    assert listed() == ["mild", "pii", "selfharm", "threat", "hate"]  # newest first
    assert listed(category="harassment") == ["mild", "threat"]
    assert listed(category="harassment/threatening") == ["threat"]
    assert listed(category="pii") == ["pii"]
    assert listed(category="sexual") == []
    assert listed(severity_min=0) == listed()
    assert listed(severity_min=2) == ["mild", "selfharm", "threat", "hate"]
    assert listed(severity_min=4) == ["selfharm", "threat", "hate"]
    assert listed(severity_min=6) == ["threat"]
    assert listed(model="llama-3") == ["threat"]
    assert listed(request_id=items["pii"].request_id) == ["pii"]
    assert listed(request_id="no-such-request") == []
    assert listed(direction=Direction.COMPLETION) == ["selfharm"]
    assert listed(direction=Direction.PROMPT, category="harassment") == ["mild", "threat"]
    assert listed(since=T0 + timedelta(minutes=1), until=T0 + timedelta(minutes=3)) == [
        "selfharm",
        "threat",
    ]
    assert listed(review_state=ReviewState.UNREVIEWED) == listed()
    store.label(items["pii"].id, label=ReviewLabel.FALSE_POSITIVE, note=None, reviewer_key_id="k")
    assert listed(review_state=ReviewState.FALSE_POSITIVE) == ["pii"]
    assert "pii" not in listed(review_state=ReviewState.UNREVIEWED)

    with pytest.raises(InvalidRequest) as unknown:
        ItemFilter(category="hatred")
    assert (unknown.value.param, unknown.value.code) == ("category", "invalid_value")
    with pytest.raises(InvalidRequest) as severity:
        ItemFilter(severity_min=3)
    assert severity.value.param == "severity_min"


def test_keyset_pages_have_no_gaps_or_duplicates(store: AuditStore) -> None:
    # Groups of items share a created_at, so the id breaks ties.
    items = [item(n, created_at=T0 + timedelta(seconds=n // 3)) for n in range(25)]
    asyncio.run(store.record(items))
    expected = [i.id for i in sorted(items, key=lambda i: (i.created_at, i.id), reverse=True)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = store.list_items(limit=4, cursor=cursor)
        seen.extend(stored.item.id for stored in page.items)
        pages += 1
        if pages == 2:  # newer items arriving meanwhile never shift later pages
            asyncio.run(store.record([item(99, created_at=T0 + timedelta(days=1))]))
        if not page.has_more:
            assert page.next_cursor is None
            break
        cursor = page.next_cursor
    assert seen == expected
    assert pages == 7
    category_pages = store.list_items(ItemFilter(category="hate"), limit=500)
    assert len(category_pages.items) == 26
    assert not category_pages.has_more

    for bad in ["not-a-cursor", "!!!", base64.urlsafe_b64encode(b"12:").decode()]:
        with pytest.raises(InvalidRequest) as invalid:
            store.list_items(cursor=bad)
        assert (invalid.value.param, invalid.value.code) == ("cursor", "invalid_cursor")
    with pytest.raises(InvalidRequest):
        store.list_items(limit=501)


def test_labels_persist_with_the_reviewer(store: AuditStore) -> None:
    items = seed(store)
    before = datetime.now(UTC)
    labelled = store.label(
        items["hate"].id,
        label=ReviewLabel.TRUE_POSITIVE,
        note="clear hate speech",
        reviewer_key_id="key_reviewer",
    )
    assert labelled.review_state is ReviewState.TRUE_POSITIVE
    again = store.get_item(items["hate"].id)
    assert (again.review_state, again.review_note, again.reviewer_key_id) == (
        ReviewState.TRUE_POSITIVE,
        "clear hate speech",
        "key_reviewer",
    )
    assert again.reviewed_at is not None
    assert before - timedelta(seconds=1) <= again.reviewed_at <= datetime.now(UTC)
    # A later review replaces the earlier one.
    store.label(
        items["hate"].id, label=ReviewLabel.NEEDS_POLICY_CHANGE, note=None, reviewer_key_id="k2"
    )
    assert store.get_item(items["hate"].id).review_note is None

    updated = store.label_many(
        [items["mild"].id, items["pii"].id, items["mild"].id],
        label=ReviewLabel.FALSE_POSITIVE,
        note="banter",
        reviewer_key_id="key_bulk",
    )
    assert updated == 2
    for name in ("mild", "pii"):
        got = store.get_item(items[name].id)
        assert (got.review_state, got.reviewer_key_id) == (ReviewState.FALSE_POSITIVE, "key_bulk")

    with pytest.raises(NotFound) as missing:
        store.label_many(
            [items["threat"].id, "nope"],
            label=ReviewLabel.TRUE_POSITIVE,
            note=None,
            reviewer_key_id="k",
        )
    assert "'nope'" in missing.value.message
    assert store.get_item(items["threat"].id).review_state is ReviewState.UNREVIEWED  # all or none
    with pytest.raises(NotFound):
        store.label("nope", label=ReviewLabel.TRUE_POSITIVE, note=None, reviewer_key_id="k")
    with pytest.raises(InvalidRequest):
        store.label(
            items["threat"].id,
            label=ReviewLabel.TRUE_POSITIVE,
            note="x" * 2001,
            reviewer_key_id="k",
        )


def test_export_walks_labelled_items_oldest_first(
    store: AuditStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.audit.store.EXPORT_PAGE_SIZE", 2)  # several pages
    items = seed(store)
    for name, label in [
        ("threat", ReviewLabel.TRUE_POSITIVE),
        ("hate", ReviewLabel.TRUE_POSITIVE),
        ("pii", ReviewLabel.FALSE_POSITIVE),
        ("mild", ReviewLabel.NEEDS_POLICY_CHANGE),
    ]:
        store.label(items[name].id, label=label, note=None, reviewer_key_id="k")
    everything = [stored.item.id for stored in store.export()]
    assert everything == [items[n].id for n in ("hate", "threat", "pii", "mild")]
    assert [s.item.id for s in store.export(ReviewLabel.TRUE_POSITIVE)] == [
        items["hate"].id,
        items["threat"].id,
    ]
    assert list(store.export(ReviewLabel.FALSE_POSITIVE))[0].item.text == items["pii"].text


def test_stats(store: AuditStore) -> None:
    items = seed(store)
    store.label(items["hate"].id, label=ReviewLabel.TRUE_POSITIVE, note=None, reviewer_key_id="k")
    stats = store.stats()
    assert stats.total == 5
    assert stats.by_category == {
        "harassment": 2,
        "harassment/threatening": 1,
        "hate": 1,
        "pii": 1,
        "self-harm": 1,
    }
    assert stats.by_direction == {"completion": 1, "prompt": 4}
    assert stats.by_review_state == {
        "unreviewed": 4,
        "true_positive": 1,
        "false_positive": 0,
        "needs_policy_change": 0,
    }
    assert stats.by_action == {"annotate": 1, "block": 4}
    assert store.stats(since=T0 + timedelta(minutes=4)).total == 1


def test_an_unreachable_database_is_a_503_for_review(store: AuditStore, down: Database) -> None:
    store.database = down
    for call in (
        lambda: store.list_items(),
        lambda: store.get_item("x"),
        lambda: store.stats(),
        lambda: store.export(),
        lambda: store.label("x", label=ReviewLabel.TRUE_POSITIVE, note=None, reviewer_key_id="k"),
    ):
        with pytest.raises(ServiceUnavailable) as unavailable:
            call()
        assert unavailable.value.code == "database_unavailable"
