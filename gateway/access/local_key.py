"""The first start's key: with no keys at all, a developer key written to a private file.

``make run`` needs a key before anyone has made one: ``safegate serve`` creates it once
(``gateway.access.cli.announce_local_key``), readable by the owner only, so the README's
examples work at once.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from gateway.access.keys import KeyStore, Role
from gateway.errors import Conflict

log = logging.getLogger("safegate.auth")

LOCAL_KEY_NAME = "local-developer"
LOCAL_KEY_FILE = "local-developer.key"


def local_key_path(home: Path) -> Path:
    return home / LOCAL_KEY_FILE


def ensure_local_key(store: KeyStore, home: Path) -> str | None:
    """On a first start (no keys at all), create a developer key and keep it in a file.

    Returns the new key, written to ``<home>/local-developer.key`` (mode 0600), or
    ``None`` when the table already holds a key (revoked ones count: an admin who revoked
    every key gets no new one behind their back) or another process created one first.
    """
    if store.count():
        return None
    try:
        issued = store.create(LOCAL_KEY_NAME, Role.DEVELOPER)
    except Conflict:  # another replica starting at the same moment
        return None
    try:
        write_private(local_key_path(home), issued.secret + "\n")
    except OSError:
        store.revoke(issued.key.id)  # nobody could ever read it: do not leave it live
        raise
    log.info("local developer key created", extra={"key_id": issued.key.id})
    return issued.secret


def write_private(path: Path, content: str) -> None:
    """Write ``content`` readable by the owner only, replacing ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
