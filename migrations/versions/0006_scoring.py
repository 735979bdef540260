"""scoring: scoring_jobs (the worker's second job kind) and instance_scores (one model's answer per instance)

Revision ID: 0006_scoring
Revises: 0005_worklists_exports
Create Date: 2026-11-30 12:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0006_scoring'
down_revision = '0005_worklists_exports'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'scoring_jobs',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('model_id', sa.Integer(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('params', sa.JSON(), nullable=False),
        sa.Column('total', sa.Integer(), nullable=False),
        sa.Column('done', sa.Integer(), nullable=False),
        sa.Column('failed', sa.Integer(), nullable=False),
        sa.Column('progress', sa.JSON(), nullable=False),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('cancel_requested', sa.Boolean(), nullable=False),
        sa.Column('worker_id', sa.String(length=128), nullable=True),
        sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['model_id'], ['trained_models.id'],
                                name=op.f('fk_scoring_jobs_model_id_trained_models'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_scoring_jobs')),
    )
    op.create_index(op.f('ix_scoring_jobs_model_id'), 'scoring_jobs', ['model_id'], unique=False)
    op.create_index(op.f('ix_scoring_jobs_status'), 'scoring_jobs', ['status'], unique=False)
    op.create_table(
        'instance_scores',
        sa.Column('model_id', sa.Integer(), nullable=False),
        sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('predicted_class', sa.String(length=64), nullable=True),
        sa.Column('confidence', sa.Float(), nullable=True),
        sa.Column('in_domain', sa.Boolean(), nullable=False),
        sa.Column('error', sa.String(length=255), nullable=True),
        sa.Column('job_id', sa.Integer(), nullable=True),
        sa.Column('scored_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['model_id'], ['trained_models.id'],
                                name=op.f('fk_instance_scores_model_id_trained_models'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('model_id', 'sop_instance_uid', name=op.f('pk_instance_scores')),
    )
    op.create_index(op.f('ix_instance_scores_sop_instance_uid'), 'instance_scores', ['sop_instance_uid'],
                    unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_instance_scores_sop_instance_uid'), table_name='instance_scores')
    op.drop_table('instance_scores')
    op.drop_index(op.f('ix_scoring_jobs_status'), table_name='scoring_jobs')
    op.drop_index(op.f('ix_scoring_jobs_model_id'), table_name='scoring_jobs')
    op.drop_table('scoring_jobs')
