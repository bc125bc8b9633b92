"""Traffic origin: ``origin`` on ``flagged_items`` and ``request_log``; key and origin indexes.

``origin`` is what a request's ``safegate-origin`` header said its traffic is (``eval``
from ``safegate eval run``), or NULL when it said nothing: every row written before this
revision. The review queue and the traffic page leave ``eval`` out by default and filter
by origin and by key, so ``flagged_items`` gets ``(key_id, created_at)`` and ``(origin,
created_at)`` indexes for the newest-first listing. Adding a nullable column rewrites no
row on SQLite or PostgreSQL; the downgrade drops the indexes, then the columns (SQLite
3.35+ drops a column in place, so ``flagged_item_categories`` rows are never touched).
See ``gateway.origin``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("flagged_items", sa.Column("origin", sa.String(32), nullable=True))
    op.add_column("request_log", sa.Column("origin", sa.String(32), nullable=True))
    op.create_index(
        "ix_flagged_items_key_id_created_at", "flagged_items", ["key_id", "created_at"]
    )
    op.create_index(
        "ix_flagged_items_origin_created_at", "flagged_items", ["origin", "created_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_flagged_items_origin_created_at", table_name="flagged_items")
    op.drop_index("ix_flagged_items_key_id_created_at", table_name="flagged_items")
    op.drop_column("request_log", "origin")
    op.drop_column("flagged_items", "origin")
