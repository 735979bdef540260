"""PACS node API: CRUD with validation, echo and find against a real Orthanc, privacy of results."""

from __future__ import annotations

import pytest

from app.devtools.orthanc import free_port
from tests.dicom.helpers import make_studies, upload_all

NODE = {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242, "retrieve_method": "move"}


def test_node_crud_and_audit(client):
    r = client.post("/api/v1/pacs-nodes", json=NODE)
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "pacs" and r.json()["retrieve_method"] == "move"
    assert client.post("/api/v1/pacs-nodes", json=NODE).status_code == 409
    page = client.get("/api/v1/pacs-nodes").json()
    assert page["total"] == 1 and [n["name"] for n in page["items"]] == ["pacs"]
    assert client.get("/api/v1/pacs-nodes/pacs").json()["port"] == 4242
    assert client.get("/api/v1/pacs-nodes/nope").status_code == 404
    assert client.delete("/api/v1/pacs-nodes/pacs").status_code == 204
    assert client.delete("/api/v1/pacs-nodes/pacs").status_code == 404
    assert client.get("/api/v1/pacs-nodes").json() == {"total": 0, "items": []}
    actions = [e["action"] for e in client.get("/api/v1/audit").json()["items"]]
    assert "pacs_node.create" in actions and "pacs_node.delete" in actions


@pytest.mark.parametrize("field, value", [
    ("ae_title", "THIS-AE-TITLE-IS-TOO-LONG"),
    ("ae_title", "BAD\\AE"),
    ("ae_title", "日本"),
    ("port", 0),
    ("port", 70000),
    ("retrieve_method", "push"),
    ("name", ""),
    ("host", "bad host/../x"),
])
def test_node_validation_names_the_field(client, field, value):
    r = client.post("/api/v1/pacs-nodes", json={**NODE, field: value})
    assert r.status_code == 422
    assert any(e["loc"][-1] == field for e in r.json()["detail"]), r.json()


def test_echo_ok_and_unreachable(client, orthanc):
    client.post("/api/v1/pacs-nodes", json={**NODE, "port": orthanc.dicom_port})
    r = client.post("/api/v1/pacs-nodes/pacs/echo")
    assert r.status_code == 200 and r.json()["ok"] is True and r.json()["elapsed_ms"] > 0
    client.app.state.ctx.settings.dicom_retries = 1
    client.post("/api/v1/pacs-nodes", json={**NODE, "name": "dead", "port": free_port()})
    r = client.post("/api/v1/pacs-nodes/dead/echo")
    assert r.status_code == 504
    assert "cannot reach" in r.json()["detail"] and "127.0.0.1" in r.json()["detail"]
    assert client.post("/api/v1/pacs-nodes/nope/echo").status_code == 404
    # each verdict is kept as the node's last echo (the console shows it), the failure too
    from app.db.models import PacsNode

    with client.app.state.ctx.sessions() as s:
        last = {n.name: (n.options or {}).get("last_echo") for n in s.query(PacsNode)}
    assert last["pacs"]["ok"] is True and last["pacs"]["elapsed_ms"] > 0
    assert last["dead"]["ok"] is False and "cannot reach" in last["dead"]["error"]


def test_echo_wrong_ae_title_is_a_clear_gateway_error(client, orthanc_factory, settings):
    # an Orthanc that checks the called AE title rejects the association: permanent -> 502
    pacs = orthanc_factory(overrides={"DicomCheckCalledAet": True})
    client.post("/api/v1/pacs-nodes", json={**NODE, "ae_title": "NOT-ORTHANC", "port": pacs.dicom_port})
    r = client.post("/api/v1/pacs-nodes/pacs/echo")
    assert r.status_code == 502
    assert "rejected" in r.json()["detail"]


def test_find_returns_results_without_patient_identifiers(client, orthanc, tmp_path):
    studies = make_studies(tmp_path / "gen", ["20120101", "20150101"], instances_per_series=1)
    upload_all(orthanc, sorted((tmp_path / "gen").iterdir()))
    client.post("/api/v1/pacs-nodes", json={**NODE, "port": orthanc.dicom_port})
    r = client.post("/api/v1/pacs-nodes/pacs/find",
                    json={"level": "STUDY", "query": {"StudyDate": "20110101-20131231", "PatientName": "",
                                                      "PatientID": "", "StudyDescription": "CHEST*"}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == 1 and body["capped"] is False
    (item,) = body["results"]
    assert item["StudyInstanceUID"] == studies[0].study_uid and item["StudyDate"] == "20120101"
    assert "PatientName" not in item and "PatientID" not in item
    assert "PatientName" in body["withheld"]
    assert len(item["patient_key"]) == 64 and "P0" not in r.text and "Test^Patient" not in r.text
    # patient root, PATIENT level; matching on PatientID needs the find-identified scope (test_auth_find)
    r = client.post("/api/v1/pacs-nodes/pacs/find", json={"level": "PATIENT", "root": "patient",
                                                          "query": {"PatientID": "", "PatientSex": ""}})
    assert r.status_code == 200 and r.json()["count"] == 2
    assert "P1" not in r.text and "P0" not in r.text
    r = client.post("/api/v1/pacs-nodes/pacs/find", json={"level": "PATIENT", "root": "patient",
                                                          "query": {"PatientID": "P1"}})
    assert r.status_code == 403 and r.json()["detail"][0]["loc"] == ["body", "query", "PatientID"]


@pytest.mark.parametrize("body, needle", [
    ({"level": "STUDY", "query": {"NotAKeyword": "x"}}, "query.NotAKeyword"),
    ({"level": "STUDY", "query": {"StudyDate": "2012"}}, "query.StudyDate"),
    ({"level": "PATIENT", "query": {}}, "level"),
    ({"level": "FRAME", "query": {}}, "level"),
])
def test_find_bad_input_is_422_with_the_field(client, body, needle):
    client.post("/api/v1/pacs-nodes", json=NODE)
    r = client.post("/api/v1/pacs-nodes/pacs/find", json=body)
    assert r.status_code == 422
    assert needle in str(r.json()["detail"])
