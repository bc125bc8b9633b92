"""Fine-tuning jobs and the model registry.

Revision ID: ft0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "ft0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "finetune_jobs",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("model_name", sa.String(64), nullable=False, index=True),
        sa.Column("base", sa.String(300), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("config", sa.Text, nullable=False),
        sa.Column("data_sha256", sa.Text, nullable=False),
        sa.Column("output_dir", sa.String(1000), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("pid", sa.Integer, nullable=True),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("metrics", sa.Text, nullable=False, server_default="{}"),
    )
    op.create_table(
        "finetune_models",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("base", sa.String(300), nullable=True),
        sa.Column("path", sa.String(1000), nullable=False),
        sa.Column("deployed", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("job_id", sa.String(40), nullable=True),
        sa.Column("hyperparameters", sa.Text, nullable=False, server_default="{}"),
        sa.Column("data_sha256", sa.Text, nullable=False, server_default="{}"),
        sa.Column("metrics", sa.Text, nullable=False, server_default="{}"),
    )


def downgrade() -> None:
    op.drop_table("finetune_models")
    op.drop_table("finetune_jobs")
