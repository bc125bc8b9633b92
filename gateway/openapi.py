"""The OpenAPI document, made to promise what the service sends.

FastAPI documents a 422 ``HTTPValidationError`` on every route that validates input, but
safegate answers bad input with a 400 and an OpenAI-style body (``gateway.errors``).
``SafegateAPI.openapi()`` replaces those 422s and documents, with the ``Error`` schema:

    400  every route that validates a body, query or path
    401  403  429  every route behind a key (with the two ways to send one)
    404  every route whose path names something
    413  every route that reads a body (``SAFEGATE_MAX_BODY_BYTES``)
    503  every route behind a key or the loaded engine

The document is served only when ``SAFEGATE_API_DOCS=true``, behind a key
(``gateway.routes.docs``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from fastapi import FastAPI, routing
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from gateway.access import checks_key
from gateway.state import app_state

ERROR_SCHEMA = "Error"
ERROR_REF = f"#/components/schemas/{ERROR_SCHEMA}"
_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")
_NULLABLE_STRING = {"anyOf": [{"type": "string"}, {"type": "null"}]}

ERROR_SCHEMA_BODY: dict[str, Any] = {
    "title": ERROR_SCHEMA,
    "description": "Every error safegate sends, as OpenAI sends errors.",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {
                    "type": "string",
                    "examples": ["invalid_request_error", "authentication_error"],
                },
                "param": {**_NULLABLE_STRING, "description": "the request field at fault"},
                "code": {**_NULLABLE_STRING, "examples": ["invalid_value", "request_too_large"]},
            },
        }
    },
}

BEARER_SCHEME = "bearer"
AZURE_SCHEME = "api-key"
SECURITY_SCHEMES: dict[str, Any] = {
    BEARER_SCHEME: {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer sg-...` (made by `safegate keys create`)",
    },
    AZURE_SCHEME: {
        "type": "apiKey",
        "in": "header",
        "name": "api-key",
        "description": "Azure OpenAI's header, the same key",
    },
}

_DESCRIPTIONS = {
    "400": "Bad request: invalid JSON, a field's value or a limit (OpenAI-style error)",
    "401": "No key, or an unknown, malformed or revoked one",
    "403": "The key's role may not use this route",
    "404": "Nothing of that name or id",
    "413": "The body is over SAFEGATE_MAX_BODY_BYTES (`request_too_large`)",
    "429": "The key's rate limit is reached; `Retry-After` says when to retry",
    "503": "Not ready or failing closed: the engine, the key store or the rate limiter",
}


class SafegateAPI(FastAPI):
    """FastAPI whose OpenAPI document has safegate's error responses (no 422)."""

    _documented: dict[str, Any] | None = None

    def openapi(self) -> dict[str, Any]:
        document = super().openapi()  # cached by FastAPI until the routes change
        if document is not self._documented:
            self._documented = document_errors(document, self.routes)
        return document


def document_errors(document: dict[str, Any], routes: Sequence[BaseRoute]) -> dict[str, Any]:
    """Rewrite ``document`` (FastAPI's) in place so its responses match the service's."""
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in _VALIDATION_SCHEMAS:
        schemas.pop(name, None)
    schemas[ERROR_SCHEMA] = ERROR_SCHEMA_BODY
    components["securitySchemes"] = SECURITY_SCHEMES
    paths: dict[str, dict[str, Any]] = document.get("paths", {})
    for route in _api_routes(routes):
        if not route.include_in_schema:
            continue
        for method in route.methods:
            operation = paths.get(route.path_format, {}).get(method.lower())
            if operation is not None:
                _document_operation(operation, route)
    if not schemas:
        del components["schemas"]
    return document


def _api_routes(routes: Sequence[BaseRoute]) -> Iterator[Any]:
    """Every API route as FastAPI documents it: an ``APIRoute``, or (FastAPI 0.16x, where
    an included router stays one object) its context, which carries the router's
    dependencies and prefix and reads like an ``APIRoute``."""
    iterate = getattr(routing, "iter_route_contexts", None)
    if iterate is None:
        yield from (route for route in routes if isinstance(route, APIRoute))
        return
    for context in iterate(routes):
        if isinstance(context.original_route, APIRoute):
            yield context


def _document_operation(operation: dict[str, Any], route: Any) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    validates = responses.pop("422", None) is not None
    calls = {dependant.call for dependant in _dependants(route.dependant)}
    keyed = any(checks_key(call) for call in calls)
    codes: list[str] = []
    if validates or route.body_field is not None:
        codes.append("400")
    if keyed:
        codes += ["401", "403", "429"]
        operation["security"] = [{BEARER_SCHEME: []}, {AZURE_SCHEME: []}]
    if route.dependant.path_params:
        codes.append("404")
    if route.body_field is not None:
        codes.append("413")
    if keyed or app_state in calls:
        codes.append("503")
    for code in codes:
        responses.setdefault(
            code,
            {
                "description": _DESCRIPTIONS[code],
                "content": {"application/json": {"schema": {"$ref": ERROR_REF}}},
            },
        )
    operation["responses"] = dict(sorted(responses.items()))


def _dependants(dependant: Dependant) -> Iterator[Dependant]:
    yield dependant
    for sub in dependant.dependencies:
        yield from _dependants(sub)
