"""The API while a real `radcohort worker` process trains a tiny cohort: progress, metrics, report,
artifacts, the model list and predictions on an uploaded DICOM."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urljoin

import pytest

from app.db.base import session_scope
from tests.factories.training import make_tiny_cohort, write_tiny_dicom

pytestmark = pytest.mark.worker
ROOT = Path(__file__).resolve().parents[2]


def test_api_follows_a_worker_run_to_a_model_that_predicts(client, ctx, tmp_path):
    pytest.importorskip("timm")
    with session_scope(ctx.sessions) as s:
        cid = make_tiny_cohort(s, ctx.settings, per_class=14, size=32, undecodable=1)
    r = client.post("/api/v1/training-jobs", json={
        "cohort_id": cid, "model": "resnet10t", "epochs": 8, "image_size": 32, "batch_size": 16, "workers": 1,
        "experiments": ["rotate90", "scale10"], "augment": {"rotation": 0}})
    assert r.status_code == 202
    jid = r.json()["id"]
    env = {**os.environ, "RADCOHORT_DATABASE_URL": ctx.settings.database_url,
           "RADCOHORT_DATA_DIR": str(ctx.settings.data_dir), "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen([sys.executable, "-c", "from app.cli import main; main()", "worker", "--poll", "0.2"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen_running: list[dict] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            job = client.get(f"/api/v1/training-jobs/{jid}").json()
            if job["status"] == "running" and job["epoch"] >= 1:
                seen_running.append(job)
            if job["status"] in ("completed", "failed", "cancelled"):
                break
            assert worker.poll() is None, worker.stdout.read()
            time.sleep(0.3)
    finally:
        worker.terminate()
        out = worker.communicate(timeout=60)[0]
    assert job["status"] == "completed", (job["error"], out[-3000:])
    # progress was visible while it ran
    assert seen_running, "never saw a running job with progress"
    mid = seen_running[0]
    # seen while still running (an 8th epoch may already be done while the evaluation runs)
    assert 1 <= mid["epoch"] <= 8 and mid["status"] == "running" and mid["device"] and mid["loss"] is not None and mid["images_per_second"] > 0
    assert mid["eta_seconds"] is not None and len(mid["history"]) == mid["epoch"]
    assert job["skipped_count"] == 1 and job["model_id"] is not None

    metrics = client.get(f"/api/v1/training-jobs/{jid}/metrics").json()
    assert {c["class"] for c in metrics["per_class"]} == {"CLeft", "CRight"}
    assert set(metrics["experiments"]) == {"rotate90", "scale10"}
    assert metrics["confusion_matrix"]["labels"] == ["CLeft", "CRight"]
    report = client.get(f"/api/v1/training-jobs/{jid}/report")
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/markdown")
    # every image link resolves from the report's own URL (a browser or Markdown viewer reading the API)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.text)
    assert links and all(link.startswith("artifacts/") for link in links), links
    for link in links:
        img = client.get(urljoin(f"/api/v1/training-jobs/{jid}/report", link))
        assert img.status_code == 200 and img.content[:4] == b"\x89PNG", link
    pngs = [a for a in job["artifacts"] if a.endswith(".png")]
    assert pngs and "spec.json" not in job["artifacts"]
    art = client.get(f"/api/v1/training-jobs/{jid}/artifacts/{pngs[0]}")
    assert art.status_code == 200 and art.headers["content-type"] == "image/png" and art.content[:4] == b"\x89PNG"
    for bad in ("model.pt", "..%2Fspec.json", "progress.jsonl", "nothing.png"):
        assert client.get(f"/api/v1/training-jobs/{jid}/artifacts/{bad}").status_code == 404, bad

    models = client.get("/api/v1/models").json()
    assert models["total"] == 1 and models["items"][0]["job_id"] == jid
    assert models["items"][0]["card"]["cohort_id"] == cid
    dicom = tmp_path / "q.dcm"
    write_tiny_dicom(dicom, "right", size=32, seed=99)
    import pydicom

    knee = pydicom.dcmread(dicom)
    knee.BodyPartExamined = "KNEE"  # the tiny cohort's classes are knees
    knee.save_as(dicom)
    r = client.post(f"/api/v1/models/{job['model_id']}/predict",
                    files={"file": ("q.dcm", io.BytesIO(dicom.read_bytes()), "application/dicom")})
    assert r.status_code == 200, r.text
    pred = r.json()
    assert pred["class"] in ("CLeft", "CRight") and set(pred["probabilities"]) == {"CLeft", "CRight"}
    assert pred["in_domain"] is True and pred["warning"] is None and pred["domain"]["modality"] == "CR"
    # a CT slice of the same picture is classified, but flagged as outside the model's domain
    ct = pydicom.dcmread(dicom)
    ct.Modality, ct.BodyPartExamined = "CT", "HEAD"
    ct.save_as(tmp_path / "ct.dcm")
    r = client.post(f"/api/v1/models/{job['model_id']}/predict",
                    files={"file": ("ct.dcm", io.BytesIO((tmp_path / "ct.dcm").read_bytes()), "application/dicom")})
    assert r.status_code == 200, r.text
    flagged = r.json()
    assert flagged["in_domain"] is False and "modality CT is not a radiograph" in flagged["warning"]
    assert "is not one the model has a class for (KNEE)" in flagged["warning"]
    assert abs(sum(pred["probabilities"].values()) - 1) < 1e-4
    assert pred["confidence"] == pytest.approx(max(pred["probabilities"].values()))
    r = client.post(f"/api/v1/models/{job['model_id']}/predict",
                    files={"file": ("x.txt", io.BytesIO(b"garbage" * 50), "text/plain")})
    assert r.status_code == 415
