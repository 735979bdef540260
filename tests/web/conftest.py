"""A console over a seeded index: named patients, real (tiny) DICOM files, a node, a retrieval, a cohort, a
completed training job with metrics and its model. Tokens are configured, so pages need a sign-in."""

from __future__ import annotations

import re
from datetime import datetime, timezone

import pytest
from fastapi.testclient import TestClient

from app.api import create_app
from app.db.models import PacsNode, Retrieval, TrainedModel, TrainingJob
from app.labels.service import make_labeler
from tests.factories.index_rows import add_index_rows
from tests.factories.training import write_tiny_dicom
from app.worklists import service as worklist_service
from tests.conftest import _migrated_ctx, make_settings

TOKEN = "console-test-token"
READER = "reader-token"
IDENT = "identified-token"
TOKENS = (f"alice:{TOKEN}:read+retrieve+train+export,bob:{READER}:read,"
          f"carol:{IDENT}:read+retrieve+export+find-identified+export-identified")
# identifiers the console must never show
NAMES = ["YAMADA^HANAKO", "DOE^JOHN", "MUSTERMANN^ERIKA", "SUZUKI^ICHIRO"]
PATIENT_IDS = ["PID-7781-SECRET", "PID-9902-SECRET", "PID-3141-SECRET", "PID-2718-SECRET"]
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def seed(ctx) -> dict:
    settings = ctx.settings
    out: dict = {"uids": []}
    with ctx.sessions() as s:
        recs = []
        for i in range(24):
            side = "L" if i % 2 else "R"
            uid = f"1.2.826.0.1.3680043.10.777.{i + 1}"
            rel = f"seed/{uid}.dcm"
            write_tiny_dicom(settings.store_dir / rel, "left" if side == "L" else "right", size=48, seed=i, sop_uid=uid)
            p = i % 8  # 8 patients... and more below: one image per patient for the cohort
            recs.append({"patient_id": PATIENT_IDS[i % 4] if i < 4 else f"PID-{i:04d}-SECRET",
                         "patient_name": NAMES[i % 4] if i < 4 else f"PATIENT^NUMBER{i}",
                         "patient_sex": "F" if p % 2 else "M", "patient_birth_date": "19700101",
                         "study_date": "20150601", "body_part_examined": "KNEE", "view_position": "AP",
                         "image_laterality": side, "series_description": "KNEE AP", "sop_instance_uid": uid,
                         "file_path": rel, "accession_number": f"ACC{i:05d}"})
            out["uids"].append(uid)
        add_index_rows(s, recs, make_labeler(s))
        s.add(PacsNode(name="main-pacs", ae_title="PACS", host="127.0.0.1", port=11999, retrieve_method="move",
                       options={"last_echo": {"ok": True, "elapsed_ms": 12.5, "at": datetime.now(timezone.utc).isoformat()}}))
        r = Retrieval(node_name="main-pacs", query={"StudyDate": "20150101-20151231"}, method="move", status="partial",
                      expected=26, received=24, skipped=0, failed=1, missing=["1.2.3.4.5", "1.2.3.4.6"],
                      failed_uids=["1.2.3.4.5"], error="1 instance(s) did not arrive",
                      report={"suboperations": {"completed": 24, "failed": 1}, "failure_reasons": {"0xA702": 1}},
                      started_at=datetime.now(timezone.utc), finished_at=datetime.now(timezone.utc))
        s.add(r)
        # a ward's list by PatientID (identified: keys shown only with find-identified), a description naming
        # the patient, and a row with a bad date
        ward = (f"PatientID,StudyDate,StudyDescription\n{PATIENT_IDS[0]},20150601,knee {NAMES[0]}\n"
                f"{PATIENT_IDS[1]},2015-02-30,\n")
        wl = worklist_service.upload(s, ward.encode(), "ward.csv", None, "token:carol")
        s.commit()
        out["retrieval"] = r.id
        out["worklist"] = wl["id"]
    return out


def add_training(ctx, cohort_id: int, uids: list[str]) -> dict:
    metrics = {
        "overall_accuracy": 75.0,
        "per_class": [{"class": "LtK", "n": 2, "correct": 2, "accuracy": 100.0, "confidence_mean": 0.9, "confidence_sd": 0.05},
                      {"class": "RtK", "n": 2, "correct": 1, "accuracy": 50.0, "confidence_mean": 0.7, "confidence_sd": 0.1}],
        "confusion_matrix": {"labels": ["LtK", "RtK"], "matrix": [[2, 0], [1, 1]]},
        "misclassified": [{"sop_instance_uid": uids[0], "true": "RtK", "predicted": "LtK", "confidence": 0.995}],
        "header_suspects": [{"sop_instance_uid": uids[0], "header_class": "RtK", "predicted": "LtK", "confidence": 0.995}],
        "experiments": {"rotate90": {"overall_accuracy": 50.0, "per_class": [{"class": "LtK", "accuracy": 50.0},
                                                                              {"class": "RtK", "accuracy": 50.0}]}},
    }
    history = [{"epoch": e, "loss": 1.0 / e, "train_accuracy": 50 + 10 * e, "val_accuracy": 45 + 10 * e,
                "images_per_second": 100.0, "eta_seconds": 0} for e in (1, 2, 3)]
    with ctx.sessions() as s:
        done = TrainingJob(cohort_id=cohort_id, status="completed", params={"model": "resnet18", "depth": None},
                           epochs=3, epoch=3, progress={}, history=history, metrics=metrics,
                           started_at=datetime.now(timezone.utc), finished_at=datetime.now(timezone.utc))
        running = TrainingJob(cohort_id=cohort_id, status="running", params={"model": "resnet10t", "depth": None},
                              epochs=10, epoch=2, progress={"loss": 0.5}, history=history[:2])
        s.add_all([done, running])
        s.flush()
        m = TrainedModel(job_id=done.id, architecture="resnet18", classes=["LtK", "RtK"], path="runs/x/model.pt",
                         card={"metrics": {"overall_accuracy": 75.0}})
        s.add(m)
        s.commit()
        return {"done": done.id, "running": running.id, "model": m.id}


@pytest.fixture
def console(tmp_path):
    """(client with follow_redirects off, seeded ids) with tokens configured."""
    # no C-FIND retries: a PACS node that is not there fails a request at once
    settings = make_settings(tmp_path, api_tokens=TOKENS, dicom_retries=0)
    for ctx in _migrated_ctx(settings):
        ids = seed(ctx)
        with TestClient(create_app(settings, ctx), follow_redirects=False) as c:
            auth = {"Authorization": f"Bearer {TOKEN}"}
            tax = c.post("/api/v1/taxonomies", headers=auth, json={"name": "knee-lr", "classes": [
                {"name": "LtK", "where": {"body_part": "KNEE", "laterality": "L"}},
                {"name": "RtK", "where": {"body_part": "KNEE", "laterality": "R"}}]})
            assert tax.status_code == 201, tax.text
            coh = c.post("/api/v1/cohorts", headers=auth, json={"taxonomy": "knee-lr", "split": {"train": 0.5, "test": 0.5}})
            assert coh.status_code == 201, coh.text
            ids["cohort"] = coh.json()["id"]
            ids.update(add_training(ctx, ids["cohort"], ids["uids"]))
            c.ctx = ctx
            yield c, ids


def sign_in(c, token: str = TOKEN, next_url: str = "/"):
    page = c.get("/login")
    csrf = CSRF.search(page.text).group(1)
    return c.post("/login", data={"token": token, "csrf_token": csrf, "next": next_url})


def csrf_of(c, path: str) -> str:
    page = c.get(path)
    assert page.status_code == 200, (path, page.status_code, page.text[:500])
    return CSRF.search(page.text).group(1)
