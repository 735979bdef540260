"""Privacy and access after a small end-to-end run, tokens on.

Instances with known names and IDs (Japanese included) arrive through the real Storage SCP ->
index/labels -> cohort -> manifest -> a tiny real training run (worker subprocess) -> metrics,
report, model card, predictions. Then every response body, every file under DATA_DIR except the
DICOM store, the captured logs and the worker's output are scanned for those names and IDs.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pynetdicom import AE

from app.api import create_app
from app.context import AppContext
from app.db.migrate import upgrade
from app.db.models import PacsNode
from app.wiring import storage_scp
from tests.conftest import make_settings
from tests.dicom.helpers import make_cr

ROOT = Path(__file__).resolve().parents[2]
ALICE, BOB = "tok-alice-7f3a", "tok-bob-91c2"
# (name, id): Japanese ideographic, half-width kana, full-width and Latin names
PATIENTS = [("山田^太郎", "ID-YAMADA-0001"), ("ﾔﾏﾀﾞ^ﾊﾅｺ", "ID-HANAKO-0002"), ("佐藤^花子=サトウ^ハナコ", "ID-SATO-0003"),
            ("Tanaka^Ichiro", "ID-TANAKA-0004"), ("鈴木^一郎", "ID-SUZUKI-0005"), ("Doe^Jane", "ID-DOE-0006"),
            ("高橋^次郎", "ID-TAKA-0007"), ("伊藤^三郎", "ID-ITO-0008"), ("渡辺^四郎", "ID-WATA-0009"),
            ("Smith^John", "ID-SMITH-0010"), ("中村^五郎", "ID-NAKA-0011"), ("小林^六郎", "ID-KOBA-0012")]


def needles() -> list[str]:
    out = []
    for name, pid in PATIENTS:
        out.append(pid)
        for part in name.replace("=", "^").split("^"):
            if len(part) >= 2:
                out.append(part)
    return out


def _instances():
    """Two instances per patient (knee AP, left and right on different patients for xr10 LtK/RtK)."""
    out = []
    for i, (name, pid) in enumerate(PATIENTS):
        side = "L" if i % 2 == 0 else "R"
        for k in range(2):
            ds = make_cr(patient_id=pid, patient_name=name, body_part="KNEE", study_description="KNEE AP",
                         series_description="AP", seed=i * 10 + k, accession=f"ACC{i}{k}")
            ds.SpecificCharacterSet = "ISO_IR 192"
            ds.ViewPosition = "AP"
            ds.ImageLaterality = side
            ds.PatientSex = "M" if i % 3 else "F"
            out.append(ds)
    return out


def _send(port: int, datasets) -> list[int]:
    ae = AE("MODALITY")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADCOHORT")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(d).Status) for d in datasets]
    finally:
        assoc.release()


class Recorder:
    """Every response body the test saw."""

    def __init__(self, client: TestClient, token: str):
        self.client, self.headers, self.bodies = client, {"Authorization": f"Bearer {token}"}, []

    def __call__(self, method: str, url: str, **kw):
        r = self.client.request(method, url, headers=self.headers, **kw)
        self.bodies.append((f"{method} {url}", r.content))
        return r


def _scan(blob: bytes, where: str) -> list[str]:
    text = blob.decode("utf-8", errors="replace")
    return [f"{n!r} in {where}" for n in needles() if n in text]


@pytest.mark.worker
def test_no_patient_identifiers_anywhere_and_audit_names_actors(tmp_path, caplog):
    pytest.importorskip("timm")
    caplog.set_level(logging.DEBUG)
    s = make_settings(tmp_path, api_tokens=f"{ALICE},{BOB}", pseudonym_key="key-one", dicom_timeout=2.0,
                      dicom_retries=0, arrival_timeout=1.0)
    upgrade(s.database_url)
    ctx = AppContext.build(s)
    with ctx.sessions() as sess:
        sess.add(PacsNode(name="modality", ae_title="MODALITY", host="127.0.0.1", port=1))
        sess.commit()
    scp = storage_scp(ctx).start()
    try:
        assert set(_send(scp.port, _instances())) == {0}
    finally:
        scp.stop()

    app = create_app(s, ctx)
    with TestClient(app) as client:
        alice, bob = Recorder(client, ALICE), Recorder(client, BOB)
        # every /api/v1 route refuses a missing or wrong token; /health is open
        assert client.get("/health").status_code == 200
        for path, ops in app.openapi()["paths"].items():
            if path.startswith("/api/v1"):
                for method in ops:
                    p = path.replace("{", "1").replace("}", "")
                    assert client.request(method.upper(), p).status_code == 401, (method, path)
                    assert client.request(method.upper(), p, headers={"Authorization": "Bearer " + ALICE[:-1]}
                                          ).status_code == 401, (method, path)

        assert alice("GET", "/api/v1/instances?limit=1000").json()["total"] == 24
        alice("GET", "/api/v1/stats")
        uid = alice("GET", "/api/v1/instances?limit=1").json()["items"][0]["sop_instance_uid"]
        alice("GET", f"/api/v1/instances/{uid}")
        r = alice("POST", "/api/v1/retrievals", json={"node": "modality", "query": {"StudyDate": "20120101-20121231"}})
        assert r.status_code == 202, r.text
        body = {"taxonomy": "xr10", "per_class": 6, "split": {"train": 0.5, "test": 0.5}, "seed": 1}
        r = alice("POST", "/api/v1/cohorts", json=body)
        assert r.status_code == 201, r.text
        cid = r.json()["id"]
        alice("GET", f"/api/v1/cohorts/{cid}")
        manifest = bob("GET", f"/api/v1/cohorts/{cid}/manifest").text
        rows = list(csv.DictReader(io.StringIO(manifest)))
        assert len(rows) == 12 and all(len(x["patient_key"]) == 64 for x in rows)
        # stable for one key: a second build with the same key gives the same pseudonyms
        r2 = alice("POST", "/api/v1/cohorts", json=body)
        again = {x["sop_instance_uid"]: x["patient_key"] for x in csv.DictReader(io.StringIO(
            alice("GET", f"/api/v1/cohorts/{r2.json()['id']}/manifest").text))}
        assert again == {x["sop_instance_uid"]: x["patient_key"] for x in rows}

        r = bob("POST", "/api/v1/training-jobs", json={
            "cohort_id": cid, "model": "resnet10t", "epochs": 1, "image_size": 32, "batch_size": 8, "workers": 0,
            "experiments": ["rotate90"], "augment": {"rotation": 0}})
        assert r.status_code == 202, r.text
        jid = r.json()["id"]
        env = {**os.environ, "RADCOHORT_DATABASE_URL": s.database_url, "RADCOHORT_DATA_DIR": str(s.data_dir),
               "RADCOHORT_PSEUDONYM_KEY": "key-one", "OMP_NUM_THREADS": "1", "RADCOHORT_LOG_LEVEL": "DEBUG"}
        worker = subprocess.Popen([sys.executable, "-c", "from app.cli import main; main()", "worker", "--poll", "0.2"],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                job = alice("GET", f"/api/v1/training-jobs/{jid}").json()
                if job["status"] in ("completed", "failed", "cancelled"):
                    break
                assert worker.poll() is None, worker.stdout.read().decode(errors="replace")[-2000:]
                time.sleep(0.5)
        finally:
            worker.terminate()
            worker_out = worker.communicate(timeout=60)[0]
        assert job["status"] == "completed", (job.get("error"), worker_out[-2000:])
        alice("GET", f"/api/v1/training-jobs/{jid}/metrics")
        alice("GET", f"/api/v1/training-jobs/{jid}/report")
        for a in job.get("artifacts", []):
            alice("GET", f"/api/v1/training-jobs/{jid}/artifacts/{a}")
        models = alice("GET", "/api/v1/models").json()
        mid = models["items"][0]["id"]
        alice("GET", f"/api/v1/models/{mid}")
        src = next(p for p in s.store_dir.rglob("*.dcm"))
        r = alice("POST", f"/api/v1/models/{mid}/predict",
                  files={"file": ("q.dcm", io.BytesIO(src.read_bytes()), "application/dicom")})
        assert r.status_code == 200, r.text
        audit = alice("GET", "/api/v1/audit?limit=1000").json()["items"]
        alice("GET", "/api/v1/training-jobs")
        alice("GET", "/api/v1/cohorts")
        alice("GET", "/api/v1/retrievals")

    # a different key gives different pseudonyms for the same patients
    s2 = s.model_copy(update={"pseudonym_key": "key-two"})
    with TestClient(create_app(s2, AppContext.build(s2))) as c2:
        r = c2.post("/api/v1/cohorts", json=body, headers={"Authorization": f"Bearer {ALICE}"})
        assert r.status_code == 201, r.text
        other = {x["sop_instance_uid"]: x["patient_key"] for x in csv.DictReader(io.StringIO(c2.get(
            f"/api/v1/cohorts/{r.json()['id']}/manifest", headers={"Authorization": f"Bearer {ALICE}"}).text))}
    assert set(other) == set(again) and not set(other.values()) & set(again.values())

    # audit: who built which cohort, retrieved what, started which job (actors are token hashes, not tokens)
    by_action = {}
    for e in audit:
        by_action.setdefault(e["action"], []).append(e)
    a_actor = by_action["cohort.create"][0]["actor"]
    assert a_actor.startswith("token:") and ALICE not in str(audit) and BOB not in str(audit)
    assert {e["target"] for e in by_action["cohort.create"]} >= {f"cohort:{cid}"}
    assert by_action["retrieval.create"][0]["actor"] == a_actor and by_action["retrieval.create"][0]["details"]["node"] == "modality"
    tj = by_action["training_job.create"][0]
    assert tj["target"] == f"training_job:{jid}" and tj["actor"].startswith("token:") and tj["actor"] != a_actor

    # the scan: responses, files under DATA_DIR (not the DICOM store), logs, worker output
    leaks: list[str] = []
    scanned = 0
    for where, content in alice.bodies + bob.bodies:
        leaks += _scan(content, where)
        scanned += 1
    files = [p for p in s.data_dir.rglob("*") if p.is_file() and s.store_dir not in p.parents]
    assert any(p.suffix == ".json" for p in files) and any(p.suffix == ".md" for p in files), files
    for p in files:
        leaks += _scan(p.read_bytes(), str(p.relative_to(s.data_dir)))
    leaks += _scan(caplog.text.encode(), "captured logs")
    leaks += _scan(worker_out, "worker output")
    # the needles are really there to be found: the store holds them
    assert _scan(src.read_bytes(), "store"), "the scan would not find identifiers"
    assert scanned > 20 and not leaks, leaks[:20]
