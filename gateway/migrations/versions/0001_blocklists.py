"""Custom blocklists: the ``blocklists`` and ``blocklist_items`` tables.

Ids are never reused (``AUTOINCREMENT`` on SQLite, a sequence on PostgreSQL): the
blocklist store's cheap version check relies on it (see ``gateway.blocklists``).

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blocklists",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("description", sa.String(1024), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("name", name="uq_blocklists_name"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "blocklist_items",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("blocklist_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("value", sa.String(1000), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["blocklist_id"],
            ["blocklists.id"],
            ondelete="CASCADE",
            name="fk_blocklist_items_blocklist_id_blocklists",
        ),
        sa.UniqueConstraint(
            "blocklist_id", "kind", "value", name="uq_blocklist_items_blocklist_id_kind_value"
        ),
        sa.CheckConstraint("kind IN ('term', 'regex')", name="ck_blocklist_items_kind"),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("blocklist_items")
    op.drop_table("blocklists")
