"""``/v1/review``: roles, filters, pagination, labels, export, stats, blocklist additions.

The API tests run the review router on real SQLite with the real key store and rate
limiter (``gateway.access``); the end-to-end tests start the whole service with the real
engine (the ``client`` fixture), moderate real text and review what it flagged.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from gateway import errors
from gateway.access import KeyStore, Role
from gateway.access.ratelimit import InProcessRateLimiter
from gateway.access.settings import MAX_REQUESTS_PER_MINUTE
from gateway.audit import AuditStore, FlaggedItem, RequestLogRow
from gateway.blocklists import BlocklistStore
from gateway.config import Settings
from gateway.db import Database
from gateway.review.schemas import PREVIEW_CHARS
from gateway.routes import review
from gateway.safety.taxonomy import Direction
from tests.gateway.conftest import EngineFactory, bare_runtime, issue_key, ready_client

HATEFUL = "All Muslims are terrorists and should be thrown out of this country."
T0 = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)


@dataclass
class Api:
    client: TestClient
    audit: AuditStore
    blocklists: BlocklistStore
    keys: dict[Role, str]
    key_ids: dict[Role, str]

    def as_(self, role: Role) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    database = Database(f"sqlite:///{tmp_path}/safegate.db")
    database.migrate()
    keys = KeyStore(database)
    issued = {
        role: keys.create(f"test-{role.value}", role, rate_limit_rpm=MAX_REQUESTS_PER_MINUTE)
        for role in Role
    }
    audit = AuditStore(database, spool_dir=tmp_path / "audit-spool")
    blocklists = BlocklistStore(database)
    app = FastAPI()
    errors.install(app)
    app.include_router(review.router)
    app.state.runtime = bare_runtime(
        Settings(home=tmp_path / "home"),
        keys=keys,
        limiter=InProcessRateLimiter(),
        audit=audit,
        state=SimpleNamespace(blocklists=blocklists),
    )
    try:
        with TestClient(app) as client:
            yield Api(
                client=client,
                audit=audit,
                blocklists=blocklists,
                keys={role: key.secret for role, key in issued.items()},
                key_ids={role: key.key.id for role, key in issued.items()},
            )
    finally:
        asyncio.run(audit.close())
        database.dispose()


def item(number: int, **changes: Any) -> FlaggedItem:
    fields: dict[str, Any] = {
        "request_id": f"req-{number}",
        "key_id": "key_developer",
        "model": "gpt-4o-mini",
        "direction": Direction.PROMPT,
        "source": "messages[0]",
        "categories": ("hate",),
        "scores": {"hate": 0.97, "violence": 0.05},
        "severities": {"hate": 4, "sexual": 0, "violence": 0, "self_harm": 0},
        "action": "block",
        "reasons": ("prompt flagged for hate",),
        "text": f"{HATEFUL} ({number})",
        "created_at": T0 + timedelta(minutes=number),
    }
    fields.update(changes)
    return FlaggedItem(**fields)


def seed(api: Api, items: list[FlaggedItem]) -> list[FlaggedItem]:
    asyncio.run(api.audit.record(items))
    return items


def listed(api: Api, **params: Any) -> list[str]:
    response = api.client.get("/v1/review/items", params=params, headers=api.as_(Role.REVIEWER))
    assert response.status_code == 200, response.text
    return [entry["id"] for entry in response.json()["data"]]


# -- roles -------------------------------------------------------------------------------

REVIEWER_ROUTES = [
    ("GET", "/v1/review/items", None),
    ("GET", "/v1/review/items/abc", None),
    ("POST", "/v1/review/items/abc/label", {"label": "true_positive"}),
    ("POST", "/v1/review/labels", {"ids": ["abc"], "label": "true_positive"}),
    ("GET", "/v1/review/export", None),
    ("GET", "/v1/review/stats", None),
]
BLOCKLIST_ROUTE = ("POST", "/v1/review/items/abc/blocklist", {"blocklist": "b", "term": "x"})


@pytest.mark.parametrize(("method", "path", "payload"), [*REVIEWER_ROUTES, BLOCKLIST_ROUTE])
def test_every_route_needs_a_key(api: Api, method: str, path: str, payload: Any) -> None:
    missing = api.client.request(method, path, json=payload)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "missing_api_key"
    wrong = api.client.request(
        method, path, json=payload, headers={"Authorization": "Bearer sg-" + "x" * 43}
    )
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(("method", "path", "payload"), REVIEWER_ROUTES)
def test_review_routes_need_the_reviewer_role(
    api: Api, method: str, path: str, payload: Any
) -> None:
    developer = api.client.request(method, path, json=payload, headers=api.as_(Role.DEVELOPER))
    assert developer.status_code == 403
    assert developer.json()["error"]["code"] == "insufficient_role"
    for role in (Role.REVIEWER, Role.ADMIN):
        allowed = api.client.request(method, path, json=payload, headers=api.as_(role))
        assert allowed.status_code in (200, 404), allowed.text  # "abc" is no item


def test_adding_to_a_blocklist_needs_admin(api: Api) -> None:
    [stored] = seed(api, [item(1)])
    body = {"blocklist": "slurs", "term": "terrorists"}
    path = f"/v1/review/items/{stored.id}/blocklist"
    for role in (Role.DEVELOPER, Role.REVIEWER):
        refused = api.client.post(path, json=body, headers=api.as_(role))
        assert refused.status_code == 403
    assert api.client.post(path, json=body, headers=api.as_(Role.ADMIN)).status_code == 201


# -- listing -----------------------------------------------------------------------------


def test_list_filters_and_objects(api: Api) -> None:
    hate, threat, completion, old_pii = seed(
        api,
        [
            item(1),
            item(
                2,
                categories=("harassment", "harassment/threatening"),
                severities={"hate": 6, "violence": 6},
                model="llama-3",
            ),
            item(3, direction=Direction.COMPLETION, source="choices[0]", categories=("sexual",)),
            item(
                -60,
                categories=("pii",),
                severities={"hate": 0},
                action="annotate",
                text="call me on 555-0100 " + "x" * 400,
            ),
        ],
    )
    assert listed(api) == [completion.id, threat.id, hate.id, old_pii.id]
    assert listed(api, category="harassment/threatening") == [threat.id]
    assert listed(api, severity_min=6) == [threat.id]
    assert listed(api, severity_min=4) == [completion.id, threat.id, hate.id]
    assert listed(api, model="llama-3") == [threat.id]
    assert listed(api, direction="completion") == [completion.id]
    assert listed(api, review_state="unreviewed", category="pii") == [old_pii.id]
    since = int((T0 + timedelta(minutes=2)).timestamp())
    assert listed(api, since=since) == [completion.id, threat.id]
    assert listed(api, until=since) == [hate.id, old_pii.id]

    body = api.client.get(
        "/v1/review/items", params={"category": "pii"}, headers=api.as_(Role.REVIEWER)
    ).json()
    assert (body["object"], body["has_more"], body["next_cursor"]) == ("list", False, None)
    [entry] = body["data"]
    assert entry == {
        "id": old_pii.id,
        "object": "review.item",
        "created_at": int(old_pii.created_at.timestamp()),
        "request_id": "req--60",
        "key_id": "key_developer",
        "model": "gpt-4o-mini",
        "origin": None,
        "direction": "prompt",
        "source": "messages[0]",
        "categories": ["pii"],
        "severities": {"hate": 0},
        "max_severity": 0,
        "action": "annotate",
        "reasons": ["prompt flagged for hate"],
        "text_sha256": entry["text_sha256"],
        "text_chars": len(old_pii.text),
        "text_preview": old_pii.text[:PREVIEW_CHARS],
        "review_state": "unreviewed",
        "review_note": None,
        "reviewer_key_id": None,
        "reviewed_at": None,
    }
    assert "scores" not in entry


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"category": "hatred"}, "category"),
        ({"severity_min": 3}, "severity_min"),
        ({"direction": "sideways"}, "direction"),
        ({"review_state": "maybe"}, "review_state"),
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"since": -1}, "since"),
        ({"cursor": "garbage"}, "cursor"),
        ({"origin": "not an origin"}, "origin"),
        ({"origin": "x" * 33}, "origin"),
        ({"include_eval": "perhaps"}, "include_eval"),
        ({"key_id": "k" * 129}, "key_id"),
    ],
)
def test_bad_filters_are_400s(api: Api, params: dict[str, Any], param: str) -> None:
    response = api.client.get("/v1/review/items", params=params, headers=api.as_(Role.REVIEWER))
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)


def test_eval_traffic_is_left_out_unless_asked_for(api: Api) -> None:
    user, ci, *evals = seed(
        api,
        [
            item(1),
            item(2, key_id="key_ci", origin="ci"),
            item(3, key_id="key_evals", origin="eval"),
            item(4, key_id="key_evals", origin="eval"),
        ],
    )
    newest_eval = [evals[1].id, evals[0].id]
    assert listed(api) == [ci.id, user.id]
    assert listed(api, include_eval="true") == [*newest_eval, ci.id, user.id]
    assert listed(api, origin="eval") == newest_eval  # asking for eval shows it
    assert listed(api, origin="ci") == [ci.id]
    assert listed(api, key_id="key_evals") == []  # that key sent only eval traffic
    assert listed(api, key_id="key_evals", include_eval="true") == newest_eval
    assert listed(api, key_id="key_developer") == [user.id]
    entries = api.client.get(
        "/v1/review/items", params={"origin": "eval"}, headers=api.as_(Role.REVIEWER)
    ).json()["data"]
    assert {(entry["origin"], entry["key_id"]) for entry in entries} == {("eval", "key_evals")}

    def stats(**params: Any) -> dict[str, Any]:
        response = api.client.get("/v1/review/stats", params=params, headers=api.as_(Role.REVIEWER))
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    assert stats()["total"] == 2
    assert stats(include_eval="true")["total"] == 4
    assert stats(origin="eval")["by_review_state"]["unreviewed"] == 2
    assert stats(key_id="key_ci")["total"] == 1


def test_pagination_walks_every_item_once(api: Api) -> None:
    items = seed(api, [item(n // 4, request_id=f"r{n}") for n in range(30)])  # ties on time
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 7}
        if cursor:
            params["cursor"] = cursor
        page = api.client.get(
            "/v1/review/items", params=params, headers=api.as_(Role.REVIEWER)
        ).json()
        seen.extend(entry["id"] for entry in page["data"])
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
    assert len(seen) == len(set(seen)) == 30
    assert seen == [i.id for i in sorted(items, key=lambda i: (i.created_at, i.id), reverse=True)]


# -- one item, labels --------------------------------------------------------------------


def test_get_item_has_the_text_and_every_score(api: Api) -> None:
    [stored] = seed(api, [item(1)])
    response = api.client.get(f"/v1/review/items/{stored.id}", headers=api.as_(Role.REVIEWER))
    assert response.status_code == 200
    body = response.json()
    assert (body["object"], body["text"], body["scores"]) == (
        "review.item",
        stored.text,
        {"hate": 0.97, "violence": 0.05},
    )
    missing = api.client.get("/v1/review/items/nope", headers=api.as_(Role.REVIEWER))
    assert missing.status_code == 404
    assert missing.json()["error"] == {
        "message": "no flagged item with id 'nope'",
        "type": "not_found_error",
        "param": "id",
        "code": "item_not_found",
    }


def test_a_label_persists_with_the_reviewers_key(api: Api) -> None:
    [stored] = seed(api, [item(1)])
    before = int(datetime.now(UTC).timestamp())
    response = api.client.post(
        f"/v1/review/items/{stored.id}/label",
        json={"label": "true_positive", "note": "textbook hate speech"},
        headers=api.as_(Role.REVIEWER),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["review_state"], body["review_note"], body["reviewer_key_id"]) == (
        "true_positive",
        "textbook hate speech",
        api.key_ids[Role.REVIEWER],
    )
    assert before - 1 <= body["reviewed_at"] <= before + 60
    again = api.client.get(f"/v1/review/items/{stored.id}", headers=api.as_(Role.ADMIN)).json()
    assert again["review_state"] == "true_positive"
    assert again["reviewer_key_id"] == api.key_ids[Role.REVIEWER]
    assert listed(api, review_state="true_positive") == [stored.id]


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"label": "unreviewed"}, "label"),
        ({"label": "maybe"}, "label"),
        ({"label": "true_positive", "note": "x" * 2001}, "note"),
        ({"label": "true_positive", "colour": "red"}, "colour"),
        ({}, "label"),
    ],
)
def test_bad_labels_are_400s(api: Api, payload: dict[str, Any], param: str) -> None:
    [stored] = seed(api, [item(1)])
    response = api.client.post(
        f"/v1/review/items/{stored.id}/label", json=payload, headers=api.as_(Role.REVIEWER)
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert api.audit.get_item(stored.id).review_state.value == "unreviewed"


def test_bulk_labels_count_and_unknown_ids_are_404s(api: Api) -> None:
    items = seed(api, [item(n) for n in range(3)])
    ids = [i.id for i in items]
    response = api.client.post(
        "/v1/review/labels",
        json={"ids": [*ids, ids[0]], "label": "false_positive", "note": "quoted news"},
        headers=api.as_(Role.REVIEWER),
    )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "object": "review.labels",
        "label": "false_positive",
        "updated": 3,
    }
    assert listed(api, review_state="false_positive") == ids[::-1]

    unknown = api.client.post(
        "/v1/review/labels",
        json={"ids": [ids[0], "ghost-1", "ghost-2"], "label": "true_positive"},
        headers=api.as_(Role.REVIEWER),
    )
    assert unknown.status_code == 404
    error = unknown.json()["error"]
    assert error["message"] == (
        "no flagged items with ids 'ghost-1', 'ghost-2'; nothing was labelled"
    )
    assert (error["param"], error["code"]) == ("ids", "item_not_found")
    assert HATEFUL not in unknown.text
    assert api.audit.get_item(ids[0]).review_state.value == "false_positive"  # untouched

    too_many = api.client.post(
        "/v1/review/labels",
        json={"ids": [f"id{n}" for n in range(501)], "label": "true_positive"},
        headers=api.as_(Role.REVIEWER),
    )
    assert too_many.status_code == 400
    assert too_many.json()["error"]["param"] == "ids"


# -- export and stats --------------------------------------------------------------------


def test_export_is_an_eval_set(api: Api) -> None:
    prompt, completion, policy, unreviewed = seed(
        api,
        [
            item(1),
            item(2, direction=Direction.COMPLETION, text="Here is how to hurt them: ..."),
            item(3, categories=("harassment",), text="You are such an idiot, honestly."),
            item(4),
        ],
    )
    for stored, label in [
        (prompt, "true_positive"),
        (completion, "false_positive"),
        (policy, "needs_policy_change"),
    ]:
        api.client.post(
            f"/v1/review/items/{stored.id}/label",
            json={"label": label},
            headers=api.as_(Role.REVIEWER),
        )
    response = api.client.get("/v1/review/export", headers=api.as_(Role.REVIEWER))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert lines == [
        {
            "id": prompt.id,
            "messages": [{"role": "user", "content": prompt.text}],
            "direction": "prompt",
            "categories": ["hate"],
            "label": "true_positive",
            "expected": "flag",
            "labels": {
                "review": "true_positive",
                "direction": "prompt",
                "categories": ["hate"],
                "harmful": True,
            },
        },
        {
            "id": completion.id,
            "messages": [{"role": "assistant", "content": "Here is how to hurt them: ..."}],
            "direction": "completion",
            "categories": ["hate"],
            "label": "false_positive",
            "expected": "allow",
            "labels": {
                "review": "false_positive",
                "direction": "completion",
                "categories": ["hate"],
                "benign_risky": True,
            },
        },
        {
            "id": policy.id,
            "messages": [{"role": "user", "content": "You are such an idiot, honestly."}],
            "direction": "prompt",
            "categories": ["harassment"],
            "label": "needs_policy_change",
            "expected": None,
            "labels": {
                "review": "needs_policy_change",
                "direction": "prompt",
                "categories": ["harassment"],
            },
        },
    ]
    assert unreviewed.id not in response.text
    only = api.client.get(
        "/v1/review/export", params={"label": "false_positive"}, headers=api.as_(Role.REVIEWER)
    )
    assert [json.loads(line)["id"] for line in only.text.splitlines()] == [completion.id]
    empty = api.client.get(
        "/v1/review/export",
        params={"label": "needs_policy_change"},
        headers=api.as_(Role.REVIEWER),
    )
    assert len(empty.text.splitlines()) == 1


def test_stats(api: Api) -> None:
    seed(api, [item(1), item(2, direction=Direction.COMPLETION, categories=("sexual", "hate"))])
    response = api.client.get("/v1/review/stats", headers=api.as_(Role.REVIEWER))
    assert response.status_code == 200
    assert response.json() == {
        "object": "review.stats",
        "total": 2,
        "by_category": {"hate": 2, "sexual": 1},
        "by_direction": {"completion": 1, "prompt": 1},
        "by_review_state": {
            "unreviewed": 2,
            "true_positive": 0,
            "false_positive": 0,
            "needs_policy_change": 0,
        },
        "by_action": {"block": 2},
        "spooled_pending": 0,
    }


def test_an_unreachable_database_is_a_503_not_a_500(api: Api) -> None:
    good = api.audit.database
    api.audit.database = Database("postgresql+psycopg://postgres@127.0.0.1:9/x?connect_timeout=2")
    try:
        for path in ("/v1/review/items", "/v1/review/stats", "/v1/review/export"):
            response = api.client.get(path, headers=api.as_(Role.REVIEWER))
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "database_unavailable"
    finally:
        api.audit.database.dispose()
        api.audit.database = good


# -- blocklist additions -----------------------------------------------------------------


def test_a_term_must_occur_in_the_item(api: Api) -> None:
    [stored] = seed(api, [item(1, text="Ship Pr0ject  Zorblax before the FALCON launch")])
    path = f"/v1/review/items/{stored.id}/blocklist"

    def add(**body: Any) -> Any:
        return api.client.post(path, json=body, headers=api.as_(Role.ADMIN))

    created = add(blocklist="codenames", term="project zorblax")
    assert created.status_code == 201, created.text
    body = created.json()
    assert (body["object"], body["item_id"], body["blocklist"], body["blocklist_created"]) == (
        "review.blocklist_addition",
        stored.id,
        "codenames",
        True,
    )
    assert (body["entry"]["object"], body["entry"]["type"], body["entry"]["value"]) == (
        "blocklist.item",
        "term",
        "project zorblax",
    )
    second = add(blocklist="codenames", term="falcon", kind="term")
    assert second.json()["blocklist_created"] is False
    regex = add(blocklist="codenames", term=r"\bf[a4]lcon\s+launch\b", kind="regex")
    assert regex.status_code == 201, regex.text
    assert [i.value for i in api.blocklists.get("codenames").items] == [
        "project zorblax",
        "falcon",
        r"\bf[a4]lcon\s+launch\b",
    ]

    for bad, code in [
        ({"blocklist": "codenames", "term": "zorbla"}, "term_not_in_item"),  # not a whole word
        ({"blocklist": "codenames", "term": "kestrel"}, "term_not_in_item"),
        ({"blocklist": "codenames", "term": "   "}, "empty_term"),
        ({"blocklist": "codenames", "term": "kestrel", "kind": "regex"}, "term_not_in_item"),
        ({"blocklist": "codenames", "term": "(unclosed", "kind": "regex"}, "invalid_regex"),
        ({"blocklist": "codenames", "term": r"(f[a4]lcon)\s+\1", "kind": "regex"}, "invalid_regex"),
        ({"blocklist": "codenames", "term": "falcon(?= launch)", "kind": "regex"}, "invalid_regex"),
        ({"blocklist": "has space", "term": "falcon"}, "invalid_name"),
    ]:
        response = add(**bad)
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["error"]["code"] == code
    missing = api.client.post(
        "/v1/review/items/nope/blocklist",
        json={"blocklist": "codenames", "term": "falcon"},
        headers=api.as_(Role.ADMIN),
    )
    assert missing.status_code == 404


# -- end to end: the real service and engine ---------------------------------------------


def audit_of(client: TestClient) -> AuditStore:
    store: AuditStore = client.app.state.runtime.audit  # type: ignore[attr-defined]
    return store


def test_a_hateful_moderation_input_lands_in_the_audit_store(client: TestClient) -> None:
    benign = "Can you give me a recipe for a quick vegetable curry?"
    response = client.post(
        "/v1/moderations", json={"input": [benign, HATEFUL]}, headers={"x-request-id": "mod-1"}
    )
    assert response.status_code == 200, response.text
    assert [r["flagged"] for r in response.json()["results"]] == [False, True]

    reviewer = issue_key(client, Role.REVIEWER)
    page = client.get(
        "/v1/review/items",
        params={"category": "hate"},
        headers={"Authorization": f"Bearer {reviewer}"},
    ).json()
    [entry] = page["data"]
    assert (entry["source"], entry["request_id"], entry["direction"]) == (
        "input[1]",
        "mod-1",
        "prompt",
    )
    assert entry["model"] == "safegate-moderation-1"
    assert entry["severities"]["hate"] >= 4
    assert entry["action"] == "block"
    keys = client.app.state.runtime.keys.list()  # type: ignore[attr-defined]
    admin_id = next(key.id for key in keys if key.name == "test-admin")
    assert entry["key_id"] == admin_id
    full = client.get(
        f"/v1/review/items/{entry['id']}", headers={"Authorization": f"Bearer {reviewer}"}
    ).json()
    assert full["text"] == HATEFUL
    assert full["scores"]["hate"] >= 0.5
    assert benign not in json.dumps(page)

    store = audit_of(client)
    with store.database.session() as session:
        [logged] = session.query(RequestLogRow).filter_by(request_id="mod-1").all()
    assert (logged.route, logged.status, logged.blocked, logged.stream) == (
        "moderations",
        200,
        None,
        False,
    )
    assert "hate" in logged.categories
    assert logged.latency_ms["total"] >= logged.latency_ms["prompt_check"] > 0


def test_a_term_added_from_a_review_is_blocked_by_the_engine(client: TestClient) -> None:
    text = "Everyone at Zorblax is a terrorist and should be thrown out of this country."
    flagged = client.post("/v1/moderations", json={"input": text})
    assert flagged.json()["results"][0]["flagged"] is True
    [stored] = audit_of(client).list_items().items
    before = client.post("/v1/moderations", json={"input": "Zorblax ships on Monday."})
    assert before.json()["results"][0]["shields"]["blocklist"]["detected"] is False

    added = client.post(
        f"/v1/review/items/{stored.item.id}/blocklist",
        json={"blocklist": "codenames", "term": "zorblax"},
    )
    assert added.status_code == 201, added.text
    after = client.post("/v1/moderations", json={"input": "Z0RBLAX ships on Monday."})
    result = after.json()["results"][0]
    assert result["shields"]["blocklist"] == {
        "detected": True,
        "score": 1.0,
        "filtered": True,
        "kinds": ["codenames"],
    }
    assert result["flagged"] is True
    assert result["action"] == "block"

    developer = issue_key(client, Role.DEVELOPER)
    refused = client.get("/v1/review/items", headers={"Authorization": f"Bearer {developer}"})
    assert refused.status_code == 403


def test_the_service_drains_an_earlier_spool_at_start(
    settings: Settings, engine_factory: EngineFactory
) -> None:
    spool_dir = settings.home_dir / "audit-spool"
    down = Database("postgresql+psycopg://postgres@127.0.0.1:9/x?connect_timeout=2")
    earlier = AuditStore(down, spool_dir=spool_dir)
    waiting = item(1)
    asyncio.run(earlier.record([waiting]))  # a previous run spooled it: the database was down
    down.dispose()
    assert (spool_dir / "spool.jsonl").exists()

    client = ready_client(settings, engine_factory)
    try:
        store = audit_of(client)
        deadline = time.monotonic() + 10
        # Drained means both: the record is in the database, then the spool file is gone
        # (the drain commits first and removes the file after, so poll for the pair).
        while not (store.list_items().items and store.spooled_pending() == 0):
            assert time.monotonic() < deadline, "the spool was not drained at start"
            time.sleep(0.02)
        assert store.get_item(waiting.id).item == waiting
        assert not (spool_dir / "spool.jsonl").exists()
    finally:
        client.__exit__(None, None, None)


def test_exported_prompt_items_load_as_an_eval_dataset(api: Api, tmp_path: Path) -> None:
    from evals.datasets import load_datasets
    from evals.suite import load_suite

    confirmed, mistaken = seed(
        api, [item(1), item(2, categories=("violence",), text="How do I kill a stuck process?")]
    )
    for stored, label in [(confirmed, "true_positive"), (mistaken, "false_positive")]:
        api.client.post(
            f"/v1/review/items/{stored.id}/label",
            json={"label": label},
            headers=api.as_(Role.REVIEWER),
        )
    export = api.client.get("/v1/review/export", headers=api.as_(Role.REVIEWER)).text
    (tmp_path / "reviewed.jsonl").write_text(export, encoding="utf-8")
    (tmp_path / "suite.yaml").write_text(
        "name: reviewed\n"
        "datasets: [{name: reviewed, path: reviewed.jsonl, format: chat}]\n"
        "models: [{name: m, via: litellm, model: openai/m, params: {mock_response: ok}}]\n"
        "metrics: [refusal_rate, over_refusal_rate]\n",
        encoding="utf-8",
    )
    [dataset] = load_datasets(load_suite(tmp_path / "suite.yaml"))
    assert len(dataset.samples) == 2
    labels = {sample.messages[0]["content"]: dict(sample.labels) for sample in dataset.samples}
    assert labels[confirmed.text]["harmful"] is True
    assert labels["How do I kill a stuck process?"]["benign_risky"] is True
