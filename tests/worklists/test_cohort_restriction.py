"""Cohorts restricted by a worklist (issue #17 item 2): only / all but the listed studies or patients."""

from __future__ import annotations

import csv
import io

import pytest
from fastapi.testclient import TestClient

from app.api import create_app
from app.labels.service import make_labeler
from tests.factories.index_rows import add_index_rows
from app.privacy import patient_key
from tests.conftest import _migrated_ctx, make_settings

ADMIN = "admin-tok"
H = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture
def api(tmp_path, db_url):
    s = make_settings(tmp_path, db_url, api_tokens=f"admin:{ADMIN}:read+retrieve+find-identified")
    for ctx in _migrated_ctx(s):
        recs = []
        # 10 knee patients per side, two studies each (their own accession numbers)
        for i in range(10):
            for side in "LR":
                for k in range(2):
                    recs.append({"patient_id": f"{side}{i}", "patient_name": f"SECRET^{side}{i}", "patient_sex": "M",
                                 "patient_age": "040Y", "body_part_examined": "KNEE", "view_position": "AP",
                                 "image_laterality": side, "accession_number": f"ACC-{side}{i}-{k}",
                                 "study_instance_uid": f"1.2.826.0.1.3680043.10.777.{'12'[side == 'R']}{i:02d}{k}"})
        # excluded rows: no body part (L1, in the worklists below; X1, in none), no side (L2; X2)
        for pid, extra in (("L1", {}), ("X1", {}), ("L2", {"body_part_examined": "KNEE", "image_laterality": ""}),
                           ("X2", {"body_part_examined": "KNEE", "image_laterality": ""})):
            recs.append({"patient_id": pid, "patient_name": f"SECRET^{pid}", "patient_sex": "M", "patient_age": "040Y",
                         "body_part_examined": "", "view_position": "AP", "accession_number": f"ACC-{pid}-x",
                         "study_instance_uid": f"1.2.826.0.1.3680043.10.778.{len(recs)}", **extra})
        with ctx.sessions() as sess:
            for r in add_index_rows(sess, recs, make_labeler(sess)):
                f = s.store_dir / r.file_path
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_bytes(b"DICM")
            sess.commit()
        with TestClient(create_app(s, ctx)) as c:
            yield c, s


def _worklist(c, text):
    r = c.post("/api/v1/worklists", files={"file": ("w.csv", text.encode())}, headers=H)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _cohort(c, **extra):
    body = {"taxonomy": "xr10", "split": {"train": 0.5, "test": 0.5}, "seed": 2, **extra}
    r = c.post("/api/v1/cohorts", json=body, headers=H)
    return r


def _keys(c, cid):
    rows = csv.DictReader(io.StringIO(c.get(f"/api/v1/cohorts/{cid}/manifest", headers=H).text))
    return {r["patient_key"] for r in rows}


def test_only_these_patients_and_exclude_these(api):
    c, s = api
    key = s.get_pseudonym_key()
    full = _cohort(c).json()
    assert full["size"] == 20
    assert full["excluded"]["no_label"] == 2 and full["excluded"]["incomplete_label"] == 2
    wid = _worklist(c, "PatientID\nL1\nL2\nR3\nNOBODY\n")
    only = _cohort(c, worklist={"id": wid})
    assert only.status_code == 201, only.text
    # the exclusions counted are those of the listed patients only (L1's unlabelled, L2's sideless image)
    assert only.json()["excluded"]["no_label"] == 1 and only.json()["excluded"]["incomplete_label"] == 1
    assert _keys(c, only.json()["id"]) == {patient_key(key, p, "") for p in ("L1", "L2", "R3")}
    assert only.json()["params"]["worklist"] == {"id": wid, "mode": "include", "by": "study"}
    but = _cohort(c, worklist={"id": wid, "mode": "exclude"}).json()
    assert but["excluded"]["no_label"] == 1 and but["excluded"]["incomplete_label"] == 1  # X1's, X2's
    assert but["size"] == 17 and not (_keys(c, but["id"]) & {patient_key(key, p, "") for p in ("L1", "L2", "R3")})


def test_study_worklists_by_study_and_by_patient(api):
    c, s = api
    key = s.get_pseudonym_key()
    # one study of L4 (accession), one of R5 (UID)
    acc = _worklist(c, "AccessionNumber\nACC-L4-0\n")
    uid = _worklist(c, "StudyInstanceUID\n1.2.826.0.1.3680043.10.777.2051\n")
    for wid, pid in ((acc, "L4"), (uid, "R5")):
        only = _cohort(c, worklist={"id": wid}).json()
        assert only["size"] == 1 and _keys(c, only["id"]) == {patient_key(key, pid, "")}
        # excluding one study by study leaves the patient's other study eligible; by patient removes both
        by_study = _cohort(c, worklist={"id": wid, "mode": "exclude"}).json()
        assert by_study["size"] == 20 and patient_key(key, pid, "") in _keys(c, by_study["id"])
        by_patient = _cohort(c, worklist={"id": wid, "mode": "exclude", "by": "patient"}).json()
        assert by_patient["size"] == 19 and patient_key(key, pid, "") not in _keys(c, by_patient["id"])


def test_bad_restrictions(api):
    c, _s = api
    r = _cohort(c, worklist={"id": 99999})
    assert r.status_code == 422  # nothing qualifies: no such worklist
    r = _cohort(c, worklist={"id": 1, "mode": "maybe"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "mode"
    r = _cohort(c, worklist={"id": 1, "colour": "red"})
    assert r.status_code == 422
    # preview: the restricted counts, nothing saved
    wid = _worklist(c, "PatientID\nL1\n")
    p = _cohort(c, worklist={"id": wid}, preview=True)
    assert p.status_code == 200 and p.json()["size"] == 1
