"""Worklists (issue #17 item 1): upload with per-row / per-file errors, a C-FIND dry run against a real
Orthanc (found / not_found / ambiguous / invalid / refused), one retrieval, per-row results as CSV, and the
identified-search rule (find-identified for PatientID / AccessionNumber, audited, keys hidden otherwise)."""

from __future__ import annotations

import csv
import io
import time

import openpyxl
import pytest
from fastapi.testclient import TestClient

from app.api import create_app
from app.db.models import AuditEvent
from app.devtools.orthanc import free_port
from app.wiring import storage_scp
from tests.conftest import _migrated_ctx, make_settings
from tests.dicom.helpers import make_studies, upload_all, wait_retrieval

ADMIN, PLAIN = "admin-tok", "plain-tok"
TOKENS = f"admin:{ADMIN}:read+retrieve+find-identified,plain:{PLAIN}:read+retrieve"
HA, HP = {"Authorization": f"Bearer {ADMIN}"}, {"Authorization": f"Bearer {PLAIN}"}


@pytest.fixture
def app_ctx(tmp_path, db_url):
    s = make_settings(tmp_path, db_url, api_tokens=TOKENS, dicom_timeout=5.0, dicom_retries=0, arrival_timeout=5.0)
    yield from _migrated_ctx(s)


@pytest.fixture
def api(app_ctx):
    with TestClient(create_app(app_ctx.settings, app_ctx)) as c:
        yield c


def _up(api, text: str | bytes, name="list.csv", headers=HA, **form):
    data = text.encode() if isinstance(text, str) else text
    return api.post("/api/v1/worklists", files={"file": (name, data)}, data=form, headers=headers)


def _rows(api, wid, headers=HA):
    r = api.get(f"/api/v1/worklists/{wid}", headers=headers)
    assert r.status_code == 200, r.text
    return {x["row"]: x for x in r.json()["rows"]}


def test_bad_rows_get_their_reason_and_never_stop_the_good_ones(api):
    csv_text = ("AccessionNumber;Study Date;Modality;Notes\n"
                "A1;20120101;CR;x\n"
                ";20120101;;\n"             # empty key
                "A2;2012-13-01;;\n"         # not a calendar date
                "A3;yesterday;;\n"          # malformed date
                "A1;2012-01-01;cr;\n"       # the same request as row 2 (date and modality normalised)
                "A4;20120101-20130101;DX;\n"
                "A5;;C*R;\n"                # not a modality code
                ";;;\n")                    # blank line: skipped
    r = _up(api, csv_text)
    assert r.status_code == 201, r.text
    out = r.json()
    assert (out["rows"], out["key_type"], out["invalid"]) == (7, "AccessionNumber", 5)
    assert out["warnings"][0]["column"] == "Notes" and "unknown column" in out["warnings"][0]["msg"]
    rows = _rows(api, out["id"])
    assert rows[2]["status"] == "pending" and rows[2]["filters"] == {"StudyDate": "20120101", "ModalitiesInStudy": "CR"}
    assert rows[3]["status"] == "invalid" and rows[3]["detail"] == "empty AccessionNumber"
    assert rows[4]["status"] == "invalid" and "not a calendar date" in rows[4]["detail"]
    assert rows[5]["status"] == "invalid" and "YYYYMMDD" in rows[5]["detail"]
    assert rows[6]["status"] == "invalid" and rows[6]["detail"] == "duplicate of row 2"
    assert rows[7]["status"] == "pending" and rows[7]["filters"]["StudyDate"] == "20120101-20130101"
    assert rows[8]["status"] == "invalid" and "modality" in rows[8]["detail"]
    assert 9 not in rows


def test_whole_file_errors(api):
    r = _up(api, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", name="x.png")
    assert r.status_code == 415 and "not CSV or XLSX" in r.json()["detail"]
    r = _up(api, b"PK\x03\x04garbage", name="x.xlsx")
    assert r.status_code == 415 and "XLSX" in r.json()["detail"]
    r = _up(api, "Name,Notes\nx,y\n")
    assert r.status_code == 422 and "no key column" in r.json()["detail"]
    r = _up(api, "StudyInstanceUID,AccessionNumber\n1.2.3,A1\n")
    assert r.status_code == 422 and "several key columns" in r.json()["detail"]
    r = _up(api, "StudyInstanceUID,AccessionNumber\n1.2.3,A1\n", column="StudyInstanceUID")
    assert r.status_code == 201 and r.json()["key_type"] == "StudyInstanceUID"
    r = _up(api, "StudyInstanceUID\n1.2.3\n", column="Modality")
    assert r.status_code == 422 and "not a key column" in r.json()["detail"]
    r = _up(api, "")
    assert r.status_code == 422 and "empty" in r.json()["detail"]
    big = "StudyInstanceUID\n" + "".join(f"1.2.{i}\n" for i in range(100_000))
    r = _up(api, big)
    assert r.status_code == 413 and "more than" in r.json()["detail"]
    r = _up(api, "StudyInstanceUID\n1.2.3\nnot-a-uid\n1.2.3\n")
    assert r.status_code == 201 and r.json()["invalid"] == 2


def test_xlsx_upload(api):
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["Study Instance UID", "Description"])
    ws.append(["1.2.840.1", "CHEST PA"])
    ws.append(["1.2.840.2", None])
    buf = io.BytesIO()
    wb.save(buf)
    r = _up(api, buf.getvalue(), name="list.xlsx", headers=HP)
    assert r.status_code == 201, r.text
    rows = _rows(api, r.json()["id"], HP)
    assert rows[2]["key"] == "1.2.840.1" and rows[2]["filters"] == {"StudyDescription": "CHEST PA"}
    assert rows[3]["status"] == "pending"


def test_identified_worklists_need_find_identified(api, app_ctx):
    r = _up(api, "PatientID\nSECRET123\n", headers=HP)
    assert r.status_code == 403 and "find-identified" in r.json()["detail"]
    r = _up(api, "PatientID\nSECRET123\n", headers=HA)
    wid = r.json()["id"]
    assert _rows(api, wid, HA)[2]["key"] == "SECRET123"
    # a token without find-identified sees the row, never the identifier (JSON and CSV)
    hidden = api.get(f"/api/v1/worklists/{wid}", headers=HP)
    assert hidden.status_code == 200 and "SECRET123" not in hidden.text and hidden.json()["rows"][0]["key"] is None
    assert "SECRET123" not in api.get(f"/api/v1/worklists/{wid}/results.csv", headers=HP).text
    assert api.post(f"/api/v1/worklists/{wid}/resolve", json={"node": "pacs"}, headers=HP).status_code == 403
    with app_ctx.sessions() as s:
        events = [(e.actor, e.action, e.details) for e in s.query(AuditEvent)]
    assert ("token:plain", "worklist.refused") in {(a, b) for a, b, _ in events}
    assert any(b == "worklist.upload" and d["identified"] for _a, b, d in events)
    assert "SECRET123" not in repr(events)


def _wait(api, wid, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = api.get(f"/api/v1/worklists/{wid}", headers=HA).json()
        if body["status"] in ("resolved", "failed"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"worklist {wid} not resolved: {body['status']}")


@pytest.mark.orthanc
def test_resolve_then_retrieve_against_orthanc(api, app_ctx, orthanc_factory, tmp_path):
    orthanc = orthanc_factory(modalities={"radcohort": (app_ctx.settings.ae_title, "127.0.0.1",
                                                        app_ctx.settings.scp_port)})
    s1 = make_studies(tmp_path / "g1", ["20120101", "20130101", "20190101"], instances_per_series=2)
    # a second study of patient P0 under the same accession number: A0 alone is ambiguous
    s2 = make_studies(tmp_path / "g2", ["20150101"], instances_per_series=1)
    upload_all(orthanc, sorted((tmp_path / "g1").iterdir()) + sorted((tmp_path / "g2").iterdir()))
    r = api.post("/api/v1/pacs-nodes", headers=HA, json={"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                                          "port": orthanc.dicom_port, "retrieve_method": "move"})
    assert r.status_code == 201, r.text
    wl = _up(api, "AccessionNumber,StudyDate\nA0,\nA0,20120101\nA1,\nA9,\nA2,19990101\n,20120101\n").json()
    r = api.post(f"/api/v1/worklists/{wl['id']}/resolve", json={"node": "pacs"}, headers=HA)
    assert r.status_code == 202, r.text
    # nothing is moved by a resolve
    body = _wait(api, wl["id"])
    assert body["status"] == "resolved"
    rows = {x["row"]: x for x in body["rows"]}
    assert rows[2]["status"] == "ambiguous" and set(rows[2]["studies"]) == {s1[0].study_uid, s2[0].study_uid}
    assert rows[3]["status"] == "found" and rows[3]["studies"] == [s1[0].study_uid]
    assert rows[4]["status"] == "found" and rows[4]["studies"] == [s1[1].study_uid]
    assert rows[5]["status"] == "not_found" and rows[6]["status"] == "not_found"
    assert rows[7]["status"] == "invalid"
    assert body["counts"] == {"ambiguous": 1, "found": 2, "not_found": 2, "invalid": 1}
    assert api.get("/api/v1/instances", headers=HA).json()["total"] == 0
    # a StudyInstanceUID worklist: rows without filters go by UID list matching, a hundred per C-FIND
    uid_csv = "StudyInstanceUID,StudyDate\n" + "".join(f"{st.study_uid},\n" for st in s1) + \
        "1.2.3.999,\n" + f"{s2[0].study_uid},19990101\n{s2[0].study_uid},20150101\n"
    uw = _up(api, uid_csv, headers=HP).json()
    assert api.post(f"/api/v1/worklists/{uw['id']}/resolve", json={"node": "pacs"}, headers=HP).status_code == 202
    ub = _wait(api, uw["id"])
    urows = {x["row"]: x for x in ub["rows"]}
    assert [urows[i]["status"] for i in range(2, 8)] == ["found"] * 3 + ["not_found", "not_found", "found"]
    assert urows[2]["studies"] == [s1[0].study_uid] and urows[7]["studies"] == [s2[0].study_uid]
    with storage_scp(app_ctx):
        r = api.post(f"/api/v1/worklists/{wl['id']}/retrieve", headers=HA)
        assert r.status_code == 202, r.text
        assert r.json()["studies"] == 2
        rid = r.json()["retrieval_id"]
        done = wait_retrieval(lambda_client(api), rid)
    assert (done["status"], done["received"]) == ("completed", 4)
    rows_csv = list(csv.DictReader(io.StringIO(api.get(f"/api/v1/worklists/{wl['id']}/results.csv",
                                                       headers=HA).text)))
    by_row = {int(x["row"]): x for x in rows_csv}
    assert by_row[3]["instances_received"] == "2" and by_row[3]["retrieval_status"] == "completed"
    assert by_row[2]["instances_received"] == "2"  # ambiguous rows are not retrieved by default: s1[0] via row 3
    assert by_row[5]["status"] == "not_found" and by_row[5]["instances_received"] == "0"
    assert by_row[3]["key"] == "A0"


def lambda_client(api):
    class _C:
        def get(self, url):
            return api.get(url, headers=HA)
    return _C()


def test_unreachable_node_marks_rows_refused(api, app_ctx):
    r = api.post("/api/v1/pacs-nodes", headers=HA, json={"name": "dead", "ae_title": "NOBODY", "host": "127.0.0.1",
                                                          "port": free_port()})
    assert r.status_code == 201, r.text
    wl = _up(api, "StudyInstanceUID\n1.2.3\n1.2.4\nbad\n", headers=HP).json()
    assert api.post(f"/api/v1/worklists/{wl['id']}/resolve", json={"node": "nope"}, headers=HP).status_code == 404
    assert api.post(f"/api/v1/worklists/{wl['id']}/retrieve", headers=HP).status_code == 409
    assert api.post(f"/api/v1/worklists/{wl['id']}/resolve", json={"node": "dead"}, headers=HP).status_code == 202
    body = _wait(api, wl["id"])
    rows = {x["row"]: x for x in body["rows"]}
    assert [rows[i]["status"] for i in (2, 3, 4)] == ["refused", "refused", "invalid"]
    assert rows[2]["detail"].startswith("PACS: ")
    assert api.post(f"/api/v1/worklists/{wl['id']}/retrieve", headers=HP).status_code == 422


def test_cli_upload_show(app_ctx, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from app.cli import cli

    for k, v in {"RADCOHORT_DATABASE_URL": app_ctx.settings.database_url,
                 "RADCOHORT_DATA_DIR": str(app_ctx.settings.data_dir)}.items():
        monkeypatch.setenv(k, v)
    f = tmp_path / "w.csv"
    f.write_text("PatientID,StudyDate\nSECRET9,20200101\nSECRET8,2020-02-30\n")
    res = CliRunner().invoke(cli, ["worklist", "upload", str(f)])
    assert res.exit_code == 2 and "--identified" in res.output
    res = CliRunner().invoke(cli, ["worklist", "upload", str(f), "--identified"])
    assert res.exit_code == 0, res.output
    assert "2 rows by PatientID, 1 invalid" in res.output and "row 3: date" in res.output
    wid = res.output.split()[1].rstrip(":")
    res = CliRunner().invoke(cli, ["worklist", "show", wid])
    assert res.exit_code == 0 and "SECRET9" not in res.output and "invalid" in res.output
    res = CliRunner().invoke(cli, ["worklist", "show", wid, "--identified"])
    assert "SECRET9" in res.output
    res = CliRunner().invoke(cli, ["worklist", "retrieve", wid])
    assert res.exit_code == 2 and "resolve it" in res.output


def test_csv_with_stray_carriage_returns_and_broken_quotes(api):
    r = _up(api, b"StudyInstanceUID\r\n1.2.3\r\n1.2.4\r1.2.5\n")
    assert r.status_code == 201 and r.json()["rows"] == 3
    r = _up(api, b'StudyInstanceUID,Description\n1.2.3,"x\r\ny\n')
    assert r.status_code in (201, 422) and r.json()


def test_list_worklists(api):
    a = _up(api, "StudyInstanceUID\n1.2.3\nbad\n", headers=HP).json()
    b = _up(api, "StudyInstanceUID\n1.2.4\n", headers=HP).json()
    body = api.get("/api/v1/worklists", headers=HP).json()
    assert body["total"] == 2 and [i["id"] for i in body["items"]] == [b["id"], a["id"]]
    assert body["items"][1]["counts"] == {"pending": 1, "invalid": 1}


def test_resolve_of_an_unreachable_pacs_backs_off_then_stops_and_leaves_the_rest_pending(api, app_ctx):
    """The node's etiquette applies to a resolve: each failure to reach the PACS raises the node's
    backoff (each next find waits longer), and five in a row end the resolve; rows not tried stay pending."""
    from app.policy.backoff import node_backoff
    from app.policy.schema import policy_of

    policy = {"backoff": {"initial_s": 0.05, "factor": 2.0, "max_s": 1.0}}
    r = api.post("/api/v1/pacs-nodes", headers=HA, json={"name": "dead", "ae_title": "NOBODY", "host": "127.0.0.1",
                                                          "port": free_port()})
    assert r.status_code == 201, r.text
    assert api.patch("/api/v1/pacs-nodes/dead", headers=HA, json={"policy": policy}).status_code == 200
    # filters make every row its own C-FIND (no UID list)
    wl = _up(api, "StudyInstanceUID,StudyDate\n" + "".join(f"1.2.3.{i},20120101\n" for i in range(12)),
             headers=HP).json()
    t0 = time.monotonic()
    assert api.post(f"/api/v1/worklists/{wl['id']}/resolve", json={"node": "dead"}, headers=HP).status_code == 202
    body = _wait(api, wl["id"])
    took = time.monotonic() - t0
    assert body["status"] == "failed" and "could not be reached for 5 rows" in body["error"]
    assert "7 row(s) not tried" in body["error"]
    statuses = [x["status"] for x in sorted(body["rows"], key=lambda x: x["row"])]
    assert statuses == ["refused"] * 5 + ["pending"] * 7
    # waits of 0.05, 0.1, 0.2, 0.4 s before finds 2-5 (each scaled by the jitter-free level delay)
    assert took >= 0.7
    backoff = node_backoff(app_ctx, "dead", policy_of({"policy": policy}).backoff.config())
    assert backoff.level >= 5


@pytest.mark.orthanc
def test_resolve_takes_the_nodes_association_slots_shared_with_retrievals(api, app_ctx, orthanc_factory, tmp_path):
    from app.policy.clock import SYSTEM_CLOCK
    from app.policy.limits import node_limits
    from app.policy.schema import policy_of
    import threading

    orthanc = orthanc_factory(modalities={"radcohort": (app_ctx.settings.ae_title, "127.0.0.1",
                                                        app_ctx.settings.scp_port)})
    studies = make_studies(tmp_path / "g", ["20120101", "20130101"], instances_per_series=1)
    upload_all(orthanc, sorted((tmp_path / "g").iterdir()))
    policy = {"max_associations": 1}
    api.post("/api/v1/pacs-nodes", headers=HA, json={"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                                      "port": orthanc.dicom_port})
    assert api.patch("/api/v1/pacs-nodes/pacs", headers=HA, json={"policy": policy}).status_code == 200
    wl = _up(api, "StudyInstanceUID,StudyDate\n" + "".join(f"{st.study_uid},{st.study_date}\n" for st in studies),
             headers=HP).json()
    # a retrieval of this node holds its only association slot for 1.5 s
    limits = node_limits(app_ctx, "pacs", policy_of({"policy": policy}), SYSTEM_CLOCK)
    held = threading.Event()

    def hold():
        with limits.association():
            held.set()
            time.sleep(1.5)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(5)
    t0 = time.monotonic()
    assert api.post(f"/api/v1/worklists/{wl['id']}/resolve", json={"node": "pacs"}, headers=HP).status_code == 202
    body = _wait(api, wl["id"])
    t.join()
    assert body["status"] == "resolved" and time.monotonic() - t0 >= 1.2  # it waited for the slot
    assert [x["status"] for x in body["rows"]] == ["found", "found"], [x["detail"] for x in body["rows"]]
