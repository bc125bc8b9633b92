"""Who may see the dashboard: a reviewer or admin API key, checked by the gateway's key store.

Flagged text is sensitive, so no page shows anything until a key is entered and
:func:`sign_in` accepts it: a key of role ``reviewer`` or ``admin`` that is neither unknown
nor revoked (``KeyStore.authenticate``). Pages check it again on every rerun, so a key
revoked meanwhile stops working within the store's cache time. What a signed-in reviewer
may change: labels (recorded with the key's id). Adding a term to a blocklist is admin's,
as in the review API.

First start (``safegate dashboard``): :func:`ensure_reviewer_key` makes a ``reviewer`` key
and keeps it in ``SAFEGATE_HOME/local-reviewer.key`` (0600) when the database has no
active reviewer or admin key at all, so a new user can sign in at once. Once such a key
exists, none is made behind an admin's back.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

from gateway.access import KeyStore, Principal, Role, write_private
from gateway.errors import ApiError, Conflict

log = logging.getLogger("safegate.dashboard")

LOCAL_REVIEWER_NAME = "local-reviewer"
LOCAL_REVIEWER_FILE = "local-reviewer.key"
ALLOWED_ROLES = (Role.REVIEWER, Role.ADMIN)


class SignInError(Exception):
    """The key cannot open the dashboard; the message says why and what to do."""


def sign_in(keys: KeyStore, secret: str) -> Principal:
    """The principal for ``secret`` if it may use the dashboard; ``SignInError`` if not."""
    secret = secret.strip()
    if not secret:
        raise SignInError("enter a reviewer or admin API key")
    try:
        principal = keys.authenticate(secret)
    except ApiError as error:  # Unauthorized (unknown, malformed, revoked), ServiceUnavailable
        raise SignInError(error.message) from None
    if principal.role not in ALLOWED_ROLES:
        raise SignInError(
            f"this is a {principal.role.value} key; the dashboard needs a reviewer or admin "
            "key (safegate keys create --name NAME --role reviewer)"
        )
    return principal


def can_edit_lists(principal: Principal) -> bool:
    """Whether ``principal`` may change blocklists and allowlists: admins only, as in the API."""
    return principal.allows(Role.ADMIN)


@dataclass(frozen=True, slots=True)
class LocalKey:
    """Where the local reviewer key is, and the key itself when this call created it."""

    path: Path
    created: str | None


def local_reviewer_key_path(home: Path) -> Path:
    return home / LOCAL_REVIEWER_FILE


def ensure_reviewer_key(keys: KeyStore, home: Path) -> LocalKey | None:
    """Make the first-start reviewer key unless a reviewer or admin key exists.

    Returns where the local key is (and the new key when one was made), or ``None`` when
    keys of those roles exist but none is kept locally.
    """
    path = local_reviewer_key_path(home)
    if path.exists():
        return LocalKey(path=path, created=None)
    if any(key.active and key.role in ALLOWED_ROLES for key in keys.list()):
        return None
    try:
        issued = keys.create(LOCAL_REVIEWER_NAME, Role.REVIEWER)
    except Conflict:  # a revoked-then-recreated name or a concurrent start
        issued = keys.create(f"{LOCAL_REVIEWER_NAME}-{secrets.token_hex(3)}", Role.REVIEWER)
    try:
        write_private(path, issued.secret + "\n")
    except OSError:
        keys.revoke(issued.key.id)  # nobody could read it: do not leave it live
        raise
    log.info("local reviewer key created", extra={"key_id": issued.key.id})
    return LocalKey(path=path, created=issued.secret)
