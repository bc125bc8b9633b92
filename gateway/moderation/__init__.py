"""``POST /v1/moderations``: OpenAI's moderation API over the safety engine.

- ``schemas``: the request and the response, OpenAI's fields with safegate's detail beside.
- ``service``: one request from its input limit to its audit records (``ModerationService``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from gateway.moderation.schemas import (
        DEFAULT_MODEL_NAME,
        ModerationRequest,
        ModerationResponse,
        ModerationResult,
        to_response,
        to_result,
    )

__all__ = [
    "DEFAULT_MODEL_NAME",
    "ModerationRequest",
    "ModerationResponse",
    "ModerationResult",
    "to_response",
    "to_result",
]

if not TYPE_CHECKING:
    __getattr__ = lazy_exports(
        __name__,
        {
            "schemas": (
                "DEFAULT_MODEL_NAME",
                "ModerationRequest",
                "ModerationResponse",
                "ModerationResult",
                "to_response",
                "to_result",
            ),
        },
        exported=__all__,
    )
