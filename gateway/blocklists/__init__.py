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

The package: ``matching`` (tokens, the term trie, RE2 patterns, the snapshot and its hits;
no database), ``store`` (the tables, the records, ``BlocklistStore`` and its limits) and
``settings`` (the blocklist member's settings and the stores' refresh default).
Every public name is importable from ``gateway.blocklists``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from gateway.blocklists.matching import (
        MAX_HITS_PER_REGEX,
        REGEX_MAX_MEM_BYTES,
        BlocklistHit,
        BlocklistSnapshot,
        CompiledRegex,
        RegexMatch,
        RegexPattern,
        TermTrie,
        UnsupportedRegex,
        compile_regex,
        regex_spans,
        term_tokens,
    )
    from gateway.blocklists.settings import DEFAULT_REFRESH_S
    from gateway.blocklists.store import (
        MAX_DESCRIPTION_CHARS,
        MAX_ITEMS_PER_LIST,
        MAX_ITEMS_PER_REQUEST,
        MAX_NAME_CHARS,
        MAX_REGEX_CHARS,
        MAX_REGEXES_PER_LIST,
        MAX_VALUE_BYTES,
        MAX_VALUE_CHARS,
        NAME_PATTERN,
        Blocklist,
        BlocklistDetail,
        BlocklistItem,
        BlocklistItemRow,
        BlocklistRow,
        BlocklistStore,
        ItemKind,
        NewItem,
        check_name,
        checked_regex,
    )

__all__ = [
    "DEFAULT_REFRESH_S",
    "MAX_DESCRIPTION_CHARS",
    "MAX_HITS_PER_REGEX",
    "MAX_ITEMS_PER_LIST",
    "MAX_ITEMS_PER_REQUEST",
    "MAX_NAME_CHARS",
    "MAX_REGEXES_PER_LIST",
    "MAX_REGEX_CHARS",
    "MAX_VALUE_BYTES",
    "MAX_VALUE_CHARS",
    "NAME_PATTERN",
    "check_name",
    "REGEX_MAX_MEM_BYTES",
    "Blocklist",
    "BlocklistDetail",
    "BlocklistHit",
    "BlocklistItem",
    "BlocklistItemRow",
    "BlocklistRow",
    "BlocklistSnapshot",
    "BlocklistStore",
    "CompiledRegex",
    "ItemKind",
    "NewItem",
    "RegexMatch",
    "RegexPattern",
    "TermTrie",
    "UnsupportedRegex",
    "checked_regex",
    "compile_regex",
    "regex_spans",
    "term_tokens",
]

if not TYPE_CHECKING:
    __getattr__ = lazy_exports(
        __name__,
        {
            "matching": (
                "MAX_HITS_PER_REGEX",
                "REGEX_MAX_MEM_BYTES",
                "BlocklistHit",
                "BlocklistSnapshot",
                "CompiledRegex",
                "RegexMatch",
                "RegexPattern",
                "TermTrie",
                "UnsupportedRegex",
                "compile_regex",
                "regex_spans",
                "term_tokens",
            ),
            "settings": ("DEFAULT_REFRESH_S",),
            "store": (
                "MAX_DESCRIPTION_CHARS",
                "MAX_ITEMS_PER_LIST",
                "MAX_ITEMS_PER_REQUEST",
                "MAX_NAME_CHARS",
                "MAX_REGEX_CHARS",
                "MAX_REGEXES_PER_LIST",
                "MAX_VALUE_BYTES",
                "MAX_VALUE_CHARS",
                "NAME_PATTERN",
                "Blocklist",
                "BlocklistDetail",
                "BlocklistItem",
                "BlocklistItemRow",
                "BlocklistRow",
                "BlocklistStore",
                "ItemKind",
                "NewItem",
                "check_name",
                "checked_regex",
            ),
        },
        exported=__all__,
    )
