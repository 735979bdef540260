"""Pseudonymous C-FIND (issue #18 item 3) and hosts the socket layer cannot encode (item 7).

The identity oracle: without the `find-identified` scope no identifying matching key is accepted
(API and CLI), answers never carry an identifying attribute, and every identified search is audited
(key names, never values). Results against a real Orthanc.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app.api import create_app
from app.cli import cli
from app.db.models import AuditEvent, PacsNode
from app.devtools.orthanc import free_port
from app.find_policy import IDENTIFYING_KEYS, WITHHELD
from tests.conftest import _migrated_ctx, make_settings
from tests.dicom.helpers import make_cr, make_studies, upload_all

PLAIN, FINDER = "plain-tok", "finder-tok"
TOKENS = f"{PLAIN},finder:{FINDER}:read+find-identified"
NODE = {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}
H_PLAIN, H_FINDER = {"Authorization": f"Bearer {PLAIN}"}, {"Authorization": f"Bearer {FINDER}"}

# every identifying key the issue names, with a value that would match on it
IDENTIFYING = {"PatientName": "Sm*", "PatientID": "P1", "PatientBirthDate": "19700101",
               "AccessionNumber": "A1", "OtherPatientIDs": "X*", "IssuerOfPatientID": "HOSP",
               "PatientBirthName": "Do*", "PatientAddress": "*Main*", "StudyID": "1"}


@pytest.fixture
def app_ctx(tmp_path):
    s = make_settings(tmp_path, api_tokens=TOKENS, dicom_timeout=2.0, dicom_retries=0)
    yield from _migrated_ctx(s)


@pytest.fixture
def api(app_ctx):
    with TestClient(create_app(app_ctx.settings, app_ctx)) as c:
        yield c


def _audits(ctx, action):
    with ctx.sessions() as s:
        return [(e.actor, e.target, e.details) for e in s.query(AuditEvent).filter_by(action=action)]


@pytest.mark.parametrize("key", sorted(IDENTIFYING))
def test_identifying_matching_key_without_the_scope_is_403_naming_the_field(api, app_ctx, key):
    assert api.post("/api/v1/pacs-nodes", json={**NODE, "port": free_port()}, headers=H_PLAIN).status_code == 201
    body = {"level": "STUDY", "query": {"StudyDate": "", key: IDENTIFYING[key]}}
    r = api.post("/api/v1/pacs-nodes/pacs/find", json=body, headers=H_PLAIN)
    assert r.status_code == 403, r.text
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", "query", key] and "find-identified" in err["msg"]
    assert IDENTIFYING[key] not in r.text
    assert _audits(app_ctx, "pacs.find_identified") == []  # refused: nothing was searched


def test_every_identifying_key_the_issue_names_is_covered():
    assert set(IDENTIFYING) <= IDENTIFYING_KEYS <= WITHHELD
    assert {"OtherPatientIDsSequence", "PatientBirthTime", "IssuerOfAccessionNumberSequence"} <= IDENTIFYING_KEYS


def test_open_mode_has_no_identified_search(client):
    """Without configured tokens the API is open, but only for pseudonymous searches."""
    client.post("/api/v1/pacs-nodes", json={**NODE, "port": free_port()})
    r = client.post("/api/v1/pacs-nodes/pacs/find", json={"level": "STUDY", "query": {"PatientID": "P*"}})
    assert r.status_code == 403 and r.json()["detail"][0]["loc"] == ["body", "query", "PatientID"]


def test_identified_search_is_audited_before_the_query_even_when_the_pacs_is_down(api, app_ctx):
    api.post("/api/v1/pacs-nodes", json={**NODE, "port": free_port()}, headers=H_PLAIN)
    r = api.post("/api/v1/pacs-nodes/pacs/find", headers=H_FINDER,
                 json={"level": "STUDY", "query": {"PatientName": "Smith^J*", "AccessionNumber": "A77"}})
    assert r.status_code in (502, 504), r.text
    assert _audits(app_ctx, "pacs.find_identified") == [
        ("token:finder", "pacs", {"level": "STUDY", "keys": ["AccessionNumber", "PatientName"]})]
    with app_ctx.sessions() as s:
        rows = json.dumps([e.details for e in s.query(AuditEvent)])
    assert "Smith" not in rows and "A77" not in rows  # key names only, never the values


def test_answers_carry_no_identifying_attribute_whoever_asks(api, app_ctx, orthanc, tmp_path):
    studies = make_studies(tmp_path / "gen", ["20120101", "20150101"], instances_per_series=1)
    upload_all(orthanc, sorted((tmp_path / "gen").iterdir()))
    other = make_cr(patient_id="ID-SMITH-9", patient_name="Smith^John", study_date="20130101",
                    accession="ACC-SMITH")
    other.PatientBirthDate = "19700101"
    other.ReferringPhysicianName = "Who^Doctor"
    other.InstitutionName = "Saint Somewhere"
    other.save_as(tmp_path / "smith.dcm", enforce_file_format=True)
    orthanc.upload(tmp_path / "smith.dcm")
    api.post("/api/v1/pacs-nodes", json={**NODE, "port": orthanc.dicom_port}, headers=H_PLAIN)
    ask_back = {k: "" for k in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
                                "ReferringPhysicianName", "InstitutionName", "IssuerOfPatientID")}
    secrets = ("Smith", "ID-SMITH", "ACC-SMITH", "19700101", "Who^Doctor", "Somewhere", "Test^Patient", "ACC1")
    # asked back empty (or '*'): a plain token may, and gets them withheld
    r = api.post("/api/v1/pacs-nodes/pacs/find", headers=H_PLAIN,
                 json={"level": "STUDY", "query": {**ask_back, "PatientName": "*", "StudyDate": ""}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == 3 and {i["StudyInstanceUID"] for i in body["results"]} >= {s.study_uid for s in studies}
    for item in body["results"]:
        assert not set(item) & WITHHELD, item
        assert len(item["patient_key"]) == 64
    assert not [s for s in secrets if s in r.text]
    assert set(ask_back) <= set(body["withheld"])
    # the scoped token may match on the name; the answer is just as pseudonymous
    r = api.post("/api/v1/pacs-nodes/pacs/find", headers=H_FINDER,
                 json={"level": "STUDY", "query": {**ask_back, "PatientName": "Smi*"}})
    assert r.status_code == 200, r.text
    (item,) = r.json()["results"]
    assert item["StudyDate"] == "20130101" and not set(item) & WITHHELD
    assert not [s for s in secrets if s in r.text]
    # the same patient_key the plain answer gave: the scope adds matching, not identity
    assert item["patient_key"] in {i["patient_key"] for i in body["results"]}
    assert [a[0] for a in _audits(app_ctx, "pacs.find_identified")] == ["token:finder"]


# ------------------------------------------------------------------ hosts (item 7)

@pytest.mark.parametrize("host, words", [
    ("a..b", "1-63 characters"),
    ("x" * 70 + ".example", "1-63 characters"),
    (".", "1-63 characters"),
    ("a:b", "IPv6"),
    (("a" * 60 + ".") * 4 + "b" * 10, "253"),
])
def test_node_host_the_socket_layer_cannot_encode_is_422_naming_the_field(api, host, words):
    r = api.post("/api/v1/pacs-nodes", json={**NODE, "host": host}, headers=H_PLAIN)
    assert r.status_code == 422, r.text
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", "host"] and words in err["msg"]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "pacs-1.example.org", "x" * 63 + ".org"])
def test_valid_hosts_are_accepted(api, host):
    r = api.post("/api/v1/pacs-nodes", json={**NODE, "host": host}, headers=H_PLAIN)
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("host", ["a..b", "y" * 70])
@pytest.mark.parametrize("op", ["echo", "find", "probe"])
def test_a_stored_host_that_cannot_be_encoded_is_a_clear_502(api, app_ctx, host, op):
    """A node registered before the schema checked hosts (written to the DB directly here)."""
    with app_ctx.sessions() as s:
        s.add(PacsNode(name="old", ae_title="OLD", host=host, port=104))
        s.commit()
    body = {"json": {"level": "STUDY", "query": {}}} if op == "find" else {}
    r = api.post(f"/api/v1/pacs-nodes/old/{op}", headers=H_PLAIN, **body)
    assert r.status_code == 502, r.text
    assert "node old" in r.json()["detail"] and "host" in r.json()["detail"]


# ------------------------------------------------------------------ the CLI

@pytest.fixture
def cli_env(monkeypatch, settings):
    for k, v in {"DATABASE_URL": settings.database_url, "DATA_DIR": str(settings.data_dir),
                 "SCP_PORT": str(settings.scp_port), "PSEUDONYM_KEY": "k", "DICOM_TIMEOUT": "2",
                 "DICOM_RETRIES": "0"}.items():
        monkeypatch.setenv(f"RADCOHORT_{k}", v)
    return settings


def _run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_cli_find_refuses_identifying_keys_unless_identified_and_audits_it(cli_env, ctx):
    port = free_port()
    assert _run("nodes", "add", "p", "--ae-title", "P", "--host", "127.0.0.1", "--port", str(port)).exit_code == 0
    r = _run("find", "p", "-q", "PatientName=Smith*", "-q", "StudyDate=")
    assert r.exit_code == 2 and "PatientName" in r.output and "--identified" in r.output
    assert _audits(ctx, "pacs.find_identified") == []
    r = _run("find", "p", "-q", "PatientName=", "-q", "PatientID=*")  # asked back only: allowed
    assert r.exit_code == 1 and "--identified" not in r.output  # it ran (the node is down)
    r = _run("find", "p", "-q", "PatientBirthDate=19700101", "--identified")
    assert r.exit_code == 1  # ran against the closed port, after the audit
    assert _audits(ctx, "pacs.find_identified") == [("cli", "p", {"level": "STUDY", "keys": ["PatientBirthDate"]})]


def test_cli_find_answers_withhold_identifiers(cli_env, orthanc, tmp_path):
    make_studies(tmp_path / "gen", ["20120101"], instances_per_series=1)
    upload_all(orthanc, sorted((tmp_path / "gen").iterdir()))
    _run("nodes", "add", "pacs", "--ae-title", "ORTHANC", "--host", "127.0.0.1", "--port", str(orthanc.dicom_port))
    r = _run("find", "pacs", "-q", "PatientID=P0", "-q", "AccessionNumber=", "-q", "PatientBirthDate=",
             "--identified", "--json")
    assert r.exit_code == 0, r.output
    (row,) = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert not set(row) & WITHHELD and len(row["patient_key"]) == 64
    assert "P0" not in r.stdout and "A0" not in r.stdout
