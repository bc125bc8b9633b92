"""The allowlist store: the ``allowlists`` table, its records, its limits and its cache.

``AllowlistStore`` validates and stores allowlists and keeps a compiled
``AllowlistSnapshot`` (``gateway.allowlists.matching``) of the enabled ones, rebuilt when
the table changes; ``gateway.allowlists`` says how, and what the limits are for.
"""

from __future__ import annotations

import builtins
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType

from sqlalchemy import JSON, Boolean, Integer, String, UniqueConstraint, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from gateway.allowlists.matching import AllowlistSnapshot, Exempts
from gateway.blocklists import (
    MAX_REGEX_CHARS,
    MAX_REGEXES_PER_LIST,
    CompiledRegex,
    RegexPattern,
    TermTrie,
    UnsupportedRegex,
    check_name,
    checked_regex,
    compile_regex,
    term_tokens,
)
from gateway.blocklists.settings import DEFAULT_REFRESH_S
from gateway.db import Base, Database, UtcDateTime
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.safety.allowlist import MAX_MASKED_CHARS
from gateway.safety.taxonomy import Category, Direction
from gateway.snapshots import SnapshotCache

log = logging.getLogger("safegate.allowlists")

MAX_NAME_CHARS = 64
# A longer match is never masked (``gateway.safety.allowlist``), so a longer term is refused.
MAX_TERM_CHARS = MAX_MASKED_CHARS
MAX_TERMS_PER_LIST = 1000
CREATED_BY_CHARS = 128  # a key id, as the audit store keeps it


# -- the table ---------------------------------------------------------------------------


class AllowlistRow(Base):
    __tablename__ = "allowlists"
    __table_args__ = (
        UniqueConstraint("name", name="uq_allowlists_name"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME_CHARS))
    terms: Mapped[list[str]] = mapped_column(JSON)
    regexes: Mapped[list[str]] = mapped_column(JSON)
    categories: Mapped[list[str]] = mapped_column(JSON)
    directions: Mapped[list[str]] = mapped_column(JSON)
    enabled: Mapped[bool] = mapped_column(Boolean)
    # Bumped by every update, so the store's version stamp sees updates as well as
    # inserts and deletes.
    revision: Mapped[int] = mapped_column(Integer)
    created_by: Mapped[str] = mapped_column(String(CREATED_BY_CHARS))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())


# -- what the store returns ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Allowlist:
    id: int
    name: str
    terms: tuple[str, ...]
    regexes: tuple[str, ...]
    categories: tuple[Category, ...]
    directions: tuple[Direction, ...]
    enabled: bool
    created_by: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class AllowlistChange:
    """The fields an update sets; ``None`` leaves a field as it is."""

    terms: Sequence[str] | None = None
    regexes: Sequence[str] | None = None
    categories: Sequence[str] | None = None
    directions: Sequence[str] | None = None
    enabled: bool | None = None


@dataclass(frozen=True, slots=True)
class _Checked:
    terms: list[str]
    regexes: list[str]
    categories: list[str]
    directions: list[str]


# -- the store ---------------------------------------------------------------------------


class AllowlistStore:
    """Allowlists in the database, and a cached compiled snapshot of the enabled ones."""

    def __init__(
        self,
        database: Database,
        *,
        refresh_s: float = DEFAULT_REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.database = database
        self._snapshots: SnapshotCache[AllowlistSnapshot, tuple[int, ...]] = SnapshotCache(
            database, version=_version, build=_compile, refresh_s=refresh_s, clock=clock
        )

    def create(
        self,
        name: str,
        *,
        terms: Sequence[str] = (),
        regexes: Sequence[str] = (),
        categories: Sequence[str],
        directions: Sequence[str],
        enabled: bool = True,
        created_by: str,
    ) -> Allowlist:
        check_name(name)
        checked = _checked(terms, regexes, categories, directions)
        now = _now()
        try:
            with self.database.session() as session:
                taken = session.scalar(select(AllowlistRow.id).where(AllowlistRow.name == name))
                if taken is not None:
                    raise _exists(name)
                row = AllowlistRow(
                    name=name,
                    terms=checked.terms,
                    regexes=checked.regexes,
                    categories=checked.categories,
                    directions=checked.directions,
                    enabled=enabled,
                    revision=0,
                    created_by=created_by[:CREATED_BY_CHARS],
                    created_at=now,
                    updated_at=now,
                )
                session.add(row)
                session.flush()
                created = _allowlist(row)
        except IntegrityError as error:  # a concurrent create of the same name won
            raise _exists(name) from error
        log.info("allowlist created", extra={"allowlist_id": created.id})
        self._changed()
        return created

    def list(self) -> builtins.list[Allowlist]:
        with self.database.session() as session:
            rows = session.scalars(select(AllowlistRow).order_by(AllowlistRow.name)).all()
            return [_allowlist(row) for row in rows]

    def get(self, name: str) -> Allowlist:
        with self.database.session() as session:
            return _allowlist(_find(session, name))

    def update(self, name: str, change: AllowlistChange) -> Allowlist:
        """Set the fields ``change`` names; the result is validated as a whole."""
        with self.database.session() as session:
            row = _find(session, name)
            checked = _checked(
                row.terms if change.terms is None else change.terms,
                row.regexes if change.regexes is None else change.regexes,
                row.categories if change.categories is None else change.categories,
                row.directions if change.directions is None else change.directions,
            )
            row.terms = checked.terms
            row.regexes = checked.regexes
            row.categories = checked.categories
            row.directions = checked.directions
            if change.enabled is not None:
                row.enabled = change.enabled
            row.revision += 1
            row.updated_at = _now()
            session.flush()
            updated = _allowlist(row)
        log.info("allowlist updated", extra={"allowlist_id": updated.id})
        self._changed()
        return updated

    def delete(self, name: str) -> Allowlist:
        with self.database.session() as session:
            row = _find(session, name)
            deleted = _allowlist(row)
            session.delete(row)
        log.info("allowlist deleted", extra={"allowlist_id": deleted.id})
        self._changed()
        return deleted

    # -- the snapshot ----------------------------------------------------------------------

    def snapshot(self) -> AllowlistSnapshot:
        """The enabled lists compiled: cached, rebuilt after a change here, checked every
        ``refresh_s`` for changes made elsewhere."""
        return self._snapshots.get()

    def _changed(self) -> None:
        self._snapshots.invalidate()


# -- validation --------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _checked(
    terms: Sequence[str],
    regexes: Sequence[str],
    categories: Sequence[str],
    directions: Sequence[str],
) -> _Checked:
    if len(terms) > MAX_TERMS_PER_LIST:
        raise InvalidRequest(
            f"an allowlist holds at most {MAX_TERMS_PER_LIST} terms, got {len(terms)}",
            param="terms",
            code="too_many_items",
        )
    if len(regexes) > MAX_REGEXES_PER_LIST:
        raise InvalidRequest(
            f"an allowlist holds at most {MAX_REGEXES_PER_LIST} regexes, got {len(regexes)}",
            param="regexes",
            code="too_many_items",
        )
    kept_terms = [_checked_term(term, param=f"terms.{i}") for i, term in enumerate(terms)]
    for index, pattern in enumerate(regexes):
        _check_text(pattern, what="a regex", limit=MAX_REGEX_CHARS, param=f"regexes.{index}")
        checked_regex(pattern, param=f"regexes.{index}")
    if not kept_terms and not regexes:
        raise InvalidRequest(
            "an allowlist needs at least one term or regex", param="terms", code="empty_items"
        )
    return _Checked(
        terms=list(dict.fromkeys(kept_terms)),
        regexes=list(dict.fromkeys(regexes)),
        categories=_members(categories, Category, param="categories", code="invalid_category"),
        directions=_members(directions, Direction, param="directions", code="invalid_direction"),
    )


def _checked_term(term: str, *, param: str) -> str:
    value = term.strip()
    _check_text(value, what="a term", limit=MAX_TERM_CHARS, param=param)
    if not term_tokens(value):
        raise InvalidRequest(
            "the term is empty after normalisation", param=param, code="empty_term"
        )
    return value


def _members(
    values: Sequence[str], kind: type[Category] | type[Direction], *, param: str, code: str
) -> builtins.list[str]:
    known = [member.value for member in kind]
    if not values:
        raise InvalidRequest(
            f"{param} must name at least one of {', '.join(known)}", param=param, code=code
        )
    for index, value in enumerate(values):
        if value not in known:
            raise InvalidRequest(
                f"{value!r} is not one of {', '.join(known)}", param=f"{param}.{index}", code=code
            )
    return [value for value in known if value in values]  # the enum's order, once each


def _check_text(value: str, *, what: str, limit: int, param: str) -> None:
    try:
        value.encode()
    except UnicodeEncodeError:  # a lone surrogate, e.g. from a JSON "\\ud800" escape
        raise InvalidRequest(
            f"{what} is not valid Unicode", param=param, code="invalid_value"
        ) from None
    if not value:
        raise InvalidRequest(f"{what} must not be empty", param=param, code="invalid_value")
    if len(value) > limit:
        raise InvalidRequest(
            f"{what} has at most {limit} characters; got {len(value)}",
            param=param,
            code="value_too_long",
        )


def _exists(name: str) -> Conflict:
    return Conflict(f"allowlist {name!r} already exists", param="name", code="allowlist_exists")


def _find(session: Session, name: str) -> AllowlistRow:
    row = session.scalar(select(AllowlistRow).where(AllowlistRow.name == name))
    if row is None:
        raise NotFound(f"no allowlist named {name!r}", param="name", code="allowlist_not_found")
    return row


def _allowlist(row: AllowlistRow) -> Allowlist:
    return Allowlist(
        id=row.id,
        name=row.name,
        terms=tuple(row.terms),
        regexes=tuple(row.regexes),
        categories=tuple(Category(value) for value in row.categories),
        directions=tuple(Direction(value) for value in row.directions),
        enabled=row.enabled,
        created_by=row.created_by,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


# -- the snapshot ------------------------------------------------------------------------


def _version(session: Session) -> tuple[int, ...]:
    """``(count, max id, sum of ids, sum of revisions)``: changes with every write."""
    row = session.execute(
        select(
            func.count(AllowlistRow.id),
            func.coalesce(func.max(AllowlistRow.id), 0),
            func.coalesce(func.sum(AllowlistRow.id), 0),
            func.coalesce(func.sum(AllowlistRow.revision), 0),
        )
    ).one()
    return tuple(int(value) for value in row)


def _compile(session: Session, version: tuple[int, ...]) -> AllowlistSnapshot:
    rows = session.scalars(
        select(AllowlistRow).where(AllowlistRow.enabled.is_(True)).order_by(AllowlistRow.id)
    ).all()
    terms: builtins.list[tuple[str, tuple[str, ...]]] = []
    regexes: builtins.list[CompiledRegex] = []
    exempts: dict[str, Exempts] = {}
    for row in rows:
        exempts[row.name] = Exempts(
            categories=frozenset(Category(value) for value in row.categories),
            directions=frozenset(Direction(value) for value in row.directions),
        )
        for term in row.terms:
            tokens = term_tokens(term)
            if tokens:
                terms.append((row.name, tokens))
        regexes += [
            CompiledRegex(row.name, row.id, _stored_regex(row.name, pattern))
            for pattern in row.regexes
        ]
    log.debug(
        "allowlist snapshot compiled",
        extra={"lists": len(rows), "terms": len(terms), "regexes": len(regexes)},
    )
    return AllowlistSnapshot(
        terms=TermTrie.build(terms),
        regexes=tuple(regexes),
        exempts=MappingProxyType(exempts),
        version=version,
    )


def _stored_regex(allowlist: str, value: str) -> RegexPattern:
    """Compile a stored regex; one RE2 refuses raises, naming its list (fail closed)."""
    try:
        return compile_regex(value)
    except UnsupportedRegex as error:
        raise UnsupportedRegex(
            f"allowlist {allowlist!r}: a stored regex",
            f"RE2 cannot compile it ({error.detail}); update the list",
            detail=error.detail,
        ) from None
