"""node_buckets: per-node rate limits (instances/min, MB/s) shared by every process

Revision ID: 0009_node_buckets
Revises: 0008_cohort_members_index
Create Date: 2026-11-30 13:30:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0009_node_buckets'
down_revision = '0008_cohort_members_index'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'node_buckets',
        sa.Column('node_name', sa.String(length=64), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('tokens', sa.Float(), nullable=False),
        sa.Column('updated', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('node_name', 'kind', name=op.f('pk_node_buckets')),
    )


def downgrade() -> None:
    op.drop_table('node_buckets')
