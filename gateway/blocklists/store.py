"""The blocklist store: the two tables, the records it returns, its limits and its cache.

``BlocklistStore`` validates and stores lists and items, and keeps a compiled
``BlocklistSnapshot`` (``gateway.blocklists.matching``) of every list, rebuilt when the
tables change; ``gateway.blocklists`` says how, and what the limits are for.
"""

from __future__ import annotations

import builtins
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import (
    CheckConstraint,
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

from gateway.blocklists.matching import (
    BlocklistSnapshot,
    CompiledRegex,
    RegexPattern,
    TermTrie,
    UnsupportedRegex,
    compile_regex,
    term_tokens,
)
from gateway.blocklists.settings import DEFAULT_REFRESH_S
from gateway.db import Base, Database, UtcDateTime
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.snapshots import SnapshotCache

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


class ItemKind(StrEnum):
    TERM = "term"
    REGEX = "regex"


# -- tables ------------------------------------------------------------------------------


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
        self.database = database
        self._snapshots: SnapshotCache[BlocklistSnapshot, tuple[int, ...]] = SnapshotCache(
            database, version=_version, build=_compile, refresh_s=refresh_s, clock=clock
        )
        self.refresh_s = refresh_s

    # -- lists -----------------------------------------------------------------------------

    def create(self, name: str, description: str = "") -> Blocklist:
        check_name(name)
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
        return self._snapshots.get()

    def _changed(self) -> None:
        self._snapshots.invalidate()


# -- helpers -----------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def check_name(name: str) -> None:
    """A list's name (blocklists and allowlists alike): 400 ``invalid_name`` unless it fits."""
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
