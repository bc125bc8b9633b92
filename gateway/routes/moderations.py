"""``POST /v1/moderations``: OpenAI-compatible moderation by the safety engine."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from gateway.errors import InvalidRequest
from gateway.moderation import ModerationRequest, ModerationResponse, to_response
from gateway.safety.taxonomy import Direction
from gateway.state import AppState, app_state

router = APIRouter(tags=["moderations"])


@router.post("/v1/moderations")
async def create_moderation(
    body: ModerationRequest, state: Annotated[AppState, Depends(app_state)]
) -> ModerationResponse:
    texts = body.texts()
    limit = state.settings.max_moderation_inputs
    if len(texts) > limit:
        raise InvalidRequest(
            f"input has {len(texts)} items; at most {limit} are allowed per request",
            param="input",
            code="too_many_inputs",
        )
    verdicts = await state.batcher.check(texts, direction=Direction.PROMPT)
    return to_response(verdicts, model=body.model)
