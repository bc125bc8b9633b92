"""Custom allowlists: the ``allowlists`` table.

One row per list: its terms, regexes, categories and directions as JSON arrays, whether
it is enabled, who created it and when, when it was last updated, and a ``revision``
every update bumps. Ids are never reused (``AUTOINCREMENT`` on SQLite), which the store's
cheap version check relies on together with the revisions (see ``gateway.allowlists``).
The downgrade drops the table.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "allowlists",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("terms", sa.JSON(), nullable=False),
        sa.Column("regexes", sa.JSON(), nullable=False),
        sa.Column("categories", sa.JSON(), nullable=False),
        sa.Column("directions", sa.JSON(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("name", name="uq_allowlists_name"),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("allowlists")
