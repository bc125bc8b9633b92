"""Usage and quotas: tokens' source and cost on ``request_log``; quotas on ``api_keys``.

``request_log`` already holds ``prompt_tokens`` and ``completion_tokens`` (NULL for a
request that never reached the upstream); this revision adds ``usage_source`` (``upstream``
when the upstream reported them, ``counted`` when safegate counted them with
``litellm.token_counter``) and ``cost_usd`` (litellm's price for the model, NULL when it
has none), and a ``(key_id, created_at)`` index, through which quota checks sum a key's
tokens since the start of its day or month and the usage report reads a key's rows.

``api_keys`` gains a key's quotas: ``daily_token_quota`` and ``monthly_token_quota``
(tokens per UTC calendar day and month) and ``monthly_budget_usd``, each NULL for none.
The values are checked by ``KeyStore`` (positive, or NULL), as the other key settings are
where SQLite cannot add a constraint in place. Adding nullable columns rewrites no row
on SQLite or PostgreSQL; SQLite 3.35+ drops them in place. See ``gateway.access.quotas``.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("request_log", sa.Column("usage_source", sa.String(16), nullable=True))
    op.add_column("request_log", sa.Column("cost_usd", sa.Float(), nullable=True))
    op.create_index("ix_request_log_key_id_created_at", "request_log", ["key_id", "created_at"])
    op.add_column("api_keys", sa.Column("daily_token_quota", sa.BigInteger(), nullable=True))
    op.add_column("api_keys", sa.Column("monthly_token_quota", sa.BigInteger(), nullable=True))
    op.add_column("api_keys", sa.Column("monthly_budget_usd", sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column("api_keys", "monthly_budget_usd")
    op.drop_column("api_keys", "monthly_token_quota")
    op.drop_column("api_keys", "daily_token_quota")
    op.drop_index("ix_request_log_key_id_created_at", table_name="request_log")
    op.drop_column("request_log", "cost_usd")
    op.drop_column("request_log", "usage_source")
