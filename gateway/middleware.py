"""Pure ASGI middleware: request ids, access logs without content, body-size limit.

Content filtering is not middleware; it lives in the safety engine and the routes.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import error_body
from gateway.metrics import Metrics
from gateway.safety import contention

log = logging.getLogger("safegate.access")
REQUEST_ID_HEADER = b"x-request-id"
DEGRADED_HEADER = b"safegate-degraded"


class RequestContext:
    """Gives each request an id (or keeps a sane incoming one), logs its outcome and
    counts it in ``/metrics`` under its route's template (never the raw path)."""

    def __init__(
        self, app: ASGIApp, *, metrics: Metrics | None = None, degraded: tuple[str, ...] = ()
    ) -> None:
        self.app = app
        self.metrics = metrics
        # What is switched off by configuration (the encoder, say): every response says so.
        self.degraded = "; ".join(degraded).encode("latin-1", "replace")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(REQUEST_ID_HEADER, b"").decode("latin-1")
        request_id = (
            incoming if 0 < len(incoming) <= 64 and incoming.isprintable() else uuid.uuid4().hex
        )
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        contention.enter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.setdefault("headers", [])
                headers.append((REQUEST_ID_HEADER, request_id.encode()))
                if self.degraded:
                    headers.append((DEGRADED_HEADER, self.degraded))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            contention.leave()
            seconds = time.perf_counter() - started
            log.info(
                "request",
                extra={
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "latency_ms": round(seconds * 1000, 2),
                },
            )
            if self.metrics is not None:
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                self.metrics.observe_request(
                    route=route, method=scope["method"], status=status, seconds=seconds
                )


class BodySizeLimit:
    """Answers a request body over ``max_bytes`` with a 413 ``request_too_large``.

    A declared ``Content-Length`` over the limit is refused before the app runs. Otherwise
    (a chunked body, or a declared length the body outgrows) bytes are counted as the app
    receives them; the chunk that crosses the limit raises inside the app's ``receive``.
    Whatever the app makes of that (FastAPI turns a failed body read into its own 400),
    everything it sends afterwards is dropped and the client gets the 413. Should the app
    have started its response before the limit was crossed, the response is left
    unfinished, so the server closes the connection rather than pass a partial body off
    as complete.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        received = 0
        too_large = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            if too_large:  # the app asks again after the refusal: nothing more is read
                raise _BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if too_large:
                return  # the app's answer to a body it could not read: the 413 replaces it
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not too_large:
                raise
            # Raised because of the refused body (ours, or what the app made of it).
        if too_large and not started:
            await self._reject(send)

    async def _reject(self, send: Send) -> None:
        body = json.dumps(
            error_body(
                f"request body exceeds {self.max_bytes} bytes (SAFEGATE_MAX_BODY_BYTES)",
                type="invalid_request_error",
                code="request_too_large",
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass
