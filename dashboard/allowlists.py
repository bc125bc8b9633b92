"""The allowlists page's data and actions, over the gateway's ``AllowlistStore``.

Reading is for any signed-in key; creating, enabling, disabling and deleting lists is
admin's, as in ``/v1/allowlists``, and a list keeps the key id that created it. The store
validates (RE2 patterns, the engine's categories, the two directions) and its errors
(``gateway.errors.ApiError``) carry messages fit to show.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dashboard.access import can_edit_lists
from gateway.access import Principal
from gateway.allowlists import Allowlist, AllowlistChange, AllowlistStore
from gateway.errors import Forbidden

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = (
    "name",
    "enabled",
    "categories",
    "directions",
    "terms",
    "regexes",
    "created_by",
    "created_at",
    "updated_at",
)


def table(store: AllowlistStore) -> pd.DataFrame:
    """One row per allowlist, by name; lists of values joined with ', '."""
    import pandas as pd

    rows = [
        {
            "name": allowlist.name,
            "enabled": allowlist.enabled,
            "categories": ", ".join(category.value for category in allowlist.categories),
            "directions": ", ".join(direction.value for direction in allowlist.directions),
            "terms": ", ".join(allowlist.terms),
            "regexes": ", ".join(allowlist.regexes),
            "created_by": allowlist.created_by,
            "created_at": allowlist.created_at,
            "updated_at": allowlist.updated_at,
        }
        for allowlist in store.list()
    ]
    return pd.DataFrame(rows, columns=list(COLUMNS))


def lines(text: str) -> list[str]:
    """The non-blank lines of a text area (a term or a pattern each)."""
    return [line for line in text.splitlines() if line.strip()]


def create(
    store: AllowlistStore,
    *,
    name: str,
    terms: str,
    regexes: str,
    categories: list[str],
    directions: list[str],
    principal: Principal,
) -> Allowlist:
    """Create a list from the form's text areas (one term or regex per line)."""
    _check_admin(principal)
    return store.create(
        name.strip(),
        terms=lines(terms),
        regexes=[line.strip() for line in lines(regexes)],
        categories=categories,
        directions=directions,
        created_by=principal.key_id,
    )


def set_enabled(
    store: AllowlistStore, name: str, *, enabled: bool, principal: Principal
) -> Allowlist:
    _check_admin(principal)
    return store.update(name, AllowlistChange(enabled=enabled))


def delete(store: AllowlistStore, name: str, *, principal: Principal) -> Allowlist:
    _check_admin(principal)
    return store.delete(name)


def _check_admin(principal: Principal) -> None:
    if not can_edit_lists(principal):
        raise Forbidden("changing allowlists needs an admin key", code="insufficient_role")
