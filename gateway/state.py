"""What the running service holds: built once in the lifespan, read by dependencies."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from opentelemetry.trace import Tracer

from gateway.access.policies import PolicyCatalog
from gateway.access.quotas import QuotaGuard
from gateway.allowlists import AllowlistStore
from gateway.audit import AuditStore
from gateway.blocklists import BlocklistStore
from gateway.chat.upstreams import LitellmUpstreams
from gateway.config import Settings
from gateway.db import Database
from gateway.errors import ServiceUnavailable
from gateway.metrics import Metrics
from gateway.safety.batcher import MicroBatcher
from gateway.safety.engine import SafetyEngine


@dataclass
class AppState:
    settings: Settings
    database: Database
    blocklists: BlocklistStore
    allowlists: AllowlistStore
    engine: SafetyEngine
    batcher: MicroBatcher
    audit: AuditStore
    upstreams: LitellmUpstreams
    policies: PolicyCatalog
    metrics: Metrics
    quotas: QuotaGuard
    tracer: Tracer  # the API's no-op tracer unless tracing is on (gateway.tracing)


def app_state(request: Request) -> AppState:
    """FastAPI dependency: the service's state; 503 until the engine has loaded."""
    state: AppState | None = getattr(request.app.state, "safegate", None)
    if state is None:
        error = getattr(request.app.state, "safegate_error", None)
        message = (
            f"the safety engine failed to load ({error}); requests are refused (fail closed)"
            if error
            else "the safety engine is still loading; retry shortly"
        )
        raise ServiceUnavailable(message, code="engine_not_ready")
    return state
