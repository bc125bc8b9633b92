"""Alembic environment of the gateway's tables (``safegate.database.run_migrations``)."""

from __future__ import annotations

import gateway.access.keys  # noqa: F401 - registers the tables on Base.metadata
import gateway.allowlists.store  # noqa: F401 - registers the tables on Base.metadata
import gateway.audit.tables  # noqa: F401 - registers the tables on Base.metadata
import gateway.blocklists.store  # noqa: F401 - registers the tables on Base.metadata
from gateway.db import Base
from safegate.database import run_migrations

run_migrations(Base.metadata)
