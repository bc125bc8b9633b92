"""The model-call cache: a rerun of an unchanged suite makes no model calls.

Each successful call is stored in ``eval_cache`` under the sha256 of the canonical JSON of
``{"model": identity, "messages": [...], "params": {...}}``: the model's identity (``via``,
the gateway's base URL and served name, or the litellm model string and its non-secret
parameters, and the suite's ``revision``), the messages sent, and the generation
parameters. Filtered outcomes are results and are cached; errors are not, so the next run
calls again. Nothing in the key says which adapter or policy stands behind a name: bump
the model's ``revision`` in the suite (or run with ``--no-cache``) after changing one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, Float, String, Text, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from evals.db import Base, Database
from evals.models import Completion
from evals.records import canonical_json, sha256_json

LOOKUP_BATCH = 500  # keys per SELECT ... IN (...)


class CacheRow(Base):
    __tablename__ = "eval_cache"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(Text)  # canonical JSON of the identity, for inspection
    text: Mapped[str | None] = mapped_column(Text, nullable=True)
    finish_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    filtered: Mapped[str | None] = mapped_column(String(16), nullable=True)
    latency_ms: Mapped[float] = mapped_column(Float)  # of the call that filled the entry
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def cache_key(
    identity: Mapping[str, Any],
    messages: Sequence[Mapping[str, str]],
    params: Mapping[str, Any],
) -> str:
    return sha256_json(
        {
            "model": dict(identity),
            "messages": [dict(message) for message in messages],
            "params": dict(params),
        }
    )


class CallCache:
    """Reads and fills ``eval_cache``."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def get_many(self, keys: Iterable[str]) -> dict[str, Completion]:
        """The cached completions among ``keys`` (latency is the original call's)."""
        wanted = list(dict.fromkeys(keys))
        found: dict[str, Completion] = {}
        with self.database.session() as session:
            for start in range(0, len(wanted), LOOKUP_BATCH):
                batch = wanted[start : start + LOOKUP_BATCH]
                for row in session.scalars(select(CacheRow).where(CacheRow.key.in_(batch))):
                    found[row.key] = Completion(
                        text=row.text,
                        finish_reason=row.finish_reason,
                        filtered=row.filtered,
                        error=None,
                        latency_ms=row.latency_ms,
                    )
        return found

    def put(self, key: str, identity: Mapping[str, Any], completion: Completion) -> bool:
        """Store a successful completion; an error is not stored. Returns whether it was."""
        if completion.error is not None:
            return False
        row = CacheRow(
            key=key,
            model=canonical_json(dict(identity)),
            text=completion.text,
            finish_reason=completion.finish_reason,
            filtered=completion.filtered,
            latency_ms=completion.latency_ms,
            created_at=datetime.now(UTC),
        )
        try:
            with self.database.session() as session:
                session.merge(row)
        except IntegrityError:
            pass  # another run stored the same call between our read and our write
        return True
