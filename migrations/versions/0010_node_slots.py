"""node_slots: per-node association slots (max_associations) shared by every process

Revision ID: 0010_node_slots
Revises: 0009_node_buckets
Create Date: 2026-11-30 13:40:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0010_node_slots'
down_revision = '0009_node_buckets'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'node_slots',
        sa.Column('node_name', sa.String(length=64), nullable=False),
        sa.Column('slot', sa.Integer(), nullable=False),
        sa.Column('holder', sa.String(length=160), nullable=True),
        sa.Column('heartbeat', sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint('node_name', 'slot', name=op.f('pk_node_slots')),
    )


def downgrade() -> None:
    op.drop_table('node_slots')
