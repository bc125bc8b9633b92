"""Traffic origin (``safegate-origin``): parsed from the header, kept on flagged items and
request records (database and spool), filtered by the store, added by migration 0004 on
SQLite and PostgreSQL without touching a row, and recorded end to end by the real service."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import func, inspect, select, table
from sqlalchemy.orm import Session

from gateway.access import Role
from gateway.audit import (
    AuditStore,
    FlaggedItemCategoryRow,
    FlaggedItemRow,
    ItemFilter,
    RequestLogRow,
)
from gateway.audit.tables import item_row, request_row
from gateway.db import Database
from gateway.errors import InvalidRequest
from gateway.origin import parse_origin
from tests.gateway.conftest import alembic_config, issue_key
from tests.gateway.test_audit import HATEFUL, T0, item, request_record

KEY_A = "key_aaaaaaaaaaaaaaaaaaaaaaaa"
KEY_B = "key_bbbbbbbbbbbbbbbbbbbbbbbb"


@pytest.fixture
def store(database: Database, tmp_path: Path) -> Iterator[AuditStore]:
    audit = AuditStore(database, spool_dir=tmp_path / "audit-spool")
    yield audit
    asyncio.run(audit.close())


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (None, None),
        ("eval", "eval"),
        ("EVAL", "eval"),
        (" ci ", "ci"),
        ("load-test.2", "load-test.2"),
    ],
)
def test_well_formed_origins_are_lower_cased(value: str | None, parsed: str | None) -> None:
    assert parse_origin(value) == parsed


@pytest.mark.parametrize("value", ["", "eval run", "-eval", "évaluation", "x" * 33, "eval;x"])
def test_malformed_origins_are_refused_naming_the_header(value: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_origin(value)
    assert (refused.value.param, refused.value.code) == ("safegate-origin", "invalid_origin")
    with pytest.raises(ValueError, match="origin must be a lower-case origin"):
        item(origin=value or "EVAL")


def test_the_origin_is_stored_spooled_and_filtered(store: AuditStore) -> None:
    users = item(1, created_at=T0, key_id=KEY_A)
    ci = item(2, created_at=T0 + timedelta(minutes=1), key_id=KEY_A, origin="ci")
    evals = [
        item(n, created_at=T0 + timedelta(minutes=n), key_id=KEY_B, origin="eval")
        for n in range(3, 6)
    ]
    asyncio.run(store.record([users, ci, *evals], request=request_record(3, origin="eval")))

    def listed(**where: Any) -> list[str]:
        return [stored.item.id for stored in store.list_items(ItemFilter(**where)).items]

    newest_first = [e.id for e in reversed(evals)] + [ci.id, users.id]
    assert listed() == newest_first  # the store itself hides nothing unless asked
    assert listed(hide_eval=True) == [ci.id, users.id]  # no origin counts as not eval
    assert listed(origin="eval") == newest_first[:3]
    assert listed(origin="EVAL", hide_eval=True) == newest_first[:3]  # asked for: shown
    assert listed(origin="ci") == [ci.id]
    assert listed(key_id=KEY_A) == [ci.id, users.id]
    assert listed(key_id=KEY_B, hide_eval=True) == []
    assert store.get_item(evals[0].id).item == evals[0]
    assert store.stats(ItemFilter(hide_eval=True)).total == 2
    assert store.stats(ItemFilter(origin="eval"), since=T0 + timedelta(minutes=4)).total == 2
    with store.database.session() as session:
        assert session.scalars(select(RequestLogRow.origin)).one() == "eval"
    with pytest.raises(InvalidRequest) as bad:
        ItemFilter(origin="not an origin")
    assert bad.value.param == "origin"
    with pytest.raises(InvalidRequest) as long_key:
        ItemFilter(key_id="k" * 129)
    assert long_key.value.param == "key_id"


def test_the_origin_survives_the_spool_and_older_lines_read_without_it(
    tmp_path: Path, database: Database
) -> None:
    down = Database("postgresql+psycopg://postgres@127.0.0.1:9/safegate?connect_timeout=2")
    audit = AuditStore(down, spool_dir=tmp_path / "spool")
    marked = item(1, origin="eval")
    try:
        asyncio.run(audit.record([marked], request=request_record(1, origin="eval")))
        spooled = [
            json.loads(line)
            for line in (tmp_path / "spool" / "spool.jsonl").read_text().splitlines()
        ]
        assert [line["origin"] for line in spooled] == ["eval", "eval"]
        # a line spooled by a version without origins: the same, less the key
        older = item(2)
        line = {**spooled[0], "id": older.id, "request_id": older.request_id}
        del line["origin"]
        with (tmp_path / "spool" / "spool.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")
        audit.database = database
        report = audit.drain_spool()
        assert report is not None
        assert (report.consumed, report.set_aside) == (3, ())
        assert audit.get_item(marked.id).item.origin == "eval"
        assert audit.get_item(older.id).item.origin is None
    finally:
        asyncio.run(audit.close())
        down.dispose()


def origins_of(session: Session, row: type[FlaggedItemRow] | type[RequestLogRow]) -> dict[str, Any]:
    """request id -> origin of every row of ``row``'s table."""
    return dict(session.execute(select(row.request_id, row.origin)).all())


def _columns(database: Database, table: str) -> set[str]:
    return {column["name"] for column in inspect(database.engine).get_columns(table)}


def _indexes(database: Database) -> set[str]:
    return {index["name"] for index in inspect(database.engine).get_indexes("flagged_items")}


def _count(database: Database, name: str) -> int:
    with database.engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(table(name))).scalar_one())


# request_log columns later revisions add: 0004's origin, 0006's usage source and cost.
AFTER_0003 = frozenset({"origin", "usage_source", "cost_usd"})


def test_migration_0004_adds_the_origin_and_keeps_every_row(
    database: Database, tmp_path: Path
) -> None:
    with database.engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0003")
    assert "origin" not in _columns(database, "flagged_items")
    assert "origin" not in _columns(database, "request_log")
    # Rows written at 0003, with that revision's columns only.
    before, logged = item(1, created_at=T0), request_record(1, created_at=T0)
    row = {k: v for k, v in item_row(before).items() if k != "origin"}
    with database.engine.begin() as connection:
        connection.execute(FlaggedItemRow.__table__.insert(), [row])
        connection.execute(
            FlaggedItemCategoryRow.__table__.insert(),
            [{"item_id": before.id, "category": c} for c in before.categories],
        )
        connection.execute(
            RequestLogRow.__table__.insert(),
            [{k: v for k, v in request_row(logged).items() if k not in AFTER_0003}],
        )

    database.migrate()
    assert "origin" in _columns(database, "flagged_items")
    assert "origin" in _columns(database, "request_log")
    assert {"ix_flagged_items_key_id_created_at", "ix_flagged_items_origin_created_at"} <= (
        _indexes(database)
    )
    audit = AuditStore(database, spool_dir=tmp_path / "spool")
    try:
        assert audit.get_item(before.id).item == before  # origin None
        evaluated = item(2, created_at=T0 + timedelta(minutes=1), origin="eval")
        asyncio.run(audit.record([evaluated], request=request_record(2, origin="eval")))
        hidden = audit.list_items(ItemFilter(hide_eval=True, category="hate")).items
        assert [stored.item.id for stored in hidden] == [before.id]
    finally:
        asyncio.run(audit.close())
    with database.session() as session:
        origins = origins_of(session, RequestLogRow)
    assert origins == {"req-1": None, "req-2": "eval"}

    with database.engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0003")
    assert "origin" not in _columns(database, "flagged_items")
    assert not _indexes(database) & {
        "ix_flagged_items_key_id_created_at",
        "ix_flagged_items_origin_created_at",
    }
    # Dropping the column copied no table: every item keeps its category rows.
    assert (_count(database, "flagged_items"), _count(database, "request_log")) == (2, 2)
    assert _count(database, "flagged_item_categories") == 4
    database.migrate()
    assert "origin" in _columns(database, "flagged_items")


# -- the service ---------------------------------------------------------------------------


def test_the_service_records_the_declared_origin(client: TestClient) -> None:
    reviewer = {"Authorization": f"Bearer {issue_key(client, Role.REVIEWER)}"}
    for request_id, headers in (
        ("from-eval", {"safegate-origin": "Eval"}),
        ("from-user", {}),
    ):
        response = client.post(
            "/v1/moderations",
            json={"input": HATEFUL},
            headers={"x-request-id": request_id, **headers},
        )
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["flagged"] is True

    refused = client.post(
        "/v1/moderations",
        json={"input": HATEFUL},
        headers={"x-request-id": "bad-origin", "safegate-origin": "eval; drop table"},
    )
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert (error["param"], error["code"]) == ("safegate-origin", "invalid_origin")

    audit: AuditStore = client.app.state.runtime.audit  # type: ignore[attr-defined]
    with audit.database.session() as session:
        logged = origins_of(session, RequestLogRow)
        flagged = origins_of(session, FlaggedItemRow)
        categories = session.scalar(select(func.count()).select_from(FlaggedItemCategoryRow))
    assert logged == {"from-eval": "eval", "from-user": None}  # the refused one: nothing
    assert flagged == {"from-eval": "eval", "from-user": None}
    assert categories

    default = client.get("/v1/review/items", headers=reviewer).json()["data"]
    assert [(entry["request_id"], entry["origin"]) for entry in default] == [("from-user", None)]
    shown = client.get(
        "/v1/review/items", params={"include_eval": "true"}, headers=reviewer
    ).json()["data"]
    assert [entry["request_id"] for entry in shown] == ["from-user", "from-eval"]
