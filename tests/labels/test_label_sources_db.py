"""The added label sources through the real index (extract -> ingest -> relabel), the migration's
backfill from stored files, a site overlay relabelling the whole index, and the coverage report
(service, API, CLI)."""

from __future__ import annotations

import json

import sqlalchemy as sa
from pydicom.dataset import Dataset
from sqlalchemy import select
from typer.testing import CliRunner

from app.db.base import make_engine
from app.db.migrate import upgrade
from app.db.models import Instance, Patient, Series
from app.index.extract import extract_record
from app.index.ingest import ingest
from app.labels.coverage import coverage
from app.labels.service import make_labeler, relabel_all
from tests.dicom.helpers import make_cr


def _cr(**kw) -> Dataset:
    extra = {k: kw.pop(k) for k in list(kw) if k[0].isupper()}
    ds = make_cr(**kw)
    del ds.ViewPosition  # make_cr writes PA: here only what the test names
    for k, v in extra.items():
        setattr(ds, k, v)
    return ds


def _request_attributes(text: str) -> list:
    item = Dataset()
    item.RequestedProcedureDescription = text
    return [item]


def test_new_sources_are_extracted_indexed_and_labelled(any_ctx):
    dss = [
        # PerformedProcedureStepDescription alone names the part and the view
        _cr(body_part="", study_description="", series_description="",
            PerformedProcedureStepDescription="CHEST (PORTABLE AP)"),
        # RequestedProcedureDescription inside RequestAttributesSequence, as modalities write it
        _cr(body_part="", study_description="", series_description="",
            RequestAttributesSequence=_request_attributes("XR TIB/FIB RIGHT")),
        # the CR reader's exam menu refines a generic BodyPartExamined
        _cr(body_part="EXTREMITY", study_description="", series_description="",
            AcquisitionDeviceProcessingDescription="[LOWER LEG         ]"),
        # a dog
        _cr(body_part="CHEST", study_description="THORAX", PatientSpeciesDescription="Canis lupus familiaris",
            PatientBreedDescription="Beagle"),
    ]
    for i, ds in enumerate(dss):
        ds.PatientID = f"N{i}"  # species is a patient attribute: one animal, one patient
    recs = [extract_record(ds, file_path=f"x/{i}.dcm") for i, ds in enumerate(dss)]
    assert recs[1]["requested_procedure_description"] == "XR TIB/FIB RIGHT"
    with any_ctx.sessions() as s:
        labeler = make_labeler(s)
        ingest(s, recs, labeler=labeler)
        s.commit()
        rows = {i.sop_instance_uid: i for i in s.scalars(select(Instance))}
        got = [rows[r["sop_instance_uid"]] for r in recs]
        assert (got[0].label_body_part, got[0].label_view) == ("CHEST", "AP")
        assert got[0].label_sources["view"] == "text:PerformedProcedureStepDescription[AP]"
        assert (got[1].label_body_part, got[1].label_laterality) == ("LEG", "R")
        assert got[2].acquisition_device_processing_description.startswith("[LOWER LEG")
        assert got[2].label_body_part == "LEG" and got[2].label_sources["body_part_refines"].startswith("EXTREMITY")
        assert (got[3].label_species, got[3].label_body_part) == ("CANINE", None)
        # a bulk relabel reads the same columns: nothing changes
        assert relabel_all(s)["changed"] == 0
        # and sees them when they change under it (e.g. a backfill)
        s.execute(sa.update(Series).where(Series.id == got[0].series_pk)
                  .values(performed_procedure_step_description="KNEE LEFT"))
        stats = relabel_all(s)
        s.commit()
        assert stats["changed"] == 1
        s.refresh(got[0])
        assert (got[0].label_body_part, got[0].label_laterality) == ("KNEE", "L")


def _insert_old_row(conn, store, n: int, ds: Dataset) -> None:
    """An instance indexed before migration 0003 (its file in the store, the new columns absent)."""
    rel = f"old/{n}.dcm"
    (store / "old").mkdir(parents=True, exist_ok=True)
    ds.save_as(store / rel, enforce_file_format=True)
    conn.execute(sa.text("INSERT INTO patients (id, patient_id, issuer) VALUES (:n, :p, '')"), {"n": n, "p": f"P{n}"})
    conn.execute(sa.text("INSERT INTO studies (id, study_instance_uid, patient_pk) VALUES (:n, :u, :n)"),
                 {"n": n, "u": ds.StudyInstanceUID})
    conn.execute(sa.text("INSERT INTO series (id, series_instance_uid, study_pk, body_part_examined) "
                         "VALUES (:n, :u, :n, :bp)"), {"n": n, "u": ds.SeriesInstanceUID, "bp": ds.BodyPartExamined})
    conn.execute(sa.text("INSERT INTO instances (id, sop_instance_uid, series_pk, study_pk, patient_pk, file_path, "
                         "file_size, received_at, has_conflict) VALUES (:n, :u, :n, :n, :n, :f, 0, :t, :c)"),
                 {"n": n, "u": ds.SOPInstanceUID, "f": rel, "t": "2026-01-01 00:00:00", "c": False})


def test_migration_adds_and_backfills_the_columns_from_stored_files(db_url, tmp_path, monkeypatch):
    data = tmp_path / "data"
    store = data / "store"
    monkeypatch.setenv("RADCOHORT_DATA_DIR", str(data))
    monkeypatch.delenv("RADCOHORT_SKIP_LABEL_BACKFILL", raising=False)
    upgrade(db_url, "0002_store_conflicts")
    engine = make_engine(db_url)
    with engine.begin() as conn:
        _insert_old_row(conn, store, 1, _cr(body_part="EXTREMITY", study_description="",
                                            AcquisitionDeviceProcessingDescription="FOREARM",
                                            PerformedProcedureStepDescription="FOREARM 2 VIEWS"))
        _insert_old_row(conn, store, 2, _cr(body_part="CHEST", PatientSpeciesDescription="Felis catus",
                                            RequestAttributesSequence=_request_attributes("FELINE THORAX")))
        _insert_old_row(conn, store, 3, _cr(body_part="KNEE"))
        conn.execute(sa.text("UPDATE instances SET file_path = 'gone/3.dcm' WHERE id = 3"))  # a lost file
    engine.dispose()
    upgrade(db_url)
    engine = make_engine(db_url)
    with engine.connect() as conn:
        adpd = dict(conn.execute(sa.text("SELECT id, acquisition_device_processing_description FROM instances")).all())
        pps = dict(conn.execute(sa.text("SELECT id, performed_procedure_step_description FROM series")).all())
        species = dict(conn.execute(sa.text("SELECT id, patient_species_description FROM patients")).all())
        rpd = dict(conn.execute(sa.text("SELECT id, requested_procedure_description FROM studies")).all())
    engine.dispose()
    assert adpd == {1: "FOREARM", 2: None, 3: None}
    assert pps == {1: "FOREARM 2 VIEWS", 2: None, 3: None}
    assert species == {1: None, 2: "Felis catus", 3: None}
    assert rpd[2] == "FELINE THORAX"
    # the next relabel sees them
    from app.context import AppContext
    from tests.conftest import make_settings

    ctx = AppContext.build(make_settings(tmp_path, db_url))
    try:
        with ctx.sessions() as s:
            relabel_all(s)
            s.commit()
            labels = {i.id: (i.label_body_part, i.label_species) for i in s.scalars(select(Instance))}
    finally:
        ctx.close()
    assert labels == {1: ("FOREARM", None), 2: (None, "FELINE"), 3: ("KNEE", None)}


SITE_OVERLAY = "extends: builtin\nname: site-b\ntext:\n  body_part:\n    HAND: [HNAD]\n  laterality:\n    R: [MIGI]\n"


def _site_index(ctx) -> list[dict]:
    specs = [("", "HNAD RIGHT")] * 3 + [("", "HNAD MIGI")] * 2 + [("KNEE", "KNEE 2 VIEWS")] * 2 + [("CHEST", "CHEST PA")]
    recs = [extract_record(_cr(body_part=bp, study_description=d, series_description="", patient_id=f"S{i}"),
                           file_path=f"s/{i}.dcm") for i, (bp, d) in enumerate(specs)]
    with ctx.sessions() as s:
        ingest(s, recs, labeler=make_labeler(s))
        s.commit()
    return recs


def test_coverage_shows_the_sites_terms_and_an_overlay_closes_the_gap(any_ctx, tmp_path):
    recs = _site_index(any_ctx)
    with any_ctx.sessions() as s:
        rep = coverage(s, limit=10, examples=2)
        bp = rep["labels"]["body_part"]
        assert rep["instances"] == 8 and bp["missing"] == 5
        top = bp["values"][0]
        assert (top["source"], top["value"], top["count"]) == ("StudyDescription", "HNAD RIGHT", 3)
        assert len(top["examples"]) == 2 and set(top["examples"]) <= {r["sop_instance_uid"] for r in recs[:3]}
        lat = {v["value"]: v["count"] for v in rep["labels"]["laterality"]["values"]}
        assert lat == {"HNAD MIGI": 2, "KNEE 2 VIEWS": 2}  # CHEST is unpaired (NONE), not a gap
        views = {v["value"] for v in rep["labels"]["view"]["values"]}
        assert "KNEE 2 VIEWS" in views and "CHEST PA" not in views
        # the site's overlay, applied to the whole index by one relabel
        overlay = tmp_path / "site.yaml"
        overlay.write_text(SITE_OVERLAY, encoding="utf-8")
        stats = relabel_all(s, overlay)
        s.commit()
        assert stats["changed"] == 5 and stats["version"].startswith("site-b-")
        rep = coverage(s)
        assert rep["labels"]["body_part"]["missing"] == 0
        assert {v["value"] for v in rep["labels"]["laterality"]["values"]} == {"KNEE 2 VIEWS"}
        hands = s.scalars(select(Instance.label_laterality).where(Instance.label_body_part == "HAND")).all()
        assert sorted(hands) == ["R"] * 5


def _last_json(output: str) -> dict:
    # the CLI's log handler may still point at an earlier CliRunner's closed stream: skip its noise
    return json.loads([line for line in output.splitlines() if line.startswith("{")][-1])


def test_coverage_api_and_cli(ctx, client, monkeypatch, tmp_path):
    _site_index(ctx)
    r = client.get("/api/v1/labels/coverage", params={"label": "body_part", "limit": 1, "examples": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body["labels"]) == ["body_part"] and body["ruleset_version"].startswith("builtin-")
    assert body["labels"]["body_part"]["values"] == [
        {"source": "StudyDescription", "value": "HNAD RIGHT", "count": 3, "examples": [body["labels"]["body_part"][
            "values"][0]["examples"][0]]}]
    assert "Test^Patient" not in r.text and "PatientName" not in r.text
    r = client.get("/api/v1/labels/coverage", params={"label": "species"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "label", 0]
    assert client.get("/api/v1/labels/coverage", params={"limit": 0}).status_code == 422
    vocab = client.get("/api/v1/labels/vocabulary").json()["labels"]
    assert {"value": "KNEE", "code": "SCT:72696002", "meaning": "Knee"} in vocab["body_part"]
    r = client.post("/api/v1/labels/overlays/validate", content=SITE_OVERLAY.replace("HAND:", "HANDS:"),
                    headers={"Content-Type": "application/yaml"})
    assert r.status_code == 422
    (err,) = r.json()["detail"]
    assert err["line"] == 5 and err["loc"] == ["body", "text", "body_part", "HANDS"]
    r = client.post("/api/v1/labels/overlays/validate", content=SITE_OVERLAY,
                    headers={"Content-Type": "application/yaml"})
    assert r.status_code == 200 and r.json()["adds"] == {"text.body_part": 1, "text.laterality": 1}

    from app.cli import cli

    monkeypatch.setenv("RADCOHORT_DATABASE_URL", ctx.settings.database_url)
    monkeypatch.setenv("RADCOHORT_DATA_DIR", str(ctx.settings.data_dir))
    run = CliRunner().invoke
    r = run(cli, ["labels", "coverage", "--json", "--label", "laterality"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["labels"]["laterality"]["missing"] == 4
    r = run(cli, ["labels", "coverage"])
    assert r.exit_code == 0 and "'HNAD RIGHT'" in r.output
    assert run(cli, ["labels", "coverage", "--label", "sex"]).exit_code == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(SITE_OVERLAY + "colour: blue\n", encoding="utf-8")
    r = run(cli, ["labels", "validate-overlay", str(bad)])
    assert r.exit_code == 2 and f"{bad}:8:" in r.output and "colour" in r.output
    good = tmp_path / "good.yaml"
    good.write_text(SITE_OVERLAY, encoding="utf-8")
    assert run(cli, ["labels", "validate-overlay", str(good)]).exit_code == 0
    r = run(cli, ["labels", "relabel", "--rules", str(good)])  # the existing command applies an overlay
    assert r.exit_code == 0 and _last_json(r.output)["changed"] == 5
    r = run(cli, ["labels", "backfill"])
    assert r.exit_code == 0 and _last_json(r.output)["missing"] == 8  # no files here
    with ctx.sessions() as s:
        assert s.scalar(select(sa.func.count()).select_from(Patient)) == 8


def test_species_label_is_in_the_instance_listing(ctx, client):
    dog = _cr(body_part="CHEST", study_description="CANINE LATERAL THORAX", series_description="", patient_id="D1")
    dog.PatientSpeciesDescription = "Canine"
    human = _cr(body_part="CHEST", study_description="CHEST PA", series_description="", patient_id="H1")
    with ctx.sessions() as s:
        ingest(s, [extract_record(d, file_path=f"v/{i}.dcm") for i, d in enumerate((dog, human))],
               labeler=make_labeler(s))
        s.commit()
    items = {i["sop_instance_uid"]: i["labels"] for i in client.get("/api/v1/instances").json()["items"]}
    assert items[str(dog.SOPInstanceUID)]["species"] and items[str(dog.SOPInstanceUID)]["body_part"] is None
    assert items[str(human.SOPInstanceUID)]["species"] is None
    assert items[str(human.SOPInstanceUID)]["body_part"] == "CHEST"
