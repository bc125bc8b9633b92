"""``POST /v1/moderations``: OpenAI-compatible moderation by the safety engine.

Every flagged input goes to the audit store (``source`` ``input[i]``, the request's model
or the default, the caller's key id and the ``safegate-origin`` it declared), with the
request's metadata; both are written before the response leaves, shielded from a client
that hangs up.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Request

from gateway.audit import RequestRecord, flagged_item
from gateway.auth import Principal
from gateway.errors import InvalidRequest, ServiceUnavailable
from gateway.moderation import ModerationRequest, ModerationResponse, to_response
from gateway.routes.origin import Origin
from gateway.safety.taxonomy import Direction
from gateway.safety.verdict import Verdict
from gateway.state import AppState, app_state

router = APIRouter(tags=["moderations"])
ROUTE = "moderations"


@router.post("/v1/moderations")
async def create_moderation(
    body: ModerationRequest,
    request: Request,
    state: Annotated[AppState, Depends(app_state)],
    origin: Origin,
) -> ModerationResponse:
    started = time.perf_counter()
    texts = body.texts()
    limit = state.settings.max_moderation_inputs
    if len(texts) > limit:
        raise InvalidRequest(
            f"input has {len(texts)} items; at most {limit} are allowed per request",
            param="input",
            code="too_many_inputs",
        )
    verdicts = await state.batcher.check(texts, direction=Direction.PROMPT)
    for verdict in verdicts:
        state.metrics.observe_verdict(verdict)
    checked = time.perf_counter()
    response = to_response(verdicts, model=body.model)
    await _audit(
        request,
        state,
        texts,
        verdicts,
        model=response.model,
        origin=origin,
        started=started,
        checked=checked,
    )
    return response


async def _audit(
    request: Request,
    state: AppState,
    texts: Sequence[str],
    verdicts: Sequence[Verdict],
    *,
    model: str,
    origin: str | None,
    started: float,
    checked: float,
) -> None:
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None:  # mounted without ``require``: refuse rather than audit no one
        raise ServiceUnavailable(
            "authentication is not set up for this route; requests are refused (fail closed)",
            code="auth_unavailable",
        )
    request_id: str = request.state.request_id
    items = [
        flagged_item(
            verdict,
            text=text,
            request_id=request_id,
            key_id=principal.key_id,
            model=model,
            source=f"input[{index}]",
            origin=origin,
        )
        for index, (text, verdict) in enumerate(zip(texts, verdicts, strict=True))
        if verdict.flagged
    ]
    categories = sorted({category for item in items for category in item.categories})
    record = RequestRecord(
        request_id=request_id,
        key_id=principal.key_id,
        model=model,
        route=ROUTE,
        status=200,
        blocked=None,
        categories=tuple(categories),
        latency_ms={
            "prompt_check": round((checked - started) * 1000, 3),
            "total": round((time.perf_counter() - started) * 1000, 3),
        },
        prompt_tokens=None,
        completion_tokens=None,
        stream=False,
        origin=origin,
    )
    with anyio.CancelScope(shield=True):
        await state.audit.record(items, request=record)
