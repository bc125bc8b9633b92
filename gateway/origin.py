"""Where traffic comes from, as its caller says: the ``safegate-origin`` request header.

``safegate eval run`` sends ``safegate-origin: eval`` on every request it makes to the
gateway. The filtering routes (chat completions, moderations) keep the value on what they
write to the audit store, the flagged items and the request log (``origin``; ``None``
when a request did not say), so the review queue and the traffic page can leave eval
traffic out by default and show it on request, and filter by any origin.

An origin is 1 to ``ORIGIN_CHARS`` characters of ``a-z``, ``0-9``, ``.``, ``_`` and ``-``
starting with a letter or digit (``eval``, ``ci``, ``load-test``); the header is
case-insensitive and stored lower-cased. Any other value is refused with a 400
``invalid_origin`` naming the header, before any work, rather than stored or dropped.

It is a label the caller chooses, not a credential: any key may send it, and it changes
nothing about how a request is filtered, blocked or recorded, only where reviewers see
it by default. To see everything one key sent, whatever it said, filter by the key.
The routes read the header through ``gateway.routes.origin.Origin``; this module stays
free of FastAPI so the stores and the CLI can use it.
"""

from __future__ import annotations

import re
from typing import Final

from gateway.errors import InvalidRequest

ORIGIN_HEADER: Final = "safegate-origin"
EVAL_ORIGIN: Final = "eval"
ORIGIN_CHARS: Final = 32
_ORIGIN = re.compile(rf"[a-z0-9][a-z0-9._-]{{0,{ORIGIN_CHARS - 1}}}")


def is_origin(value: str) -> bool:
    """Whether ``value`` is a well-formed (lower-case) origin."""
    return _ORIGIN.fullmatch(value) is not None


def parse_origin(value: str | None, *, param: str = ORIGIN_HEADER) -> str | None:
    """The origin a header or query value names (lower-cased), or None when absent.

    Raises ``InvalidRequest`` (400 ``invalid_origin``, ``param`` named) when malformed.
    """
    if value is None:
        return None
    origin = value.strip().lower()
    if not is_origin(origin):
        shown = value if len(value) <= ORIGIN_CHARS + 8 else value[: ORIGIN_CHARS + 8] + "..."
        raise InvalidRequest(
            f"{param} must be 1 to {ORIGIN_CHARS} characters of a-z, 0-9, '.', '_' or '-' "
            f"(e.g. {EVAL_ORIGIN}), got {shown!r}",
            param=param,
            code="invalid_origin",
        )
    return origin
