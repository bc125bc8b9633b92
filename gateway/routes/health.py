"""Liveness, readiness and Prometheus metrics: open to anyone, so they say little.

``/readyz`` gives the status (``loading``, ``ready`` or ``failed``), the members' names
when ready, and a failure's type and message without file paths; never settings or paths.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gateway.metrics import CONTENT_TYPE
from gateway.state import runtime

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and serving HTTP."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready only when every configured classifier has loaded."""
    held = runtime(request)
    state = held.state
    if state is None:
        error = held.error  # already path-free
        body = {"status": "failed", "error": error} if error else {"status": "loading"}
        return JSONResponse(body, status_code=503)
    members = [spec.classifier.id for spec in state.engine.members]
    ready: dict[str, object] = {"status": "ready", "members": members}
    degraded = state.settings.degraded()
    if degraded:
        ready["degraded"] = list(degraded)
    return JSONResponse(ready)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus metrics (``gateway.metrics``); open like the probes, no content in labels."""
    return Response(runtime(request).metrics.render(), media_type=CONTENT_TYPE)
