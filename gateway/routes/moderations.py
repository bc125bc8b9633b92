"""``POST /v1/moderations``: OpenAI-compatible moderation by the safety engine.

The route parses, calls ``gateway.moderation.service.ModerationService`` (the check and
the audit records) and returns its response.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from gateway.access import Principal
from gateway.errors import ServiceUnavailable
from gateway.moderation import ModerationRequest, ModerationResponse
from gateway.moderation.service import ModerationService
from gateway.routes.origin import Origin
from gateway.state import AppState, app_state

router = APIRouter(tags=["moderations"])


@router.post("/v1/moderations")
async def create_moderation(
    body: ModerationRequest,
    request: Request,
    state: Annotated[AppState, Depends(app_state)],
    origin: Origin,
) -> ModerationResponse:
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None:  # mounted without ``require``: refuse rather than audit no one
        raise ServiceUnavailable(
            "authentication is not set up for this route; requests are refused (fail closed)",
            code="auth_unavailable",
        )
    return await ModerationService(state).moderate(
        body, principal=principal, request_id=request.state.request_id, origin=origin
    )
