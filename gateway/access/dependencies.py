"""The FastAPI dependencies that admit a request: its key, its role, its rate limit.

``require(role)`` and ``require_by_method`` check the key a request presents against the
``KeyStore`` (``gateway.access.keys``), then its role, then take a token from the key's rate
limit; ``gateway.access`` tells the rules and the errors.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Awaitable, Callable, Iterable

from fastapi import Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers

from gateway.access.keys import (
    ANONYMOUS,
    CHALLENGE,
    KEY_PATTERN,
    Principal,
    Role,
    invalid_key,
)
from gateway.access.ratelimit import Limit
from gateway.errors import Forbidden, RateLimited, ServiceUnavailable, Unauthorized
from gateway.state import runtime

log = logging.getLogger("safegate.auth")

# Every dependency ``require`` and ``require_by_method`` made, for ``checks_key``.
_KEY_CHECKS: weakref.WeakSet[Callable[..., Awaitable[Principal]]] = weakref.WeakSet()


def require(role: Role, *more: Role) -> Callable[..., Awaitable[Principal]]:
    """A dependency: authenticate, check the role (any of those given), then rate limit.

    Usage: ``principal: Annotated[Principal, Depends(require(Role.DEVELOPER))]``, or
    ``dependencies=[Depends(require(Role.ADMIN))]`` on a route or router. Admin keys pass
    every role check. The principal is also left on ``request.state.principal``.
    """
    roles = (role, *more)

    async def principal_for(request: Request, response: Response) -> Principal:
        return await _admit(request, response, roles)

    _KEY_CHECKS.add(principal_for)
    return principal_for


def require_by_method(*, read: Role, write: Role) -> Callable[..., Awaitable[Principal]]:
    """Like ``require``: ``read`` for GET, HEAD and OPTIONS, ``write`` for anything else."""

    async def principal_for(request: Request, response: Response) -> Principal:
        safe = request.method in {"GET", "HEAD", "OPTIONS"}
        return await _admit(request, response, (read if safe else write,))

    _KEY_CHECKS.add(principal_for)
    return principal_for


def checks_key(dependency: object) -> bool:
    """Whether ``dependency`` is one that ``require`` or ``require_by_method`` made.

    The OpenAPI document (``gateway.openapi``) uses it to mark the routes that need a key.
    """
    return dependency in _KEY_CHECKS


async def _admit(request: Request, response: Response, roles: Iterable[Role]) -> Principal:
    wanted = tuple(roles)
    admitted: Principal | None = getattr(request.state, "principal", None)
    if admitted is not None:  # a router's and a route's ``require``: one key, one token
        _check_roles(admitted, wanted)
        return admitted
    held = runtime(request)
    settings, keys, limiter = held.settings, held.keys, held.limiter
    if not settings.auth.enabled:
        request.state.principal = ANONYMOUS
        return ANONYMOUS
    if keys is None or limiter is None:
        raise ServiceUnavailable(
            "authentication is not set up yet, so requests are refused (fail closed); "
            "retry shortly",
            code="auth_unavailable",
        )
    secret = presented_key(request.headers)
    if not KEY_PATTERN.fullmatch(secret):
        raise invalid_key()
    principal = keys.cached(secret)
    if principal is None:  # a database read: off the event loop
        principal = await run_in_threadpool(keys.authenticate, secret)
    _check_roles(principal, wanted)
    defaults = settings.rate_limit
    limit = Limit.of(principal.rate_limit_rpm or defaults.requests_per_minute, burst=defaults.burst)
    decision = await limiter.acquire(principal.key_id, limit)
    if not decision.allowed:
        log.info(
            "rate limited",
            extra={"key_id": principal.key_id, "retry_after_s": round(decision.retry_after_s, 3)},
        )
        raise RateLimited(
            f"Rate limit reached for key '{principal.name}': {limit.requests_per_minute} "
            f"requests per minute. Retry after {decision.retry_after_s:.1f} s.",
            retry_after_s=decision.retry_after_s,
            headers={
                "x-ratelimit-limit-requests": str(limit.requests_per_minute),
                "x-ratelimit-remaining-requests": "0",
            },
        )
    response.headers["x-ratelimit-limit-requests"] = str(limit.requests_per_minute)
    response.headers["x-ratelimit-remaining-requests"] = str(decision.remaining)
    request.state.principal = principal
    return principal


def _check_roles(principal: Principal, wanted: tuple[Role, ...]) -> None:
    if not any(principal.allows(role) for role in wanted):
        needed = " or ".join(f"'{role.value}'" for role in wanted)
        raise Forbidden(
            f"This route needs the {needed} role (or 'admin'); the key "
            f"'{principal.name}' has the '{principal.role.value}' role.",
            code="insufficient_role",
        )


def presented_key(headers: Headers) -> str:
    """The key from ``Authorization: Bearer KEY`` or Azure's ``api-key: KEY`` header."""
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise Unauthorized(
                "The Authorization header must be 'Bearer <your API key>'.",
                code="invalid_api_key",
                headers=CHALLENGE,
            )
        return credentials.strip()
    api_key = headers.get("api-key")
    if api_key is not None and api_key.strip():
        return api_key.strip()
    raise Unauthorized(
        "You didn't provide an API key. Send it in an 'Authorization: Bearer <key>' header "
        "(or an 'api-key' header); an admin creates keys with 'safegate keys create'.",
        code="missing_api_key",
        headers=CHALLENGE,
    )
