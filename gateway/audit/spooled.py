"""Audit records as spool lines (JSON) and back."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from gateway.audit.records import (
    SCHEMA_VERSION,
    AuditRecord,
    FlaggedItem,
    RequestRecord,
)
from gateway.safety.taxonomy import Direction

# -- the spool's records -----------------------------------------------------------------


class BadRecord(Exception):
    """A spooled line that is JSON but not a record this version can read."""


def to_spool_line(record: AuditRecord) -> dict[str, Any]:
    if isinstance(record, FlaggedItem):
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "flagged_item",
            "id": record.id,
            "created_at": record.created_at.isoformat(),
            "request_id": record.request_id,
            "key_id": record.key_id,
            "model": record.model,
            "direction": record.direction.value,
            "source": record.source,
            "categories": list(record.categories),
            "scores": dict(record.scores),
            "severities": dict(record.severities),
            "action": record.action,
            "reasons": list(record.reasons),
            "text": record.text,
            "origin": record.origin,
        }
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "request",
        "id": record.id,
        "created_at": record.created_at.isoformat(),
        "request_id": record.request_id,
        "key_id": record.key_id,
        "model": record.model,
        "route": record.route,
        "status": record.status,
        "blocked": record.blocked,
        "categories": list(record.categories),
        "latency_ms": dict(record.latency_ms),
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "stream": record.stream,
        "origin": record.origin,
        "usage_source": None if record.usage_source is None else record.usage_source.value,
        "cost_usd": record.cost_usd,
    }


def from_spool_line(data: Mapping[str, Any]) -> AuditRecord:
    """Decode a spooled record; raise ``BadRecord`` with a reason that quotes no content."""
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BadRecord(f"unknown schema_version {version!r}")
    kind = data.get("kind")
    try:
        if kind == "flagged_item":
            return FlaggedItem(
                id=_field(data, "id", str),
                created_at=_time(data),
                request_id=_field(data, "request_id", str),
                key_id=_field(data, "key_id", str),
                model=_optional(data, "model", str),
                direction=Direction(_field(data, "direction", str)),
                source=_field(data, "source", str),
                categories=tuple(_strings(data, "categories")),
                scores=_field(data, "scores", dict),
                severities=_field(data, "severities", dict),
                action=_field(data, "action", str),
                reasons=tuple(_strings(data, "reasons")),
                text=_field(data, "text", str),
                origin=_optional(data, "origin", str),  # absent in lines spooled before 0004
            )
        if kind == "request":
            return RequestRecord(
                id=_field(data, "id", str),
                created_at=_time(data),
                request_id=_field(data, "request_id", str),
                key_id=_field(data, "key_id", str),
                model=_optional(data, "model", str),
                route=_field(data, "route", str),
                status=_field(data, "status", int),
                blocked=_optional(data, "blocked", str),
                categories=tuple(_strings(data, "categories")),
                latency_ms=_field(data, "latency_ms", dict),
                prompt_tokens=_optional(data, "prompt_tokens", int),
                completion_tokens=_optional(data, "completion_tokens", int),
                stream=_field(data, "stream", bool),
                origin=_optional(data, "origin", str),
                usage_source=_optional(data, "usage_source", str),  # absent before 0006
                cost_usd=_cost(data),
            )
    except BadRecord:
        raise
    except (TypeError, ValueError) as error:
        raise BadRecord(f"{kind} fails validation ({type(error).__name__})") from None
    raise BadRecord(f"unknown kind {kind!r}")


def _field(data: Mapping[str, Any], name: str, kind: type[Any]) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadRecord(f"field {name!r} is missing or not {kind.__name__}")
    return value


def _optional(data: Mapping[str, Any], name: str, kind: type[Any]) -> Any:
    return None if data.get(name) is None else _field(data, name, kind)


def _cost(data: Mapping[str, Any]) -> float | None:
    value = data.get("cost_usd")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRecord("field 'cost_usd' is not a number")
    return float(value)


def _strings(data: Mapping[str, Any], name: str) -> list[str]:
    values = _field(data, name, list)
    if not all(isinstance(value, str) for value in values):
        raise BadRecord(f"field {name!r} must be a list of strings")
    return list(values)


def _time(data: Mapping[str, Any]) -> datetime:
    try:
        moment = datetime.fromisoformat(_field(data, "created_at", str))
    except ValueError:
        raise BadRecord("field 'created_at' is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise BadRecord("field 'created_at' has no time zone")
    return moment
