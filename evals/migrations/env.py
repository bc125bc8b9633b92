"""Alembic environment for the harness's tables (version table alembic_version_evals)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

import evals.cache  # noqa: F401 - registers the cache table
import evals.runs  # noqa: F401 - registers the runs and samples tables
from evals.db import VERSION_TABLE, Base

config = context.config


def _migrate(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("alembic needs a connection or sqlalchemy.url")
    with create_engine(url).begin() as own:
        _migrate(own)


run()
