"""Alembic environment of fine-tuning's tables (version table alembic_version_finetune)."""

from __future__ import annotations

import finetune.jobs  # noqa: F401 - registers the jobs table
import finetune.registry  # noqa: F401 - registers the models table
from finetune.db import VERSION_TABLE, Base
from safegate.database import run_migrations

run_migrations(Base.metadata, version_table=VERSION_TABLE)
