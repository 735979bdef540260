"""Index: pure extraction and bulk idempotent ingest on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from sqlalchemy import func, select

from app.db.models import Instance, Patient, Series, Study
from app.store import DicomStore
from app.index.extract import age_years, extract_record
from app.index.ingest import index_directory, ingest, reindex
from tests.dicom.helpers import make_cr


def counts(ctx) -> tuple[int, int, int, int]:
    with ctx.sessions() as s:
        return tuple(s.scalar(select(func.count()).select_from(m)) for m in (Patient, Study, Series, Instance))


def test_extract_record_has_every_index_column():
    ds = make_cr(patient_id="PID9", patient_name="Doe^Jane", body_part="KNEE")
    ds.PatientAge = "045Y"
    ds.Laterality = "R"
    rec = extract_record(ds, file_path="a/b/c.dcm", file_size=123, transfer_syntax_uid="1.2.840.10008.1.2.1",
                         source_node="pacs")
    for table in (Patient, Study, Series, Instance):
        for col in table.__table__.columns:
            if col.name in ("id",) or col.name.endswith("_pk") or col.name.startswith("label_") or col.name in (
                    "has_conflict", "ruleset_version"):
                continue
            assert col.name in rec, col.name
    assert rec["patient_id"] == "PID9" and rec["patient_name"] == "Doe^Jane"
    assert rec["body_part_examined"] == "KNEE" and rec["laterality"] == "R"
    assert rec["rows"] == 64 and rec["bits_stored"] == 12 and rec["instance_number"] == 1
    assert rec["file_path"] == "a/b/c.dcm" and rec["file_size"] == 123 and rec["source_node"] == "pacs"


def test_extract_tolerates_bad_values():
    ds = make_cr()
    # a malformed IS as a PACS may send it (bypasses pydicom's write-side validation)
    ds._dict[0x00200013] = RawDataElement(Tag(0x00200013), "IS", 2, b"x1", 0, False, True)
    del ds.PatientID
    rec = extract_record(ds)
    assert rec["instance_number"] is None and rec["patient_id"] == ""


@pytest.mark.parametrize("age,birth,study,want", [
    ("045Y", None, None, 45.0), ("006M", None, None, 0.5), ("bad", "19800101", "20100101", 30.0),
    (None, "19800102", "20100101", 29.0), (None, None, "20100101", None),
])
def test_age_years(age, birth, study, want):
    assert age_years(age, birth, study) == want


def _records(n_patients=3, per_patient=4):
    recs = []
    for p in range(n_patients):
        study = None
        for k in range(per_patient):
            ds = make_cr(patient_id=f"P{p}", study_uid=study, instance_number=k + 1)
            study = ds.StudyInstanceUID
            recs.append(extract_record(ds, file_path=f"f{p}-{k}", file_size=10))
    return recs


def test_ingest_bulk_is_idempotent(any_ctx):
    recs = _records()
    with any_ctx.sessions() as s:
        r1 = ingest(s, recs)
        s.commit()
    assert r1.inserted == 12 and r1.existing == 0
    # every instance of a patient in one study; every instance its own series
    assert counts(any_ctx) == (3, 3, 12, 12)
    with any_ctx.sessions() as s:
        r2 = ingest(s, recs + recs[:2])  # again, with duplicates inside the batch
        s.commit()
    assert r2.inserted == 0 and r2.existing == 12
    assert counts(any_ctx) == (3, 3, 12, 12)
    with any_ctx.sessions() as s:
        inst = s.scalars(select(Instance).where(Instance.sop_instance_uid == recs[5]["sop_instance_uid"])).one()
        st = s.get(Study, inst.study_pk)
        pat = s.get(Patient, inst.patient_pk)
    assert st.study_instance_uid == recs[5]["study_instance_uid"] and pat.patient_id == "P1"
    assert inst.file_path == "f1-1" and inst.modality == "CR" and inst.has_conflict is False


def test_ingest_twice_in_one_transaction_and_after_a_rollback(any_ctx):
    # PostgreSQL stages instance rows in a per-connection temporary table (COPY): two calls in one
    # transaction, and a batch after a rolled-back one on the same pooled connection, count as on SQLite
    recs = _records(2, 4)
    with any_ctx.sessions() as s:
        r1 = ingest(s, recs[:5])
        r2 = ingest(s, recs[3:])
        s.commit()
    assert (r1.inserted, r1.existing) == (5, 0)
    assert sorted(r2.inserted_uids) == sorted(r["sop_instance_uid"] for r in recs[5:])
    assert sorted(r2.existing_uids) == sorted(r["sop_instance_uid"] for r in recs[3:5])
    assert counts(any_ctx) == (2, 2, 8, 8)
    extra = _records(1, 2)
    with any_ctx.sessions() as s:
        assert ingest(s, extra).inserted == 2
        s.rollback()
    with any_ctx.sessions() as s:
        r3 = ingest(s, extra + recs[:1])
        s.commit()
        # without a labeler the JSON label columns hold JSON null on both backends (as SQLAlchemy writes it)
        nulls = s.scalar(select(func.count()).select_from(Instance).where(Instance.label_sources.is_(None)))
    assert (r3.inserted, r3.existing) == (2, 1) and counts(any_ctx) == (2, 3, 10, 10)  # P0 again, a new study
    assert nulls == 0


def test_ingest_applies_labeler_and_survives_its_failures(any_ctx):
    recs = _records(1, 3)

    def labeler(rec):
        if rec["instance_number"] == 2:
            raise RuntimeError("rule bug")
        return {"label_body_part": rec["body_part_examined"], "label_sources": {"body_part": "BodyPartExamined"},
                "has_conflict": True, "ruleset_version": "t1", "not_a_column": 1}

    with any_ctx.sessions() as s:
        r = ingest(s, recs, labeler=labeler)
        s.commit()
        rows = {i.instance_number: i for i in s.scalars(select(Instance))}
    assert r.inserted == 3 and r.label_errors == 1
    assert rows[1].label_body_part == "CHEST" and rows[1].label_sources == {"body_part": "BodyPartExamined"}
    assert rows[1].has_conflict is True and rows[1].ruleset_version == "t1"
    assert rows[2].label_body_part is None and rows[2].has_conflict is False


def test_ingest_clips_overlong_text_and_japanese_round_trips(any_ctx):
    ds = make_cr(patient_name="山田^太郎", study_description="胸部正面" * 100)
    ds.SpecificCharacterSet = "ISO_IR 192"
    with any_ctx.sessions() as s:
        ingest(s, [extract_record(ds, file_path="x")])
        s.commit()
        st = s.scalars(select(Study)).one()
        p = s.scalars(select(Patient)).one()
    assert st.study_description == ("胸部正面" * 100)[:255]
    assert p.patient_name == "山田^太郎"


def test_ingest_rejects_records_without_uids(any_ctx):
    rec = extract_record(make_cr())
    rec["series_instance_uid"] = None
    with any_ctx.sessions() as s, pytest.raises(ValueError):
        ingest(s, [rec])


def test_index_directory_and_reindex(any_ctx, tmp_path):
    store = DicomStore(any_ctx.settings.store_dir)
    for i in range(5):
        ds = make_cr(patient_id=f"P{i % 2}")
        ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
        meta = dcmread(tmp_path / "x.dcm", stop_before_pixels=True).file_meta
        raw = (tmp_path / "x.dcm").read_bytes()
        from app.store import file_meta_end

        with open(tmp_path / "x.dcm", "rb") as f:
            off = file_meta_end(f)
        store.write_raw(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, meta, raw[off:])
    (any_ctx.settings.store_dir / "junk.dcm").write_bytes(b"not dicom")
    res = reindex(any_ctx)
    assert res.files == 6 and res.inserted == 5 and len(res.unreadable) == 1
    with any_ctx.sessions() as s:
        paths = set(s.scalars(select(Instance.file_path)))
    assert all((any_ctx.settings.store_dir / p).is_file() for p in paths) and len(paths) == 5
    again = index_directory(any_ctx)
    assert again.inserted == 0 and again.existing == 5
    assert counts(any_ctx)[3] == 5


def test_cache_reuses_committed_ids_and_ignores_rolled_back_ones(any_ctx):
    from app.index.ingest import IngestCache

    cache = IngestCache()
    a = make_cr(patient_id="PC")
    b = make_cr(patient_id="PC", study_uid=a.StudyInstanceUID, series_uid=a.SeriesInstanceUID)
    ghost = make_cr(patient_id="GHOST")
    with any_ctx.sessions() as s:
        ingest(s, [extract_record(ghost)], cache=cache)
        s.rollback()
        cache.discard()
    with any_ctx.sessions() as s:
        ingest(s, [extract_record(a)], cache=cache)
        s.commit()
        cache.commit()
    assert ("GHOST", "") not in cache.patients and ("PC", "") in cache.patients
    with any_ctx.sessions() as s:
        r = ingest(s, [extract_record(b), extract_record(ghost)], cache=cache)
        s.commit()
        cache.commit()
        rows = {i.sop_instance_uid: i for i in s.scalars(select(Instance))}
    assert r.inserted == 2
    assert rows[b.SOPInstanceUID].series_pk == rows[a.SOPInstanceUID].series_pk
    assert rows[b.SOPInstanceUID].patient_pk == rows[a.SOPInstanceUID].patient_pk
    assert counts(any_ctx) == (2, 2, 2, 3)


def _charset_files() -> list:
    import pydicom

    d = Path(pydicom.__file__).parent / "data" / "charset_files"
    return sorted(d.glob("chr*.dcm"))


def test_fast_header_read_and_extract_match_pydicom():
    """read_part10_header + the raw fast path give the same record as dcmread + pydicom conversion,
    over pydicom's character set files (Japanese, Korean, Greek, Arabic, ... ) and real radiographs."""
    from app.store import read_part10_header
    from tests.conftest import testdata as sample

    files = _charset_files() + [sample("RG1_J2KR.dcm"), sample("RG3_UNCR.dcm"), sample("CT_small.dcm")]
    assert len(files) > 10
    for f in files:
        fast = extract_record(read_part10_header(f), received_at=None)
        ref_ds = dcmread(f, stop_before_pixels=True)
        for elem in ref_ds:  # convert every value with pydicom first: forces the slow path
            _ = elem.value
        ref = extract_record(ref_ds)
        fast.pop("received_at"), ref.pop("received_at")
        assert fast == ref, f.name
