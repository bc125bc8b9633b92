"""Custom allowlists: terms and regexes whose matches are exempt from named categories.

A product name or an internal code word that a category flags (a false positive) is
allowlisted for that category in the directions where it occurs, instead of raising the
category's threshold for everyone. Admins manage lists through ``/v1/allowlists``
(``gateway.routes.allowlists``) and the dashboard's Allowlists page; the engine reads an
immutable, compiled :class:`AllowlistSnapshot` of the enabled lists once per batch
(``gateway.safety.allowlist`` says how a match becomes an exemption, and why adding an
allowlisted term to a harmful text does not get it through).

Storage
    One table, created by Alembic revision ``0005``: ``allowlists``, one row per list with
    a unique name, its terms, regexes, categories and directions (JSON arrays), whether
    it is enabled, the key id that created it, and when it was created and last
    updated. Ids are never reused (``AUTOINCREMENT`` on SQLite, a sequence on
    PostgreSQL) and every update bumps the row's ``revision``, so ``(count, max id, sum
    of ids, sum of revisions)`` changes with every write: the store's version, read in
    one cheap query.

Terms and regexes
    Exactly the blocklists' (``gateway.blocklists``): terms normalised and folded like
    every text and matched as whole words; regexes in RE2 syntax, case-insensitive, on
    the folded text, in time linear in the text. A pattern RE2 cannot compile, or one
    that matches the empty string, is refused with a 400 ``invalid_regex`` naming the
    field (``regexes.0``). A term is at most ``MAX_TERM_CHARS`` characters: longer
    matches are never masked.

Categories and directions
    Categories are the engine's thirteen (``gateway.safety.taxonomy.Category``); an
    allowlist exempts exactly the ones it names (``violence`` does not cover
    ``violence/graphic``). Directions are ``prompt`` and ``completion``. Shields are never
    exempt: a blocklist hit blocks whatever an allowlist says (blocklists win), and
    jailbreak, indirect attack, profanity and PII are judged as without allowlists.

Caching and replicas
    As the blocklists': ``snapshot()`` compiles the enabled lists once and caches them; a
    change made through this store drops the cache, and one made by another replica is
    picked up within ``refresh_s`` (``SAFEGATE_BLOCKLIST__REFRESH_S``, the same interval).
    If the table cannot be read when a check is due, ``snapshot()`` raises and the
    engine fails closed (the ``allowlist`` step fails like a member).

Errors are the API's (``gateway.errors``)::

    InvalidRequest   a bad name, term, regex, category or direction, or too many items
    NotFound         no allowlist of that name
    Conflict         an allowlist of that name exists

Nothing here logs a term or a pattern. The package: ``matching`` (the snapshot and its
hits; no database) and ``store`` (the table, the records, ``AllowlistStore``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from gateway.allowlists.matching import AllowlistHit, AllowlistSnapshot, Exempts
    from gateway.allowlists.store import (
        MAX_TERM_CHARS,
        MAX_TERMS_PER_LIST,
        Allowlist,
        AllowlistChange,
        AllowlistRow,
        AllowlistStore,
    )

__all__ = [
    "MAX_TERMS_PER_LIST",
    "MAX_TERM_CHARS",
    "Allowlist",
    "AllowlistChange",
    "AllowlistHit",
    "AllowlistRow",
    "AllowlistSnapshot",
    "AllowlistStore",
    "Exempts",
]

if not TYPE_CHECKING:
    __getattr__ = lazy_exports(
        __name__,
        {
            "matching": ("AllowlistHit", "AllowlistSnapshot", "Exempts"),
            "store": (
                "MAX_TERM_CHARS",
                "MAX_TERMS_PER_LIST",
                "Allowlist",
                "AllowlistChange",
                "AllowlistRow",
                "AllowlistStore",
            ),
        },
        exported=__all__,
    )
