"""Batch scoring's API without a worker (no torch): queue, one active job per model, follow, cancel, list,
read scores per model and per instance, 404s; what a worker wrote is read back as written."""

from __future__ import annotations

from app.db.base import session_scope
from app.db.models import ScoringJob
from tests.factories.index_rows import add_index_rows
from app.training import jobs, scoring
from tests.api.test_training import _model


def _write(ctx, mid: int, jid: int, rows: list[dict]) -> None:
    with session_scope(ctx.sessions) as s:
        assert jobs.claim_next(s, "w1", table=ScoringJob).id == jid
    with session_scope(ctx.sessions) as s:
        owned, _ = scoring.write_batch(s, jid, "w1", mid, rows, cursor=len(rows), done=len(rows),
                                       failed=sum(1 for r in rows if r["error"]),
                                       progress={"out_of_domain": sum(1 for r in rows if not r["in_domain"]),
                                                 "images_per_second": 12.5, "eta_seconds": 0})
        assert owned
        scoring.complete_job(s, jid, "w1")


def test_queue_follow_cancel_and_one_active_job_per_model(client, ctx):
    mid = _model(ctx)
    assert client.post("/api/v1/models/999/scores").status_code == 404
    assert client.get(f"/api/v1/models/{mid}/scoring-job").status_code == 404
    r = client.post(f"/api/v1/models/{mid}/scores", json={"batch_size": 8})
    assert r.status_code == 202, r.text
    queued = r.json()
    assert queued["status"] == "queued" and queued["model_id"] == mid
    assert queued["note"] == "queued — no worker is running: start `radcohort worker`"
    r = client.post(f"/api/v1/models/{mid}/scores")
    assert r.status_code == 409 and f"scoring job {queued['id']}" in r.json()["detail"]
    job = client.get(f"/api/v1/models/{mid}/scoring-job").json()
    assert job["id"] == queued["id"] and job["params"]["batch_size"] == 8
    assert job["params"]["modalities"] == ["CR", "DX", "DR"]
    assert (job["total"], job["done"], job["failed"]) == (0, 0, 0)
    assert client.post(f"/api/v1/models/{mid}/scores", json={"batch_size": 0}).status_code == 422
    assert client.post(f"/api/v1/models/{mid}/scores", json={"modality": "CT"}).status_code == 422
    r = client.post(f"/api/v1/models/{mid}/scoring-job/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert client.post(f"/api/v1/models/{mid}/scoring-job/cancel").status_code == 409
    assert client.post(f"/api/v1/models/{mid}/scores").status_code == 202  # a new one once the last has ended
    listing = client.get("/api/v1/scoring-jobs", params={"model_id": mid}).json()
    assert listing["total"] == 2 and listing["items"][1]["status"] == "cancelled"
    assert client.get("/api/v1/scoring-jobs", params={"status": "queued"}).json()["total"] == 1
    actions = [e["action"] for e in client.get("/api/v1/audit").json()["items"]]
    assert actions.count("scoring_job.create") == 2 and actions.count("scoring_job.cancel") == 1


def test_scores_per_model_and_per_instance(client, ctx):
    mid = _model(ctx)
    with session_scope(ctx.sessions) as s:
        rows = add_index_rows(s, [{"patient_id": f"p{i}", "body_part_examined": "KNEE"} for i in range(3)])
        uids = [r.sop_instance_uid for r in rows]
    jid = client.post(f"/api/v1/models/{mid}/scores").json()["id"]
    _write(ctx, mid, jid, [
        {"sop_instance_uid": uids[0], "predicted_class": "A", "confidence": 0.9, "in_domain": True, "error": None},
        {"sop_instance_uid": uids[1], "predicted_class": "B", "confidence": 0.6, "in_domain": False, "error": None},
        {"sop_instance_uid": uids[2], "predicted_class": None, "confidence": None, "in_domain": True,
         "error": "cannot decode pixel data"}])
    job = client.get(f"/api/v1/models/{mid}/scoring-job").json()
    assert (job["status"], job["done"], job["scored"], job["failed"], job["out_of_domain"]) == ("completed", 3, 2, 1, 1)
    assert job["images_per_second"] == 12.5
    page = client.get(f"/api/v1/models/{mid}/scores").json()
    assert page["total"] == 3 and {i["sop_instance_uid"] for i in page["items"]} == set(uids)
    one = client.get(f"/api/v1/models/{mid}/scores", params={"sop_instance_uid": uids[1]}).json()
    assert one["total"] == 1 and one["items"][0]["predicted_class"] == "B" and one["items"][0]["in_domain"] is False
    assert client.get(f"/api/v1/models/{mid}/scores", params={"in_domain": False}).json()["total"] == 1
    assert client.get(f"/api/v1/models/{mid}/scores", params={"predicted_class": "A"}).json()["total"] == 1
    failed = client.get(f"/api/v1/models/{mid}/scores", params={"failed": True}).json()
    assert failed["total"] == 1 and failed["items"][0]["error"] == "cannot decode pixel data"
    assert client.get(f"/api/v1/models/{mid}/scores", params={"sop_instance_uid": "x"}).status_code == 422
    assert client.get("/api/v1/models/999/scores").status_code == 404
    per = client.get(f"/api/v1/instances/{uids[0]}/scores").json()
    assert per["total"] == 1 and per["items"][0]["model_id"] == mid and per["items"][0]["confidence"] == 0.9
    assert per["items"][0]["architecture"] == "resnet10t" and per["items"][0]["job_id"] == jid
    assert client.get("/api/v1/instances/1.2.3.999/scores").status_code == 404
    # an indexed instance nobody scored: an empty list, not a 404
    with session_scope(ctx.sessions) as s:
        (extra,) = add_index_rows(s, [{"patient_id": "q"}])
        uid = extra.sop_instance_uid
    assert client.get(f"/api/v1/instances/{uid}/scores").json() == {"sop_instance_uid": uid, "total": 0, "items": []}
    # deleting the model deletes its scores
    assert client.delete(f"/api/v1/models/{mid}").status_code == 204
    assert client.get(f"/api/v1/instances/{uids[0]}/scores").json()["total"] == 0
