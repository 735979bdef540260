"""The etiquette API: PATCH policy, GET policy, probe, urgent, pause/resume/cancel over HTTP."""

from __future__ import annotations

import time
from datetime import datetime, timezone

from app.policy.windows import DAYS
from tests.dicom.helpers import make_studies, upload_all, wait_retrieval


def node(client, port: int = 4242, name: str = "pacs", method: str = "get"):
    r = client.post("/api/v1/pacs-nodes", json={"name": name, "ae_title": "ORTHANC", "host": "127.0.0.1",
                                                 "port": port, "retrieve_method": method})
    assert r.status_code == 201, r.text




def test_patch_policy_validation_and_view(client):
    node(client)
    pol = {"timezone": "Asia/Tokyo", "max_associations": 1, "instances_per_minute": 600,
           "windows": [{"days": ["sat", "sun"], "start": "00:00", "end": "24:00"}],
           "urgent": {"allowed": False}}
    r = client.patch("/api/v1/pacs-nodes/pacs", json={"policy": pol})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["policy"]["timezone"] == "Asia/Tokyo" and body["policy"]["instances_per_minute"] == 600
    assert body["protocol"] == "dimse" and body["planner"]["method"] == "get"
    assert isinstance(body["window"]["open"], bool) and body["window"]["changes_at"]
    assert client.get("/api/v1/pacs-nodes/pacs/policy").json()["policy"] == body["policy"]

    bad = client.patch("/api/v1/pacs-nodes/pacs", json={"policy": {"timezone": "Nowhere/Land"}})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == "timezone"
    bad = client.patch("/api/v1/pacs-nodes/pacs", json={"policy": {"windows": [{"days": ["mon"], "start": "7pm",
                                                                               "end": "07:00"}]}})
    assert bad.status_code == 422 and "start" in bad.json()["detail"][0]["loc"]
    bad = client.patch("/api/v1/pacs-nodes/pacs", json={"protocol": "dicomweb"})
    assert bad.status_code == 422 and "dicomweb_url" in bad.json()["detail"]
    assert client.patch("/api/v1/pacs-nodes/nope", json={"protocol": "dimse"}).status_code == 404
    r = client.patch("/api/v1/pacs-nodes/pacs", json={"protocol": "dicomweb",
                                                      "dicomweb_url": "http://127.0.0.1:8042/dicom-web/"})
    assert r.status_code == 200 and r.json()["planner"]["method"] == "dicomweb"
    assert r.json()["policy"]["max_associations"] == 1  # a PATCH without policy keeps it
    # urgent is refused where the node's rules forbid it
    r = client.post("/api/v1/retrievals", json={"node": "pacs", "query": {"StudyDate": "20120101"}, "urgent": True})
    assert r.status_code == 422 and "urgent" in r.json()["detail"]


def test_pause_resume_cancel_state_rules(client, ctx):
    from app.retrievals.service import create_retrieval

    node(client)
    with ctx.sessions() as s:  # not submitted to the pool: only the state machine is under test
        rid = create_retrieval(s, "pacs", {"StudyDate": "20120101"}, "test").id
        s.commit()
    assert client.post(f"/api/v1/retrievals/{rid}/resume").status_code == 409
    assert client.post(f"/api/v1/retrievals/{rid}/pause").json()["status"] == "paused"
    assert client.post(f"/api/v1/retrievals/{rid}/pause").status_code == 409
    assert client.post(f"/api/v1/retrievals/{rid}/resume").json()["status"] == "queued"
    body = client.post(f"/api/v1/retrievals/{rid}/cancel").json()
    assert body["status"] == "cancelled" and "before it started" in body["error"]
    assert client.post(f"/api/v1/retrievals/{rid}/cancel").status_code == 409
    assert client.post("/api/v1/retrievals/999/pause").status_code == 404
    from sqlalchemy import select

    from app.db.models import AuditEvent

    with ctx.sessions() as s:
        actions = list(s.scalars(select(AuditEvent.action).where(AuditEvent.target == str(rid))))
    assert {"retrieval.pause", "retrieval.resume", "retrieval.cancel"} <= set(actions)


def test_over_http_window_wait_then_cancel_and_pause_resume_mid_run(client, ctx, orthanc, tmp_path):
    ctx.settings.arrival_timeout = 3.0
    studies = make_studies(tmp_path / "gen", ["20120101", "20120102", "20120103"], instances_per_series=4)
    upload_all(orthanc, sorted((tmp_path / "gen").iterdir()))
    node(client, orthanc.dicom_port)
    probe = client.post("/api/v1/pacs-nodes/pacs/probe?wait=true")  # blocking form: 200 when done
    assert probe.status_code == 200, probe.text
    assert probe.json()["capabilities"]["get"]["works"] and probe.json()["planner"]["method"] == "get"

    # a window that is closed today (every other weekday): the job stays queued and says until when
    today = DAYS[datetime.now(timezone.utc).weekday()]
    closed = {"windows": [{"days": [d for d in DAYS if d != today], "start": "00:00", "end": "24:00"}]}
    assert client.patch("/api/v1/pacs-nodes/pacs", json={"policy": closed}).status_code == 200
    rid = client.post("/api/v1/retrievals", json={"node": "pacs", "query": {"StudyDate": "20120101"}}).json()["id"]
    deadline = time.monotonic() + 20
    while not client.get(f"/api/v1/retrievals/{rid}").json()["report"].get("waiting_for_window_until"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    body = client.get(f"/api/v1/retrievals/{rid}").json()
    assert body["status"] == "queued" and body["received"] == 0
    assert client.post(f"/api/v1/retrievals/{rid}/cancel").status_code == 200
    body = wait_retrieval(client, rid, {"cancelled"})
    assert body["received"] == 0

    # slow it down (2 instances/s, pieces of 4), pause after the first piece, resume
    slow = {"instances_per_minute": 120}
    assert client.patch("/api/v1/pacs-nodes/pacs", json={"policy": slow}).status_code == 200
    rid = client.post("/api/v1/retrievals", json={"node": "pacs", "query": {"StudyDate": "20120101-20120103"}}).json()["id"]
    deadline = time.monotonic() + 30
    while client.get("/api/v1/instances?limit=1").json()["total"] < 4:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.post(f"/api/v1/retrievals/{rid}/pause").json()["status"] == "paused"
    time.sleep(4)  # at most the piece in flight completes, then nothing moves
    held = client.get("/api/v1/instances?limit=1").json()["total"]
    assert held < 12
    time.sleep(2)
    assert client.get("/api/v1/instances?limit=1").json()["total"] == held
    assert client.post(f"/api/v1/retrievals/{rid}/resume").json()["status"] == "running"
    body = wait_retrieval(client, rid, {"completed", "partial", "failed"})
    assert (body["status"], body["received"]) == ("completed", 12)
    assert body["report"]["paused_s"] >= 2 and body["report"]["rate_wait_s"] > 0
    assert {u for st in studies for u in st.sop_uids} == {
        i["sop_instance_uid"] for i in client.get("/api/v1/instances?limit=100").json()["items"]}
