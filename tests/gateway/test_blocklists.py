"""Custom blocklists: the store on real SQLite and PostgreSQL, matching, the member, the API.

The store runs on a SQLite file under ``tmp_path`` and, for the tests marked ``postgres``,
on the local PostgreSQL server in a schema made for the test and dropped after it
(``SAFEGATE_TEST_POSTGRES_URL`` points elsewhere; the tests skip when it is unreachable).
Every schema comes from the Alembic migrations, as in the service.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, inspect, select
from sqlalchemy.exc import OperationalError

from gateway import errors
from gateway.blocklists import (
    MAX_HITS_PER_REGEX,
    MAX_ITEMS_PER_REQUEST,
    MAX_REGEXES_PER_LIST,
    BlocklistItemRow,
    BlocklistSnapshot,
    BlocklistStore,
    CompiledRegex,
    ItemKind,
    NewItem,
    TermTrie,
    UnsupportedRegex,
    compile_regex,
    term_tokens,
)
from gateway.db import Base, Database
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.routes.blocklists import router
from gateway.safety.classifier import Classifier
from gateway.safety.engine import MemberSpec, SafetyEngine
from gateway.safety.members import MEMBERS, MemberKind
from gateway.safety.members.blocklist import BlocklistClassifier
from gateway.safety.normalize import normalize
from gateway.safety.policy import Policy
from gateway.safety.settings import SHIPPED_POLICY
from gateway.safety.taxonomy import Shield
from gateway.safety.verdict import Finding
from tests.gateway.conftest import alembic_config, bare_runtime

POSTGRES_URL = os.environ.get(
    "SAFEGATE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
POSTGRES_CONNECT_TIMEOUT_S = 3
TABLES = {"blocklists", "blocklist_items"}
CATASTROPHIC = r"(a+)+$"
CATASTROPHIC_TEXT = "a" * 5000 + "!"
# A backtracking engine needs about 2**n steps for (a+)+$ on n a's and a non-a: the
# ``regex`` module ran past half a second on 5,000. RE2 must answer in linear time.
LINEAR_BOUND_S = 1.0


def term(value: str) -> NewItem:
    return NewItem(kind=ItemKind.TERM, value=value)


def pattern(value: str) -> NewItem:
    return NewItem(kind=ItemKind.REGEX, value=value)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- databases ---------------------------------------------------------------------------


@pytest.fixture
def store(sqlite_database: Database) -> BlocklistStore:
    return BlocklistStore(sqlite_database)


# -- the migration -----------------------------------------------------------------------


def test_migration_matches_the_tables_and_downgrades(database: Database) -> None:
    # Only these tables, on both sides: other modules' tables share Base.metadata.
    def ours(item: object, name: str | None, type_: str, reflected: bool, other: object) -> bool:
        table = item if type_ == "table" else getattr(item, "table", None)
        return getattr(table, "name", None) in TABLES

    with database.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"include_object": ours})
        assert compare_metadata(context, Base.metadata) == []
    with database.engine.begin() as connection:
        command.downgrade(alembic_config(connection), "base")
    assert TABLES.isdisjoint(inspect(database.engine).get_table_names())
    database.migrate()
    assert set(inspect(database.engine).get_table_names()) >= TABLES


# -- the store ---------------------------------------------------------------------------


def test_create_list_get_and_delete(database: Database) -> None:
    store = BlocklistStore(database)
    before = datetime.now(UTC)
    created = store.create("codenames", "internal project names")
    assert created.name == "codenames"
    assert created.description == "internal project names"
    assert created.item_count == 0
    assert created.created_at.tzinfo is not None
    assert created.created_at.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= created.created_at <= datetime.now(UTC)
    store.create("competitors")

    assert [b.name for b in store.list()] == ["codenames", "competitors"]
    fetched = store.get("codenames")
    assert (fetched.id, fetched.items, fetched.created_at) == (created.id, (), created.created_at)

    with pytest.raises(Conflict) as conflict:
        store.create("codenames")
    assert (conflict.value.param, conflict.value.code) == ("name", "blocklist_exists")

    deleted = store.delete("codenames")
    assert (deleted.id, deleted.name) == (created.id, "codenames")
    assert [b.name for b in store.list()] == ["competitors"]
    for call in (store.get, store.delete):
        with pytest.raises(NotFound) as missing:
            call("codenames")
        assert missing.value.code == "blocklist_not_found"


def test_items_are_added_idempotently_and_removed(database: Database) -> None:
    store = BlocklistStore(database)
    store.create("codenames")
    store.create("other")
    first = store.add_items("codenames", [term("frobnicate"), pattern(r"\bproject\s+falcon\b")])
    assert [(item.kind, item.value) for item in first] == [
        (ItemKind.TERM, "frobnicate"),
        (ItemKind.REGEX, r"\bproject\s+falcon\b"),
    ]
    # The same items again (a term with surrounding spaces is the same term) come back
    # with their ids; a duplicate inside one request is one item.
    again = store.add_items(
        "codenames", [term("  frobnicate "), pattern(r"\bproject\s+falcon\b"), term("frobnicate")]
    )
    assert [item.id for item in again] == [first[0].id, first[1].id]
    detail = store.get("codenames")
    assert detail.item_count == 2
    assert [item.id for item in detail.items] == [first[0].id, first[1].id]
    assert store.list()[0].item_count == 2

    store.remove_item("codenames", first[0].id)
    assert [item.value for item in store.get("codenames").items] == [r"\bproject\s+falcon\b"]
    with pytest.raises(NotFound) as gone:
        store.remove_item("codenames", first[0].id)
    assert (gone.value.param, gone.value.code) == ("item_id", "item_not_found")
    with pytest.raises(NotFound):  # an item of another list is not this list's
        store.remove_item("other", first[1].id)
    with pytest.raises(NotFound):
        store.add_items("missing", [term("x")])


def test_deleting_a_list_deletes_its_items(database: Database) -> None:
    store = BlocklistStore(database)
    store.create("codenames")
    store.add_items("codenames", [term("frobnicate"), pattern("falcon")])
    store.delete("codenames")
    with database.session() as session:
        assert session.scalar(select(func.count(BlocklistItemRow.id))) == 0
    assert store.create("codenames").item_count == 0


def test_ids_are_never_reused(database: Database) -> None:
    # The snapshot's version check (count, max id, sum of ids) relies on it.
    store = BlocklistStore(database)
    store.create("codenames")
    [old] = store.add_items("codenames", [term("frobnicate")])
    store.remove_item("codenames", old.id)
    [new] = store.add_items("codenames", [term("quux")])
    assert new.id > old.id
    old_list = store.delete("codenames")
    assert store.create("codenames").id > old_list.id


def test_a_change_made_here_is_seen_at_once(database: Database) -> None:
    store = BlocklistStore(database, refresh_s=3600, clock=Clock())
    store.create("codenames")
    assert store.snapshot().search("frobnicate") == ()
    store.add_items("codenames", [term("frobnicate")])
    assert [hit.blocklist for hit in store.snapshot().search("frobnicate")] == ["codenames"]


def test_refresh_picks_up_another_replicas_change(database: Database) -> None:
    clock = Clock()
    here = BlocklistStore(database, refresh_s=5.0, clock=clock)
    there = BlocklistStore(Database(database.url))
    try:
        here.create("codenames")
        [quux] = here.add_items("codenames", [term("quux")])
        cached = here.snapshot()
        assert cached.search("frobnicate") == ()

        there.add_items("codenames", [term("frobnicate")])
        clock.now += 4.9
        assert here.snapshot() is cached  # younger than refresh_s: not even checked
        clock.now += 0.2
        refreshed = here.snapshot()
        assert [hit.blocklist for hit in refreshed.search("frobnicate")] == ["codenames"]
        clock.now += 60
        assert here.snapshot() is refreshed  # checked, unchanged: not rebuilt

        # One item out and one in leaves the count alone; the version still moves.
        there.remove_item("codenames", quux.id)
        there.add_items("codenames", [term("zorp")])
        clock.now += 5.0
        latest = here.snapshot()
        assert latest.search("quux") == ()
        assert len(latest.search("zorp frobnicate")) == 2

        there.delete("codenames")
        clock.now += 5.0
        assert here.snapshot().search("zorp frobnicate") == ()
    finally:
        there.database.dispose()


def test_snapshot_raises_when_the_database_is_gone(store: BlocklistStore) -> None:
    store.create("codenames")
    with store.database.engine.begin() as connection:
        command.downgrade(alembic_config(connection), "base")
    with pytest.raises(OperationalError):
        store.snapshot()


@pytest.mark.parametrize(
    "name",
    ["", "has space", "a" * 65, "slash/name", "ümlaut", ".", "..", "name\n"],
)
def test_bad_names_are_refused(store: BlocklistStore, name: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        store.create(name)
    assert (refused.value.param, refused.value.code) == ("name", "invalid_name")


def test_good_names_are_accepted(store: BlocklistStore) -> None:
    for name in ["a", "A-b_c.d", "x" * 64, "...", "v1.2"]:
        assert store.create(name).name == name


@pytest.mark.parametrize(
    ("item", "code"),
    [
        (term("   "), "empty_term"),
        (term("\u200b\u200d"), "empty_term"),  # zero-width characters only
        (term("x" * 1001), "value_too_long"),
        (term("\U0001f600" * 501), "value_too_long"),  # 501 characters but 2004 bytes
        (term("bad \ud800 surrogate"), "invalid_value"),
        (pattern("(unclosed"), "invalid_regex"),
        (pattern("[z-a]"), "invalid_regex"),
        (pattern(r"\L<names>"), "invalid_regex"),
        (pattern(""), "invalid_regex"),
        (pattern("a*"), "invalid_regex"),  # matches the empty string, so every text
        (pattern("falcon|"), "invalid_regex"),
        (pattern("a" * 501), "value_too_long"),
    ],
)
def test_bad_items_are_refused_and_nothing_is_added(
    store: BlocklistStore, item: NewItem, code: str
) -> None:
    store.create("codenames")
    with pytest.raises(InvalidRequest) as refused:
        store.add_items("codenames", [term("frobnicate"), item])
    assert (refused.value.param, refused.value.code) == ("items.1.value", code)
    assert store.get("codenames").items == ()


def test_item_limits(store: BlocklistStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.create("codenames")
    with pytest.raises(InvalidRequest) as empty:
        store.add_items("codenames", [])
    assert empty.value.code == "empty_items"
    with pytest.raises(InvalidRequest) as too_many:
        store.add_items("codenames", [term(f"t{i}") for i in range(MAX_ITEMS_PER_REQUEST + 1)])
    assert (too_many.value.param, too_many.value.code) == ("items", "too_many_items")

    store.add_items("codenames", [pattern(f"falcon{i}") for i in range(MAX_REGEXES_PER_LIST)])
    with pytest.raises(InvalidRequest) as regexes:
        store.add_items("codenames", [pattern("one more")])
    assert "at most 100 regexes" in regexes.value.message
    # Existing items do not count again.
    store.add_items("codenames", [pattern("falcon0")])

    monkeypatch.setattr("gateway.blocklists.store.MAX_ITEMS_PER_LIST", MAX_REGEXES_PER_LIST + 1)
    store.add_items("codenames", [term("frobnicate")])
    with pytest.raises(InvalidRequest) as full:
        store.add_items("codenames", [term("quux")])
    assert full.value.code == "too_many_items"


# -- matching ----------------------------------------------------------------------------


def hits(store: BlocklistStore, text: str) -> list[tuple[str, str]]:
    """``(list, matched folded text)`` for each hit in ``text`` after ``normalize``."""
    folded = normalize(text).folded
    return [(hit.blocklist, folded[hit.start : hit.end]) for hit in store.snapshot().search(folded)]


@pytest.mark.parametrize(
    ("value", "text", "matched"),
    [
        ("frobnicate", "Please FR0BN1CATE the report", ["frobnicate"]),
        ("frobnicate", "f r o b n i c a t e", ["frobnicate"]),
        ("frobnicate", "ＦＲＯＢＮＩＣＡＴＥ now", ["frobnicate"]),  # full-width
        ("frobnicate", "fr\u043ebnicate", ["frobnicate"]),  # a Cyrillic o
        ("frobnicate", "frob\u200bnicate", ["frobnicate"]),  # a zero-width space
        ("frobnicate", "frobnicate's plan", ["frobnicate"]),
        ("frobnicate", "(frobnicate)", ["frobnicate"]),
        ("frobnicate", "frobnicated", []),  # whole words only
        ("frobnicate", "unfrobnicate", []),
        ("frobnicate", "frobnicate_v2", []),  # "_" is a word character
        ("frobnicate", "frob nicate", []),
        ("FR0BN1CATE", "please frobnicate", ["frobnicate"]),  # terms fold like texts
        ("project falcon", "Project\n\nFalcon launch", ["project\n\nfalcon"]),
        ("project falcon", "project-falcon", []),  # punctuation is kept
        ("project falcon", "the falcon project", []),
        ("e-mail", "E-Mail me", ["e-mail"]),
        ("e-mail", "e mail me", []),
        ("café", "Cafe au lait", ["cafe"]),  # accents fold on both sides
        ("日本", "日本語のテキスト", ["日本"]),  # unspaced scripts match inside words
    ],
)
def test_term_matching(store: BlocklistStore, value: str, text: str, matched: list[str]) -> None:
    store.create("codenames")
    store.add_items("codenames", [term(value)])
    assert hits(store, text) == [("codenames", m) for m in matched]


def test_the_longest_term_wins_and_lists_report_separately(store: BlocklistStore) -> None:
    store.create("codenames")
    store.create("birds")
    store.add_items("codenames", [term("project"), term("project falcon")])
    store.add_items("birds", [term("falcon")])
    assert hits(store, "The Project Falcon team met project staff") == [
        ("codenames", "project falcon"),
        ("birds", "falcon"),
        ("codenames", "project"),
    ]


@pytest.mark.parametrize(
    ("regex", "text", "matched"),
    [
        (r"\bproject\s+falcon\b", "Project  Falcon launch", ["project falcon"]),
        (r"\bproject\s+falcon\b", "project\nfalcon", ["project\nfalcon"]),
        (r"\bproject\s+falcon\b", "projectfalcon", []),
        (r"FALCON \d{2}\b", "see Falcon 42 and FALCON 7", ["falcon 42"]),  # ignores case
        (r"order #\d+", "order #123 and order #9", ["order #123", "order #9"]),
        (r"h[a@]te", "I h@te it", ["hate"]),  # leetspeak is folded before regexes run
        (r"\b", "zero-length matches are no hits", []),
    ],
)
def test_regex_matching(store: BlocklistStore, regex: str, text: str, matched: list[str]) -> None:
    store.create("codenames")
    store.add_items("codenames", [pattern(regex)])
    assert hits(store, text) == [("codenames", m) for m in matched]


def test_a_catastrophic_regex_runs_in_linear_time(store: BlocklistStore) -> None:
    store.create("codenames")
    store.add_items("codenames", [pattern(CATASTROPHIC)])
    snapshot = store.snapshot()
    for length in (5_000, 50_000, 500_000):
        text = normalize("a" * length + "b").folded
        started = time.perf_counter()
        assert snapshot.search(text) == ()  # decided, not given up on: no match, no error
        assert time.perf_counter() - started < LINEAR_BOUND_S
    # The same pattern still matches where it should, however long the text.
    [hit] = snapshot.search("a" * 500_000)
    assert (hit.blocklist, hit.start, hit.end) == ("codenames", 0, 500_000)


def test_a_search_never_times_out_under_cpu_load(store: BlocklistStore) -> None:
    """The old 50 ms wall-clock budget blocked benign texts on a loaded machine: none now."""
    store.create("codenames")
    store.add_items("codenames", [pattern(r"\bproject\s+falcon\b"), pattern(CATASTROPHIC)])
    snapshot = store.snapshot()
    benign = normalize("A perfectly ordinary sentence about the quarterly report. " * 500).folded
    stop = threading.Event()

    def burn() -> None:
        while not stop.is_set():
            sum(range(10_000))

    burners = [threading.Thread(target=burn) for _ in range(2)]
    for burner in burners:
        burner.start()
    try:
        for _ in range(50):
            assert snapshot.search(benign) == ()
    finally:
        stop.set()
        for burner in burners:
            burner.join()


def test_one_regex_reports_at_most_its_cap_of_hits(store: BlocklistStore) -> None:
    store.create("codenames")
    store.add_items("codenames", [pattern(r"a[^z]*z|a")])  # rescans the text per match
    text = "a" * 200_000
    started = time.perf_counter()
    found = store.snapshot().search(text)
    assert time.perf_counter() - started < LINEAR_BOUND_S
    assert [(hit.start, hit.end) for hit in found] == [
        (i, i + 1) for i in range(MAX_HITS_PER_REGEX)
    ]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (r"(falcon)\s+\1", "backreferences are not supported (invalid escape sequence: \\1)"),
        (r"(?P<w>falcon)(?P=w)", "backreferences are not supported (invalid perl operator: (?P)"),
        (r"falcon(?=\d)", "lookarounds are not supported (invalid perl operator: (?=)"),
        (r"falcon(?!\d)", "lookarounds are not supported (invalid perl operator: (?!)"),
        (r"(?<=project )falcon", "lookarounds are not supported (invalid perl operator: (?<=)"),
        (r"(?<!project )falcon", "lookarounds are not supported (invalid perl operator: (?<!)"),
        (r"(?>falcon)", "atomic groups and possessive quantifiers are not supported"),
        (r"fal+con++", "atomic groups and possessive quantifiers are not supported"),
        (r"falcon\Z", "RE2 cannot compile it (invalid escape sequence: \\Z): write \\z"),
    ],
)
def test_patterns_re2_cannot_run_are_refused_with_the_reason(
    store: BlocklistStore, value: str, reason: str
) -> None:
    store.create("codenames")
    with pytest.raises(InvalidRequest) as refused:
        store.add_items("codenames", [pattern(value)])
    assert (refused.value.param, refused.value.code) == ("items.0.value", "invalid_regex")
    assert refused.value.message.startswith(f"regex {value!r} is refused: {reason}")
    assert store.get("codenames").items == ()
    with pytest.raises(UnsupportedRegex):
        compile_regex(value)


class _Words:
    """Random texts of single-token words with random whitespace between them."""

    WORDS = ("a", "b", "ab", "-")
    SPACES = (" ", "  ", "\n", "\t ", " \n\n ")


@settings(max_examples=300, deadline=None)
@given(
    lists=st.dictionaries(
        st.sampled_from(["one", "two"]),
        st.sets(st.lists(st.sampled_from(_Words.WORDS), min_size=1, max_size=3).map(tuple)),
        min_size=1,
    ),
    words=st.lists(st.sampled_from(_Words.WORDS), max_size=30),
    spaces=st.lists(st.sampled_from(_Words.SPACES), min_size=30, max_size=30),
)
def test_term_trie_finds_each_lists_leftmost_longest_hits(
    lists: dict[str, set[tuple[str, ...]]], words: list[str], spaces: list[str]
) -> None:
    text = ""
    starts: list[int] = []
    for word, space in zip(words, spaces, strict=False):
        starts.append(len(text))
        text += word + space
    trie = TermTrie.build((name, tokens) for name, terms in lists.items() for tokens in terms)
    found = {(hit.blocklist, starts.index(hit.start), hit.end) for hit in trie.search(text)}

    expected: set[tuple[str, int, int]] = set()
    for name, terms in lists.items():
        index = 0
        while index < len(words):
            longest = max(
                (len(t) for t in terms if tuple(words[index : index + len(t)]) == t), default=0
            )
            if longest:
                last = index + longest - 1
                expected.add((name, index, starts[last] + len(words[last])))
                index += longest
            else:
                index += 1
    assert found == expected


# -- the member --------------------------------------------------------------------------


def test_the_member_is_registered_and_is_a_classifier(store: BlocklistStore) -> None:
    assert MEMBERS.get(MemberKind.BLOCKLIST.value) is BlocklistClassifier
    member = BlocklistClassifier(source=store)
    assert isinstance(member, Classifier)
    assert (member.id, member.labels) == ("blocklist", frozenset({Shield.BLOCKLIST}))


def test_the_member_scores_and_reports_findings(store: BlocklistStore) -> None:
    store.create("codenames")
    store.create("competitors")
    store.add_items("codenames", [term("frobnicate"), pattern(r"\bproject\s+falcon\b")])
    store.add_items("competitors", [term("acme corp")])
    member = BlocklistClassifier(id="custom-lists", source=store)
    texts = [
        normalize("Please FR0BN1CATE the Project  Falcon report for ACME Corp."),
        normalize("A perfectly ordinary sentence."),
    ]
    flagged, clean = member.classify(texts)

    assert flagged.scores == {Shield.BLOCKLIST: 1.0}
    folded = texts[0].folded
    assert [(f.kind, folded[f.start : f.end]) for f in flagged.findings] == [
        ("codenames", "frobnicate"),
        ("codenames", "project falcon"),
        ("competitors", "acme corp"),
    ]
    assert all(f.label is Shield.BLOCKLIST for f in flagged.findings)
    assert clean.scores == {Shield.BLOCKLIST: 0.0}
    assert clean.findings == ()
    assert member.classify([]) == []


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=200))
def test_member_scores_are_zero_or_one_with_findings_exactly_on_hits(text: str) -> None:
    member = BlocklistClassifier(source=_FIXED_SOURCE)
    normalized = normalize(text)
    [detection] = member.classify([normalized])
    score = detection.scores[Shield.BLOCKLIST]
    assert score == (1.0 if detection.findings else 0.0)
    for finding in detection.findings:
        assert 0 <= finding.start < finding.end <= len(normalized.folded)


class _FixedSource:
    """A source over a fixed snapshot, for property tests that need no database."""

    def __init__(self) -> None:
        terms = [("fixed", term_tokens(value)) for value in ("a", "frobnicate", "x y")]
        self._snapshot = BlocklistSnapshot(
            terms=TermTrie.build(terms),
            regexes=(CompiledRegex("fixed", 1, compile_regex(r"\d{3}")),),
            version=(),
        )

    def snapshot(self) -> BlocklistSnapshot:
        return self._snapshot


_FIXED_SOURCE = _FixedSource()


def test_the_engine_blocks_on_a_hit_and_fails_closed_on_an_unusable_regex(
    sqlite_database: Database,
) -> None:
    clock = Clock()
    store = BlocklistStore(sqlite_database, clock=clock)
    store.create("codenames")
    store.add_items("codenames", [term("frobnicate"), pattern(CATASTROPHIC)])
    engine = SafetyEngine(
        [MemberSpec(BlocklistClassifier(source=store))], policy=Policy.load(SHIPPED_POLICY)
    )
    try:
        hit, clean, catastrophic = engine.check(
            ["Please FR0BN1CATE the report", "Please file the report", CATASTROPHIC_TEXT]
        )
        assert hit.blocked
        assert hit.shield(Shield.BLOCKLIST).flagged
        assert hit.findings == (Finding(label=Shield.BLOCKLIST, kind="codenames", start=7, end=17),)
        assert not clean.blocked
        assert not catastrophic.blocked  # decided in linear time: no match, no timeout

        # A stored pattern RE2 refuses (written before blocklists used RE2, here straight
        # into the table as another replica would) fails closed once the change is seen.
        with sqlite_database.session() as session:
            row = BlocklistItemRow(
                blocklist_id=store.get("codenames").id,
                kind=ItemKind.REGEX.value,
                value=r"(falcon)\s+\1",
                created_at=datetime.now(UTC),
            )
            session.add(row)
            session.flush()
            item_id = row.id
        clock.now += store.refresh_s
        [refused] = engine.check(["Please file the report"])
        assert refused.blocked
        assert refused.reasons == (
            f"member blocklist failed (UnsupportedRegex: blocklist 'codenames': stored regex "
            f"item {item_id} is refused: RE2 cannot compile it (invalid escape sequence: \\1); "
            "delete the item); blocked because the policy fails closed",
        )
    finally:
        engine.close()


# -- the API -----------------------------------------------------------------------------


@pytest.fixture
def client(store: BlocklistStore) -> Iterator[TestClient]:
    app = FastAPI()
    errors.install(app)
    app.include_router(router)
    app.state.runtime = bare_runtime(state=SimpleNamespace(blocklists=store))
    with TestClient(app) as test_client:
        yield test_client


def error(message: str, *, type: str, param: str | None, code: str | None) -> dict[str, object]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def test_api_lifecycle(client: TestClient, store: BlocklistStore) -> None:
    created = client.post(
        "/v1/blocklists", json={"name": "codenames", "description": "internal project names"}
    )
    assert created.status_code == 201
    body = created.json()
    assert body == {
        "id": body["id"],
        "object": "blocklist",
        "name": "codenames",
        "description": "internal project names",
        "created_at": body["created_at"],
        "item_count": 0,
    }
    assert abs(body["created_at"] - time.time()) < 60

    added = client.post(
        "/v1/blocklists/codenames/items",
        json={
            "items": [
                {"type": "term", "value": "frobnicate"},
                {"type": "regex", "value": r"\bproject\s+falcon\b"},
            ]
        },
    )
    assert added.status_code == 201
    items = added.json()["data"]
    assert added.json()["object"] == "list"
    assert [(i["object"], i["type"], i["value"]) for i in items] == [
        ("blocklist.item", "term", "frobnicate"),
        ("blocklist.item", "regex", r"\bproject\s+falcon\b"),
    ]
    # What the API added is what the engine matches.
    assert hits(store, "Please FR0BN1CATE it") == [("codenames", "frobnicate")]

    listed = client.get("/v1/blocklists")
    assert listed.status_code == 200
    assert listed.json()["object"] == "list"
    assert [(b["name"], b["item_count"]) for b in listed.json()["data"]] == [("codenames", 2)]

    fetched = client.get("/v1/blocklists/codenames")
    assert fetched.status_code == 200
    assert fetched.json()["items"] == items
    assert fetched.json()["item_count"] == 2

    removed = client.delete(f"/v1/blocklists/codenames/items/{items[0]['id']}")
    assert removed.status_code == 200
    assert removed.json() == {"id": items[0]["id"], "object": "blocklist.item", "deleted": True}
    assert [i["value"] for i in client.get("/v1/blocklists/codenames").json()["items"]] == [
        r"\bproject\s+falcon\b"
    ]
    assert hits(store, "Please FR0BN1CATE it") == []
    again = client.delete(f"/v1/blocklists/codenames/items/{items[0]['id']}")
    assert again.status_code == 404
    assert again.json() == error(
        f"blocklist 'codenames' has no item {items[0]['id']}",
        type="not_found_error",
        param="item_id",
        code="item_not_found",
    )

    deleted = client.delete("/v1/blocklists/codenames")
    assert deleted.status_code == 200
    assert deleted.json() == {
        "id": body["id"],
        "object": "blocklist",
        "name": "codenames",
        "deleted": True,
    }
    assert client.get("/v1/blocklists").json() == {"object": "list", "data": []}


def test_api_duplicate_name_is_a_conflict(client: TestClient) -> None:
    assert client.post("/v1/blocklists", json={"name": "codenames"}).status_code == 201
    duplicate = client.post("/v1/blocklists", json={"name": "codenames"})
    assert duplicate.status_code == 409
    assert duplicate.json() == error(
        "blocklist 'codenames' already exists",
        type="conflict_error",
        param="name",
        code="blocklist_exists",
    )


@pytest.mark.parametrize(
    ("method", "path", "payload"),
    [
        ("GET", "/v1/blocklists/missing", None),
        ("DELETE", "/v1/blocklists/missing", None),
        ("POST", "/v1/blocklists/missing/items", {"items": [{"type": "term", "value": "x"}]}),
        ("DELETE", "/v1/blocklists/missing/items/1", None),
    ],
)
def test_api_unknown_list_is_not_found(
    client: TestClient, method: str, path: str, payload: dict[str, object] | None
) -> None:
    response = client.request(method, path, json=payload)
    assert response.status_code == 404
    assert response.json() == error(
        "no blocklist named 'missing'",
        type="not_found_error",
        param="name",
        code="blocklist_not_found",
    )


def test_api_bad_name_is_refused(client: TestClient) -> None:
    response = client.post("/v1/blocklists", json={"name": "has space"})
    assert response.status_code == 400
    assert response.json() == error(
        "name must be 1 to 64 letters, digits, '_', '.' or '-' (and not '.' or '..')",
        type="invalid_request_error",
        param="name",
        code="invalid_name",
    )


@pytest.mark.parametrize(
    ("items", "param", "code", "message"),
    [
        (
            [{"type": "regex", "value": "(unclosed"}],
            "items.0.value",
            "invalid_regex",
            "regex '(unclosed' is refused: RE2 cannot compile it (missing ): (unclosed)",
        ),
        (
            [{"type": "term", "value": "ok"}, {"type": "regex", "value": r"(falcon)\s+\1"}],
            "items.1.value",
            "invalid_regex",
            "regex '(falcon)\\\\s+\\\\1' is refused: backreferences are not supported (invalid "
            "escape sequence: \\1): blocklist regexes run on RE2, which matches in linear time "
            "and has no backreferences",
        ),
        (
            [{"type": "regex", "value": "(?<!project )falcon"}],
            "items.0.value",
            "invalid_regex",
            "regex '(?<!project )falcon' is refused: lookarounds are not supported (invalid perl "
            "operator: (?<!): blocklist regexes run on RE2, which matches in linear time and "
            "has no lookahead or lookbehind",
        ),
        (
            [{"type": "term", "value": "ok"}, {"type": "term", "value": "  "}],
            "items.1.value",
            "empty_term",
            "the term is empty after normalisation",
        ),
        ([], "items", "invalid_value", None),
        ([{"type": "glob", "value": "*"}], "items.0.type", "invalid_value", None),
        ([{"type": "term"}], "items.0.value", "invalid_value", None),
        (
            [{"type": "term", "value": f"t{i}"} for i in range(MAX_ITEMS_PER_REQUEST + 1)],
            "items",
            "invalid_value",
            None,
        ),
    ],
)
def test_api_bad_items_are_refused(
    client: TestClient,
    store: BlocklistStore,
    items: list[dict[str, str]],
    param: str,
    code: str,
    message: str | None,
) -> None:
    store.create("codenames")
    response = client.post("/v1/blocklists/codenames/items", json={"items": items})
    assert response.status_code == 400
    body = response.json()["error"]
    assert (body["type"], body["param"], body["code"]) == ("invalid_request_error", param, code)
    if message is not None:
        assert body["message"] == message
    assert store.get("codenames").items == ()


def test_api_broken_json_and_unknown_fields_are_refused(client: TestClient) -> None:
    broken = client.post(
        "/v1/blocklists",
        content=b'{"name": "codenames"',
        headers={"content-type": "application/json"},
    )
    assert broken.status_code == 400
    body = broken.json()["error"]
    assert body["message"].startswith("the request body is not valid JSON")
    assert body["type"] == "invalid_request_error"
    assert body["param"] is None
    assert body["code"] == "invalid_json"
    unknown = client.post("/v1/blocklists", json={"name": "codenames", "colour": "red"})
    assert unknown.status_code == 400
    assert unknown.json()["error"]["param"] == "colour"
    assert client.get("/v1/blocklists").json()["data"] == []
