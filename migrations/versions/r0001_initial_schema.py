"""Initial schema: catalog, cost-matrix versions, API keys, registry, jobs, verifications, audit log.

Revision ID: 0001
Revises:
Create Date: 2026-11-23 20:01:34
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table('api_keys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('prefix', sa.String(length=32), nullable=False),
    sa.Column('key_sha256', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('role', sa.String(length=20), nullable=False),
    sa.Column('created_by', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("role IN ('client', 'pharmacist', 'admin')", name=op.f('ck_api_keys_role')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
    sa.UniqueConstraint('prefix', name=op.f('uq_api_keys_prefix'))
    )
    op.create_table('datasets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('path', sa.String(length=1000), nullable=False),
    sa.Column('source', sa.String(length=20), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=True),
    sa.Column('counts', sa.JSON(), nullable=False),
    sa.Column('created_by', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_datasets')),
    sa.UniqueConstraint('name', name=op.f('uq_datasets_name'))
    )
    op.create_table('products',
    sa.Column('ndc', sa.String(length=16), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('shape', sa.String(length=40), nullable=False),
    sa.Column('colour', sa.String(length=40), nullable=False),
    sa.Column('imprint', sa.JSON(), nullable=False),
    sa.Column('size_mm', sa.Float(), nullable=True),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('ndc', name=op.f('pk_products'))
    )
    op.create_table('admin_audit_log',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('actor_key_id', sa.Integer(), nullable=True),
    sa.Column('actor_role', sa.String(length=20), nullable=True),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('entity_type', sa.String(length=64), nullable=False),
    sa.Column('entity_id', sa.String(length=64), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('details', sa.JSON(), nullable=False),
    sa.Column('request_id', sa.String(length=128), nullable=True),
    sa.ForeignKeyConstraint(['actor_key_id'], ['api_keys.id'], name=op.f('fk_admin_audit_log_actor_key_id_api_keys')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_admin_audit_log'))
    )
    with op.batch_alter_table('admin_audit_log', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_admin_audit_log_action'), ['action'], unique=False)
        batch_op.create_index(batch_op.f('ix_admin_audit_log_created_at'), ['created_at'], unique=False)

    op.create_table('cost_matrix_versions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('parent_id', sa.Integer(), nullable=True),
    sa.Column('author', sa.String(length=200), nullable=False),
    sa.Column('author_key_id', sa.Integer(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('default_cost', sa.Float(), nullable=False),
    sa.Column('entries_sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['author_key_id'], ['api_keys.id'], name=op.f('fk_cost_matrix_versions_author_key_id_api_keys')),
    sa.ForeignKeyConstraint(['parent_id'], ['cost_matrix_versions.id'], name=op.f('fk_cost_matrix_versions_parent_id_cost_matrix_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cost_matrix_versions')),
    sa.UniqueConstraint('parent_id', name=op.f('uq_cost_matrix_versions_parent_id'),
                        postgresql_nulls_not_distinct=True)
    )
    op.create_table('cost_matrix_entries',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('true_ndc', sa.String(length=16), nullable=False),
    sa.Column('predicted_ndc', sa.String(length=16), nullable=False),
    sa.Column('cost', sa.Float(), nullable=False),
    sa.CheckConstraint('cost >= 0', name=op.f('ck_cost_matrix_entries_cost_non_negative')),
    sa.CheckConstraint('true_ndc <> predicted_ndc', name=op.f('ck_cost_matrix_entries_off_diagonal')),
    sa.ForeignKeyConstraint(['predicted_ndc'], ['products.ndc'], name=op.f('fk_cost_matrix_entries_predicted_ndc_products')),
    sa.ForeignKeyConstraint(['true_ndc'], ['products.ndc'], name=op.f('fk_cost_matrix_entries_true_ndc_products')),
    sa.ForeignKeyConstraint(['version_id'], ['cost_matrix_versions.id'], name=op.f('fk_cost_matrix_entries_version_id_cost_matrix_versions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cost_matrix_entries')),
    sa.UniqueConstraint('version_id', 'true_ndc', 'predicted_ndc', name=op.f('uq_cost_matrix_entries_version_id_true_ndc_predicted_ndc'))
    )
    with op.batch_alter_table('cost_matrix_entries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_cost_matrix_entries_version_id'), ['version_id'], unique=False)

    op.create_table('model_versions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('path', sa.String(length=1000), nullable=False),
    sa.Column('arch', sa.String(length=50), nullable=False),
    sa.Column('method', sa.String(length=30), nullable=False),
    sa.Column('output_kind', sa.String(length=10), nullable=False),
    sa.Column('classes', sa.JSON(), nullable=False),
    sa.Column('image_size', sa.Integer(), nullable=True),
    sa.Column('temperature', sa.Float(), nullable=True),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('parent_id', sa.Integer(), nullable=True),
    sa.Column('cost_matrix_version_id', sa.Integer(), nullable=True),
    sa.Column('dataset_id', sa.Integer(), nullable=True),
    sa.Column('dataset_fingerprint', sa.String(length=64), nullable=True),
    sa.Column('code_version', sa.String(length=64), nullable=True),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('decision', sa.JSON(), nullable=False),
    sa.Column('checkpoint_metadata', sa.JSON(), nullable=False),
    sa.Column('created_by', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['cost_matrix_version_id'], ['cost_matrix_versions.id'], name=op.f('fk_model_versions_cost_matrix_version_id_cost_matrix_versions')),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_model_versions_dataset_id_datasets')),
    sa.ForeignKeyConstraint(['parent_id'], ['model_versions.id'], name=op.f('fk_model_versions_parent_id_model_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_versions')),
    sa.UniqueConstraint('sha256', name=op.f('uq_model_versions_sha256'))
    )
    op.create_table('active_state',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('cost_matrix_version_id', sa.Integer(), nullable=True),
    sa.Column('model_version_id', sa.Integer(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint('id = 1', name=op.f('ck_active_state_singleton')),
    sa.ForeignKeyConstraint(['cost_matrix_version_id'], ['cost_matrix_versions.id'], name=op.f('fk_active_state_cost_matrix_version_id_cost_matrix_versions')),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], name=op.f('fk_active_state_model_version_id_model_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_active_state'))
    )
    op.create_table('model_promotions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('action', sa.String(length=20), nullable=False),
    sa.Column('from_model_version_id', sa.Integer(), nullable=True),
    sa.Column('to_model_version_id', sa.Integer(), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('actor_key_id', sa.Integer(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('forced', sa.Boolean(), nullable=False),
    sa.Column('gate', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("action IN ('promote', 'auto_promote', 'rollback', 'activate')", name=op.f('ck_model_promotions_action')),
    sa.ForeignKeyConstraint(['actor_key_id'], ['api_keys.id'], name=op.f('fk_model_promotions_actor_key_id_api_keys')),
    sa.ForeignKeyConstraint(['from_model_version_id'], ['model_versions.id'], name=op.f('fk_model_promotions_from_model_version_id_model_versions')),
    sa.ForeignKeyConstraint(['to_model_version_id'], ['model_versions.id'], name=op.f('fk_model_promotions_to_model_version_id_model_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_promotions'))
    )
    op.create_table('training_jobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('method', sa.String(length=30), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=True),
    sa.Column('dataset_name', sa.String(length=100), nullable=False),
    sa.Column('include_feedback', sa.Boolean(), nullable=False),
    sa.Column('base_model_version_id', sa.Integer(), nullable=True),
    sa.Column('cost_matrix_version_id', sa.Integer(), nullable=True),
    sa.Column('hyperparameters', sa.JSON(), nullable=False),
    sa.Column('seed', sa.Integer(), nullable=False),
    sa.Column('auto_promote', sa.Boolean(), nullable=False),
    sa.Column('request_sha256', sa.String(length=64), nullable=False),
    sa.Column('progress', sa.JSON(), nullable=False),
    sa.Column('result', sa.JSON(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('celery_task_id', sa.String(length=64), nullable=True),
    sa.Column('lease_owner', sa.String(length=200), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('cancel_requested', sa.Boolean(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('resume_path', sa.String(length=1000), nullable=True),
    sa.Column('result_model_version_id', sa.Integer(), nullable=True),
    sa.Column('created_by', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name=op.f('ck_training_jobs_status')),
    sa.ForeignKeyConstraint(['base_model_version_id'], ['model_versions.id'], name=op.f('fk_training_jobs_base_model_version_id_model_versions')),
    sa.ForeignKeyConstraint(['cost_matrix_version_id'], ['cost_matrix_versions.id'], name=op.f('fk_training_jobs_cost_matrix_version_id_cost_matrix_versions')),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_training_jobs_dataset_id_datasets')),
    sa.ForeignKeyConstraint(['result_model_version_id'], ['model_versions.id'], name=op.f('fk_training_jobs_result_model_version_id_model_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_training_jobs'))
    )
    with op.batch_alter_table('training_jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_training_jobs_request_sha256'), ['request_sha256'], unique=False)
        batch_op.create_index(batch_op.f('ix_training_jobs_status'), ['status'], unique=False)

    op.create_table('verifications',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('api_key_id', sa.Integer(), nullable=True),
    sa.Column('client_reference', sa.String(length=200), nullable=True),
    sa.Column('idempotency_key', sa.String(length=200), nullable=True),
    sa.Column('request_sha256', sa.String(length=64), nullable=True),
    sa.Column('prescribed_ndc_input', sa.String(length=64), nullable=False),
    sa.Column('prescribed_ndc', sa.String(length=16), nullable=True),
    sa.Column('verdict', sa.String(length=20), nullable=False),
    sa.Column('reason', sa.String(length=64), nullable=False),
    sa.Column('predicted_ndc', sa.String(length=16), nullable=True),
    sa.Column('probability_prescribed', sa.Float(), nullable=True),
    sa.Column('expected_accept_cost', sa.Float(), nullable=True),
    sa.Column('top', sa.JSON(), nullable=False),
    sa.Column('conformal_set', sa.JSON(), nullable=True),
    sa.Column('model_version_id', sa.Integer(), nullable=True),
    sa.Column('cost_matrix_version_id', sa.Integer(), nullable=True),
    sa.Column('image_sha256', sa.String(length=64), nullable=False),
    sa.Column('image_path', sa.String(length=1000), nullable=True),
    sa.Column('image_format', sa.String(length=10), nullable=True),
    sa.Column('image_width', sa.Integer(), nullable=True),
    sa.Column('image_height', sa.Integer(), nullable=True),
    sa.Column('latency_ms', sa.Float(), nullable=True),
    sa.Column('response', sa.JSON(), nullable=False),
    sa.CheckConstraint("verdict IN ('match', 'mismatch', 'review')", name=op.f('ck_verifications_verdict')),
    sa.ForeignKeyConstraint(['api_key_id'], ['api_keys.id'], name=op.f('fk_verifications_api_key_id_api_keys')),
    sa.ForeignKeyConstraint(['cost_matrix_version_id'], ['cost_matrix_versions.id'], name=op.f('fk_verifications_cost_matrix_version_id_cost_matrix_versions')),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], name=op.f('fk_verifications_model_version_id_model_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_verifications')),
    sa.UniqueConstraint('api_key_id', 'idempotency_key', name=op.f('uq_verifications_api_key_id_idempotency_key'))
    )
    with op.batch_alter_table('verifications', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_verifications_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_verifications_model_version_id'), ['model_version_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_verifications_prescribed_ndc'), ['prescribed_ndc'], unique=False)
        batch_op.create_index(batch_op.f('ix_verifications_verdict'), ['verdict'], unique=False)

    op.create_table('resolutions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('verification_id', sa.String(length=36), nullable=False),
    sa.Column('actual_ndc', sa.String(length=16), nullable=True),
    sa.Column('resolved_by', sa.String(length=200), nullable=False),
    sa.Column('resolved_by_key_id', sa.Integer(), nullable=True),
    sa.Column('note', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['actual_ndc'], ['products.ndc'], name=op.f('fk_resolutions_actual_ndc_products')),
    sa.ForeignKeyConstraint(['resolved_by_key_id'], ['api_keys.id'], name=op.f('fk_resolutions_resolved_by_key_id_api_keys')),
    sa.ForeignKeyConstraint(['verification_id'], ['verifications.id'], name=op.f('fk_resolutions_verification_id_verifications')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_resolutions'))
    )
    with op.batch_alter_table('resolutions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_resolutions_verification_id'), ['verification_id'], unique=False)

    # The singleton pointer row always exists, so activation is a plain UPDATE (no insert race).
    active_state = sa.table('active_state', sa.column('id', sa.Integer()),
                            sa.column('updated_at', sa.DateTime(timezone=True)))
    op.bulk_insert(active_state, [{'id': 1, 'updated_at': datetime.now(UTC)}])


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table('resolutions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_resolutions_verification_id'))

    op.drop_table('resolutions')
    with op.batch_alter_table('verifications', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_verifications_verdict'))
        batch_op.drop_index(batch_op.f('ix_verifications_prescribed_ndc'))
        batch_op.drop_index(batch_op.f('ix_verifications_model_version_id'))
        batch_op.drop_index(batch_op.f('ix_verifications_created_at'))

    op.drop_table('verifications')
    with op.batch_alter_table('training_jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_training_jobs_status'))
        batch_op.drop_index(batch_op.f('ix_training_jobs_request_sha256'))

    op.drop_table('training_jobs')
    op.drop_table('model_promotions')
    op.drop_table('active_state')
    op.drop_table('model_versions')
    with op.batch_alter_table('cost_matrix_entries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_cost_matrix_entries_version_id'))

    op.drop_table('cost_matrix_entries')
    op.drop_table('cost_matrix_versions')
    with op.batch_alter_table('admin_audit_log', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_admin_audit_log_created_at'))
        batch_op.drop_index(batch_op.f('ix_admin_audit_log_action'))

    op.drop_table('admin_audit_log')
    op.drop_table('products')
    op.drop_table('datasets')
    op.drop_table('api_keys')
