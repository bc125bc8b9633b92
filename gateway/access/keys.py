"""API keys: roles, the ``api_keys`` table and ``KeyStore``, and the first start's local key.

``gateway.access`` tells how keys are made, stored, cached and checked when the database
cannot be reached. Nothing here imports FastAPI or Starlette, so ``safegate keys`` and
the dashboard use the store without loading the web stack; the route dependencies that
check a request's key live in ``gateway.access.dependencies``.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import logging
import math
import re
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Float,
    Index,
    Integer,
    String,
    func,
    select,
    text,
)
from sqlalchemy.exc import (
    IntegrityError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Mapped, Session, mapped_column

from gateway.access.quotas import NO_QUOTA, Quota
from gateway.access.settings import (
    DEFAULT_CACHE_TTL_S,
    DEFAULT_OUTAGE_GRACE_S,
    MAX_REQUESTS_PER_MINUTE,
)
from gateway.db import Base, Database, UtcDateTime
from gateway.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
    Unauthorized,
)

log = logging.getLogger("safegate.auth")

KEY_PREFIX = "sg-"
KEY_RANDOM_BYTES = 32
KEY_PATTERN = re.compile(r"^sg-[A-Za-z0-9_-]{43}$")
DISPLAY_PREFIX_CHARS = len(KEY_PREFIX) + 8
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
POLICY_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
KEY_STORE_RETRY_AFTER_S = 5
DEFAULT_TOUCH_INTERVAL_S = 60.0
DEFAULT_CACHE_MAX_ENTRIES = 10_000
KEY_ID_PREFIX = "key_"  # a key's public id: this and 24 hex digits
ANONYMOUS_KEY_ID = "anonymous"
# Every 401 carries it: the scheme a client should authenticate with (RFC 6750).
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="safegate"'}


class Role(StrEnum):
    ADMIN = "admin"
    DEVELOPER = "developer"
    REVIEWER = "reviewer"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts as: the key that authenticated it, or the anonymous admin."""

    key_id: str  # "anonymous" when auth is disabled
    name: str
    role: Role
    policy: str | None  # a policy name; None = the service's default policy
    rate_limit_rpm: int | None  # None = the service's default rate limit
    quota: Quota = NO_QUOTA  # token quotas and budget (gateway.access.quotas); none by default

    def allows(self, role: Role) -> bool:
        """Whether this principal may act in ``role``: its own role, or any role for admin."""
        return self.role is Role.ADMIN or self.role is role


ANONYMOUS = Principal(
    key_id=ANONYMOUS_KEY_ID, name="anonymous", role=Role.ADMIN, policy=None, rate_limit_rpm=None
)


def invalid_key() -> Unauthorized:
    """The 401 for a key that is malformed or that no row has."""
    return Unauthorized(
        "Incorrect API key provided. Ask an admin for a key ('safegate keys create').",
        code="invalid_api_key",
        headers=CHALLENGE,
    )


# -- the table ---------------------------------------------------------------------------


class ApiKeyRow(Base):
    __tablename__ = "api_keys"
    __table_args__ = (
        Index("uq_api_keys_secret_hash", "secret_hash", unique=True),
        Index(
            "uq_api_keys_active_name",
            "name",
            unique=True,
            sqlite_where=text("revoked_at IS NULL"),
            postgresql_where=text("revoked_at IS NULL"),
        ),
        CheckConstraint("role IN ('admin', 'developer', 'reviewer')", name="ck_api_keys_role"),
        CheckConstraint(
            "rate_limit_rpm IS NULL OR rate_limit_rpm > 0", name="ck_api_keys_rate_limit_rpm"
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    policy: Mapped[str | None] = mapped_column(String(64))
    rate_limit_rpm: Mapped[int | None] = mapped_column(Integer)
    secret_hash: Mapped[str] = mapped_column(String(64))  # SHA-256 of the key, hex
    prefix: Mapped[str] = mapped_column(String(16))  # "sg-" and 8 characters, for display
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    daily_token_quota: Mapped[int | None] = mapped_column(BigInteger)
    monthly_token_quota: Mapped[int | None] = mapped_column(BigInteger)
    monthly_budget_usd: Mapped[float | None] = mapped_column(Float)


# -- what the store returns ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key as listed: everything but the secret and its hash."""

    id: str
    name: str
    role: Role
    policy: str | None
    rate_limit_rpm: int | None
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None
    quota: Quota = NO_QUOTA

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A key just created, with its secret: the only time the secret is known."""

    key: ApiKey
    secret: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class _Cached:
    principal: Principal
    expires: float  # the clock's time after which the database is asked again
    verified: float  # the clock's time of the last lookup that found the key valid
    stale: bool = False  # admitted while the database could not be reached


# The database could not be reached (connection, timeout, no pooled connection in time),
# as opposed to an answer or an error about the schema or the data. SQLite raises
# OperationalError for a missing table too, so for SQLite only these result codes count.
_UNREACHABLE = (OperationalError, InterfaceError, PoolTimeoutError)
_SQLITE_UNREACHABLE = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_FULL,
    }
)


# -- the store ---------------------------------------------------------------------------


class KeyStore:
    """API keys in the database, and a short-lived cache of the valid ones."""

    def __init__(
        self,
        database: Database,
        *,
        cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
        touch_interval_s: float = DEFAULT_TOUCH_INTERVAL_S,
        cache_max_entries: int = DEFAULT_CACHE_MAX_ENTRIES,
        outage_grace_s: float = DEFAULT_OUTAGE_GRACE_S,
        on_stale: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if not cache_ttl_s > 0:
            raise ValueError(f"cache_ttl_s must be positive, got {cache_ttl_s!r}")
        if not (math.isfinite(outage_grace_s) and outage_grace_s >= 0):
            raise ValueError(
                f"outage_grace_s must be a finite number of seconds >= 0, got {outage_grace_s!r}"
            )
        if not touch_interval_s > 0:
            raise ValueError(f"touch_interval_s must be positive, got {touch_interval_s!r}")
        if cache_max_entries < 1:
            raise ValueError(f"cache_max_entries must be at least 1, got {cache_max_entries!r}")
        self.database = database
        self.cache_ttl_s = cache_ttl_s
        self.touch_interval = timedelta(seconds=touch_interval_s)
        self.cache_max_entries = cache_max_entries
        self.outage_grace_s = outage_grace_s
        self._on_stale = on_stale
        self._clock = clock
        self._now = now
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, _Cached] = OrderedDict()  # by the key's SHA-256
        self._revocations = 0  # bumped by every revoke: a lookup that overlapped one is not cached

    # -- management ------------------------------------------------------------------------

    def create(
        self,
        name: str,
        role: Role | str,
        *,
        policy: str | None = None,
        rate_limit_rpm: int | None = None,
        quota: Quota = NO_QUOTA,
    ) -> IssuedKey:
        """Create a key; the returned ``IssuedKey.secret`` is never available again."""
        _check_name(name)
        checked_role = _check_role(role)
        _check_policy(policy)
        _check_rate_limit(rate_limit_rpm)
        secret = KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)
        row = ApiKeyRow(
            id=KEY_ID_PREFIX + secrets.token_hex(12),
            name=name,
            role=checked_role.value,
            policy=policy,
            rate_limit_rpm=rate_limit_rpm,
            secret_hash=_digest(secret),
            prefix=secret[:DISPLAY_PREFIX_CHARS],
            created_at=self._now(),
            revoked_at=None,
            last_used_at=None,
            daily_token_quota=quota.daily_tokens,
            monthly_token_quota=quota.monthly_tokens,
            monthly_budget_usd=quota.monthly_budget_usd,
        )
        try:
            with self.database.session() as session:
                taken = session.scalar(
                    select(ApiKeyRow.id).where(
                        ApiKeyRow.name == name, ApiKeyRow.revoked_at.is_(None)
                    )
                )
                if taken is not None:
                    raise _name_exists(name)
                session.add(row)
                session.flush()
                created = _api_key(row)
        except IntegrityError as error:  # a concurrent create of the same name won
            raise _name_exists(name) from error
        log.info("api key created", extra={"key_id": created.id, "role": created.role.value})
        return IssuedKey(key=created, secret=secret)

    def list(self, *, include_revoked: bool = True) -> builtins.list[ApiKey]:
        """Keys by creation time, oldest first."""
        query = select(ApiKeyRow).order_by(ApiKeyRow.created_at, ApiKeyRow.id)
        if not include_revoked:
            query = query.where(ApiKeyRow.revoked_at.is_(None))
        with self.database.session() as session:
            return [_api_key(row) for row in session.scalars(query)]

    def get(self, key_id: str) -> ApiKey:
        with self.database.session() as session:
            return _api_key(_find(session, key_id))

    def count(self) -> int:
        """How many keys the table holds, revoked ones included."""
        with self.database.session() as session:
            return int(session.scalar(select(func.count(ApiKeyRow.id))) or 0)

    def set_quota(self, key_id: str, quota: Quota) -> ApiKey:
        """Replace a key's quotas (``NO_QUOTA`` lifts them); servers apply it within
        ``cache_ttl_s``, this store at once."""
        with self.database.session() as session:
            row = _find(session, key_id)
            row.daily_token_quota = quota.daily_tokens
            row.monthly_token_quota = quota.monthly_tokens
            row.monthly_budget_usd = quota.monthly_budget_usd
            updated = _api_key(row)
        self._forget(key_id)
        log.info("api key quota set", extra={"key_id": key_id})
        return updated

    def _forget(self, key_id: str) -> None:
        """Drop ``key_id`` from the cache; a lookup overlapping this cannot put it back."""
        with self._lock:
            self._revocations += 1
            stale = [
                digest for digest, hit in self._cache.items() if hit.principal.key_id == key_id
            ]
            for digest in stale:
                del self._cache[digest]

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key (idempotent: a revoked key keeps its first ``revoked_at``)."""
        with self.database.session() as session:
            row = _find(session, key_id)
            if row.revoked_at is None:
                row.revoked_at = self._now()
            revoked = _api_key(row)
        self._forget(key_id)
        log.info("api key revoked", extra={"key_id": key_id})
        return revoked

    # -- authentication --------------------------------------------------------------------

    def cached(self, secret: str) -> Principal | None:
        """The principal for ``secret`` if a recent lookup found it valid; no I/O.

        "Recent" is within ``cache_ttl_s``, or, after a lookup that could not reach the
        database admitted the key stale, within ``cache_ttl_s`` of that lookup (and never
        past ``outage_grace_s`` after the key's last successful check).
        """
        digest = _digest(secret)
        with self._lock:
            hit = self._cache.get(digest)
            if hit is None:
                return None
            now = self._clock()
            if hit.expires <= now:
                if hit.verified + self.outage_grace_s <= now:  # of no use even in an outage
                    del self._cache[digest]
                return None
            self._cache.move_to_end(digest)
        if hit.stale and self._on_stale is not None:
            self._on_stale()
        return hit.principal

    def authenticate(self, secret: str) -> Principal:
        """The principal for ``secret``; raises ``Unauthorized`` for an unknown or revoked key.

        If the database cannot be reached, a key checked within ``outage_grace_s`` is
        admitted from the cache; any other key gets ``ServiceUnavailable`` (see the module
        docstring). Blocking (a database read on a cache miss): call it from a worker thread
        in ``async`` code, as ``require`` does.
        """
        if not KEY_PATTERN.fullmatch(secret):
            raise invalid_key()
        hit = self.cached(secret)
        if hit is not None:
            return hit
        digest = _digest(secret)
        with self._lock:
            revocations = self._revocations
        try:
            principal = self._lookup(digest)
        except Unauthorized:
            with self._lock:  # the database said no: nothing is left to serve stale
                self._cache.pop(digest, None)
            raise
        except SQLAlchemyError as error:
            if _unreachable(error):
                return self._admit_stale(digest, revocations, error)
            log.error("key store unreadable", extra={"error": _describe(error)})
            raise _key_store_unavailable() from None
        with self._lock:
            if self._revocations == revocations:
                now = self._clock()
                self._cache[digest] = _Cached(principal, now + self.cache_ttl_s, verified=now)
                self._cache.move_to_end(digest)
                while len(self._cache) > self.cache_max_entries:
                    self._cache.popitem(last=False)
        return principal

    def _admit_stale(self, digest: str, revocations: int, error: SQLAlchemyError) -> Principal:
        """After a lookup that could not reach the database: the cached key, or a 503."""
        with self._lock:
            now = self._clock()
            hit = self._cache.get(digest)
            usable = (
                hit is not None
                and self._revocations == revocations  # no revoke ran meanwhile
                and now < hit.verified + self.outage_grace_s
            )
            if hit is not None and usable:
                until = min(now + self.cache_ttl_s, hit.verified + self.outage_grace_s)
                self._cache[digest] = replace(hit, expires=until, stale=True)
                self._cache.move_to_end(digest)
            elif hit is not None and now >= hit.verified + self.outage_grace_s:
                del self._cache[digest]
        failure = _describe(error)
        if hit is None or not usable:
            log.error(
                "key store unreachable; key not verified",
                extra={"error": failure, "sha256": digest[:12]},
            )
            raise _key_store_unavailable() from None
        log.warning(
            "key store unreachable; admitting a key checked earlier",
            extra={
                "key_id": hit.principal.key_id,
                "checked_s_ago": round(now - hit.verified, 3),
                "outage_grace_s": self.outage_grace_s,
                "error": failure,
            },
        )
        if self._on_stale is not None:
            self._on_stale()
        return hit.principal

    def _lookup(self, digest: str) -> Principal:
        with self.database.session() as session:
            row = session.scalar(select(ApiKeyRow).where(ApiKeyRow.secret_hash == digest))
            if row is None or not hmac.compare_digest(row.secret_hash, digest):
                log.info("api key rejected", extra={"reason": "unknown", "sha256": digest[:12]})
                raise invalid_key()
            if row.revoked_at is not None:
                log.info("api key rejected", extra={"reason": "revoked", "key_id": row.id})
                raise Unauthorized(
                    "This API key was revoked; ask an admin for a new one.",
                    code="invalid_api_key",
                    headers=CHALLENGE,
                )
            now = self._now()
            if row.last_used_at is None or now - row.last_used_at >= self.touch_interval:
                row.last_used_at = now
            return _principal(row)


# -- helpers -----------------------------------------------------------------------------


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def _key_store_unavailable() -> ServiceUnavailable:
    return ServiceUnavailable(
        "the key store cannot be reached, so this API key cannot be verified and the "
        "request is refused (fail closed); retry shortly",
        code="key_store_unavailable",
        headers={"Retry-After": str(KEY_STORE_RETRY_AFTER_S)},
    )


def _unreachable(error: SQLAlchemyError) -> bool:
    """Whether ``error`` says the database could not be reached (rather than answered)."""
    if not isinstance(error, _UNREACHABLE):
        return False
    original = getattr(error, "orig", None)
    if isinstance(original, sqlite3.Error):
        code = getattr(original, "sqlite_errorcode", None)
        return code is not None and (code & 0xFF) in _SQLITE_UNREACHABLE
    return True


def _describe(error: SQLAlchemyError) -> str:
    """The error's class and the driver's (never its message: it may carry parameters)."""
    original = getattr(error, "orig", None)
    if original is None:
        return type(error).__name__
    return f"{type(error).__name__}({type(original).__name__})"


def _check_name(name: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidRequest(
            "name must be 1 to 64 letters, digits, '_', '.' or '-', starting with a letter "
            "or digit",
            param="name",
            code="invalid_name",
        )


def _check_role(role: Role | str) -> Role:
    try:
        return Role(role)
    except ValueError:
        roles = ", ".join(member.value for member in Role)
        raise InvalidRequest(
            f"role must be one of {roles}", param="role", code="invalid_role"
        ) from None


def _check_policy(policy: str | None) -> None:
    if policy is not None and not POLICY_PATTERN.fullmatch(policy):
        raise InvalidRequest(
            "policy must be 1 to 64 lower-case letters, digits, '_' or '-', starting with a "
            "letter or digit",
            param="policy",
            code="invalid_policy",
        )


def _check_rate_limit(rate_limit_rpm: int | None) -> None:
    if rate_limit_rpm is not None and not 1 <= rate_limit_rpm <= MAX_REQUESTS_PER_MINUTE:
        raise InvalidRequest(
            f"rate_limit_rpm must be 1 to {MAX_REQUESTS_PER_MINUTE}",
            param="rate_limit_rpm",
            code="invalid_rate_limit",
        )


def _name_exists(name: str) -> Conflict:
    return Conflict(
        f"an active key named {name!r} exists; revoke it first or pick another name",
        param="name",
        code="key_name_exists",
    )


def _find(session: Session, key_id: str) -> ApiKeyRow:
    row = session.get(ApiKeyRow, key_id)
    if row is None:
        raise NotFound(f"no API key with id {key_id!r}", param="key_id", code="key_not_found")
    return row


def _api_key(row: ApiKeyRow) -> ApiKey:
    return ApiKey(
        id=row.id,
        name=row.name,
        role=Role(row.role),
        policy=row.policy,
        rate_limit_rpm=row.rate_limit_rpm,
        prefix=row.prefix,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
        quota=_quota(row),
    )


def _principal(row: ApiKeyRow) -> Principal:
    return Principal(
        key_id=row.id,
        name=row.name,
        role=Role(row.role),
        policy=row.policy,
        rate_limit_rpm=row.rate_limit_rpm,
        quota=_quota(row),
    )


def _quota(row: ApiKeyRow) -> Quota:
    return Quota(
        daily_tokens=row.daily_token_quota,
        monthly_tokens=row.monthly_token_quota,
        monthly_budget_usd=row.monthly_budget_usd,
    )
