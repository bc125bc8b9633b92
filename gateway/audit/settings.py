"""Settings of the audit store, with their defaults.

A leaf (pydantic only): ``gateway.config`` composes this section into ``Settings``, and
the audit modules take their defaults from here.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

DEFAULT_DRAIN_INTERVAL_S = 10.0
DEFAULT_WRITE_TIMEOUT_S = 2.0


class AuditSettings(BaseModel):
    """The audit store (``gateway.audit``): flagged texts for review, request metadata."""

    drain_interval_s: float = Field(
        default=DEFAULT_DRAIN_INTERVAL_S,
        gt=0,
        description="how often records spooled while the database was down are moved into it",
    )
    write_timeout_s: float = Field(
        default=DEFAULT_WRITE_TIMEOUT_S,
        gt=0,
        description="a database write that takes longer is spooled to disk as well",
    )
    spool_dir: Path | None = Field(
        default=None, description="where records wait while the database is down (0700)"
    )
    record_requests: bool = Field(
        default=True, description="keep metadata (never text) of every filtered request"
    )
