"""The ``safegate-origin`` header as a typed route dependency (see ``gateway.origin``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header

from gateway.origin import ORIGIN_HEADER, parse_origin


async def request_origin(
    origin: Annotated[
        str | None,
        Header(
            alias=ORIGIN_HEADER,
            description="where this traffic comes from (e.g. 'eval'); recorded, not trusted",
        ),
    ] = None,
) -> str | None:
    return parse_origin(origin)


Origin = Annotated[str | None, Depends(request_origin)]
