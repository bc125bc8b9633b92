"""What the dashboard reads and writes: every package's stores over one home and database.

The dashboard runs over the same ``SAFEGATE_HOME`` and ``SAFEGATE_DATABASE_URL`` as the
gateway, the trainer and the eval harness, through their own stores (never raw SQL where
a store has the API): keys, flagged items and request metadata, blocklists and allowlists
(the gateway);
jobs and models (``finetune``); eval runs (``evals``). :meth:`Stores.open` upgrades each
package's tables first, so a fresh home shows empty pages rather than errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from evals.db import Database as EvalDatabase
from evals.runs import RunStore
from finetune.db import Database as FinetuneDatabase
from finetune.jobs import JobStore
from finetune.registry import ModelRegistry
from gateway.access import KeyStore
from gateway.allowlists import AllowlistStore
from gateway.audit import SPOOL_DIRNAME, AuditStore
from gateway.blocklists import BlocklistStore
from gateway.config import Settings
from gateway.db import Database as GatewayDatabase

EVAL_RUNS_DIRNAME = "evals"  # as evals.settings.EvalSettings.runs_dir
JOBS_DIRNAME = "jobs"  # as finetune.settings.FinetuneSettings.jobs_dir


@dataclass(frozen=True)
class Stores:
    """The stores of one safegate home, opened once per dashboard process."""

    home: Path
    database_url: str
    keys: KeyStore
    audit: AuditStore
    blocklists: BlocklistStore
    allowlists: AllowlistStore
    jobs: JobStore
    models: ModelRegistry
    runs: RunStore
    jobs_dir: Path
    runs_dir: Path
    _databases: tuple[GatewayDatabase, FinetuneDatabase, EvalDatabase]

    @classmethod
    def open(cls, settings: Settings) -> Stores:
        """Open (and migrate) every package's tables in the configured database."""
        home = settings.ensure_home()
        url = settings.database
        timeouts = settings.database_timeouts
        gateway = GatewayDatabase(url, timeouts=timeouts)
        finetune = FinetuneDatabase(url, timeouts=timeouts)
        evals = EvalDatabase(url, timeouts=timeouts)
        for database in (gateway, finetune, evals):
            database.migrate()
        runs_dir = home / EVAL_RUNS_DIRNAME
        return cls(
            home=home,
            database_url=url,
            keys=KeyStore(
                gateway,
                cache_ttl_s=settings.auth.cache_ttl_s,
                outage_grace_s=settings.auth.outage_grace_s,
            ),
            audit=AuditStore(
                gateway,
                spool_dir=settings.audit.spool_dir or home / SPOOL_DIRNAME,
                record_requests=False,  # the dashboard records nothing, it only reads
            ),
            blocklists=BlocklistStore(gateway, refresh_s=settings.blocklist.refresh_s),
            allowlists=AllowlistStore(gateway, refresh_s=settings.blocklist.refresh_s),
            jobs=JobStore(finetune),
            models=ModelRegistry(finetune),
            runs=RunStore(evals, runs_dir=runs_dir),
            jobs_dir=home / JOBS_DIRNAME,
            runs_dir=runs_dir,
            _databases=(gateway, finetune, evals),
        )

    def close(self) -> None:
        for database in self._databases:
            database.dispose()
