"""Prometheus metrics, served at ``GET /metrics`` in the text exposition format.

Each app owns its ``CollectorRegistry`` (tests build many apps in one process)::

    safegate_requests_total{route, method, status}           every HTTP request
    safegate_request_seconds{route}                          latency of every HTTP request
    safegate_stage_seconds{stage}                            prompt_check, upstream,
                                                             completion_check, first_token
    safegate_verdicts_total{direction, action}               texts checked: allow/annotate/block
    safegate_blocks_total{direction, category}               labels that blocked a text
    safegate_flags_total{direction, category}                labels flagged (block or annotate)
    safegate_upstream_errors_total{model, code}              upstream failures by gateway code
    safegate_audit_spool_pending                             audit records waiting on disk
    safegate_engine_queue_chars                              characters waiting for detection
    safegate_auth_stale_admissions_total                     requests admitted on a cached key
                                                             while the key store was unreachable
    safegate_tokens_total{key_id, model, type}               chat tokens (type prompt or
                                                             completion) per API key and model

Labels never carry content; ``route`` is the route's template (``/v1/blocklists/{name}``),
never the raw path, so cardinality stays bounded. ``key_id`` is the key's public id
(``key_...``, never the secret; ``safegate keys list`` maps it to a name). Keys are
bounded by the keys table, and each process labels at most ``MAX_KEY_LABELS`` distinct
key ids: tokens of any further key count under ``key_id="other"`` (per-key figures past
that are in ``safegate keys usage``). ``model`` is a configured or deployed model name.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway.safety.verdict import Verdict

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_KEY_LABELS = 200
OTHER_KEYS = "other"
STAGE_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "safegate_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "safegate_request_seconds",
            "HTTP request latency by route template.",
            ["route"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "safegate_stage_seconds",
            "Time spent per stage of a filtered chat request.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.verdicts = Counter(
            "safegate_verdicts",
            "Texts checked, by direction and the action taken.",
            ["direction", "action"],
            registry=self.registry,
        )
        self.blocks = Counter(
            "safegate_blocks",
            "Labels that blocked a text, by direction and category.",
            ["direction", "category"],
            registry=self.registry,
        )
        self.flags = Counter(
            "safegate_flags",
            "Labels flagged (blocked or annotated), by direction and category.",
            ["direction", "category"],
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "safegate_upstream_errors",
            "Upstream failures by model and gateway error code.",
            ["model", "code"],
            registry=self.registry,
        )
        self.spool_pending = Gauge(
            "safegate_audit_spool_pending",
            "Audit records (flagged items and request logs) spooled to disk while the "
            "database was unavailable.",
            registry=self.registry,
        )
        self.engine_queue_chars = Gauge(
            "safegate_engine_queue_chars",
            "Characters admitted to the safety engine's queue and not yet detected.",
            registry=self.registry,
        )
        self.auth_stale_admissions = Counter(
            "safegate_auth_stale_admissions",
            "Requests admitted on a key checked earlier, within the outage grace, because "
            "the key store could not be reached.",
            registry=self.registry,
        )

        self.tokens = Counter(
            "safegate_tokens",
            "Chat tokens by API key id, model and type (prompt or completion).",
            ["key_id", "model", "type"],
            registry=self.registry,
        )
        self._key_labels: set[str] = set()

    def observe_tokens(self, *, key_id: str, model: str, prompt: int, completion: int) -> None:
        label = self._key_label(key_id)
        self.tokens.labels(label, model, "prompt").inc(prompt)
        self.tokens.labels(label, model, "completion").inc(completion)

    def _key_label(self, key_id: str) -> str:
        """``key_id`` itself for the first ``MAX_KEY_LABELS`` keys seen, then ``other``."""
        if key_id in self._key_labels:
            return key_id
        if len(self._key_labels) >= MAX_KEY_LABELS:
            return OTHER_KEYS
        self._key_labels.add(key_id)
        return key_id

    def observe_request(self, *, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage).observe(seconds)

    def observe_verdict(self, verdict: Verdict) -> None:
        direction = verdict.direction.value
        self.verdicts.labels(direction, verdict.action).inc()
        for label in verdict.flagged_labels:
            self.flags.labels(direction, label.value).inc()
            if verdict.labels[label].action.value == "block":
                self.blocks.labels(direction, label.value).inc()

    def observe_stale_admission(self) -> None:
        self.auth_stale_admissions.inc()

    def track_spool(self, pending: Callable[[], int]) -> None:
        self.spool_pending.set_function(lambda: float(pending()))

    def track_engine_queue(self, pending_chars: Callable[[], int]) -> None:
        self.engine_queue_chars.set_function(lambda: float(pending_chars()))

    def render(self) -> bytes:
        return generate_latest(self.registry)
