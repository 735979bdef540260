"""Retrieval API: 202 + background run, polling to an exact report, listing newest first."""

from __future__ import annotations

import pytest

from app.wiring import storage_scp
from tests.dicom.helpers import make_studies, upload_all, wait_retrieval




@pytest.fixture
def pacs_node(client, orthanc, tmp_path):
    studies = make_studies(tmp_path / "gen", ["20120101", "20130101", "20190101"], series_per_study=2,
                           instances_per_series=2)
    upload_all(orthanc, sorted((tmp_path / "gen").iterdir()))
    r = client.post("/api/v1/pacs-nodes", json={"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                                 "port": orthanc.dicom_port, "retrieve_method": "move"})
    assert r.status_code == 201
    return studies


def test_retrieval_runs_in_background_and_reports_exactly(client, ctx, pacs_node):
    studies = pacs_node
    ctx.settings.arrival_timeout = 3.0
    with storage_scp(ctx):
        r = client.post("/api/v1/retrievals", json={"node": "pacs", "query": {"StudyDate": "20110101-20161231"}})
        assert r.status_code == 202, r.text
        assert set(r.json()) == {"id", "status"} and r.json()["status"] == "queued"
        body = wait_retrieval(client, r.json()["id"])
        assert (body["status"], body["expected"], body["received"], body["skipped"], body["failed"],
                body["missing"], body["error"]) == ("completed", 8, 8, 0, 0, [], None)
        # two at once: the same range again (all skipped) and the 2019 study
        a = client.post("/api/v1/retrievals", json={"node": "pacs", "query": {"StudyDate": "20110101-20161231"}})
        b = client.post("/api/v1/retrievals", json={"node": "pacs", "query": {"StudyDate": "20190101"}})
        ra, rb = wait_retrieval(client, a.json()["id"]), wait_retrieval(client, b.json()["id"])
    assert (ra["status"], ra["skipped"], ra["received"]) == ("completed", 8, 0)
    assert (rb["status"], rb["expected"], rb["received"]) == ("completed", 4, 4)
    items = client.get("/api/v1/retrievals").json()["items"]
    assert [i["id"] for i in items] == sorted((i["id"] for i in items), reverse=True)
    assert len(items) == 3
    inst = client.get("/api/v1/instances", params={"limit": 100}).json()
    assert inst["total"] == 12 == len({u for st in studies for u in st.sop_uids})
    assert any(e["action"] == "retrieval.create" for e in client.get("/api/v1/audit").json()["items"])


def test_retrieval_without_our_scp_fails_then_retry_completes(client, ctx, pacs_node):
    ctx.settings.arrival_timeout = 1.0
    ctx.settings.dicom_retries = 0
    r = client.post("/api/v1/retrievals", json={"node": "pacs", "query": {"StudyDate": "20190101"}})
    rid = r.json()["id"]
    body = wait_retrieval(client, rid)
    assert body["status"] == "failed" and body["received"] == 0 and len(body["missing"]) == 4
    assert body["error"]
    with storage_scp(ctx):
        r = client.post(f"/api/v1/retrievals/{rid}/retry")
        assert r.status_code == 202 and r.json() == {"id": rid, "status": "queued"}
        body = wait_retrieval(client, rid)
    assert (body["status"], body["received"], body["missing"], body["error"]) == ("completed", 4, [], None)
    assert client.post("/api/v1/retrievals/999/retry").status_code == 404


@pytest.mark.parametrize("body, code, needle", [
    ({"node": "nope", "query": {"StudyDate": "20120101"}}, 404, "nope"),
    ({"node": "pacs", "query": {"Bogus": "1"}}, 422, "query.Bogus"),
    ({"node": "pacs", "query": {"StudyDate": "20121301"}}, 422, "query.StudyDate"),
    ({"node": "pacs", "query": {}}, 422, "query"),
    ({"node": "pacs"}, 422, "query"),
])
def test_bad_retrieval_requests(client, body, code, needle):
    client.post("/api/v1/pacs-nodes", json={"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                            "port": 4242})
    r = client.post("/api/v1/retrievals", json=body)
    assert r.status_code == code
    assert needle in str(r.json()["detail"])
    assert client.get("/api/v1/retrievals").json()["total"] == 0


def test_unknown_retrieval_is_404(client):
    assert client.get("/api/v1/retrievals/999").status_code == 404
