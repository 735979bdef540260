"""Training and models API without a worker: validation, queueing, listing, cancel, 404/409s, upload checks."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from app.db.base import session_scope
from app.db.models import Cohort, TrainedModel, TrainingJob
from app.training import predict
from tests.factories.training import write_tiny_dicom


def _cohort(ctx, classes: dict | None = None) -> int:
    """A cohort row whose summary has {class: (train, test)} (default A and B, 5/2 each)."""
    classes = classes if classes is not None else {"A": (5, 2), "B": (5, 2)}
    summary = {"classes": [{"name": n, "available": tr + te, "selected": tr + te, "train": tr, "test": te}
                           for n, (tr, te) in classes.items()]}
    with session_scope(ctx.sessions) as s:
        c = Cohort(taxonomy_name="t", taxonomy={"name": "t", "classes": [{"name": n} for n in classes]},
                   summary=summary)
        s.add(c)
        s.flush()
        return c.id


def _model(ctx) -> int:
    """A registered model with fake artifacts (upload checks come before any model is loaded)."""
    cid = _cohort(ctx)
    with session_scope(ctx.sessions) as s:
        job = TrainingJob(cohort_id=cid, status="completed", params={}, metrics={"overall_accuracy": 1.0})
        s.add(job)
        s.flush()
        rd = ctx.settings.runs_dir / f"job-{job.id}"
        rd.mkdir(parents=True)
        (rd / "model.pt").write_bytes(b"not really a model")
        m = TrainedModel(job_id=job.id, architecture="resnet10t", classes=["A", "B"],
                         path=f"runs/job-{job.id}/model.pt", card={"cohort_id": cid})
        s.add(m)
        s.flush()
        return m.id


def test_create_validates_with_field_detail(client, ctx):
    cid = _cohort(ctx)
    r = client.post("/api/v1/training-jobs", json={"cohort_id": cid, "epochs": 0, "model": "Res Net!",
                                                   "image_size": 8, "experiments": ["rotate45"],
                                                   "augment": {"blur": 1}, "weights": "../../etc/passwd"})
    assert r.status_code == 422
    locs = {tuple(e["loc"][1:]) for e in r.json()["detail"]}
    assert {("epochs",), ("model",), ("image_size",), ("experiments",), ("augment", "blur"), ("weights",)} <= locs
    r = client.post("/api/v1/training-jobs", json={"cohort_id": 4242})
    assert r.status_code == 404 and "cohort 4242" in r.json()["detail"]


def test_queue_list_get_and_cancel(client, ctx):
    cid = _cohort(ctx)
    r = client.post("/api/v1/training-jobs", json={"cohort_id": cid, "model": "resnet18", "epochs": 3,
                                                   "image_size": 64, "augment": {"rotation": [10, 20]}})
    assert r.status_code == 202
    no_worker = "queued — no worker is running: start `radcohort worker`"
    assert r.json() == {"id": r.json()["id"], "status": "queued", "note": no_worker}
    jid = r.json()["id"]
    job = client.get(f"/api/v1/training-jobs/{jid}").json()
    assert job["status"] == "queued" and job["epochs"] == 3 and job["epoch"] == 0 and job["history"] == []
    assert job["params"]["augment"] == {"rotation": [10.0, 20.0]}
    assert job["params"]["experiments"] == []  # none unless asked for
    assert job["params"]["val_fraction"] == 0.1 and job["note"] == no_worker
    assert client.get("/api/v1/training-jobs").json()["items"][0]["note"] == no_worker
    for key in ("device", "images_per_second", "loss", "train_accuracy", "val_accuracy", "eta_seconds", "error",
                "model_id", "cohort_id"):
        assert key in job

    ladder = client.post("/api/v1/training-jobs", json={"cohort_id": cid, "experiments": ["depth_ladder"]})
    assert ladder.status_code == 202 and len(ladder.json()["jobs"]) == 4 and ladder.json()["id"] == ladder.json()["jobs"][0]
    side = client.get(f"/api/v1/training-jobs/{ladder.json()['id']}/ladder").json()["jobs"]
    assert [(r["depth"], r["status"], r["overall_accuracy"]) for r in side] == [
        (4, "queued", None), (19, "queued", None), (34, "queued", None), (64, "queued", None)]
    assert client.get(f"/api/v1/training-jobs/{jid}/ladder").status_code == 404
    listing = client.get("/api/v1/training-jobs", params={"cohort_id": cid}).json()
    assert listing["total"] == 5 and [j["id"] for j in listing["items"]][-1] == jid  # newest first
    assert [j["params"]["depth"] for j in listing["items"][:4]] == [64, 34, 19, 4]

    # nothing to read until the job has completed
    for path in ("metrics", "report", "artifacts/curves.png"):
        r = client.get(f"/api/v1/training-jobs/{jid}/{path}")
        assert r.status_code == 409 and "queued" in r.json()["detail"], path
    assert client.get("/api/v1/training-jobs/9999").status_code == 404
    assert client.get("/api/v1/training-jobs/9999/metrics").status_code == 404

    r = client.post(f"/api/v1/training-jobs/{jid}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = client.post(f"/api/v1/training-jobs/{jid}/cancel")
    assert r.status_code == 409 and "already cancelled" in r.json()["detail"]
    assert client.get("/api/v1/training-jobs", params={"status": "cancelled"}).json()["total"] == 1
    actions = [e["action"] for e in client.get("/api/v1/audit").json()["items"]]
    assert actions.count("training_job.create") == 5 and actions.count("training_job.cancel") == 1


def test_models_listing_and_404s(client, ctx):
    assert client.get("/api/v1/models").json() == {"total": 0, "items": []}
    mid = _model(ctx)
    body = client.get("/api/v1/models").json()
    assert body["total"] == 1 and body["items"][0]["classes"] == ["A", "B"] and "card" in body["items"][0]
    assert client.get(f"/api/v1/models/{mid}").json()["architecture"] == "resnet10t"
    assert client.get("/api/v1/models/777").status_code == 404
    r = client.post("/api/v1/models/777/predict", files={"file": ("x.dcm", b"DICM", "application/dicom")})
    assert r.status_code == 404


def test_predict_rejects_bad_uploads_with_4xx_and_keeps_no_temp_files(client, ctx, tmp_path, monkeypatch):
    mid = _model(ctx)
    url = f"/api/v1/models/{mid}/predict"
    no_pixels = tmp_path / "nopix.dcm"
    write_tiny_dicom(no_pixels, "left", size=16)
    import pydicom

    ds = pydicom.dcmread(no_pixels)
    del ds.PixelData
    ds.save_as(no_pixels)
    dicom = tmp_path / "ok.dcm"
    write_tiny_dicom(dicom, "left", size=16)
    truncated = dicom.read_bytes()[:200]
    cases = {
        "garbage": (b"hello, not DICOM" * 100, 415, "not a DICOM"),
        "empty": (b"", 415, "empty"),
        "no pixels": (no_pixels.read_bytes(), 422, "no pixel data"),
        "truncated": (truncated, 422, "no pixel data"),  # cut inside the header: nothing after it
    }
    for name, (payload, status, words) in cases.items():
        r = client.post(url, files={"file": ("f.dcm", io.BytesIO(payload), "application/dicom")})
        assert r.status_code == status, (name, r.status_code, r.text)
        assert words in r.json()["detail"], (name, r.json())
    assert client.post(url).status_code == 422  # no file part
    monkeypatch.setattr(predict, "max_upload_bytes", lambda _settings: 1000)
    r = client.post(url, files={"file": ("big.dcm", io.BytesIO(dicom.read_bytes()), "application/dicom")})
    assert r.status_code == 413 and "1000 bytes" in r.json()["detail"]
    tmp = ctx.settings.data_dir / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []


def test_api_side_never_imports_torch(tmp_path):
    code = ("import sys, app.api.main, app.api.routes.training, app.api.routes.trained_models, "
            "app.training.predict, app.training.jobs, app.cli; "
            "from app.api import create_app; from app.config import Settings; "
            "create_app(Settings(_env_file=None, database_url='sqlite://', data_dir=sys.argv[1])); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "data")],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr[-2000:]


def test_bad_requests_are_refused_at_submission_with_the_allowed_values(client, ctx):
    """What the worker would fail on late: an unknown model, a cohort with one class; no job is queued."""
    cid = _cohort(ctx)
    r = client.post("/api/v1/training-jobs", json={"cohort_id": cid, "model": "resnet81"})
    assert r.status_code == 422
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", "model"] and "resnet18" in err["msg"] and "no worker is running" in err["msg"]
    assert "resnet10t" in err["ctx"]["allowed"] and err["ctx"]["source"] == "built-in"
    one = _cohort(ctx, {"A": (5, 2), "B": (5, 0)})
    r = client.post("/api/v1/training-jobs", json={"cohort_id": one, "model": "resnet10t"})
    assert r.status_code == 422
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", "cohort_id"] and "1 with test images" in err["msg"] and "B 5/0" in err["msg"]
    r = client.post("/api/v1/training-jobs", json={"cohort_id": cid, "epochs": 100000, "image_size": 4096,
                                                   "batch_size": 10**6, "val_fraction": 0.9})
    assert r.status_code == 422
    assert {tuple(e["loc"][1:]) for e in r.json()["detail"]} == {("epochs",), ("image_size",), ("batch_size",),
                                                                  ("val_fraction",)}
    assert client.get("/api/v1/training-jobs").json()["total"] == 0
    # the default of experiments is visible in the schema
    schema = client.get("/openapi.json").json()["components"]["schemas"]["TrainingJobCreate"]["properties"]
    assert schema["experiments"]["default"] == [] and schema["val_fraction"]["default"] == 0.1


def test_live_workers_publish_models_and_health_says_so(client, ctx):
    from app.training import workers

    health = client.get("/health").json()["workers"]
    assert health["alive"] == 0 and "radcohort worker" in health["note"]
    with session_scope(ctx.sessions) as s:
        workers.register(s, "host:1:abc", "host", 1, {"queues": ["training"], "models": ["resnet10t", "tinynet_x"],
                                                      "device": "cpu"})
    health = client.get("/health").json()["workers"]
    assert health["alive"] == 1 and health["queues"] == ["training"] and health["note"] is None
    assert health["items"][0]["models"] == 2 and health["items"][0]["device"] == "cpu"
    assert "hostname" not in health["items"][0] and "host" not in str(health)  # /health needs no token
    archs = client.get("/api/v1/architectures").json()
    assert archs == {"total": 2, "items": ["resnet10t", "tinynet_x"], "source": "workers"}
    cid = _cohort(ctx)
    r = client.post("/api/v1/training-jobs", json={"cohort_id": cid, "model": "tinynet_x"})
    assert r.status_code == 202 and "note" not in r.json()
    r = client.post("/api/v1/training-jobs", json={"cohort_id": cid, "model": "resnet18"})
    assert r.status_code == 422 and "live workers" in r.json()["detail"][0]["msg"]
    # a worker whose heartbeat is old is not alive
    from datetime import timedelta

    from app.db.models import WorkerProcess

    with session_scope(ctx.sessions) as s:
        s.get(WorkerProcess, "host:1:abc").heartbeat_at = workers.utcnow() - timedelta(seconds=300)
    assert client.get("/health").json()["workers"]["alive"] == 0
    job = client.get(f"/api/v1/training-jobs/{r.json()['detail'] and 1}").json()
    assert job["status"] == "queued" and job["note"] == workers.NO_WORKER_NOTE


def test_delete_model_removes_its_checkpoint_and_keeps_the_job(client, ctx):
    mid = _model(ctx)
    model = client.get(f"/api/v1/models/{mid}").json()
    ckpt = ctx.settings.runs_dir / f"job-{model['job_id']}" / "model.pt"
    assert ckpt.is_file()
    assert client.delete(f"/api/v1/models/{mid}").status_code == 204
    assert not ckpt.exists() and client.get(f"/api/v1/models/{mid}").status_code == 404
    job = client.get(f"/api/v1/training-jobs/{model['job_id']}").json()
    assert job["status"] == "completed" and job["model_id"] is None
    assert client.delete(f"/api/v1/models/{mid}").status_code == 404
    assert "model.delete" in [e["action"] for e in client.get("/api/v1/audit").json()["items"]]
