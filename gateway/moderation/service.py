"""One moderation request: its input limit, the engine's check, the audit records.

Every flagged input goes to the audit store (``source`` ``input[i]``, the request's model
or the default, the caller's key id and the ``safegate-origin`` it declared), with the
request's metadata; both are written before the response leaves, shielded from a client
that hangs up.
"""

from __future__ import annotations

import time

import anyio

from gateway.access import Principal
from gateway.audit import flagged_item, request_record
from gateway.errors import InvalidRequest
from gateway.moderation.schemas import ModerationRequest, ModerationResponse, to_response
from gateway.safety.taxonomy import Direction
from gateway.state import AppState
from gateway.tracing import audit_attributes, describe, stage

ROUTE = "moderations"


class ModerationService:
    """Moderation over the app's engine and audit store."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    async def moderate(
        self,
        body: ModerationRequest,
        *,
        principal: Principal,
        request_id: str,
        origin: str | None = None,
    ) -> ModerationResponse:
        started = time.perf_counter()
        texts = body.texts()
        limit = self.state.settings.max_moderation_inputs
        if len(texts) > limit:
            raise InvalidRequest(
                f"input has {len(texts)} items; at most {limit} are allowed per request",
                param="input",
                code="too_many_inputs",
            )
        sizes = {"safegate.texts": len(texts), "safegate.chars": sum(len(t) for t in texts)}
        with stage(self.state.tracer, "moderation_check", sizes) as span:
            verdicts = await self.state.batcher.check(texts, direction=Direction.PROMPT)
            describe(span, verdicts)
        checked = time.perf_counter()
        for verdict in verdicts:
            self.state.metrics.observe_verdict(verdict)
        response = to_response(verdicts, model=body.model)
        items = [
            flagged_item(
                verdict,
                text=text,
                request_id=request_id,
                key_id=principal.key_id,
                model=response.model,
                source=f"input[{index}]",
                origin=origin,
            )
            for index, (text, verdict) in enumerate(zip(texts, verdicts, strict=True))
            if verdict.flagged
        ]
        record = request_record(
            request_id=request_id,
            key_id=principal.key_id,
            model=response.model,
            route=ROUTE,
            status=200,
            items=items,
            latency_ms={
                "prompt_check": round((checked - started) * 1000, 3),
                "total": round((time.perf_counter() - started) * 1000, 3),
            },
            stream=False,
            origin=origin,
        )
        audit = audit_attributes(items, record)
        with stage(self.state.tracer, "audit", audit), anyio.CancelScope(shield=True):
            await self.state.audit.record(items, request=record)
        return response
