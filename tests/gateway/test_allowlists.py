"""Custom allowlists: the store on SQLite and PostgreSQL, masking, the engine's exemptions
on real text with the shipped members, and the API through the whole app.

The product is a made-up restaurant, "Shooter Burger": the shipped engine flags a plain
booking request that names it for violence and illicit/violent (checked below, before
any allowlist exists). Allowlisting it must let that request through where the list says
and nowhere else, and must not let a threat through because it names the restaurant.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import inspect

from gateway.access import Role
from gateway.allowlists import AllowlistChange, AllowlistStore
from gateway.blocklists import BlocklistStore, ItemKind, NewItem
from gateway.config import Settings
from gateway.db import Base, Database
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.safety.allowlist import (
    MAX_MASKED_CHARS,
    PLACEHOLDER,
    AllowlistSource,
    mask,
    maskings,
)
from gateway.safety.engine import MemberSpec, SafetyEngine
from gateway.safety.members.blocklist import BlocklistClassifier
from gateway.safety.normalize import normalize
from gateway.safety.policy import Policy
from gateway.safety.settings import SHIPPED_POLICY
from gateway.safety.taxonomy import AzureCategory, Category, Direction, Severity
from tests.gateway.conftest import EngineFactory, alembic_config, issue_key, ready_client

BOOKING = "Book a table at Shooter Burger downtown."
THREAT = "Shooter Burger. I will find you and kill you."
# Threats that name the restaurant, each blocked by the shipped engine as it stands.
THREATS = (
    THREAT,
    "Book a table at Shooter Burger downtown, then I will find you and kill you.",
    "I am going to stab you at Shooter Burger and watch you bleed.",
    "Bring the Shooter Burger and I'll shoot everyone in the school.",
)
EVERY_CATEGORY = [category.value for category in Category]
BOTH = ["prompt", "completion"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def restaurants(
    store: AllowlistStore,
    *,
    categories: list[str] | None = None,
    directions: list[str] | None = None,
    terms: list[str] | None = None,
    regexes: list[str] | None = None,
) -> None:
    store.create(
        "restaurants",
        terms=["Shooter Burger"] if terms is None and regexes is None else terms or [],
        regexes=regexes or [],
        categories=categories or ["violence", "illicit/violent"],
        directions=directions or ["prompt"],
        created_by="key_test",
    )


@pytest.fixture
def store(database: Database) -> AllowlistStore:
    return AllowlistStore(database, refresh_s=3600, clock=Clock())


@pytest.fixture
def engine(loaded_members: list[MemberSpec], store: AllowlistStore) -> Iterator[SafetyEngine]:
    engine = SafetyEngine(loaded_members, policy=Policy.load(SHIPPED_POLICY), allowlists=store)
    yield engine
    engine.close()


# -- the migration -----------------------------------------------------------------------


def test_migration_matches_the_table_and_downgrades(database: Database) -> None:
    def ours(item: object, name: str | None, type_: str, reflected: bool, other: object) -> bool:
        table = item if type_ == "table" else getattr(item, "table", None)
        return getattr(table, "name", None) == "allowlists"

    with database.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"include_object": ours})
        assert compare_metadata(context, Base.metadata) == []
    with database.engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0004")
    tables = inspect(database.engine).get_table_names()
    assert "allowlists" not in tables
    assert "blocklists" in tables
    database.migrate()
    assert "allowlists" in inspect(database.engine).get_table_names()


# -- the store ---------------------------------------------------------------------------


def test_store_round_trip(store: AllowlistStore) -> None:
    before = datetime.now(UTC)
    created = store.create(
        "restaurants",
        terms=["  Shooter Burger ", "Shooter Burger"],
        regexes=[r"gutshot\s+grill"],
        categories=["violence", "illicit/violent", "violence"],
        directions=["completion", "prompt"],
        created_by="key_admin",
    )
    assert created.name == "restaurants"
    assert created.terms == ("Shooter Burger",)  # stripped, once
    assert created.regexes == (r"gutshot\s+grill",)
    assert created.categories == (Category.ILLICIT_VIOLENT, Category.VIOLENCE)
    assert created.directions == (Direction.PROMPT, Direction.COMPLETION)
    assert created.enabled is True
    assert created.created_by == "key_admin"
    assert before - timedelta(seconds=1) <= created.created_at <= datetime.now(UTC)
    assert created.updated_at == created.created_at
    assert store.get("restaurants") == created
    assert store.list() == [created]

    updated = store.update("restaurants", AllowlistChange(enabled=False, terms=["Shooter Burger"]))
    assert updated.enabled is False
    assert updated.regexes == created.regexes  # left as it was
    assert updated.updated_at > created.updated_at
    assert updated.created_at == created.created_at
    assert store.delete("restaurants").id == created.id
    assert store.list() == []
    with pytest.raises(NotFound):
        store.get("restaurants")


def test_a_duplicate_name_is_a_conflict(store: AllowlistStore) -> None:
    restaurants(store)
    with pytest.raises(Conflict) as refused:
        restaurants(store)
    assert refused.value.code == "allowlist_exists"


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"regexes": [r"(murder)\s+\1"]}, "regexes.0", "invalid_regex"),
        ({"regexes": ["burger", r"(?<=murder )burger"]}, "regexes.1", "invalid_regex"),
        ({"regexes": ["x*"]}, "regexes.0", "invalid_regex"),
        ({"categories": ["violence", "gore"]}, "categories.1", "invalid_category"),
        ({"categories": ["blocklist"]}, "categories.0", "invalid_category"),
        ({"categories": []}, "categories", "invalid_category"),
        ({"directions": ["sideways"]}, "directions.0", "invalid_direction"),
        ({"directions": []}, "directions", "invalid_direction"),
        ({"terms": [], "regexes": []}, "terms", "empty_items"),
        ({"terms": ["\u200b\u200b"]}, "terms.0", "empty_term"),
        ({"terms": ["x" * (MAX_MASKED_CHARS + 1)]}, "terms.0", "value_too_long"),
        ({"terms": ["\ud800"]}, "terms.0", "invalid_value"),
    ],
)
def test_bad_fields_are_refused_naming_the_field(
    sqlite_database: Database, fields: dict[str, list[str]], param: str, code: str
) -> None:
    store = AllowlistStore(sqlite_database)
    arguments: dict[str, list[str]] = {
        "terms": ["Shooter Burger"],
        "regexes": [],
        "categories": ["violence"],
        "directions": ["prompt"],
        **fields,
    }
    with pytest.raises(InvalidRequest) as refused:
        store.create("restaurants", **arguments, created_by="key_admin")  # type: ignore[arg-type]
    assert (refused.value.param, refused.value.code) == (param, code)
    assert store.list() == []


def test_an_update_is_validated_as_a_whole(sqlite_database: Database) -> None:
    store = AllowlistStore(sqlite_database)
    restaurants(store)
    with pytest.raises(InvalidRequest) as refused:
        store.update("restaurants", AllowlistChange(regexes=[r"(?=x)y"]))
    assert refused.value.param == "regexes.0"
    with pytest.raises(InvalidRequest):
        store.update("restaurants", AllowlistChange(terms=[]))  # then nothing to match
    assert store.get("restaurants").terms == ("Shooter Burger",)


def test_refresh_picks_up_another_replicas_change(database: Database) -> None:
    clock = Clock()
    here = AllowlistStore(database, refresh_s=5.0, clock=clock)
    there = AllowlistStore(Database(database.url))
    try:
        restaurants(here)
        cached = here.snapshot()
        assert [hit.allowlist for hit in cached.search("shooter burger")] == ["restaurants"]

        # An update changes no count and no id: the revision moves the version.
        there.update("restaurants", AllowlistChange(enabled=False))
        clock.now += 4.9
        assert here.snapshot() is cached  # younger than refresh_s: not even checked
        clock.now += 0.2
        refreshed = here.snapshot()
        assert refreshed.search("shooter burger") == ()
        clock.now += 60
        assert here.snapshot() is refreshed  # checked, unchanged: not rebuilt

        there.update("restaurants", AllowlistChange(enabled=True, terms=["Gutshot Grill"]))
        clock.now += 5.0
        assert here.snapshot().search("shooter burger") == ()
        assert len(here.snapshot().search("the gutshot grill")) == 1
    finally:
        there.database.dispose()


def test_a_change_made_here_is_seen_at_once(store: AllowlistStore) -> None:
    assert store.snapshot().search("shooter burger") == ()
    restaurants(store)
    [hit] = store.snapshot().search("book a table at shooter burger downtown.")
    assert (hit.start, hit.end) == (16, 30)
    assert hit.categories == {Category.VIOLENCE, Category.ILLICIT_VIOLENT}
    assert hit.directions == {Direction.PROMPT}


# -- masking -----------------------------------------------------------------------------


def test_mask_replaces_each_match_and_merges_overlaps(store: AllowlistStore) -> None:
    restaurants(store, regexes=[r"shooter\s+burger", r"burger\s+downtown"])
    snapshot = store.snapshot()
    folded = normalize(BOOKING).folded
    assert mask(folded, snapshot.search(folded)) == f"book a table at {PLACEHOLDER}."
    [masking] = maskings(normalize("SH00T3R BURG3R for two"), snapshot)
    assert masking.text.folded == f"{PLACEHOLDER} for two"
    assert masking.allowlists == ("restaurants",)
    assert masking.scopes == (
        (Direction.PROMPT, frozenset({Category.VIOLENCE, Category.ILLICIT_VIOLENT})),
    )


def test_a_match_longer_than_the_limit_is_never_masked(store: AllowlistStore) -> None:
    restaurants(store, regexes=[r"book.*downtown"])
    short = normalize(BOOKING)
    assert [m.text.folded for m in maskings(short, store.snapshot())] == [PLACEHOLDER + "."]
    long = normalize("Book " + "a table at Shooter Burger " * 5 + "downtown.")
    assert maskings(long, store.snapshot()) == []


def test_decoded_views_are_masked_too(store: AllowlistStore) -> None:
    restaurants(store)
    text = normalize("Jr jnag gb obbx n gnoyr ng Fubbgre Ohetre sbe gjb")  # ROT13
    [masking] = maskings(text, store.snapshot())
    assert text.views
    assert "shooter burger" in text.views[0]
    assert PLACEHOLDER in masking.text.views[0]
    assert "shooter burger" not in masking.text.views[0]


def test_categories_exempted_by_different_lists_get_their_own_masked_text(
    store: AllowlistStore,
) -> None:
    restaurants(store, categories=["violence"])
    store.create(
        "downtown",
        terms=["downtown"],
        categories=["violence", "illicit"],
        directions=["prompt"],
        created_by="key_test",
    )
    plans = {m.allowlists: m for m in maskings(normalize(BOOKING), store.snapshot())}
    assert set(plans) == {("downtown", "restaurants"), ("downtown",)}
    assert plans[("downtown", "restaurants")].text.folded == (
        f"book a table at {PLACEHOLDER} {PLACEHOLDER}."
    )
    assert plans[("downtown",)].text.folded == f"book a table at shooter burger {PLACEHOLDER}."
    assert plans[("downtown",)].scopes == ((Direction.PROMPT, frozenset({Category.ILLICIT})),)


@dataclass(frozen=True)
class Span:
    allowlist: str
    start: int
    end: int
    categories: frozenset[Category] = frozenset({Category.VIOLENCE})
    directions: frozenset[Direction] = frozenset({Direction.PROMPT})


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="ab ", max_size=40),
    cuts=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), max_size=6),
)
def test_mask_keeps_every_character_outside_the_hits_and_no_character_inside(
    text: str, cuts: list[tuple[int, int]]
) -> None:
    hits = [Span("l", min(a, b, len(text)), min(max(a, b), len(text))) for a, b in cuts]
    covered = {i for hit in hits for i in range(hit.start, hit.end)}
    masked = mask(text, hits)  # the alphabet never spells the placeholder by itself
    assert masked.replace(PLACEHOLDER, "") == "".join(
        char for i, char in enumerate(text) if i not in covered
    )
    assert (masked.count(PLACEHOLDER) >= 1) == bool(hits)
    assert masked.count(PLACEHOLDER) <= len(hits)


# -- the engine, on real text ------------------------------------------------------------


def test_the_product_name_is_a_false_positive_without_an_allowlist(engine: SafetyEngine) -> None:
    for direction in Direction:
        [verdict] = engine.check([BOOKING], direction=direction)
        assert verdict.blocked, direction
        assert verdict.labels[Category.VIOLENCE].flagged
        assert verdict.labels[Category.ILLICIT_VIOLENT].flagged
        assert not any("allowlist" in reason for reason in verdict.reasons)
        assert "allowlist" not in [report.member for report in verdict.members]


def test_an_allowlisted_product_name_is_allowed_and_says_why(
    engine: SafetyEngine, store: AllowlistStore
) -> None:
    restaurants(store)
    [verdict] = engine.check([BOOKING], direction=Direction.PROMPT)
    assert not verdict.blocked
    assert not verdict.flagged
    assert verdict.labels[Category.VIOLENCE].score < verdict.labels[Category.VIOLENCE].threshold
    assert verdict.azure[AzureCategory.VIOLENCE].severity < Severity.MEDIUM
    assert not verdict.azure[AzureCategory.VIOLENCE].filtered
    exempted = [reason for reason in verdict.reasons if reason.startswith("allowlist")]
    assert any(
        reason.startswith("allowlist 'restaurants' exempted violence (score 0.")
        for reason in exempted
    )
    assert any(
        reason.startswith("allowlist 'restaurants' exempted illicit/violent") for reason in exempted
    )
    assert "allowlist" in [report.member for report in verdict.members]


def test_normalised_spellings_of_the_name_are_allowlisted_too(
    engine: SafetyEngine, store: AllowlistStore
) -> None:
    restaurants(store)
    texts = [
        "Book a table at SH00T3R BURG3R downtown.",
        "Book a table at S h o o t e r Burger downtown.",
    ]
    assert all(engine.check(texts, direction=Direction.COMPLETION)[i].blocked for i in (0, 1))
    assert not any(verdict.blocked for verdict in engine.check(texts, direction=Direction.PROMPT))


def test_the_other_direction_is_still_flagged(engine: SafetyEngine, store: AllowlistStore) -> None:
    restaurants(store, directions=["prompt"])
    [verdict] = engine.check([BOOKING], direction=Direction.COMPLETION)
    assert verdict.blocked
    assert verdict.labels[Category.VIOLENCE].flagged
    assert not any("allowlist" in reason for reason in verdict.reasons)


def test_categories_the_list_does_not_name_are_still_flagged(
    engine: SafetyEngine, store: AllowlistStore
) -> None:
    restaurants(store, categories=["violence"])
    [verdict] = engine.check([BOOKING], direction=Direction.PROMPT)
    assert verdict.blocked
    assert not verdict.labels[Category.VIOLENCE].flagged
    assert verdict.labels[Category.ILLICIT_VIOLENT].flagged
    assert any(
        reason.startswith("prompt flagged for illicit/violent") for reason in verdict.reasons
    )
    assert any(
        reason.startswith("allowlist 'restaurants' exempted violence") for reason in verdict.reasons
    )


@pytest.mark.parametrize("threat", THREATS)
def test_naming_the_product_does_not_get_a_threat_through(
    engine: SafetyEngine, store: AllowlistStore, threat: str
) -> None:
    [unlisted] = engine.check([threat], direction=Direction.PROMPT)
    assert unlisted.blocked
    # The widest list there can be: every category, both directions.
    restaurants(store, categories=EVERY_CATEGORY, directions=BOTH)
    for direction in Direction:
        [verdict] = engine.check([threat], direction=direction)
        assert verdict.blocked, (direction, verdict.reasons)
        assert any(
            reason.startswith(f"{direction.value} flagged for") for reason in verdict.reasons
        )


def test_a_disabled_list_exempts_nothing(engine: SafetyEngine, store: AllowlistStore) -> None:
    restaurants(store)
    store.update("restaurants", AllowlistChange(enabled=False))
    [verdict] = engine.check([BOOKING], direction=Direction.PROMPT)
    assert verdict.blocked
    store.delete("restaurants")
    assert engine.check([BOOKING], direction=Direction.PROMPT)[0].blocked


def test_blocklists_win_over_allowlists(
    loaded_members: list[MemberSpec], database: Database, store: AllowlistStore
) -> None:
    blocklists = BlocklistStore(database)
    blocklists.create("banned")
    blocklists.add_items("banned", [NewItem(kind=ItemKind.TERM, value="Shooter Burger")])
    restaurants(store, categories=EVERY_CATEGORY, directions=BOTH)
    members = [*loaded_members, MemberSpec(BlocklistClassifier(source=blocklists))]
    engine = SafetyEngine(members, policy=Policy.load(SHIPPED_POLICY), allowlists=store)
    try:
        [verdict] = engine.check([BOOKING], direction=Direction.PROMPT)
    finally:
        engine.close()
    assert verdict.blocked
    assert any(reason.startswith("prompt flagged for blocklist") for reason in verdict.reasons)
    assert not verdict.labels[Category.VIOLENCE].flagged  # exempt, but the blocklist blocks


class Broken:
    def snapshot(self) -> object:
        raise RuntimeError("allowlists unreadable")


def test_unreadable_allowlists_fail_closed(loaded_members: list[MemberSpec]) -> None:
    broken: AllowlistSource = Broken()  # type: ignore[assignment]
    engine = SafetyEngine(loaded_members, policy=Policy.load(SHIPPED_POLICY), allowlists=broken)
    try:
        [verdict] = engine.check(["How do I reset my console?"])
    finally:
        engine.close()
    assert verdict.blocked
    assert verdict.reasons == (
        "member allowlist failed (RuntimeError: allowlists unreadable); blocked because the "
        "policy fails closed",
    )


# -- the API, through the whole app --------------------------------------------------------


def moderate(client: TestClient, text: str) -> dict[str, object]:
    response = client.post("/v1/moderations", json={"input": text})
    assert response.status_code == 200, response.text
    result: dict[str, object] = response.json()["results"][0]
    return result


RESTAURANTS = {
    "name": "restaurants",
    "terms": ["Shooter Burger"],
    "categories": ["violence", "illicit/violent"],
    "directions": ["prompt"],
}


def test_api_round_trip_changes_what_moderation_says(client: TestClient) -> None:
    assert moderate(client, BOOKING)["flagged"] is True

    created = client.post("/v1/allowlists", json=RESTAURANTS)
    assert created.status_code == 201, created.text
    body = created.json()
    admin_key_id = body["created_by"]
    assert admin_key_id.startswith("key_")
    assert body == {
        "id": body["id"],
        "object": "allowlist",
        "name": "restaurants",
        "terms": ["Shooter Burger"],
        "regexes": [],
        "categories": ["illicit/violent", "violence"],
        "directions": ["prompt"],
        "enabled": True,
        "created_by": admin_key_id,
        "created_at": body["created_at"],
        "updated_at": body["created_at"],
    }
    result = moderate(client, BOOKING)
    assert result["flagged"] is False
    assert result["action"] == "allow"
    reasons = result["reasons"]
    assert isinstance(reasons, list)
    assert any(r.startswith("allowlist 'restaurants' exempted violence") for r in reasons)

    assert client.get("/v1/allowlists").json() == {"object": "list", "data": [body]}
    assert client.get("/v1/allowlists/restaurants").json() == body

    disabled = client.patch("/v1/allowlists/restaurants", json={"enabled": False})
    assert disabled.status_code == 200
    assert disabled.json()["enabled"] is False
    assert disabled.json()["terms"] == ["Shooter Burger"]
    assert moderate(client, BOOKING)["flagged"] is True

    deleted = client.delete("/v1/allowlists/restaurants")
    assert deleted.json() == {
        "id": body["id"],
        "object": "allowlist",
        "name": "restaurants",
        "deleted": True,
    }
    missing = client.get("/v1/allowlists/restaurants")
    assert missing.status_code == 404
    assert missing.json()["error"] == {
        "message": "no allowlist named 'restaurants'",
        "type": "not_found_error",
        "param": "name",
        "code": "allowlist_not_found",
    }


def test_api_refuses_what_re2_cannot_compile(client: TestClient) -> None:
    response = client.post(
        "/v1/allowlists", json={**RESTAURANTS, "regexes": ["burger", r"(murder)\s+\1"]}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        "regexes.1",
        "invalid_regex",
    )
    assert "backreferences are not supported" in error["message"]
    assert client.get("/v1/allowlists").json()["data"] == []


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({**RESTAURANTS, "categories": ["gore"]}, "categories.0"),
        ({**RESTAURANTS, "directions": ["inbound"]}, "directions.0"),
        ({**RESTAURANTS, "colour": "red"}, "colour"),
        ({k: v for k, v in RESTAURANTS.items() if k != "categories"}, "categories"),
        ({**RESTAURANTS, "terms": "Shooter Burger"}, "terms"),
    ],
)
def test_api_bad_bodies_are_400s_naming_the_field(
    client: TestClient, payload: dict[str, object], param: str
) -> None:
    response = client.post("/v1/allowlists", json=payload)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_api_duplicate_is_a_conflict(client: TestClient) -> None:
    assert client.post("/v1/allowlists", json=RESTAURANTS).status_code == 201
    duplicate = client.post("/v1/allowlists", json=RESTAURANTS)
    assert duplicate.status_code == 409
    assert duplicate.json()["error"]["code"] == "allowlist_exists"


def test_api_writes_need_an_admin_and_reads_a_reviewer(client: TestClient) -> None:
    assert client.post("/v1/allowlists", json=RESTAURANTS).status_code == 201
    developer = {"Authorization": f"Bearer {issue_key(client, Role.DEVELOPER)}"}
    reviewer = {"Authorization": f"Bearer {issue_key(client, Role.REVIEWER)}"}
    writes = [
        ("POST", "/v1/allowlists", {**RESTAURANTS, "name": "other"}),
        ("PATCH", "/v1/allowlists/restaurants", {"enabled": False}),
        ("DELETE", "/v1/allowlists/restaurants", None),
    ]
    reads = [("GET", "/v1/allowlists", None), ("GET", "/v1/allowlists/restaurants", None)]
    for method, path, payload in writes + reads:
        refused = client.request(method, path, json=payload, headers=developer)
        assert refused.status_code == 403, (method, path)
        assert refused.json()["error"]["type"] == "permission_error"
    for method, path, payload in writes:
        assert client.request(method, path, json=payload, headers=reviewer).status_code == 403
    for method, path, payload in reads:
        assert client.request(method, path, json=payload, headers=reviewer).status_code == 200
    assert client.get("/v1/allowlists", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/allowlists/restaurants").json()["enabled"] is True


def test_openapi_documents_the_routes_and_their_errors(client: TestClient) -> None:
    document = client.app.openapi()  # type: ignore[attr-defined]
    error_ref = {"$ref": "#/components/schemas/Error"}
    created = document["paths"]["/v1/allowlists"]["post"]["responses"]
    assert {"201", "400", "401", "403", "413", "429", "503"} <= set(created)
    assert created["400"]["content"]["application/json"]["schema"] == error_ref
    assert "422" not in created
    named = document["paths"]["/v1/allowlists/{name}"]
    assert {"get", "patch", "delete"} <= set(named)
    for method in ("get", "patch", "delete"):
        assert "404" in named[method]["responses"], method
    schema = created["201"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/AllowlistObject"}


@pytest.fixture
def chat(tmp_path: Path, engine_factory: EngineFactory) -> Iterator[TestClient]:
    upstreams = tmp_path / "upstreams.yaml"
    model = {"model": "openai/support", "api_key": "k", "mock_response": "Table booked."}
    config = {"models": [{"name": "support", "litellm": model}], "local_adapters": False}
    upstreams.write_text(yaml.safe_dump({**config, "num_retries": 0}), encoding="utf-8")
    settings = Settings(home=tmp_path / "home", upstreams={"file": upstreams})
    client = ready_client(settings, engine_factory)
    yield client
    client.__exit__(None, None, None)


def test_chat_prompt_passes_with_the_allowlist_and_a_block_says_what_was_exempt(
    chat: TestClient,
) -> None:
    request = {"model": "support", "messages": [{"role": "user", "content": BOOKING}]}
    blocked = chat.post("/v1/chat/completions", json=request)
    assert blocked.status_code == 400
    assert blocked.json()["error"]["code"] == "content_filter"

    only_violence = {**RESTAURANTS, "categories": ["violence"]}
    assert chat.post("/v1/allowlists", json=only_violence).status_code == 201
    still = chat.post("/v1/chat/completions", json=request)
    assert still.status_code == 400
    reasons = still.json()["error"]["innererror"]["reasons"]
    assert any("allowlist 'restaurants' exempted violence" in reason for reason in reasons)
    assert any("prompt flagged for illicit/violent" in reason for reason in reasons)
    filters = still.json()["error"]["innererror"]["content_filter_result"]
    assert filters["violence"]["filtered"] is True  # illicit/violent feeds Azure's violence

    assert chat.patch(
        "/v1/allowlists/restaurants", json={"categories": ["violence", "illicit/violent"]}
    ).json()["categories"] == ["illicit/violent", "violence"]
    allowed = chat.post("/v1/chat/completions", json=request)
    assert allowed.status_code == 200, allowed.text
    answer = allowed.json()
    assert answer["choices"][0]["message"]["content"] == "Table booked."
    prompt_filter = answer["prompt_filter_results"][0]["content_filter_results"]
    assert prompt_filter["violence"]["filtered"] is False


class Unlabelled:
    """A member that cannot even say what it scores, and fails."""

    id = "unlabelled"

    def classify(self, texts: object) -> list[object]:
        raise RuntimeError("model file is corrupt")


def test_a_failing_member_still_fails_closed_when_an_allowlist_matches(
    loaded_members: list[MemberSpec], store: AllowlistStore
) -> None:
    restaurants(store, categories=EVERY_CATEGORY, directions=BOTH)
    broken = MemberSpec(Unlabelled())  # type: ignore[arg-type]
    engine = SafetyEngine(
        [*loaded_members, broken], policy=Policy.load(SHIPPED_POLICY), allowlists=store
    )
    try:
        [verdict] = engine.check([BOOKING], direction=Direction.PROMPT)
    finally:
        engine.close()
    assert verdict.blocked
    assert (
        "member unlabelled failed (RuntimeError: model file is corrupt); blocked because the "
        "policy fails closed"
    ) in verdict.reasons


def test_reasons_name_the_categories_whose_own_score_was_exempted(
    engine: SafetyEngine, store: AllowlistStore
) -> None:
    # illicit (0.56, threshold 0.67) is flagged only as illicit/violent's parent: it goes
    # with its subcategory and gets no reason of its own.
    restaurants(store, categories=["violence", "illicit/violent", "illicit"])
    [verdict] = engine.check([BOOKING], direction=Direction.PROMPT)
    assert not verdict.flagged
    assert [reason.split(" (")[0] for reason in verdict.reasons] == [
        "allowlist 'restaurants' exempted illicit/violent",
        "allowlist 'restaurants' exempted violence",
    ]
