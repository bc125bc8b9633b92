"""The gateway's exceptions and the one place that maps them to OpenAI-style errors.

Every error leaves the service as ``{"error": {"message", "type", "param", "code"}}``
with a 4xx or 5xx status; no traceback and no request text ever reaches the body::

    ApiError                      status  type
     +-- InvalidRequest           400     invalid_request_error
     |    +-- InputTooLarge       413     invalid_request_error
     +-- Unauthorized             401     authentication_error
     +-- Forbidden                403     permission_error
     +-- NotFound                 404     not_found_error
     +-- Conflict                 409     conflict_error
     +-- RateLimited              429     requests
     |    +-- Overloaded          429     server_error
     |    +-- QuotaExceeded       429     insufficient_quota
     +-- ServiceUnavailable       503     service_unavailable

An error may carry response headers: ``RateLimited`` (and so ``Overloaded``) sets
``Retry-After`` (whole seconds, rounded up), ``Unauthorized`` may set
``WWW-Authenticate``. ``requests`` is the type OpenAI's own 429 for a request-rate limit
carries; ``Overloaded`` is the service's load, not the caller's rate, hence
``server_error``; ``QuotaExceeded`` is a key's token quota or budget used up
(``gateway.access.quotas``), ``insufficient_quota`` as OpenAI types its own, with ``Retry-After``
at the quota's reset.

The engine's ``InputTooLong`` maps to 400; its ``EngineOverloaded`` (the safety engine's
queue is full) to ``Overloaded``, 429 ``engine_overloaded`` with the queue's estimate as
``Retry-After``, at once rather than after a wait that would end in a fail-closed 503.
FastAPI's validation errors and broken JSON map to 400, anything unexpected to a 500
whose body says only that an error occurred and gives the request id to look up in the
logs. ``without_paths`` strips file paths from an
error message that leaves the service (``/readyz``, the 503 of a failed engine): the
full message goes to the log only.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from gateway.safety.engine import EngineOverloaded, InputTooLong

if TYPE_CHECKING:
    from fastapi import FastAPI, Request

log = logging.getLogger("safegate.errors")


class ApiError(Exception):
    status = 400
    type = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers: dict[str, str] = dict(headers or {})


class InvalidRequest(ApiError):
    pass


class InputTooLarge(InvalidRequest):
    status = 413


class Unauthorized(ApiError):
    status = 401
    type = "authentication_error"


class Forbidden(ApiError):
    status = 403
    type = "permission_error"


class NotFound(ApiError):
    status = 404
    type = "not_found_error"


class Conflict(ApiError):
    status = 409
    type = "conflict_error"


class RateLimited(ApiError):
    """Too many requests; ``Retry-After`` says in how many seconds to try again."""

    status = 429
    type = "requests"

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float,
        param: str | None = None,
        code: str | None = "rate_limit_exceeded",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.retry_after_s = retry_after_s
        seconds = str(max(1, math.ceil(retry_after_s)))
        super().__init__(
            message, param=param, code=code, headers={**(headers or {}), "Retry-After": seconds}
        )


class Overloaded(RateLimited):
    """The service has more work queued than it takes; retry after ``Retry-After``."""

    type = "server_error"

    @classmethod
    def from_engine(cls, error: EngineOverloaded) -> Overloaded:
        return cls(str(error), retry_after_s=error.retry_after_s, code="engine_overloaded")


class QuotaExceeded(RateLimited):
    """A key's token quota or budget is used up until its window resets (``Retry-After``)."""

    type = "insufficient_quota"


class ServiceUnavailable(ApiError):
    status = 503
    type = "service_unavailable"


PATH_PLACEHOLDER = "<path>"
# A token (between spaces, quotes and brackets) with a slash or backslash in it: absolute,
# relative and home paths, and URLs, which may name internal hosts.
_PATH_TOKEN = re.compile(r"""[^\s'"`()\[\]{}<>,;]*[/\\][^\s'"`()\[\]{}<>,;]*""")


def without_paths(message: str) -> str:
    """``message`` with every path-like token replaced by ``<path>``."""

    def replace(match: re.Match[str]) -> str:
        token = match.group()
        kept = token.rstrip(".:")  # a sentence's or a clause's end stays
        return PATH_PLACEHOLDER + token[len(kept) :]

    return _PATH_TOKEN.sub(replace, message)


def public_error(error: BaseException) -> str:
    """What a client may read about an internal failure: its type and message, no paths."""
    return f"{type(error).__name__}: {without_paths(str(error))}"


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, dict[str, str | None]]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _is_type_tag(part: object) -> bool:
    return isinstance(part, str) and ("[" in part or part in _TYPE_TAGS)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every failure into an OpenAI-style body."""
    # FastAPI loads here, with the app: code that only raises these errors (``safegate
    # keys``) does not import the web stack.
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    def _response(
        status: int,
        body: dict[str, dict[str, str | None]],
        headers: Mapping[str, str] | None = None,
    ) -> JSONResponse:
        return JSONResponse(status_code=status, content=body, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _response(
            exc.status,
            error_body(exc.message, type=exc.type, param=exc.param, code=exc.code),
            exc.headers,
        )

    @app.exception_handler(InputTooLong)
    async def _too_long(request: Request, exc: InputTooLong) -> JSONResponse:
        return _response(
            400,
            error_body(
                str(exc), type="invalid_request_error", param="input", code="input_too_long"
            ),
        )

    @app.exception_handler(EngineOverloaded)
    async def _overloaded(request: Request, exc: EngineOverloaded) -> JSONResponse:
        log.warning(
            "safety engine overloaded",
            extra={
                "request_id": getattr(request.state, "request_id", None),
                "characters": exc.characters,
                "pending_chars": exc.pending,
                "retry_after_s": round(exc.retry_after_s, 1),
            },
        )
        error = Overloaded.from_engine(exc)
        return _response(
            error.status,
            error_body(error.message, type=error.type, param=error.param, code=error.code),
            error.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = list(first.get("loc", ()))
        if loc and loc[0] in ("body", "query", "path", "header"):  # where, not which field
            loc = loc[1:]
        # Union members show up in the location as type tags ("str",
        # "function-after[_valid_unicode(), str]", "list[ContentPart]"): the client named
        # a field, so the param names only fields and indexes.
        location = [str(part) for part in loc if not _is_type_tag(part)]
        param = ".".join(location) or None
        if first.get("type") == "json_invalid":
            position = first.get("ctx", {}).get("error", "")
            message = f"the request body is not valid JSON ({position})".replace(" ()", "")
            code = "invalid_json"
            param = None
        else:
            detail = first.get("msg", "invalid request")
            message = f"{param}: {detail}" if param else str(detail)
            code = "invalid_value"
        return _response(
            400, error_body(message, type="invalid_request_error", param=param, code=code)
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _response(exc.status_code, error_body(str(exc.detail), type=kind))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", None)
        log.exception("unhandled error", extra={"request_id": request_id})
        message = f"internal error; request id {request_id}" if request_id else "internal error"
        return _response(500, error_body(message, type="server_error"))
