"""API keys: the ``api_keys`` table.

Only a key's SHA-256 and a display prefix are stored, never the key (see
``gateway.access``). Names are unique among keys that are not revoked: a partial unique
index, which SQLite and PostgreSQL both support.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("policy", sa.String(64), nullable=True),
        sa.Column("rate_limit_rpm", sa.Integer(), nullable=True),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("role IN ('admin', 'developer', 'reviewer')", name="ck_api_keys_role"),
        sa.CheckConstraint(
            "rate_limit_rpm IS NULL OR rate_limit_rpm > 0", name="ck_api_keys_rate_limit_rpm"
        ),
    )
    op.create_index("uq_api_keys_secret_hash", "api_keys", ["secret_hash"], unique=True)
    op.create_index(
        "uq_api_keys_active_name",
        "api_keys",
        ["name"],
        unique=True,
        sqlite_where=sa.text("revoked_at IS NULL"),
        postgresql_where=sa.text("revoked_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("uq_api_keys_active_name", table_name="api_keys")
    op.drop_index("uq_api_keys_secret_hash", table_name="api_keys")
    op.drop_table("api_keys")
