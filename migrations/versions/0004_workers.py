"""workers: live `radcohort worker` processes (heartbeat and the models each offers)

Revision ID: 0004_workers
Revises: 0003_label_sources
Create Date: 2026-11-30 09:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0004_workers'
down_revision = '0003_label_sources'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'workers',
        sa.Column('id', sa.String(length=128), nullable=False),
        sa.Column('hostname', sa.String(length=255), nullable=False),
        sa.Column('pid', sa.Integer(), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('capabilities', sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_workers_heartbeat_at', 'workers', ['heartbeat_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_workers_heartbeat_at', table_name='workers')
    op.drop_table('workers')
