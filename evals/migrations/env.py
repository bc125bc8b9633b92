"""Alembic environment of the harness's tables (version table alembic_version_evals)."""

from __future__ import annotations

import evals.cache  # noqa: F401 - registers the cache table
import evals.runs  # noqa: F401 - registers the runs and samples tables
from evals.db import VERSION_TABLE, Base
from safegate.database import run_migrations

run_migrations(Base.metadata, version_table=VERSION_TABLE)
