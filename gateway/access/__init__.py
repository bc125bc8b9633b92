"""Who may call the gateway, and how much: API keys, roles and the ``require(role)``
dependency that guards every filtering route, with rate limits, per-key policies, token
quotas and usage, and the ``safegate keys`` CLI.

Keys
    A key is ``sg-`` followed by 43 URL-safe characters (``secrets.token_urlsafe(32)``,
    256 random bits). It is shown once, when it is created; the ``api_keys`` table
    (Alembic revision ``0002``) keeps only its SHA-256 and a display prefix (``sg-`` and
    the next 8 characters, which leaves 208 unknown random bits). A plain SHA-256 is
    enough here, unlike for passwords: a slow, salted hash (bcrypt, argon2) exists to make
    guessing low-entropy secrets expensive, and 256 random bits cannot be guessed at any
    speed, so the fast hash gives nothing away while letting the store find a key by an
    indexed equality lookup on its hash. The stored hash is compared once more with
    ``hmac.compare_digest`` before it is trusted.

Names
    A key's name is 1 to 64 letters, digits, ``_``, ``.`` or ``-``, unique among the
    keys that are not revoked (a partial unique index), so a rotated key can take the
    name of the one it replaces. Ids (``key_`` + 24 hex characters) are what ``revoke``
    takes and what logs and the audit store carry; the secret is never logged.

Roles
    ``admin`` may do everything; ``developer`` may send requests to filter
    (``/v1/moderations``, chat completions); ``reviewer`` may read blocklists and review
    flagged content. A key may carry a ``policy`` name (its requests are filtered by
    ``<name>.yaml``), its own ``rate_limit_rpm`` (else the service's default) and token
    quotas and a budget (``gateway.access.quotas.Quota``, on the principal as ``quota``), which
    ``set_quota`` changes; servers apply a change within ``cache_ttl_s``.

Caching and replicas
    ``authenticate`` caches a valid key for ``cache_ttl_s`` (``SAFEGATE_AUTH__CACHE_TTL_S``,
    5 s by default), so a busy key costs one indexed read per ``cache_ttl_s`` per replica.
    ``revoke`` through a store drops that store's cache at once (a lookup racing the revoke
    cannot put the key back), so the revoke takes effect immediately on the replica that
    made it; other replicas, and a server running beside the ``safegate keys revoke``
    command, refuse the key within ``cache_ttl_s``. ``last_used_at`` is written at most
    once every ``touch_interval_s`` (60 s) per key and replica, never on a cache hit.

When the key store cannot be reached
    A key whose last successful check is less than ``outage_grace_s`` old
    (``SAFEGATE_AUTH__OUTAGE_GRACE_S``, 300 s by default; 0 turns this off) keeps working
    when, and only when, the lookup fails because the database cannot be reached: a
    connection or operational error (``OperationalError``, ``InterfaceError``, a statement
    cancelled by its timeout) or no pooled connection in time (``TimeoutError``). Such a
    stale admission is logged (key id, age and error class; never the key) and counted
    (``on_stale``, the ``safegate_auth_stale_admissions_total`` metric); it re-arms the
    entry for at most ``cache_ttl_s``, so the database is tried again once per
    ``cache_ttl_s`` per key and replica, never on every request. An answer from the
    database always wins: an unknown or revoked key is refused and dropped from the cache,
    and refusals are never cached, so they are never served stale. Other database errors
    (a missing table, bad data) admit nothing. A key that cannot be checked (never seen by
    this replica, or checked more than ``outage_grace_s`` ago) gets a 503
    ``key_store_unavailable`` with ``Retry-After``, never a 401: the key may well be valid.
    So a key revoked while a replica could not reach the database is refused by that
    replica within ``cache_ttl_s`` of the database coming back, and no key outlives its
    last check by more than ``outage_grace_s``.

Disabled authentication
    With ``SAFEGATE_AUTH__ENABLED=false`` every request is an anonymous admin and no
    per-key rate limit applies: anyone who can reach the port can change blocklists and
    read flagged content. Only for a service bound to localhost or behind a gateway that
    authenticates on its own.

Errors are the API's (``gateway.errors``)::

    Unauthorized        401  missing_api_key, invalid_api_key (unknown, malformed or revoked)
    Forbidden           403  insufficient_role (the message names the role needed)
    RateLimited         429  rate_limit_exceeded, with Retry-After
    ServiceUnavailable  503  key_store_unavailable (with Retry-After), auth_unavailable,
                             rate_limiter_unavailable
    InvalidRequest      400  a bad name, role, policy or rate limit on create
    NotFound            404  key_not_found;  Conflict 409  key_name_exists

The package: ``keys`` (roles, principals, the table and ``KeyStore``; no FastAPI, so
``safegate keys`` imports it without the web stack), ``local_key`` (the first start's
developer key in a private file), ``dependencies`` (``require``, ``require_by_method``,
``checks_key``, ``presented_key``), ``ratelimit`` (per-key token buckets, in process or in
Redis), ``policies`` (a key's policy file), ``quotas`` and ``usage`` (token quotas and
budgets, and the usage report), ``cli`` (``safegate keys``), ``settings`` (the auth, rate
limit and quota settings and their defaults). The names of ``keys``, ``local_key`` and
``dependencies`` are importable from ``gateway.access``, which imports each one's module
when it is first asked for (``gateway.lazy_exports``): importing ``gateway.access.settings``
loads no key store, and importing the key store loads no FastAPI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from gateway.access.dependencies import checks_key, presented_key, require, require_by_method
    from gateway.access.keys import (
        ANONYMOUS,
        ANONYMOUS_KEY_ID,
        DEFAULT_CACHE_MAX_ENTRIES,
        DEFAULT_TOUCH_INTERVAL_S,
        DISPLAY_PREFIX_CHARS,
        KEY_PATTERN,
        KEY_PREFIX,
        KEY_RANDOM_BYTES,
        KEY_STORE_RETRY_AFTER_S,
        NAME_PATTERN,
        POLICY_PATTERN,
        ApiKey,
        ApiKeyRow,
        IssuedKey,
        KeyStore,
        Principal,
        Role,
    )
    from gateway.access.local_key import (
        LOCAL_KEY_FILE,
        LOCAL_KEY_NAME,
        ensure_local_key,
        local_key_path,
        write_private,
    )
    from gateway.access.settings import DEFAULT_CACHE_TTL_S, DEFAULT_OUTAGE_GRACE_S

__all__ = [
    "ANONYMOUS",
    "ANONYMOUS_KEY_ID",
    "DEFAULT_CACHE_MAX_ENTRIES",
    "DEFAULT_CACHE_TTL_S",
    "DEFAULT_OUTAGE_GRACE_S",
    "DEFAULT_TOUCH_INTERVAL_S",
    "DISPLAY_PREFIX_CHARS",
    "KEY_PATTERN",
    "KEY_PREFIX",
    "KEY_RANDOM_BYTES",
    "KEY_STORE_RETRY_AFTER_S",
    "LOCAL_KEY_FILE",
    "LOCAL_KEY_NAME",
    "NAME_PATTERN",
    "POLICY_PATTERN",
    "ApiKey",
    "ApiKeyRow",
    "IssuedKey",
    "KeyStore",
    "Principal",
    "Role",
    "checks_key",
    "ensure_local_key",
    "local_key_path",
    "presented_key",
    "require",
    "require_by_method",
    "write_private",
]

if not TYPE_CHECKING:
    __getattr__ = lazy_exports(
        __name__,
        {
            "keys": (
                "ANONYMOUS",
                "ANONYMOUS_KEY_ID",
                "DEFAULT_CACHE_MAX_ENTRIES",
                "DEFAULT_TOUCH_INTERVAL_S",
                "DISPLAY_PREFIX_CHARS",
                "KEY_PATTERN",
                "KEY_PREFIX",
                "KEY_RANDOM_BYTES",
                "KEY_STORE_RETRY_AFTER_S",
                "NAME_PATTERN",
                "POLICY_PATTERN",
                "ApiKey",
                "ApiKeyRow",
                "IssuedKey",
                "KeyStore",
                "Principal",
                "Role",
            ),
            "local_key": (
                "LOCAL_KEY_FILE",
                "LOCAL_KEY_NAME",
                "ensure_local_key",
                "local_key_path",
                "write_private",
            ),
            "settings": ("DEFAULT_CACHE_TTL_S", "DEFAULT_OUTAGE_GRACE_S"),
            "dependencies": ("checks_key", "presented_key", "require", "require_by_method"),
        },
        exported=__all__,
    )
