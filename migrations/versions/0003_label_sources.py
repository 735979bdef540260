"""label sources: PerformedProcedureStepDescription, AcquisitionDeviceProcessingDescription, species
and breed columns, the species label; backfilled from the stored files

Revision ID: 0003_label_sources
Revises: 0002_store_conflicts
Create Date: 2026-11-30 08:30:00
"""
import os

from alembic import op
import sqlalchemy as sa


revision = '0003_label_sources'
down_revision = '0002_store_conflicts'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('patients', schema=None) as batch_op:
        batch_op.add_column(sa.Column('patient_species_description', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('patient_breed_description', sa.String(length=64), nullable=True))
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(sa.Column('performed_procedure_step_description', sa.String(length=255), nullable=True))
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('acquisition_device_processing_description', sa.String(length=255),
                                      nullable=True))
        batch_op.add_column(sa.Column('label_species', sa.String(length=16), nullable=True))
    # the new columns are label sources: fill them from the files already in the store, so the next
    # relabel sees them (RADCOHORT_SKIP_LABEL_BACKFILL=1 defers it to `radcohort labels backfill`)
    if os.environ.get("RADCOHORT_SKIP_LABEL_BACKFILL") != "1":
        from app.config import Settings
        from app.labels.backfill import backfill_label_sources

        try:
            store = Settings().store_dir
        except Exception:  # noqa: BLE001 - settings unusable here: the CLI command can backfill later
            store = None
        backfill_label_sources(op.get_bind(), store)


def downgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_column('label_species')
        batch_op.drop_column('acquisition_device_processing_description')
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_column('performed_procedure_step_description')
    with op.batch_alter_table('patients', schema=None) as batch_op:
        batch_op.drop_column('patient_species_description')
        batch_op.drop_column('patient_breed_description')
