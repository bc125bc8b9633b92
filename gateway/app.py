"""The FastAPI application: ``create_app()`` wires settings, storage, engine and routes.

Start-up order: logging, database migrations, blocklist and allowlist stores, API keys and
rate limiter (so keys are checked while loading), then the safety engine (the allowlist
store attached to whatever engine the factory builds),
which loads in a worker thread so ``/healthz`` answers at once while ``/readyz`` and
every filtering route answer 503 until each classifier has loaded. A member that fails
to load keeps the service unready (fail closed) and ``/readyz`` says which and why.
What start-up makes lands in the app's one ``gateway.state.Runtime``, which the routes
read through typed dependencies.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI

from gateway import errors, logs
from gateway.access import KeyStore, Role, require, require_by_method
from gateway.access.policies import PolicyCatalog
from gateway.access.quotas import Clock, QuotaGuard, utc_now
from gateway.access.ratelimit import build_limiter
from gateway.allowlists import AllowlistStore
from gateway.audit import SPOOL_DIRNAME, AuditStore
from gateway.blocklists import BlocklistStore
from gateway.chat.upstreams import LitellmUpstreams, UpstreamsConfig, registry_adapters
from gateway.config import Settings, get_settings
from gateway.db import Database
from gateway.engine_factory import build_engine
from gateway.metrics import Metrics
from gateway.middleware import BodySizeLimit, RequestContext
from gateway.openapi import SafegateAPI
from gateway.routes import (
    allowlists,
    blocklists,
    chat,
    docs,
    health,
    moderations,
    review,
    usage,
)
from gateway.safety.batcher import MicroBatcher
from gateway.safety.engine import SafetyEngine
from gateway.state import AppState, Runtime
from gateway.tracing import RequestSpans, build_tracing
from safegate.offline import offline_defaults

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("safegate.app")

# Builds the members and the policy; the app attaches the allowlist store to what it
# returns (``SafetyEngine.attach_allowlists``), so every engine it serves applies them.
EngineFactory = Callable[[Settings, BlocklistStore], SafetyEngine]


def _default_engine(settings: Settings, store: BlocklistStore) -> SafetyEngine:
    return build_engine(settings, blocklists=store)


def create_app(
    settings: Settings | None = None,
    *,
    engine_factory: EngineFactory = _default_engine,
    now: Clock = utc_now,
    span_exporter: SpanExporter | None = None,
) -> FastAPI:
    """The service over ``settings``; ``now`` is the clock of request records and quota
    windows (tests move it); ``span_exporter`` replaces the OTLP exporter when tracing is on
    (tests pass an in-memory one)."""
    settings = settings or get_settings()
    offline_defaults()
    tracing = build_tracing(settings.tracing, exporter=span_exporter)
    # What the routes read (``gateway.state``): the lifespan fills in the stores and the
    # engine's state.
    held = Runtime(settings=settings, metrics=Metrics(), tracing=tracing)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logs.configure(settings.log_level)
        settings.ensure_home()  # 0700: the database under it holds flagged text
        database = Database(settings.database, timeouts=settings.database_timeouts)
        await asyncio.to_thread(database.migrate)
        store = BlocklistStore(database, refresh_s=settings.blocklist.refresh_s)
        allowlist_store = AllowlistStore(database, refresh_s=settings.blocklist.refresh_s)
        # The audit store works before the engine loads: review needs no engine.
        audit = AuditStore(
            database,
            spool_dir=settings.audit.spool_dir or settings.home_dir / SPOOL_DIRNAME,
            drain_interval_s=settings.audit.drain_interval_s,
            write_timeout_s=settings.audit.write_timeout_s,
            record_requests=settings.audit.record_requests,
        )
        held.audit = audit
        held.metrics.track_spool(audit.spooled_pending)
        await audit.start()
        # Keys and limits work before the engine loads (routes still answer 503 until then).
        held.keys = KeyStore(
            database,
            cache_ttl_s=settings.auth.cache_ttl_s,
            outage_grace_s=settings.auth.outage_grace_s,
            on_stale=held.metrics.observe_stale_admission,
        )
        quotas = QuotaGuard(
            database,
            cache_ttl_s=settings.quota.cache_ttl_s,
            outage_grace_s=settings.auth.outage_grace_s,
            recording=settings.audit.record_requests,
            now=now,
        )
        held.quotas = quotas
        limiter = build_limiter(
            redis_url=settings.rate_limit.redis_url,
            key_prefix=settings.rate_limit.key_prefix,
            timeout_s=settings.rate_limit.timeout_s,
        )
        held.limiter = limiter
        upstreams = LitellmUpstreams(
            UpstreamsConfig.load(settings.upstreams.file),
            adapters=registry_adapters(settings.database, timeouts=settings.database_timeouts),
            local_api_base=settings.local_models_api_base,
        )
        await asyncio.to_thread(upstreams.refresh)
        held.upstreams = upstreams
        held.error = None
        loader = asyncio.create_task(
            _load(
                held,
                database,
                (store, allowlist_store),
                engine_factory,
                services=(audit, upstreams, quotas),
            )
        )
        try:
            yield
        finally:
            loader.cancel()
            state = held.state
            if state is not None:
                await state.batcher.close()
                state.engine.close()
            await limiter.close()
            await audit.close()
            database.dispose()
            await asyncio.to_thread(tracing.shutdown)  # the last spans, flushed

    app = SafegateAPI(
        title="safegate",
        version="0.1.0",
        summary="Safety-first content filter and evaluation gateway",
        lifespan=lifespan,
        # FastAPI's own docs routes answer anyone; ``routes.docs`` serves them behind a key.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.runtime = held  # the one attribute; read through ``gateway.state.runtime``
    errors.install(app)
    app.include_router(health.router)
    app.include_router(chat.router)
    app.include_router(moderations.router, dependencies=[Depends(require(Role.DEVELOPER))])
    app.include_router(
        blocklists.router,
        dependencies=[Depends(require_by_method(read=Role.REVIEWER, write=Role.ADMIN))],
    )
    app.include_router(
        allowlists.router,
        dependencies=[Depends(require_by_method(read=Role.REVIEWER, write=Role.ADMIN))],
    )
    app.include_router(review.router)  # each route names its role (reviewer, admin)
    app.include_router(usage.router, dependencies=[Depends(require(Role.ADMIN))])
    if settings.api_docs:
        app.include_router(
            docs.router,
            dependencies=[Depends(require(Role.ADMIN, Role.DEVELOPER, Role.REVIEWER))],
        )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if tracing.enabled:  # off, requests pass no tracing middleware at all
        app.add_middleware(RequestSpans, tracer=tracing.tracer)
    app.add_middleware(RequestContext, metrics=held.metrics, degraded=settings.degraded())
    return app


async def _load(
    held: Runtime,
    database: Database,
    stores: tuple[BlocklistStore, AllowlistStore],
    engine_factory: EngineFactory,
    *,
    services: tuple[AuditStore, LitellmUpstreams, QuotaGuard],
) -> None:
    settings = held.settings
    audit, upstreams, quotas = services
    blocklist_store, allowlist_store = stores
    try:
        engine = await asyncio.to_thread(engine_factory, settings, blocklist_store)
        engine.attach_allowlists(allowlist_store)
    except Exception as exc:  # noqa: BLE001 - reported by /readyz; requests fail closed
        # Clients read it without paths (``/readyz`` is open); the log keeps all of it.
        held.error = errors.public_error(exc)
        log.error("safety engine failed to load", extra={"error": f"{type(exc).__name__}: {exc}"})
        return
    batcher = MicroBatcher(
        engine,
        max_batch=settings.engine.max_batch,
        max_batch_chars=settings.engine.max_batch_chars,
        queue_capacity_chars=settings.engine.queue_capacity_chars,
        max_wait_s=settings.engine.max_wait_s,
    )
    held.metrics.track_engine_queue(lambda: batcher.pending_chars)
    held.state = AppState(
        settings=settings,
        database=database,
        blocklists=blocklist_store,
        allowlists=allowlist_store,
        engine=engine,
        batcher=batcher,
        audit=audit,
        upstreams=upstreams,
        policies=PolicyCatalog(default=engine.policy, home_dir=settings.home_dir),
        metrics=held.metrics,
        quotas=quotas,
        tracer=held.tracing.tracer,
    )
    log.info("safety engine ready", extra={"members": [s.classifier.id for s in engine.members]})
