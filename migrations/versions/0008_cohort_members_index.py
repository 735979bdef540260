"""cohort_members: drop the index on cohort_id alone (the unique (cohort_id, sop_instance_uid) index
serves every lookup by cohort; keeping both cost 65-80 ms per 15,000-member snapshot on PostgreSQL)

Revision ID: 0008_cohort_members_index
Revises: 0007_jobs
Create Date: 2026-11-30 13:00:00
"""
from alembic import op


revision = '0008_cohort_members_index'
down_revision = '0007_jobs'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('cohort_members', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_cohort_members_cohort_id'))


def downgrade() -> None:
    with op.batch_alter_table('cohort_members', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_cohort_members_cohort_id'), ['cohort_id'], unique=False)
