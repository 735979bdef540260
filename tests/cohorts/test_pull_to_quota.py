"""Pull to quota against a real Orthanc into our real Storage SCP (C-MOVE), through the labeler."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import select

from app.cohorts.pull_runner import date_slices, pull_to_quota
from app.cohorts.taxonomies import create_taxonomy
from app.db.models import AuditEvent, Instance
from app.wiring import storage_scp
from app.labels.service import get_rules
from app.retrievals.nodes import create_node, get_node
from app.retrievals.schemas import NodeIn
from app.synth.generate import generate, read_truth

TAXONOMY = {"name": "pulltest", "classes": [
    {"name": "LtK", "where": {"modality": ["CR", "DX"], "body_part": "KNEE", "view": "AP", "laterality": "L"}},
    {"name": "C20F", "where": {"modality": ["CR", "DX"], "body_part": "CHEST", "view": "PA", "sex": "F",
                               "age_years": {"min": 20, "max": 29}}}]}


def test_date_slices_cover_the_range_without_overlap():
    assert date_slices("20110101-20161231", 6)[0] == "20110101-20111231"
    s = date_slices("20110101-20161231", 6)
    assert len(s) == 6 and s[-1].endswith("-20161231")
    assert date_slices("20200101-20200102", 5) == ["20200101-20200101", "20200102-20200102"]


def test_answers_are_verified_deduplicated_and_retrieved_by_uid():
    from pydicom import Dataset

    from app.cohorts.pull_runner import _checked, _retrieval_queries, verified_series

    def ans(series, study="1.1", sex="F", date="20120304", part="CHEST"):
        ds = Dataset()
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.StudyDate = series, study, date
        if sex is not None:
            ds.PatientSex = sex
        if part is not None:
            ds.BodyPartExamined = part
        return ds

    wanted = {"StudyDate": "20110101-20161231", "PatientSex": "F", "BodyPartExamined": "CHEST", "Modality": ""}
    answers = [ans("1.1.1"), ans("1.1.1"), ans("1.1.2", sex="M"), ans("1.1.3", sex=None),
               ans("1.1.4", part=None), ans("1.1.5", date="20190101"), ans("", study="1.2"),
               ans("1.2.1", study="1.2", date="20160101")]
    checked = _checked()
    got = verified_series(answers, wanted, checked)
    assert got == {"1.1.1": ("1.1", "20120304"), "1.2.1": ("1.2", "20160101")}
    assert (checked["answers"], checked["matched"], checked["duplicates"], checked["mismatched"],
            checked["unverifiable"]) == (8, 2, 1, 2, 3)
    assert checked["unverifiable_keys"] == {"PatientSex": 1, "BodyPartExamined": 1, "SeriesInstanceUID": 1}
    assert _retrieval_queries(got, lists=True) == [{"StudyInstanceUID": "1.1\\1.2", "SeriesInstanceUID": "1.1.1\\1.2.1"}]
    assert _retrieval_queries(got, lists=False) == [{"StudyInstanceUID": "1.1", "SeriesInstanceUID": "1.1.1"},
                                                    {"StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.2.1"}]


@pytest.fixture
def rig(ctx, orthanc, tmp_path):
    """Orthanc holding 6 left knees (distinct patients) and 1 chest of a woman in her 20s; our SCP."""
    ctx.settings.arrival_timeout = 3.0
    ctx.settings.dicom_retries = 1
    gen = tmp_path / "gen"
    generate(gen, per_class=6, seed=3, taxonomy="xr10", size="64x64", workers=1, syntaxes=["explicit"])
    truth = read_truth(gen)
    knees = [r for r in truth if r["true_class"] == "LtK"]
    chests = [r for r in truth if r["true_class"] == "C20F"][:1]
    for r in knees + chests:
        orthanc.upload(gen / r["file"])
    with ctx.sessions() as s:
        create_node(s, NodeIn(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port), "test")
        create_taxonomy(s, TAXONOMY, get_rules(ctx.settings.label_rules))
        s.commit()
    scp = storage_scp(ctx).start()
    yield ctx, knees, chests
    scp.stop()


def _indexed(ctx) -> set[str]:
    with ctx.sessions() as s:
        return set(s.scalars(select(Instance.sop_instance_uid)))


def test_pull_stops_at_quota_and_reports_exhausted_classes(rig, client):
    ctx, knees, chests = rig
    knee_patients = {r["patient_id"] for r in knees}
    assert len(knee_patients) >= 4  # the seed gives enough distinct patients for a quota below them

    out = pull_to_quota(ctx, "pacs", "pulltest", per_class=2, study_date_range="20110101-20161231", actor="t")
    ltk, c20f = out["classes"]["LtK"], out["classes"]["C20F"]
    assert out["stopped"] == "done" and out["error"] is None
    assert (ltk["before"], ltk["quota"], ltk["exhausted"]) == (0, 2, False)
    assert 2 <= ltk["after"] < len(knee_patients)  # stopped at the quota: not the whole PACS
    got = _indexed(ctx)
    assert 2 <= len(got & {r["sop_instance_uid"] for r in knees}) < len(knees)
    # the only chest is found (birth-date range for the age band) and the class is exhausted
    assert (c20f["before"], c20f["after"], c20f["exhausted"]) == (0, 1, True)
    assert chests[0]["sop_instance_uid"] in got
    # one C-FIND per planned query picks the date slices holding matches: one retrieval, not one per slice
    assert len(c20f["retrievals"]) == 1
    # Orthanc honours every key: each answer is checked on our side and matches; retrievals name UIDs
    assert c20f["checked"]["matched"] == 1 and c20f["checked"]["mismatched"] == 0
    assert c20f["rounds"][0]["series"] == 1 and c20f["not_sent"] == []
    with ctx.sessions() as s:
        from app.db.models import Retrieval

        q = s.get(Retrieval, c20f["retrievals"][0]).query
    assert set(k for k, v in q.items() if v) == {"StudyInstanceUID", "SeriesInstanceUID"}
    assert 1 <= len(ltk["retrievals"]) < 6
    assert out["retrievals"] == len(ltk["retrievals"]) + len(c20f["retrievals"])

    # through the API: a larger quota fetches more knees, in the background
    r = client.post("/api/v1/cohorts/pull", json={"node": "pacs", "taxonomy": "pulltest", "per_class": 50})
    assert r.status_code == 202, r.text
    pid = r.json()["id"]
    deadline = time.monotonic() + 60
    while (body := client.get(f"/api/v1/cohorts/pulls/{pid}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert body["status"] == "completed", body
    rep = body["report"]["classes"]
    assert rep["LtK"]["before"] == ltk["after"] and rep["LtK"]["after"] == len(knee_patients)
    assert rep["LtK"]["exhausted"] and rep["C20F"]["exhausted"]
    assert rep["LtK"]["checked"]["mismatched"] == 0 and rep["LtK"]["rounds"][0]["status"] == "completed"
    assert {r["sop_instance_uid"] for r in knees} <= _indexed(ctx)
    with ctx.sessions() as s:
        actions = list(s.scalars(select(AuditEvent.action).where(AuditEvent.action.like("cohort.pull%"))))
    assert actions.count("cohort.pull.start") == 2 and actions.count("cohort.pull.finish") == 2


def test_pull_request_errors(client, ctx):
    r = client.post("/api/v1/cohorts/pull", json={"node": "nope", "taxonomy": "xr10", "per_class": 5})
    assert r.status_code == 404 and "nope" in r.json()["detail"]
    r = client.post("/api/v1/cohorts/pull", json={"node": "nope", "taxonomy": "xr10", "per_class": 0,
                                                  "study_date": "2011"})
    assert r.status_code == 422
    assert {tuple(e["loc"]) for e in r.json()["detail"]} == {("body", "per_class"), ("body", "study_date")}
    with ctx.sessions() as s:
        create_node(s, NodeIn(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=1), "test")
        s.commit()
    r = client.post("/api/v1/cohorts/pull", json={"node": "pacs", "taxonomy": "xr10", "per_class": 5,
                                                  "study_date": "20160101-20110101"})
    assert r.status_code == 422 and "study_date" in r.json()["detail"]
    assert client.get("/api/v1/cohorts/pulls/99").status_code == 404


def test_cli_pull_skips_full_classes_and_stops_on_an_unreachable_pacs(ctx, monkeypatch):
    from typer.testing import CliRunner

    from app.cli import cli
    from cohort_index import build_index

    with ctx.sessions() as s:
        build_index(s, ctx.settings.store_dir)  # LtK, RtK, C20F, C60M: 12+ patients each, no W
        create_node(s, NodeIn(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=1), "test")
        s.commit()
    for k, v in {"RADCOHORT_DATABASE_URL": ctx.settings.database_url,
                 "RADCOHORT_DATA_DIR": str(ctx.settings.data_dir), "RADCOHORT_DICOM_RETRIES": "0"}.items():
        monkeypatch.setenv(k, v)
    run = CliRunner().invoke
    r = run(cli, ["cohort", "pull", "nope", "--per-class", "5"])
    assert r.exit_code == 2 and "nope" in r.output
    r = run(cli, ["cohort", "pull", "pacs", "--taxonomy", "xr10", "--per-class", "5"])
    assert r.exit_code == 1, r.output
    # the report is the JSON document first in the output (a logging handler may write after it)
    out, _ = json.JSONDecoder().raw_decode(r.output[r.output.index("{"):])
    assert out["stopped"] == "find_failed" and "C-FIND" in out["error"] and out["retrievals"] == 0
    ltk = out["classes"]["LtK"]
    assert ltk["before"] == ltk["after"] >= 12 and (ltk["retrievals"], ltk["exhausted"]) == ([], False)
    assert out["classes"]["W"]["before"] == 0 and not out["classes"]["W"]["exhausted"]


def test_a_pacs_that_ignores_keys_gets_its_answers_checked_before_anything_moves(ctx, settings, tmp_path):
    """dcmqrscp (default) ignores PatientSex, PatientBirthDate, StudyDate and BodyPartExamined at SERIES
    level and never returns BodyPartExamined: the women class gets women only, the knee class (body
    part not verifiable) gets nothing, and the report says why."""
    from pydicom import dcmread

    from app.probe.service import probe_and_store
    from tests.conformance.peers import start_peer

    ctx.settings.arrival_timeout = 3.0
    ctx.settings.dicom_retries = 1
    gen = tmp_path / "gen"
    generate(gen, per_class=2, seed=5, taxonomy="xr10", size="64x64", workers=1, syntaxes=["explicit"])
    truth = read_truth(gen)
    sex_of = {r["sop_instance_uid"]: str(dcmread(gen / r["file"], stop_before_pixels=True).get("PatientSex", ""))
              for r in truth}
    assert {"F", "M"} <= set(sex_of.values())
    peer = start_peer("dcmqrscp", tmp_path / "peer", (settings.ae_title, settings.scp_port))
    taxonomy = {"name": "lax", "classes": [
        {"name": "women", "where": {"modality": ["CR", "DX"], "sex": "F"}},
        {"name": "kneeL", "where": {"body_part": "KNEE", "laterality": "L"}}]}
    try:
        peer.load([gen / r["file"] for r in truth])
        with ctx.sessions() as s:
            create_node(s, NodeIn(name="lax", ae_title=peer.ae_title, host="127.0.0.1", port=peer.port), "test")
            s.commit()
            caps = probe_and_store(s, ctx.settings, get_node(s, "lax"), "test")["capabilities"]
            create_taxonomy(s, taxonomy, get_rules(ctx.settings.label_rules))
            s.commit()
        assert {"PatientSex", "BodyPartExamined"} <= set(caps["keys_not_honoured"]["SERIES"])
        with storage_scp(ctx):
            out = pull_to_quota(ctx, "lax", "lax", per_class=50, study_date_range="20000101-20261231", actor="t")
    finally:
        peer.stop()
    women, knees = out["classes"]["women"], out["classes"]["kneeL"]
    got = _indexed(ctx)
    # only women were moved, though the PACS answered every series; the men's were discarded unmoved
    assert got and {sex_of[u] for u in got} == {"F"}
    assert got == {u for u, sx in sex_of.items() if sx == "F"}
    assert women["checked"]["mismatched"] > 0 and women["checked"]["matched"] > 0
    assert {"PatientSex", "StudyDate"} <= set(women["not_sent"])  # the probe said they are ignored
    assert all(rnd["status"] == "completed" for rnd in women["rounds"])
    # no answer carries BodyPartExamined: no knee series can be verified, none is moved, and it is said
    assert knees["retrievals"] == [] and knees["checked"]["matched"] == 0
    assert knees["checked"]["unverifiable_keys"].get("BodyPartExamined", 0) > 0
    assert out["stopped"] == "done"


def test_a_pacs_that_refuses_uid_lists_gets_one_retrieval_per_series(ctx, settings, tmp_path):
    """pynetdicom's qrscp answers once per instance and cannot take a UID list (the probe learns
    both): the pull names each verified series on its own and gets exactly the CR series."""
    from app.probe.service import probe_and_store
    from tests.conformance.peers import start_peer
    from tests.dicom.helpers import make_cr

    ctx.settings.arrival_timeout = 3.0
    gen = tmp_path / "gen"
    gen.mkdir()
    wanted, other = set(), set()
    for i, (modality, date) in enumerate([("CR", "20120101"), ("CR", "20130101"), ("MR", "20120101")]):
        study = f"1.2.826.0.1.3680043.10.999.{i}"
        for j in range(2):  # two instances per series: a duplicate answer per series at SERIES level
            ds = make_cr(patient_id=f"Q{i}", study_uid=study, series_uid=f"{study}.1", sop_uid=f"{study}.1.{j}",
                         modality=modality, study_date=date, instance_number=j + 1)
            ds.save_as(gen / f"{i}-{j}.dcm", enforce_file_format=True)
            (wanted if modality == "CR" else other).add(str(ds.SOPInstanceUID))
    peer = start_peer("qrscp", tmp_path / "peer", (settings.ae_title, settings.scp_port))
    try:
        peer.load(sorted(gen.iterdir()))
        with ctx.sessions() as s:
            create_node(s, NodeIn(name="q", ae_title=peer.ae_title, host="127.0.0.1", port=peer.port), "test")
            s.commit()
            caps = probe_and_store(s, ctx.settings, get_node(s, "q"), "test")["capabilities"]
            create_taxonomy(s, {"name": "cr", "classes": [{"name": "CR", "where": {"modality": "CR"}}]},
                            get_rules(ctx.settings.label_rules))
            s.commit()
        assert caps["uid_lists_refused"] is True and caps["duplicate_answers"] is True
        with storage_scp(ctx):
            out = pull_to_quota(ctx, "q", "cr", per_class=50, study_date_range="20110101-20141231", actor="t")
    finally:
        peer.stop()
    cr = out["classes"]["CR"]
    assert _indexed(ctx) == wanted
    assert [r["series"] for r in cr["rounds"]] == [1, 1] and all(r["status"] == "completed" for r in cr["rounds"])
    assert cr["checked"]["duplicates"] >= 2 and cr["checked"]["matched"] == 2
