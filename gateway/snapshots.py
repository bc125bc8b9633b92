"""A compiled view of some tables, shared by a process's requests and rebuilt only when the
tables change: the blocklists' and allowlists' snapshots.

``get`` returns the cached view; every ``refresh_s`` it reads the tables' version stamp (a
cheap aggregate query) and rebuilds the view when the stamp moved, so a change made by
another replica is seen within ``refresh_s``. A change made through this process calls
``invalidate``, so it is seen at once. The stamp is read before the rows: a change landing
in between makes the next check rebuild again, never miss it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, Protocol, TypeVar

from sqlalchemy.orm import Session

from gateway.db import Database


class Versioned(Protocol):
    @property
    def version(self) -> Hashable: ...


S = TypeVar("S", bound=Versioned)
V = TypeVar("V", bound=Hashable)


class SnapshotCache(Generic[S, V]):
    """``build(session, version)`` cached, rebuilt when ``version(session)`` changes."""

    def __init__(
        self,
        database: Database,
        *,
        version: Callable[[Session], V],
        build: Callable[[Session, V], S],
        refresh_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not refresh_s > 0:
            raise ValueError(f"refresh_s must be positive, got {refresh_s!r}")
        self.database = database
        self.refresh_s = refresh_s
        self._version = version
        self._build = build
        self._clock = clock
        self._lock = threading.Lock()
        self._snapshot: S | None = None
        self._checked_at = 0.0

    def get(self) -> S:
        with self._lock:
            now = self._clock()
            cached = self._snapshot
            if cached is not None and now - self._checked_at < self.refresh_s:
                return cached
            with self.database.session() as session:
                version = self._version(session)
                if cached is None or cached.version != version:
                    cached = self._build(session, version)
            self._snapshot = cached
            self._checked_at = now
            return cached

    def invalidate(self) -> None:
        with self._lock:
            self._snapshot = None
