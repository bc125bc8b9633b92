"""What the running service holds: one ``Runtime`` per app, read by typed dependencies.

``create_app`` makes the app's ``Runtime`` (settings, metrics, tracing) and stores it once
as ``app.state.runtime``; the lifespan fills in the rest. ``runtime(request)`` is the one
reader of ``app.state``: every dependency below goes through it, and routes take the typed
``Annotated`` aliases, never the attribute bag.

``AppState`` is complete once the engine has loaded (``app_state``, 503 until then); the
blocklist and allowlist stores come with it (``Blocklists``, ``Allowlists``). The key
store, the quota guard and the audit store are made first and work while the engine
loads (review and usage need no engine): each has its own dependency, typed for routes
as ``Keys``, ``Quotas`` and ``Audit``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from opentelemetry.trace import Tracer

from gateway.access.keys import KeyStore
from gateway.access.policies import PolicyCatalog
from gateway.access.quotas import QuotaGuard
from gateway.access.ratelimit import RateLimiter
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
from gateway.tracing import Tracing


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


@dataclass
class Runtime:
    """What one app holds: made by ``create_app``, filled in by its lifespan.

    The stores are ``None`` until the lifespan has made them; ``state`` is ``None`` until
    the engine has loaded, and ``error`` says why when it could not (path-free, for
    ``/readyz``).
    """

    settings: Settings
    metrics: Metrics
    tracing: Tracing
    audit: AuditStore | None = None
    keys: KeyStore | None = None
    quotas: QuotaGuard | None = None
    limiter: RateLimiter | None = None
    upstreams: LitellmUpstreams | None = None
    state: AppState | None = None
    error: str | None = None


def runtime(request: Request) -> Runtime:
    """The app's ``Runtime``: the one place that reads ``request.app.state``."""
    held = getattr(request.app.state, "runtime", None)
    if not isinstance(held, Runtime):
        raise RuntimeError("the app holds no Runtime: create_app stores one as app.state.runtime")
    return held


def app_state(request: Request) -> AppState:
    """FastAPI dependency: the service's state; 503 until the engine has loaded."""
    held = runtime(request)
    state = held.state
    if state is None:
        error = held.error
        message = (
            f"the safety engine failed to load ({error}); requests are refused (fail closed)"
            if error
            else "the safety engine is still loading; retry shortly"
        )
        raise ServiceUnavailable(message, code="engine_not_ready")
    return state


def key_store(request: Request) -> KeyStore:
    """The running key store (made in the lifespan, before the engine loads)."""
    keys = runtime(request).keys
    if keys is None:
        raise _usage_not_running()
    return keys


def quota_guard(request: Request) -> QuotaGuard:
    """The running quota guard: its database and clock (made with the key store)."""
    quotas = runtime(request).quotas
    if quotas is None:
        raise _usage_not_running()
    return quotas


def _usage_not_running() -> ServiceUnavailable:
    return ServiceUnavailable("the key store is not running yet", code="usage_unavailable")


def audit_store(request: Request) -> AuditStore:
    """The running audit store (made in the lifespan, before the engine loads)."""
    store = runtime(request).audit
    if store is None:
        raise ServiceUnavailable("the audit store is not running yet", code="audit_unavailable")
    return store


def blocklist_store(state: Annotated[AppState, Depends(app_state)]) -> BlocklistStore:
    """The blocklist store (it comes with the engine, so 503 until that has loaded)."""
    return state.blocklists


def allowlist_store(state: Annotated[AppState, Depends(app_state)]) -> AllowlistStore:
    """The allowlist store (it comes with the engine, so 503 until that has loaded)."""
    return state.allowlists


Keys = Annotated[KeyStore, Depends(key_store)]
Quotas = Annotated[QuotaGuard, Depends(quota_guard)]
Audit = Annotated[AuditStore, Depends(audit_store)]
Blocklists = Annotated[BlocklistStore, Depends(blocklist_store)]
Allowlists = Annotated[AllowlistStore, Depends(allowlist_store)]
