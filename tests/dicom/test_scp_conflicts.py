"""Duplicates and conflicts (issue #18 item 4) through the real SCP, the index and the API.

A known SOP Instance UID sent again: the same bytes are Success and stored once; other content,
another study or another patient is kept aside under .conflicts/ (never indexed, never filed under
the wrong patient), answered 0xB000, listed by GET /api/v1/conflicts and audited.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from app.privacy import patient_key
from app.db.models import AuditEvent, Instance, Patient, StoreConflict, Study
from app.dicom.scp import STATUS_CONFLICT
from app.wiring import storage_scp
from app.store import part10_sha256
from app.index.ingest import reindex
from tests.dicom.helpers import make_cr
from tests.dicom.test_scp import SENDER, add_node, count, send


@pytest.fixture
def scp(ctx):
    add_node(ctx, "sender", SENDER)
    server = storage_scp(ctx).start()
    yield server
    server.stop()


def _main_files(ctx) -> list:
    root = ctx.settings.store_dir
    return sorted(p for p in root.rglob("*.dcm") if not any(x.startswith(".") for x in p.relative_to(root).parts))


def _conflicts(ctx) -> list[StoreConflict]:
    with ctx.sessions() as s:
        return list(s.scalars(select(StoreConflict).order_by(StoreConflict.id)))


def _key(ctx, pid: str) -> str:
    return patient_key(ctx.settings.get_pseudonym_key(), pid, "")


def test_identical_copy_is_success_and_stored_once(ctx, scp):
    ds = make_cr()
    assert send(scp.port, [ds]) == [0]
    assert send(scp.port, [ds]) == [0]
    assert len(_main_files(ctx)) == 1 and count(ctx) == 1 and _conflicts(ctx) == []
    assert not (ctx.settings.store_dir / ".conflicts").exists()
    with ctx.sessions() as s:  # the node it came from is recorded per instance (retrievals use it)
        assert s.scalars(select(Instance.source_node)).one() == "sender"


def test_other_content_under_a_known_uid_is_kept_aside_and_reported(ctx, scp, client):
    first = make_cr(patient_id="PID-FIRST", seed=1)
    forged = make_cr(patient_id="PID-FIRST", seed=2, study_uid=first.StudyInstanceUID,
                     series_uid=first.SeriesInstanceUID, sop_uid=first.SOPInstanceUID)
    assert send(scp.port, [first]) == [0]
    original = _main_files(ctx)[0]
    sha_before = part10_sha256(original)
    assert send(scp.port, [forged]) == [STATUS_CONFLICT]
    # the indexed instance and its file are untouched
    assert _main_files(ctx) == [original] and part10_sha256(original) == sha_before and count(ctx) == 1
    [c] = _conflicts(ctx)
    assert c.reason == "sop_content" and c.sop_instance_uid == first.SOPInstanceUID
    assert c.existing_sha256 == sha_before and c.received_sha256 != sha_before
    aside = ctx.settings.store_dir / c.file_path
    assert c.file_path.startswith(".conflicts/") and dcmread(aside).PixelData == forged.PixelData
    assert c.source_node == "sender" and c.calling_ae == SENDER
    # the same forged copy again: still a conflict, still one record and one file
    assert send(scp.port, [forged]) == [STATUS_CONFLICT]
    assert len(_conflicts(ctx)) == 1 and len(list(aside.parent.iterdir())) == 1
    # API and audit: UIDs and pseudonyms, never the patient ID
    body = client.get("/api/v1/conflicts").json()
    assert body["total"] == 1 and body["items"][0]["sop_instance_uid"] == first.SOPInstanceUID
    assert body["items"][0]["patient_key"] == body["items"][0]["existing_patient_key"] == _key(ctx, "PID-FIRST")
    assert client.get(f"/api/v1/conflicts/{c.id}").json()["reason"] == "sop_content"
    assert client.get("/api/v1/conflicts/999").status_code == 404
    with ctx.sessions() as s:
        ev = s.scalars(select(AuditEvent).where(AuditEvent.action == "dicom.conflict")).one()
    assert ev.target == first.SOPInstanceUID and ev.details["conflict_id"] == c.id
    assert "PID-FIRST" not in json.dumps(body) and "PID-FIRST" not in json.dumps(ev.details)
    assert "Test^Patient" not in json.dumps(body)


def test_known_uid_under_another_study_is_not_stored_as_a_second_instance(ctx, scp):
    first = make_cr(patient_id="P1")
    moved = make_cr(patient_id="P1", sop_uid=first.SOPInstanceUID)  # new study and series UIDs
    assert send(scp.port, [first]) == [0]
    assert send(scp.port, [moved]) == [STATUS_CONFLICT]
    assert len(_main_files(ctx)) == 1 and count(ctx) == 1
    [c] = _conflicts(ctx)
    assert c.reason == "sop_study" and c.study_instance_uid == moved.StudyInstanceUID
    assert c.existing_study_instance_uid == first.StudyInstanceUID
    # reindex finds nothing to add (the copy is under .conflicts/, which it skips)
    assert reindex(ctx).inserted == 0 and count(ctx) == 1


def test_new_instance_of_a_known_study_with_another_patient_is_not_filed_under_the_first(ctx, scp, client):
    first = make_cr(patient_id="PID-A")
    other = make_cr(patient_id="PID-B", study_uid=first.StudyInstanceUID)  # new series, new SOP
    assert send(scp.port, [first]) == [0]
    assert send(scp.port, [other]) == [STATUS_CONFLICT]
    with ctx.sessions() as s:
        assert list(s.scalars(select(Instance.sop_instance_uid))) == [first.SOPInstanceUID]
        owner = s.scalar(select(Patient.patient_id).join(Study, Study.patient_pk == Patient.id))
    assert owner == "PID-A"
    assert len(_main_files(ctx)) == 1  # moved out of the UID tree: reindex cannot file it under PID-A
    [c] = _conflicts(ctx)
    assert c.reason == "study_patient" and c.sop_instance_uid == other.SOPInstanceUID
    assert c.patient_key == _key(ctx, "PID-B") and c.existing_patient_key == _key(ctx, "PID-A")
    assert (ctx.settings.store_dir / c.file_path).is_file()
    assert reindex(ctx).inserted == 0
    body = client.get("/api/v1/conflicts", params={"reason": "study_patient"}).json()
    assert [i["sop_instance_uid"] for i in body["items"]] == [other.SOPInstanceUID]
    assert "PID-A" not in json.dumps(body) and "PID-B" not in json.dumps(body)


def test_storescu_is_told_with_a_warning_and_the_copy_is_kept(tmp_path, ctx, scp):
    first = make_cr(patient_id="P1", seed=3)
    forged = make_cr(patient_id="P1", seed=4, study_uid=first.StudyInstanceUID,
                     series_uid=first.SeriesInstanceUID, sop_uid=first.SOPInstanceUID)
    assert send(scp.port, [first]) == [0]
    path = tmp_path / "forged.dcm"
    forged.save_as(path, enforce_file_format=True)
    r = subprocess.run(["storescu", "-v", "-aet", SENDER, "-aec", "RADCOHORT", "127.0.0.1", str(scp.port),
                        str(path)], capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Warning: CoercionOfDataElements" in out, out[-2000:]  # dcmtk's name for 0xB000
    assert len(_conflicts(ctx)) == 1 and count(ctx) == 1


def test_one_batch_with_two_patients_for_a_new_study_files_only_the_first(ctx):
    """The index itself (not only the SCP's pre-checks) refuses the second patient of a study."""
    from app.index.extract import extract_record
    from app.index.ingest import ingest

    study = generate_uid()
    a, b = make_cr(patient_id="PA", study_uid=study), make_cr(patient_id="PB", study_uid=study)
    recs = [extract_record(d, file_path=f"x/{i}.dcm") for i, d in enumerate((a, b))]
    with ctx.sessions() as s:
        res = ingest(s, recs)
        s.commit()
    assert res.inserted_uids == [a.SOPInstanceUID] and res.conflicts == {b.SOPInstanceUID: "study_patient"}


def test_reindex_reports_a_file_that_conflicts_instead_of_filing_it(ctx, scp):
    """A file already in the UID tree (e.g. stored before this check) naming another patient for a
    known study: reindex leaves it unindexed and says so."""
    first = make_cr(patient_id="PID-A")
    assert send(scp.port, [first]) == [0]
    stray = make_cr(patient_id="PID-B", study_uid=first.StudyInstanceUID)
    path = ctx.settings.store_dir / stray.StudyInstanceUID / stray.SeriesInstanceUID / f"{stray.SOPInstanceUID}.dcm"
    path.parent.mkdir(parents=True)
    stray.save_as(path, enforce_file_format=True)
    res = reindex(ctx)
    assert res.inserted == 0 and res.conflicts == {stray.SOPInstanceUID: "study_patient"}
    assert count(ctx) == 1


def test_conflicts_api_needs_a_token_with_the_read_scope(tmp_path):
    from fastapi.testclient import TestClient

    from app.api import create_app
    from app.context import AppContext
    from app.db.migrate import upgrade
    from tests.conftest import make_settings

    s = make_settings(tmp_path, api_tokens="reader:r-secret:read,trainer:t-secret:train")
    upgrade(s.database_url)
    c = AppContext.build(s)
    try:
        with TestClient(create_app(s, c)) as client:
            assert client.get("/api/v1/conflicts").status_code == 401
            assert client.get("/api/v1/conflicts", headers={"Authorization": "Bearer t-secret"}).status_code == 403
            r = client.get("/api/v1/conflicts", headers={"Authorization": "Bearer r-secret"})
            assert r.status_code == 200 and r.json()["total"] == 0
    finally:
        c.close()
