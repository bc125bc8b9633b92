"""The records that cross the seam between the harness and the metrics.

A ``Sample`` is one dataset row as it was sent; an ``Output`` is what the model (through
the gateway or directly) did with it. Metrics read both, paired by ``Sample.id``; run
records store them with ``SCHEMA_VERSION`` so older runs stay readable.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class Sample:
    """One dataset row."""

    id: str  # stable: dataset name + row id or line number
    dataset: str
    messages: tuple[Mapping[str, str], ...]  # chat messages sent to the model
    reference: str | None  # expected answer (quality metrics), may be None
    labels: Mapping[str, Any] = field(default_factory=dict)  # {"harmful": True}, ...


@dataclass(frozen=True, slots=True)
class Output:
    """What the model did with one sample."""

    sample_id: str
    text: str | None  # None when filtered or failed
    finish_reason: str | None  # "stop", "length", "content_filter", ...
    filtered: str | None  # None, "prompt" (gateway 400 content_filter) or "completion"
    error: str | None  # model error on this example (recorded, the run goes on)
    latency_ms: float
    cached: bool
    prompt_sha256: str  # of the canonical JSON of messages
    reference_sha256: str | None


def canonical_json(value: Any) -> str:
    """The one JSON spelling of ``value`` that hashes compare: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_json(value: Any) -> str:
    """sha256 (hex) of ``value``'s canonical JSON."""
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def prompt_sha256(messages: Sequence[Mapping[str, str]]) -> str:
    """The hash a run records for a sample's prompt: its messages as canonical JSON."""
    return sha256_json([dict(message) for message in messages])


def reference_sha256(reference: str | None) -> str | None:
    return None if reference is None else hashlib.sha256(reference.encode("utf-8")).hexdigest()
