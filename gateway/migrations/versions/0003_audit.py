"""The audit store: ``flagged_items``, ``flagged_item_categories`` and ``request_log``.

``flagged_items.text`` is the only column in the database that holds raw content;
``request_log`` keeps metadata only. Category filtering goes through
``flagged_item_categories`` (one row per flagged label, indexed by category), which
works the same on SQLite and PostgreSQL. See ``gateway.audit``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "flagged_items",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(128), nullable=False),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("direction", sa.String(16), nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("categories", sa.JSON(), nullable=False),
        sa.Column("scores", sa.JSON(), nullable=False),
        sa.Column("severities", sa.JSON(), nullable=False),
        sa.Column("max_severity", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("text_sha256", sa.String(64), nullable=False),
        sa.Column("review_state", sa.String(24), nullable=False),
        sa.Column("review_note", sa.Text(), nullable=True),
        sa.Column("reviewer_key_id", sa.String(128), nullable=True),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "direction IN ('prompt', 'completion')", name="ck_flagged_items_direction"
        ),
        sa.CheckConstraint("action IN ('block', 'annotate')", name="ck_flagged_items_action"),
        sa.CheckConstraint(
            "review_state IN ('unreviewed', 'true_positive', 'false_positive', "
            "'needs_policy_change')",
            name="ck_flagged_items_review_state",
        ),
    )
    op.create_index("ix_flagged_items_created_at_id", "flagged_items", ["created_at", "id"])
    op.create_index(
        "ix_flagged_items_review_state_created_at",
        "flagged_items",
        ["review_state", "created_at"],
    )
    op.create_index("ix_flagged_items_request_id", "flagged_items", ["request_id"])
    op.create_table(
        "flagged_item_categories",
        sa.Column("item_id", sa.String(64), nullable=False),
        sa.Column("category", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("item_id", "category"),
        sa.ForeignKeyConstraint(
            ["item_id"],
            ["flagged_items.id"],
            ondelete="CASCADE",
            name="fk_flagged_item_categories_item_id_flagged_items",
        ),
    )
    op.create_index(
        "ix_flagged_item_categories_category_item_id",
        "flagged_item_categories",
        ["category", "item_id"],
    )
    op.create_table(
        "request_log",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(128), nullable=False),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("route", sa.String(200), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("blocked", sa.String(16), nullable=True),
        sa.Column("categories", sa.JSON(), nullable=False),
        sa.Column("latency_ms", sa.JSON(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("stream", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_request_log_created_at", "request_log", ["created_at"])
    op.create_index("ix_request_log_request_id", "request_log", ["request_id"])


def downgrade() -> None:
    op.drop_table("request_log")
    op.drop_table("flagged_item_categories")
    op.drop_table("flagged_items")
