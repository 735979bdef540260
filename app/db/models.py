"""All tables. Schema changes go through Alembic migrations in migrations/versions."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# ---------------------------------------------------------------- PACS nodes
class PacsNode(Base):
    __tablename__ = "pacs_nodes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    ae_title: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    retrieve_method: Mapped[str] = mapped_column(String(8), default="move")
    # free-form per-node options (policy, capabilities from a probe, DICOMweb URL ...)
    options: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


# ---------------------------------------------------------------- index
class Patient(Base):
    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("patient_id", "issuer", name="uq_patients_id_issuer"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64))  # stored, never exported
    issuer: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str | None] = mapped_column(String(324))  # stored, never exposed
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    # veterinary headers (app.labels species): an animal gets no human body part
    patient_species_description: Mapped[str | None] = mapped_column(String(64))
    patient_breed_description: Mapped[str | None] = mapped_column(String(64))


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8), index=True)
    study_time: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(64))
    study_description: Mapped[str | None] = mapped_column(String(255))
    requested_procedure_description: Mapped[str | None] = mapped_column(String(255))
    patient_age: Mapped[str | None] = mapped_column(String(8))


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    series_description: Mapped[str | None] = mapped_column(String(255))
    protocol_name: Mapped[str | None] = mapped_column(String(255))
    laterality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    performed_procedure_step_description: Mapped[str | None] = mapped_column(String(255))  # a label source


class Instance(Base):
    """One stored SOP instance. Patient/study/series keys and labels are denormalized here
    so that cohort selection over millions of rows is a single indexed table scan."""

    __tablename__ = "instances"
    __table_args__ = (
        # covering index for cohort selection (app.cohorts.builder): every column a class predicate or
        # the selection reads, so both backends answer it with an index-only scan
        Index("ix_instances_labels", "label_body_part", "label_view", "label_laterality", "label_sex",
              "label_age_years", "label_age_band", "modality", "has_conflict", "photometric_interpretation",
              "patient_pk", "id"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"), index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    modality: Mapped[str | None] = mapped_column(String(16))
    view_position: Mapped[str | None] = mapped_column(String(16))
    image_laterality: Mapped[str | None] = mapped_column(String(16))
    photometric_interpretation: Mapped[str | None] = mapped_column(String(32))
    # the CR/DX reader's exam menu ("[LOWER LEG]"): set per image, a label source
    acquisition_device_processing_description: Mapped[str | None] = mapped_column(String(255))
    # this instance's own PatientSex (PACS vary it between a patient's studies): relabel reads it,
    # as labelling at indexing did, rather than the patient row's first-seen value
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    bits_stored: Mapped[int | None] = mapped_column(Integer)
    transfer_syntax_uid: Mapped[str | None] = mapped_column(String(64))
    file_path: Mapped[str] = mapped_column(String(512))  # relative to the store root
    file_size: Mapped[int] = mapped_column(BigInteger, default=0)
    source_node: Mapped[str | None] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # normalized labels (app.labels), recomputed when the rule set changes
    label_body_part: Mapped[str | None] = mapped_column(String(32))
    label_view: Mapped[str | None] = mapped_column(String(32))
    label_laterality: Mapped[str | None] = mapped_column(String(16))
    label_sex: Mapped[str | None] = mapped_column(String(8))
    label_age_years: Mapped[float | None] = mapped_column(Float)
    label_age_band: Mapped[str | None] = mapped_column(String(16))
    label_species: Mapped[str | None] = mapped_column(String(16))  # set only when the header names one
    label_sources: Mapped[dict | None] = mapped_column(JSON)  # label -> tag or rule it came from
    label_conflicts: Mapped[list | None] = mapped_column(JSON)  # [] or [{"label","values":[...]}]
    has_conflict: Mapped[bool] = mapped_column(Boolean, default=False)
    ruleset_version: Mapped[str | None] = mapped_column(String(64))


# ---------------------------------------------------------------- retrievals
class Retrieval(Base):
    __tablename__ = "retrievals"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_name: Mapped[str] = mapped_column(String(64), index=True)
    query: Mapped[dict] = mapped_column(JSON, default=dict)
    method: Mapped[str | None] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    expected: Mapped[int] = mapped_column(Integer, default=0)
    received: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    missing: Mapped[list] = mapped_column(JSON, default=list)
    failed_uids: Mapped[list] = mapped_column(JSON, default=list)
    error: Mapped[str | None] = mapped_column(Text)
    report: Mapped[dict] = mapped_column(JSON, default=dict)  # sub-operation counts, timings ...
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # the lease of the process running it (app.retrievals.lease): a stale one is taken over
    runner_id: Mapped[str | None] = mapped_column(String(96))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class RetrievalItem(Base):
    """One expected instance of a retrieval and its fate."""

    __tablename__ = "retrieval_items"
    __table_args__ = (UniqueConstraint("retrieval_id", "sop_instance_uid", name="uq_retrieval_items_uid"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    retrieval_id: Mapped[int] = mapped_column(ForeignKey("retrievals.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="expected")  # expected|received|skipped|failed|missing


# ---------------------------------------------------------------- labels, taxonomies, cohorts
class RuleSet(Base):
    __tablename__ = "rulesets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[str] = mapped_column(String(64), unique=True)  # e.g. "builtin-1+<sha12>"
    sha256: Mapped[str] = mapped_column(String(64))
    rules: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Taxonomy(Base):
    __tablename__ = "taxonomies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    classes: Mapped[list] = mapped_column(JSON)  # [{"name", "where": {...}}]
    description: Mapped[str | None] = mapped_column(Text)
    builtin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Cohort(Base):
    """A frozen snapshot: never updated after creation."""

    __tablename__ = "cohorts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    taxonomy_name: Mapped[str] = mapped_column(String(64))
    taxonomy: Mapped[dict] = mapped_column(JSON)  # the taxonomy as it was
    ruleset_version: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer, default=0)
    params: Mapped[dict] = mapped_column(JSON, default=dict)  # the full request
    summary: Mapped[dict] = mapped_column(JSON, default=dict)  # classes with split counts
    excluded: Mapped[dict] = mapped_column(JSON, default=dict)  # reason -> count
    size: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CohortMember(Base):
    __tablename__ = "cohort_members"
    __table_args__ = (UniqueConstraint("cohort_id", "sop_instance_uid", name="uq_cohort_members_uid"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # no index of its own: the unique (cohort_id, sop_instance_uid) index serves lookups by cohort (migration 0008)
    cohort_id: Mapped[int] = mapped_column(ForeignKey("cohorts.id", ondelete="CASCADE"))
    # a hint for joins, not a foreign key: the snapshot is its UIDs and outlives index rows, and on
    # PostgreSQL the FK check locked every member's instance row (half the cost of saving a cohort)
    instance_pk: Mapped[int | None] = mapped_column(Integer)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    class_name: Mapped[str] = mapped_column(String(64))
    split: Mapped[str] = mapped_column(String(16))
    patient_key: Mapped[str] = mapped_column(String(64))  # HMAC pseudonym
    file_path: Mapped[str | None] = mapped_column(String(512))


# ---------------------------------------------------------------- training
class TrainingJob(Base):
    __tablename__ = "training_jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cohort_id: Mapped[int] = mapped_column(ForeignKey("cohorts.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    params: Mapped[dict] = mapped_column(JSON, default=dict)  # the final config
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    epochs: Mapped[int] = mapped_column(Integer, default=30)
    device: Mapped[str | None] = mapped_column(String(64))
    images_per_second: Mapped[float | None] = mapped_column(Float)
    progress: Mapped[dict] = mapped_column(JSON, default=dict)  # loss, accuracies, eta ...
    history: Mapped[list] = mapped_column(JSON, default=list)
    metrics: Mapped[dict | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker_id: Mapped[str | None] = mapped_column(String(128))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    run_dir: Mapped[str | None] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class TrainedModel(Base):
    __tablename__ = "trained_models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("training_jobs.id"), unique=True)
    architecture: Mapped[str] = mapped_column(String(64))
    classes: Mapped[list] = mapped_column(JSON)
    path: Mapped[str] = mapped_column(String(512))  # checkpoint, relative to DATA_DIR
    card: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ScoringJob(Base):
    """Scoring every indexed radiograph with one model: queued by the API, run by `radcohort worker` through
    the training queue's claim/lease functions (app.training.jobs, `table=ScoringJob`)."""

    __tablename__ = "scoring_jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("trained_models.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    params: Mapped[dict] = mapped_column(JSON, default=dict)  # modalities, batch_size
    total: Mapped[int] = mapped_column(Integer, default=0)  # instances to score (counted when claimed)
    done: Mapped[int] = mapped_column(Integer, default=0)  # scored or failed so far
    failed: Mapped[int] = mapped_column(Integer, default=0)  # could not be decoded (a row with its error)
    progress: Mapped[dict] = mapped_column(JSON, default=dict)  # cursor, images/s, eta, out_of_domain ...
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker_id: Mapped[str | None] = mapped_column(String(128))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class InstanceScore(Base):
    """One model's answer for one indexed instance (written in bulk by a scoring job; a later job of the
    same model replaces it). No foreign key to instances: scores outlive re-indexing, like cohort members."""

    __tablename__ = "instance_scores"
    model_id: Mapped[int] = mapped_column(ForeignKey("trained_models.id", ondelete="CASCADE"), primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    predicted_class: Mapped[str | None] = mapped_column(String(64))  # null when the image could not be decoded
    confidence: Mapped[float | None] = mapped_column(Float)
    in_domain: Mapped[bool] = mapped_column(Boolean, default=True)
    error: Mapped[str | None] = mapped_column(String(255))
    job_id: Mapped[int | None] = mapped_column(Integer)
    scored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WorkerProcess(Base):
    """A `radcohort worker` process: written on start and on every poll, so the API can say whether one
    is alive and which models it offers (the API never imports torch to find out)."""

    __tablename__ = "workers"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)  # the worker_id it claims jobs with
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    # {"queues": [...], "models": [...], "depth_presets": {...}, "device": ..., "version": ...}
    capabilities: Mapped[dict] = mapped_column(JSON, default=dict)


# ---------------------------------------------------------------- audit
class AuditEvent(Base):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))  # token fingerprint or "cli"
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(128))
    details: Mapped[dict] = mapped_column(JSON, default=dict)


# ---------------------------------------------------------------- store conflicts
class StoreConflict(Base):
    """A received copy that contradicts the index (a known SOP Instance UID with other content or
    under another study/series, or a known study under another patient): kept aside under the
    store's .conflicts/ folder, never indexed. Patient identity only as HMAC pseudonyms."""

    __tablename__ = "store_conflicts"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "received_sha256", name="uq_store_conflicts_copy"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(32))  # sop_content|sop_study|sop_series|study_patient
    received_sha256: Mapped[str] = mapped_column(String(64))
    file_path: Mapped[str] = mapped_column(String(512))  # relative to the store root (.conflicts/...)
    file_size: Mapped[int] = mapped_column(BigInteger, default=0)
    source_node: Mapped[str | None] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    patient_key: Mapped[str | None] = mapped_column(String(64))  # pseudonym of the received copy's patient
    existing_study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    existing_series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    existing_sha256: Mapped[str | None] = mapped_column(String(64))
    existing_patient_key: Mapped[str | None] = mapped_column(String(64))
    existing_source_node: Mapped[str | None] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


# ---------------------------------------------------------------- worklists and exports (issue #17)
class Worklist(Base):
    """An uploaded list of study requests (CSV/XLSX), resolved by C-FIND and retrieved as one job."""

    __tablename__ = "worklists"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    filename: Mapped[str | None] = mapped_column(String(255))
    key_type: Mapped[str] = mapped_column(String(32))  # AccessionNumber | PatientID | StudyInstanceUID
    status: Mapped[str] = mapped_column(String(16), default="uploaded")  # uploaded|resolving|resolved|failed
    node_name: Mapped[str | None] = mapped_column(String(64))
    row_count: Mapped[int] = mapped_column(Integer, default=0)
    summary: Mapped[dict] = mapped_column(JSON, default=dict)  # status -> count, file-level errors
    retrieval_id: Mapped[int | None] = mapped_column(Integer)
    actor: Mapped[str | None] = mapped_column(String(128))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WorklistRow(Base):
    """One request of a worklist; `key` may identify a patient (shown only to find-identified tokens)."""

    __tablename__ = "worklist_rows"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    worklist_id: Mapped[int] = mapped_column(ForeignKey("worklists.id", ondelete="CASCADE"), index=True)
    row: Mapped[int] = mapped_column(Integer)  # line in the uploaded file (header = 1)
    key: Mapped[str | None] = mapped_column(String(255))
    filters: Mapped[dict] = mapped_column(JSON, default=dict)  # StudyDate / ModalitiesInStudy / StudyDescription
    status: Mapped[str] = mapped_column(String(16))  # pending|found|not_found|ambiguous|invalid|refused
    studies: Mapped[list] = mapped_column(JSON, default=list)  # StudyInstanceUIDs it resolved to
    detail: Mapped[str | None] = mapped_column(Text)


class Export(Base):
    """A de-identified DICOM or image-dataset export of a frozen cohort, built in the background."""

    __tablename__ = "exports"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cohort_id: Mapped[int] = mapped_column(ForeignKey("cohorts.id"), index=True)
    format: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="queued")  # queued|running|done|failed|cancelled|deleted
    done: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    report: Mapped[dict] = mapped_column(JSON, default=dict)  # exported, excluded/flagged counts, card
    archive_path: Mapped[str | None] = mapped_column(String(512))  # relative to DATA_DIR
    actor: Mapped[str | None] = mapped_column(String(128))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


# ---------------------------------------------------------------- durable background jobs
class Job(Base):
    """One piece of background work (probe, cohort pull, export, worklist resolve, retrieval): queued by
    whoever asks, claimed under a lease by a job runner (app.jobs), in the API process or `radcohort worker`."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_queue_status", "queue", "status"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)  # which handler runs it
    queue: Mapped[str] = mapped_column(String(32))  # which runners may claim it
    target: Mapped[str | None] = mapped_column(String(128), index=True)  # "export:7": the row it works on
    payload: Mapped[dict] = mapped_column(JSON, default=dict)  # ids and options only, never an identifier
    status: Mapped[str] = mapped_column(String(16), default="queued")  # queued|running|succeeded|failed|cancelled
    progress: Mapped[dict] = mapped_column(JSON, default=dict)
    result: Mapped[dict | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str | None] = mapped_column(String(128))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    runner_id: Mapped[str | None] = mapped_column(String(128))  # host:pid:random of the holder
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class NodeBucket(Base):
    """A node's rate limit shared by every process (RADCOHORT_SHARED_NODE_LIMITS): the tokens of one token
    bucket (instances or bytes) as of `updated` (epoch seconds), refilled and taken in one UPDATE."""

    __tablename__ = "node_buckets"
    node_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)  # instances | bytes
    tokens: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)


class NodeSlot(Base):
    """One of a node's `max_associations` association slots, shared by every process
    (RADCOHORT_SHARED_NODE_LIMITS): held under a lease (holder + heartbeat, epoch seconds) while a C-FIND,
    C-MOVE or C-GET association is open; a stopped holder's slot is free again once its lease is stale."""

    __tablename__ = "node_slots"
    node_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(160))
    heartbeat: Mapped[float | None] = mapped_column(Float)
