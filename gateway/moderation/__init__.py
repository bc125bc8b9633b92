"""``POST /v1/moderations``: OpenAI's moderation API over the safety engine.

- ``schemas``: the request and the response, OpenAI's fields with safegate's detail beside.
- ``service``: one request from its input limit to its audit records (``ModerationService``).
"""

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
