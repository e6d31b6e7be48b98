"""Training jobs: live-request dedup index and feedback cut-off; promotion outcome (refused auto-promotions).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 20:45:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_LIVE = sa.text("status IN ('queued', 'running', 'succeeded')")


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table('training_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('feedback_through_id', sa.Integer(), nullable=True))
        batch_op.create_index('uq_training_jobs_request_sha256_live', ['request_sha256'], unique=True,
                              postgresql_where=_LIVE, sqlite_where=_LIVE)
    with op.batch_alter_table('model_promotions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('outcome', sa.String(length=20), server_default='applied', nullable=False))
        batch_op.create_check_constraint(op.f('ck_model_promotions_outcome'), "outcome IN ('applied', 'refused')")


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table('model_promotions', schema=None) as batch_op:
        batch_op.drop_constraint(op.f('ck_model_promotions_outcome'), type_='check')
        batch_op.drop_column('outcome')
    with op.batch_alter_table('training_jobs', schema=None) as batch_op:
        batch_op.drop_index('uq_training_jobs_request_sha256_live')
        batch_op.drop_column('feedback_through_id')
