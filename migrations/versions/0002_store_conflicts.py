"""store conflicts: received copies that contradict the index, kept aside

Revision ID: 0002_store_conflicts
Revises: 0001
Create Date: 2026-11-30 09:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0002_store_conflicts'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('store_conflicts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('reason', sa.String(length=32), nullable=False),
    sa.Column('received_sha256', sa.String(length=64), nullable=False),
    sa.Column('file_path', sa.String(length=512), nullable=False),
    sa.Column('file_size', sa.BigInteger(), nullable=False),
    sa.Column('source_node', sa.String(length=64), nullable=True),
    sa.Column('calling_ae', sa.String(length=16), nullable=True),
    sa.Column('patient_key', sa.String(length=64), nullable=True),
    sa.Column('existing_study_instance_uid', sa.String(length=64), nullable=True),
    sa.Column('existing_series_instance_uid', sa.String(length=64), nullable=True),
    sa.Column('existing_sha256', sa.String(length=64), nullable=True),
    sa.Column('existing_patient_key', sa.String(length=64), nullable=True),
    sa.Column('existing_source_node', sa.String(length=64), nullable=True),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_store_conflicts')),
    sa.UniqueConstraint('sop_instance_uid', 'received_sha256', name='uq_store_conflicts_copy')
    )
    with op.batch_alter_table('store_conflicts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_store_conflicts_sop_instance_uid'), ['sop_instance_uid'], unique=False)
        batch_op.create_index(batch_op.f('ix_store_conflicts_received_at'), ['received_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('store_conflicts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_store_conflicts_received_at'))
        batch_op.drop_index(batch_op.f('ix_store_conflicts_sop_instance_uid'))
    op.drop_table('store_conflicts')
