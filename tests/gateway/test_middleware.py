"""The request-context middleware counts the requests in flight, which the encoder reads
to size its threads (``gateway.safety.contention``)."""

from __future__ import annotations

import asyncio

import pytest
from starlette.types import Message, Receive, Scope, Send

from gateway.middleware import RequestContext
from gateway.safety import contention


def _scope() -> Scope:
    return {"type": "http", "method": "POST", "path": "/v1/moderations", "headers": []}


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: Message) -> None:
    return None


def test_requests_in_flight_are_counted_while_they_run_and_released_when_they_fail() -> None:
    seen: list[int] = []
    release = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(contention.in_flight())
        if scope["path"] == "/boom":
            raise RuntimeError("the route failed")
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    middleware = RequestContext(app)

    async def main() -> None:
        first = asyncio.create_task(middleware(_scope(), _receive, _send))
        second = asyncio.create_task(middleware(_scope(), _receive, _send))
        await asyncio.sleep(0.01)
        assert contention.in_flight() == 2
        assert contention.busy()
        release.set()
        await asyncio.gather(first, second)
        assert contention.in_flight() == 0
        with pytest.raises(RuntimeError, match="the route failed"):
            await middleware({**_scope(), "path": "/boom"}, _receive, _send)
        assert contention.in_flight() == 0

    asyncio.run(main())
    assert seen == [1, 2, 1]
