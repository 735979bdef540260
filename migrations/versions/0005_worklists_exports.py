"""worklists (uploaded study requests and their per-row resolution) and cohort exports

Revision ID: 0005_worklists_exports
Revises: 0004_workers
Create Date: 2026-11-30 09:45:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0005_worklists_exports'
down_revision = '0004_workers'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'worklists',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('filename', sa.String(length=255), nullable=True),
        sa.Column('key_type', sa.String(length=32), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('node_name', sa.String(length=64), nullable=True),
        sa.Column('row_count', sa.Integer(), nullable=False),
        sa.Column('summary', sa.JSON(), nullable=False),
        sa.Column('retrieval_id', sa.Integer(), nullable=True),
        sa.Column('actor', sa.String(length=128), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_table(
        'worklist_rows',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('worklist_id', sa.Integer(), nullable=False),
        sa.Column('row', sa.Integer(), nullable=False),
        sa.Column('key', sa.String(length=255), nullable=True),
        sa.Column('filters', sa.JSON(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('studies', sa.JSON(), nullable=False),
        sa.Column('detail', sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(['worklist_id'], ['worklists.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_worklist_rows_worklist_id', 'worklist_rows', ['worklist_id'], unique=False)
    op.create_table(
        'exports',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('cohort_id', sa.Integer(), nullable=False),
        sa.Column('format', sa.String(length=32), nullable=False),
        sa.Column('params', sa.JSON(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('done', sa.Integer(), nullable=False),
        sa.Column('total', sa.Integer(), nullable=False),
        sa.Column('report', sa.JSON(), nullable=False),
        sa.Column('archive_path', sa.String(length=512), nullable=True),
        sa.Column('actor', sa.String(length=128), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['cohort_id'], ['cohorts.id']),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_exports_cohort_id', 'exports', ['cohort_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_exports_cohort_id', table_name='exports')
    op.drop_table('exports')
    op.drop_index('ix_worklist_rows_worklist_id', table_name='worklist_rows')
    op.drop_table('worklist_rows')
    op.drop_table('worklists')
