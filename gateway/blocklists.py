"""Custom blocklists: exact terms and regexes, kept in the database, matched after normalisation.

Admins manage lists through ``/v1/blocklists`` (``gateway.routes.blocklists``); the
``blocklist`` ensemble member (``gateway.safety.members.blocklist``) reads an immutable,
compiled :class:`BlocklistSnapshot` of every list once per batch and reports one finding,
labelled ``blocklist`` and kinded with the list's name, per hit.

Storage
    Two tables, created by Alembic revision ``0001``: ``blocklists`` (a unique name, a
    description) and ``blocklist_items`` (``term`` or ``regex`` and its value, unique per
    list; deleting a list cascades to its items). Rows are only ever inserted or deleted,
    never updated, and ids are never reused (``AUTOINCREMENT`` on SQLite, a sequence on
    PostgreSQL), so ``(count, max id, sum of ids)`` of the two tables changes with every
    change: that is the store's version, read in one cheap query.

Terms
    A term goes through the same ``normalize`` as every text (NFKC, invisible characters
    removed, then ``fold``: case, accents, homoglyphs, letter spacing, leetspeak) and is
    split into tokens: runs of word characters, single punctuation or symbol characters,
    and single characters of scripts written without spaces (Han, kana, Thai, ...). A term
    matches where its tokens appear consecutively among the text's tokens, whitespace
    between tokens ignored. So ``frobnicate`` matches ``Please FR0BN1CATE the report``,
    ``f r o b n i c a t e`` and ``frobnicate's``, but not ``frobnicated`` or
    ``unfrobnicate`` (whole words only); ``project falcon`` matches ``Project\\n\\nFalcon``;
    punctuation is kept, so ``e-mail`` does not match ``e mail``. At each place the longest
    term of a list wins and one list's hits never overlap. All terms of all lists live in
    one token trie, so a text costs one pass however many terms there are.
Regexes
    RE2 syntax (the ``google-re2`` package), compiled case-insensitive and searched in the
    folded view (so write them in lower case and expect leetspeak and homoglyphs folded:
    ``\\bproject\\s+falcon\\b`` matches ``Project  Falcon launch``). RE2 matches in time
    linear in the text whatever the pattern, so a search needs no time budget and no
    pattern can hang a worker, on an idle machine or a loaded one. The price is syntax
    that needs backtracking: backreferences (``\\1``, ``(?P=name)``), lookarounds
    (``(?=``, ``(?!``, ``(?<=``, ``(?<!``), atomic groups and possessive quantifiers are
    refused when the item is added, with a message naming the pattern and why. ``\\w``,
    ``\\d``, ``\\s`` and ``\\b`` are ASCII-only in RE2: for words of other scripts use
    ``\\p{L}`` classes or, better, terms (which tokenise every script). ``\\z`` ends the
    text (``\\Z`` is refused). Folding reads digits inside some mixed words as leetspeak
    (``JIRA-1234`` becomes ``jira-i2ea``), so such identifiers are safer as terms, which
    fold the same way. A pattern that matches the empty string is refused, and empty
    matches are never hits. One regex reports at most ``MAX_HITS_PER_REGEX`` hits in a
    text (one hit already blocks it): finding every match of some patterns rescans the
    text once per match, and the cap keeps that linear too. A stored pattern that RE2
    cannot compile (one added before blocklists used RE2) makes the snapshot raise
    ``UnsupportedRegex`` naming its list and item: the member fails and the engine blocks
    (fail closed) until an admin deletes the item.

Caching and replicas
    ``snapshot()`` compiles every list once and caches the result. A change made through
    this store drops the cache, so the next snapshot sees it at once; a change made by
    another replica is picked up when the cached snapshot is older than ``refresh_s`` and the
    version query says the tables changed (unchanged tables keep the same snapshot object).
    If the database cannot be read when a check is due, ``snapshot()`` raises: the member
    fails and the engine fails closed rather than serve a list of unknown age.

Errors are the API's (``gateway.errors``)::

    InvalidRequest   a bad name, description, term or regex, too many items (``param`` says which)
    NotFound         no list of that name, or no item of that id in the list
    Conflict         a list of that name exists, or a concurrent change collided (retry)

and ``UnsupportedRegex`` from :func:`compile_regex` (a pattern RE2 cannot compile; the
store turns it into ``InvalidRequest``). Nothing here logs an item's value.
"""

from __future__ import annotations

import builtins
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Protocol

import re2
import regex
from sqlalchemy import (
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Integer,
    Select,
    String,
    UniqueConstraint,
    func,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column
from sqlalchemy.types import TypeDecorator

from gateway.db import Base, Database
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.safety.normalize import normalize

log = logging.getLogger("safegate.blocklists")

NAME_PATTERN = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9_.-]{1,64}$")
MAX_NAME_CHARS = 64
MAX_DESCRIPTION_CHARS = 1024
MAX_VALUE_CHARS = 1000  # the ``value`` column's width
MAX_REGEX_CHARS = 500
# PostgreSQL cannot index a B-tree row over 2704 bytes, and (list, kind, value) is unique:
# every stored text is capped in UTF-8 bytes too.
MAX_VALUE_BYTES = 2000
MAX_ITEMS_PER_REQUEST = 1000
MAX_ITEMS_PER_LIST = 10_000
MAX_REGEXES_PER_LIST = 100
# One regex's hits in one text: past the first the text is blocked anyway, and finding
# every match of a pattern like ``a[^z]*z|a`` rescans the rest of the text per match.
MAX_HITS_PER_REGEX = 100
# RE2's memory for one compiled pattern (its default): a pattern needing more is refused.
REGEX_MAX_MEM_BYTES = 8 << 20
DEFAULT_REFRESH_S = 5.0

# Scripts written without spaces between words: each of their characters is a token, so a
# term in them matches as a substring.
_UNSPACED = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}\p{Tibetan}"
_TOKEN: Any = regex.compile(rf"[{_UNSPACED}]|[^\W{_UNSPACED}]+|[^\w\s]")


class UnsupportedRegex(ValueError):
    """RE2 cannot compile a pattern: the message names it (``what``) and says why.

    ``detail`` is RE2's own reason (``invalid escape sequence: \\1``).
    """

    def __init__(self, what: str, reason: str, *, detail: str) -> None:
        super().__init__(f"{what} is refused: {reason}")
        self.detail = detail


class RegexMatch(Protocol):
    """What the snapshot reads of an RE2 match (``google-re2`` ships no type stubs)."""

    def span(self) -> tuple[int, int]: ...


class RegexPattern(Protocol):
    """A compiled RE2 pattern; spans index the ``str`` searched, in characters."""

    def finditer(self, text: str) -> Iterator[RegexMatch]: ...

    def fullmatch(self, text: str) -> RegexMatch | None: ...


class ItemKind(StrEnum):
    TERM = "term"
    REGEX = "regex"


# -- tables ------------------------------------------------------------------------------


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores no offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("timestamps must be timezone-aware")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class BlocklistRow(Base):
    __tablename__ = "blocklists"
    __table_args__ = (
        UniqueConstraint("name", name="uq_blocklists_name"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME_CHARS))
    description: Mapped[str] = mapped_column(String(MAX_DESCRIPTION_CHARS))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class BlocklistItemRow(Base):
    __tablename__ = "blocklist_items"
    __table_args__ = (
        UniqueConstraint(
            "blocklist_id", "kind", "value", name="uq_blocklist_items_blocklist_id_kind_value"
        ),
        CheckConstraint("kind IN ('term', 'regex')", name="ck_blocklist_items_kind"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    blocklist_id: Mapped[int] = mapped_column(
        ForeignKey(
            "blocklists.id", ondelete="CASCADE", name="fk_blocklist_items_blocklist_id_blocklists"
        )
    )
    kind: Mapped[str] = mapped_column(String(8))
    value: Mapped[str] = mapped_column(String(MAX_VALUE_CHARS))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


# -- what the store returns ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewItem:
    """An item to add: a term or a regex."""

    kind: ItemKind
    value: str


@dataclass(frozen=True, slots=True)
class BlocklistItem:
    id: int
    kind: ItemKind
    value: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Blocklist:
    id: int
    name: str
    description: str
    created_at: datetime
    item_count: int


@dataclass(frozen=True, slots=True)
class BlocklistDetail(Blocklist):
    items: tuple[BlocklistItem, ...] = ()


# -- the compiled snapshot ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlocklistHit:
    """A place in the folded text that a list's term or regex matched."""

    blocklist: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class CompiledRegex:
    blocklist: str
    item_id: int
    pattern: RegexPattern


@dataclass(frozen=True, slots=True)
class TermTrie:
    """Every list's terms as one trie over tokens, flattened so it can be frozen.

    Node 0 is the root; ``edges[(node, token)]`` is the next node, and ``ends[node]``
    names the lists with a term that ends there.
    """

    edges: Mapping[tuple[int, str], int]
    ends: Mapping[int, frozenset[str]]

    @classmethod
    def build(cls, terms: Iterable[tuple[str, tuple[str, ...]]]) -> TermTrie:
        edges: dict[tuple[int, str], int] = {}
        ends: dict[int, set[str]] = {}
        for blocklist, tokens in terms:
            node = 0
            for token in tokens:
                node = edges.setdefault((node, token), len(edges) + 1)
            ends.setdefault(node, set()).add(blocklist)
        frozen = {node: frozenset(names) for node, names in ends.items()}
        return cls(edges=MappingProxyType(edges), ends=MappingProxyType(frozen))

    def search(self, folded: str) -> list[BlocklistHit]:
        """Leftmost-longest hits of each list; one list's hits never overlap."""
        if not self.edges:
            return []
        matches = list(_TOKEN.finditer(folded))
        tokens: list[str] = [match.group() for match in matches]
        hits: list[BlocklistHit] = []
        free_from: dict[str, int] = {}  # per list: the first token a new hit may start at
        for first in range(len(tokens)):
            node = 0
            longest: dict[str, int] = {}
            for index in range(first, len(tokens)):
                child = self.edges.get((node, tokens[index]))
                if child is None:
                    break
                node = child
                for blocklist in self.ends.get(node, ()):
                    longest[blocklist] = index
            for blocklist, last in longest.items():
                if first >= free_from.get(blocklist, 0):
                    hits.append(
                        BlocklistHit(blocklist, matches[first].start(), matches[last].end())
                    )
                    free_from[blocklist] = last + 1
        return hits


@dataclass(frozen=True, slots=True)
class BlocklistSnapshot:
    """Every list, compiled: what the ``blocklist`` member searches. Immutable."""

    terms: TermTrie
    regexes: tuple[CompiledRegex, ...]
    version: tuple[int, ...]

    def search(self, folded: str) -> tuple[BlocklistHit, ...]:
        """All hits in ``folded`` (a ``NormalizedText.folded``), ordered by position.

        Linear in the text for every pattern (RE2): no budget, nothing to time out.
        """
        hits = set(self.terms.search(folded))
        for compiled in self.regexes:
            hits.update(
                BlocklistHit(compiled.blocklist, start, end)
                for start, end in regex_spans(compiled.pattern, folded)
            )
        return tuple(sorted(hits, key=lambda hit: (hit.start, hit.end, hit.blocklist)))


# -- the store ---------------------------------------------------------------------------


class BlocklistStore:
    """Blocklists in the database, and a cached compiled snapshot of them."""

    def __init__(
        self,
        database: Database,
        *,
        refresh_s: float = DEFAULT_REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not refresh_s > 0:
            raise ValueError(f"refresh_s must be positive, got {refresh_s!r}")
        self.database = database
        self.refresh_s = refresh_s
        self._clock = clock
        self._lock = threading.Lock()
        self._snapshot: BlocklistSnapshot | None = None
        self._checked_at = 0.0

    # -- lists -----------------------------------------------------------------------------

    def create(self, name: str, description: str = "") -> Blocklist:
        _check_name(name)
        _check_text(
            description,
            what="description",
            limit=MAX_DESCRIPTION_CHARS,
            max_bytes=4 * MAX_DESCRIPTION_CHARS,  # not indexed: only the character limit binds
            param="description",
        )
        try:
            with self.database.session() as session:
                taken = session.scalar(select(BlocklistRow.id).where(BlocklistRow.name == name))
                if taken is not None:
                    raise _exists(name)
                row = BlocklistRow(name=name, description=description, created_at=_now())
                session.add(row)
                session.flush()
                created = _blocklist(row, item_count=0)
        except IntegrityError as error:  # a concurrent create of the same name won
            raise _exists(name) from error
        log.info("blocklist created", extra={"blocklist_id": created.id})
        self._changed()
        return created

    def list(self) -> list[Blocklist]:
        with self.database.session() as session:
            rows = session.execute(_with_counts().order_by(BlocklistRow.name)).all()
            return [_blocklist(row, item_count=count) for row, count in rows]

    def get(self, name: str) -> BlocklistDetail:
        with self.database.session() as session:
            row = _find(session, name)
            items = session.scalars(
                select(BlocklistItemRow)
                .where(BlocklistItemRow.blocklist_id == row.id)
                .order_by(BlocklistItemRow.id)
            ).all()
            return BlocklistDetail(
                id=row.id,
                name=row.name,
                description=row.description,
                created_at=row.created_at,
                item_count=len(items),
                items=tuple(_item(item) for item in items),
            )

    def delete(self, name: str) -> Blocklist:
        """Delete a list and (by cascade) its items; return what was deleted."""
        with self.database.session() as session:
            row, count = _find_with_count(session, name)
            deleted = _blocklist(row, item_count=count)
            session.delete(row)
        log.info("blocklist deleted", extra={"blocklist_id": deleted.id})
        self._changed()
        return deleted

    # -- items -----------------------------------------------------------------------------

    def add_items(self, name: str, items: Sequence[NewItem]) -> builtins.list[BlocklistItem]:
        """Add items; return them in request order, with the ids they have.

        Adding an item the list already has (same kind and value; terms compared after
        stripping surrounding whitespace) is not an error: the existing item comes back.
        """
        if not items:
            raise InvalidRequest("items must not be empty", param="items", code="empty_items")
        if len(items) > MAX_ITEMS_PER_REQUEST:
            raise InvalidRequest(
                f"at most {MAX_ITEMS_PER_REQUEST} items per request, got {len(items)}",
                param="items",
                code="too_many_items",
            )
        wanted = list(dict.fromkeys(_checked(item, index) for index, item in enumerate(items)))
        try:
            with self.database.session() as session:
                row, count = _find_with_count(session, name)
                present = {
                    (item.kind, item.value): item
                    for item in session.scalars(
                        select(BlocklistItemRow).where(
                            BlocklistItemRow.blocklist_id == row.id,
                            BlocklistItemRow.value.in_([value for _, value in wanted]),
                        )
                    )
                }
                new = [
                    BlocklistItemRow(blocklist_id=row.id, kind=kind, value=value, created_at=_now())
                    for kind, value in wanted
                    if (kind, value) not in present
                ]
                _check_capacity(session, row.id, count=count, new=new)
                session.add_all(new)
                session.flush()
                present.update({(item.kind, item.value): item for item in new})
                added = [_item(present[key]) for key in wanted]
        except IntegrityError as error:  # a concurrent request added one of these first
            raise Conflict(
                f"blocklist {name!r} changed while adding items; retry the request",
                param="items",
                code="concurrent_change",
            ) from error
        log.info("blocklist items added", extra={"blocklist_id": row.id, "added": len(new)})
        if new:
            self._changed()
        return added

    def remove_item(self, name: str, item_id: int) -> None:
        with self.database.session() as session:
            row = _find(session, name)
            item = session.get(BlocklistItemRow, item_id)
            if item is None or item.blocklist_id != row.id:
                raise NotFound(
                    f"blocklist {name!r} has no item {item_id}",
                    param="item_id",
                    code="item_not_found",
                )
            session.delete(item)
        log.info("blocklist item removed", extra={"blocklist_id": row.id, "item_id": item_id})
        self._changed()

    # -- the snapshot ----------------------------------------------------------------------

    def snapshot(self) -> BlocklistSnapshot:
        """The compiled lists: cached, rebuilt after a change here, checked every ``refresh_s``."""
        with self._lock:
            now = self._clock()
            cached = self._snapshot
            if cached is not None and now - self._checked_at < self.refresh_s:
                return cached
            with self.database.session() as session:
                # The version is read before the rows: a change landing in between makes the
                # next check rebuild again, never miss it.
                version = _version(session)
                if cached is None or cached.version != version:
                    cached = _compile(session, version)
            self._snapshot = cached
            self._checked_at = now
            return cached

    def _changed(self) -> None:
        with self._lock:
            self._snapshot = None


# -- helpers -----------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _check_name(name: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidRequest(
            "name must be 1 to 64 letters, digits, '_', '.' or '-' (and not '.' or '..')",
            param="name",
            code="invalid_name",
        )


def _exists(name: str) -> Conflict:
    return Conflict(f"blocklist {name!r} already exists", param="name", code="blocklist_exists")


def _not_found(name: str) -> NotFound:
    return NotFound(f"no blocklist named {name!r}", param="name", code="blocklist_not_found")


def _find(session: Session, name: str) -> BlocklistRow:
    row = session.scalar(select(BlocklistRow).where(BlocklistRow.name == name))
    if row is None:
        raise _not_found(name)
    return row


def _with_counts() -> Select[BlocklistRow, int]:
    return (
        select(BlocklistRow, func.count(BlocklistItemRow.id))
        .outerjoin(BlocklistItemRow, BlocklistItemRow.blocklist_id == BlocklistRow.id)
        .group_by(BlocklistRow.id)
    )


def _find_with_count(session: Session, name: str) -> tuple[BlocklistRow, int]:
    found = session.execute(_with_counts().where(BlocklistRow.name == name)).first()
    if found is None:
        raise _not_found(name)
    row, count = found
    return row, count


def _blocklist(row: BlocklistRow, *, item_count: int) -> Blocklist:
    return Blocklist(
        id=row.id,
        name=row.name,
        description=row.description,
        created_at=row.created_at,
        item_count=item_count,
    )


def _item(row: BlocklistItemRow) -> BlocklistItem:
    return BlocklistItem(
        id=row.id, kind=ItemKind(row.kind), value=row.value, created_at=row.created_at
    )


def term_tokens(value: str) -> tuple[str, ...]:
    """The tokens a term matches as: normalised like any text, then tokenised."""
    tokens: list[str] = _TOKEN.findall(normalize(value).folded)
    return tuple(tokens)


def _regex_options() -> Any:
    options = re2.Options()
    options.case_sensitive = False
    options.log_errors = False  # a refused pattern is the caller's error, not a log line
    options.max_mem = REGEX_MAX_MEM_BYTES
    return options


_REGEX_OPTIONS = _regex_options()
_LOOKAROUNDS = ("(?=", "(?!", "(?<=", "(?<!")
_BACKREFERENCE = re.compile(r"invalid escape sequence: \\[1-9]|invalid perl operator: \(\?P")


def compile_regex(value: str) -> RegexPattern:
    """Compile a blocklist regex the way the snapshot does (RE2, case-insensitive).

    Raises ``UnsupportedRegex`` saying why RE2 refuses it.
    """
    try:
        pattern: RegexPattern = re2.compile(value, _REGEX_OPTIONS)
    except re2.error as error:
        raw = error.args[0] if error.args else ""
        detail = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        raise UnsupportedRegex(f"regex {value!r}", _refusal(detail), detail=detail) from None
    return pattern


def regex_spans(pattern: RegexPattern, folded: str) -> Iterator[tuple[int, int]]:
    """The non-empty matches of ``pattern`` in ``folded``, at most ``MAX_HITS_PER_REGEX``."""
    found = 0
    for match in pattern.finditer(folded):
        start, end = match.span()
        if end > start:
            yield start, end
            found += 1
            if found >= MAX_HITS_PER_REGEX:
                return


def _refusal(detail: str) -> str:
    """RE2's reason for refusing a pattern, with what it means for a blocklist."""
    linear = "blocklist regexes run on RE2, which matches in linear time and has no"
    if detail.startswith("invalid perl operator: ") and detail.endswith(_LOOKAROUNDS):
        return f"lookarounds are not supported ({detail}): {linear} lookahead or lookbehind"
    if _BACKREFERENCE.fullmatch(detail):
        return f"backreferences are not supported ({detail}): {linear} backreferences"
    if detail == "invalid perl operator: (?>" or (
        detail.startswith("bad repetition operator: ") and detail.endswith("+")
    ):
        return (
            f"atomic groups and possessive quantifiers are not supported ({detail}): "
            f"{linear} backtracking to control"
        )
    if detail == "invalid escape sequence: \\Z":
        return f"RE2 cannot compile it ({detail}): write \\z for the end of the text"
    return f"RE2 cannot compile it ({detail})"


def _checked(item: NewItem, index: int) -> tuple[str, str]:
    """Validate one new item; return its ``(kind, value)`` as stored."""
    param = f"items.{index}.value"
    if item.kind is ItemKind.TERM:
        value = item.value.strip()
        _check_text(value, what="a term", limit=MAX_VALUE_CHARS, param=param)
        if not term_tokens(value):
            raise InvalidRequest(
                "the term is empty after normalisation", param=param, code="empty_term"
            )
        return item.kind.value, value
    value = item.value
    _check_text(value, what="a regex", limit=MAX_REGEX_CHARS, param=param)
    checked_regex(value, param=param)
    return item.kind.value, value


def checked_regex(value: str, *, param: str) -> RegexPattern:
    """Compile a regex an admin sent; ``InvalidRequest`` naming it and why when refused."""
    try:
        pattern = compile_regex(value)
    except UnsupportedRegex as error:
        raise InvalidRequest(str(error), param=param, code="invalid_regex") from None
    if pattern.fullmatch("") is not None:
        raise InvalidRequest(
            f"regex {value!r} is refused: it matches the empty string, so it would match "
            "every text",
            param=param,
            code="invalid_regex",
        )
    return pattern


def _check_text(
    value: str, *, what: str, limit: int, param: str, max_bytes: int = MAX_VALUE_BYTES
) -> None:
    """Raise unless ``value`` is valid Unicode of at most ``limit`` characters and ``max_bytes``."""
    try:
        size = len(value.encode())
    except UnicodeEncodeError:  # a lone surrogate, e.g. from a JSON "\\ud800" escape
        raise InvalidRequest(
            f"{what} is not valid Unicode", param=param, code="invalid_value"
        ) from None
    if len(value) > limit or size > max_bytes:
        raise InvalidRequest(
            f"{what} has at most {limit} characters and {max_bytes} bytes of UTF-8; "
            f"got {len(value)} characters, {size} bytes",
            param=param,
            code="value_too_long",
        )


def _check_capacity(
    session: Session, blocklist_id: int, *, count: int, new: Sequence[BlocklistItemRow]
) -> None:
    if count + len(new) > MAX_ITEMS_PER_LIST:
        raise InvalidRequest(
            f"a blocklist holds at most {MAX_ITEMS_PER_LIST} items; it has {count} and the "
            f"request adds {len(new)}",
            param="items",
            code="too_many_items",
        )
    new_regexes = sum(1 for item in new if item.kind == ItemKind.REGEX)
    if not new_regexes:
        return
    regexes = session.scalar(
        select(func.count(BlocklistItemRow.id)).where(
            BlocklistItemRow.blocklist_id == blocklist_id,
            BlocklistItemRow.kind == ItemKind.REGEX.value,
        )
    )
    if (regexes or 0) + new_regexes > MAX_REGEXES_PER_LIST:
        raise InvalidRequest(
            f"a blocklist holds at most {MAX_REGEXES_PER_LIST} regexes; it has {regexes} and "
            f"the request adds {new_regexes}",
            param="items",
            code="too_many_items",
        )


def _version(session: Session) -> tuple[int, ...]:
    """``(count, max id, sum of ids)`` of both tables: changes with every insert or delete."""
    row = session.execute(
        select(
            select(func.count(BlocklistRow.id)).scalar_subquery(),
            select(func.coalesce(func.max(BlocklistRow.id), 0)).scalar_subquery(),
            select(func.coalesce(func.sum(BlocklistRow.id), 0)).scalar_subquery(),
            select(func.count(BlocklistItemRow.id)).scalar_subquery(),
            select(func.coalesce(func.max(BlocklistItemRow.id), 0)).scalar_subquery(),
            select(func.coalesce(func.sum(BlocklistItemRow.id), 0)).scalar_subquery(),
        )
    ).one()
    return tuple(int(value) for value in row)


def _compile(session: Session, version: tuple[int, ...]) -> BlocklistSnapshot:
    started = time.perf_counter()
    names: dict[int, str] = dict(session.execute(select(BlocklistRow.id, BlocklistRow.name)).all())
    rows = session.execute(
        select(
            BlocklistItemRow.id,
            BlocklistItemRow.blocklist_id,
            BlocklistItemRow.kind,
            BlocklistItemRow.value,
        ).order_by(BlocklistItemRow.id)
    )
    terms: list[tuple[str, tuple[str, ...]]] = []
    regexes: list[CompiledRegex] = []
    for item_id, blocklist_id, kind, value in rows:
        name = names.get(blocklist_id)
        if name is None:  # its list was deleted between the two reads
            continue
        if kind == ItemKind.TERM.value:
            tokens = term_tokens(value)
            if tokens:
                terms.append((name, tokens))
            else:
                log.warning("blocklist term folds to nothing", extra={"item_id": item_id})
        else:
            regexes.append(CompiledRegex(name, item_id, _stored_regex(name, item_id, value)))
    snapshot = BlocklistSnapshot(
        terms=TermTrie.build(terms),
        regexes=tuple(regexes),
        version=version,
    )
    log.debug(
        "blocklist snapshot compiled",
        extra={
            "lists": len(names),
            "terms": len(terms),
            "regexes": len(regexes),
            "ms": round((time.perf_counter() - started) * 1000, 1),
        },
    )
    return snapshot


def _stored_regex(blocklist: str, item_id: int, value: str) -> RegexPattern:
    """Compile a stored regex; one RE2 refuses raises, naming its list and item (fail closed)."""
    try:
        return compile_regex(value)
    except UnsupportedRegex as error:
        log.error(
            "blocklist regex cannot be compiled; delete the item",
            extra={"blocklist": blocklist, "item_id": item_id},
        )
        raise UnsupportedRegex(
            f"blocklist {blocklist!r}: stored regex item {item_id}",
            f"RE2 cannot compile it ({error.detail}); delete the item",
            detail=error.detail,
        ) from None
